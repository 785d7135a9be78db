import CXenBackSupport
import Glibc
import Hypervisor
import XenABI
import SystemSupport

/// A simulated guest domain on the loopback hypervisor: its memory, its
/// grant table and its event channels, as a guest kernel would use them.
/// This is the frontend's side; the backend reaches the same files through
/// LoopbackGrantTable and LoopbackEventChannels.
public final class LoopbackGuestDomain: @unchecked Sendable {   // page/grant allocation is locked; memory is shared by design
    public let domain: DomID
    public let layout: LoopbackLayout
    private let memory: SharedFile
    private let grants: SharedFile
    public let pageCount: Int
    public let grantCount: Int
    private let lock = PThreadMutex()
    private var freePages: [UInt32]
    private var freeGrants: [GrantRef]

    /// Creates the domain's files (replacing any left from an earlier run).
    public init(layout: LoopbackLayout, domain: DomID, memoryPages: Int = 16384, grantEntries: Int = 8192) throws(HypervisorError) {
        precondition(domain != 0, "dom0 is the backend's domain")
        self.layout = layout
        self.domain = domain
        let dir = layout.domainDirectory(domain)
        do { try makeDirectories(dir, mode: 0o700) } catch {
            throw HypervisorError("create domain folder", errno: error.code, detail: error.call)
        }
        for f in [layout.memory(domain), layout.grantTable(domain), layout.eventChannels(domain)] { unlink(f) }
        memory = try SharedFile(path: layout.memory(domain), createLength: memoryPages * XenPage.size, operation: "create domain memory")
        grants = try SharedFile(path: layout.grantTable(domain), createLength: grantEntries * GrantEntryV1.size, operation: "create grant table")
        _ = try EventChannelTable(path: layout.eventChannels(domain), create: true)
        pageCount = memoryPages
        grantCount = grantEntries
        freePages = (0..<UInt32(memoryPages)).reversed()
        // Grant references 0..7 are reserved on Xen (GNTTAB_NR_RESERVED_ENTRIES).
        freeGrants = (8..<GrantRef(grantEntries)).reversed()
    }

    /// Removes the domain's files.
    public func destroy() {
        for f in [layout.memory(domain), layout.grantTable(domain), layout.eventChannels(domain)] { unlink(f) }
        rmdir(layout.domainDirectory(domain))
    }

    // MARK: memory

    public func allocatePage() throws(HypervisorError) -> UInt32 {
        guard let p = lock.withLock({ freePages.popLast() }) else {
            throw HypervisorError("allocate page", errno: ENOMEM, detail: "dom\(domain) memory is full")
        }
        return p
    }

    public func freePage(_ frame: UInt32) { lock.withLock { freePages.append(frame) } }

    /// The guest's view of one of its pages.
    public func page(_ frame: UInt32) -> UnsafeMutableRawPointer {
        precondition(frame < pageCount)
        return memory.base + Int(frame) * XenPage.size
    }

    // MARK: grants

    /// gnttab_grant_foreign_access: lets `grantee` map or copy `frame`.
    public func grantAccess(frame: UInt32, to grantee: DomID, readOnly: Bool) throws(HypervisorError) -> GrantRef {
        guard let ref = lock.withLock({ freeGrants.popLast() }) else {
            throw HypervisorError("grant", errno: ENOSPC, detail: "dom\(domain) grant table is full")
        }
        setEntry(ref, GrantEntryV1(flags: GrantFlags.permitAccess | (readOnly ? GrantFlags.readonly : 0),
                                   domid: grantee, frame: frame))
        return ref
    }

    /// gnttab_end_foreign_access: revokes a grant and frees its reference.
    public func endAccess(_ ref: GrantRef) {
        setEntry(ref, GrantEntryV1(flags: GrantFlags.invalid, domid: 0, frame: 0))
        lock.withLock { freeGrants.append(ref) }
    }

    /// Writes a raw grant entry: domid and frame first, then flags, as Xen
    /// requires. Tests use it to forge hostile entries.
    public func setEntry(_ ref: GrantRef, _ e: GrantEntryV1) {
        precondition(Int(ref) < grantCount)
        let p = grants.base + Int(ref) * GrantEntryV1.size
        xb_store_release_u16(p + GrantEntryV1.Offset.domid, e.domid)
        xb_store_release_u32(p + GrantEntryV1.Offset.frame, e.frame)
        xb_wmb()
        xb_store_release_u16(p + GrantEntryV1.Offset.flags, e.flags)
    }

    // MARK: event channels

    public func openEventChannels() throws(HypervisorError) -> LoopbackEventChannels {
        try LoopbackEventChannels(layout: layout, domain: domain)
    }
}
