import CXenBackSupport
import Glibc
import Hypervisor
import XenABI

/// A guest domain as the backend sees it: its grant table and its memory.
final class GrantingDomain: @unchecked Sendable {   // immutable; the mappings are shared by design
    let domain: DomID
    let grants: SharedFile
    let memory: SharedFile
    let entryCount: UInt32
    let pageCount: UInt32

    init(layout: LoopbackLayout, domain: DomID) throws(HypervisorError) {
        guard access(layout.grantTable(domain), F_OK) == 0 else {
            throw HypervisorError("grant", errno: ESRCH, grantStatus: GrantStatus.badDomain, detail: "no domain \(domain)")
        }
        self.domain = domain
        grants = try SharedFile(path: layout.grantTable(domain), operation: "open grant table")
        memory = try SharedFile(path: layout.memory(domain), operation: "open domain memory")
        entryCount = UInt32(grants.length / GrantEntryV1.size)
        pageCount = UInt32(memory.length / XenPage.size)
    }

    /// Checks grant `ref` as Xen's grant code does before a map or copy:
    /// in range, GTF_permit_access for `grantee`, writable if `write`, and a
    /// frame inside the domain's memory. Returns the frame or a GNTST_ code.
    @inline(__always)
    func validate(ref: GrantRef, grantee: DomID, write: Bool) -> (status: Int16, frame: UInt32) {
        guard ref < entryCount else { return (GrantStatus.badGntref, 0) }
        let entry = grants.base + Int(ref) * GrantEntryV1.size
        let flags = xb_load_acquire_u16(entry + GrantEntryV1.Offset.flags)   // then domid/frame, as Xen reads them
        let domid = xb_load_acquire_u16(entry + GrantEntryV1.Offset.domid)
        let frame = xb_load_acquire_u32(entry + GrantEntryV1.Offset.frame)
        guard flags & GrantFlags.typeMask == GrantFlags.permitAccess, domid == grantee else {
            return (GrantStatus.generalError, 0)
        }
        if write && flags & GrantFlags.readonly != 0 { return (GrantStatus.generalError, 0) }
        guard frame < pageCount else { return (GrantStatus.badPage, 0) }
        return (GrantStatus.okay, frame)
    }

    @inline(__always)
    func page(_ frame: UInt32) -> UnsafeMutableRawPointer { memory.base + Int(frame) * XenPage.size }
}

/// The loopback hypervisor's grant operations for one mapping domain (the
/// backend, normally dom0): maps grants with mmap of the granting domain's
/// memory file, copies with memcpy after the same checks Xen makes.
public final class LoopbackGrantTable: GrantTableHandle, @unchecked Sendable {   // one thread at a time
    private let layout: LoopbackLayout
    public let ownDomain: DomID
    private var domains: [DomID: GrantingDomain] = [:]
    private var lastDomain: GrantingDomain?
    private var mappings: [UInt64: (GrantingDomain, Int)] = [:]
    /// Bound on one batch, as gntdev bounds its mappings.
    public static let maxPagesPerMapping = 1024

    public init(layout: LoopbackLayout, ownDomain: DomID) {
        self.layout = layout
        self.ownDomain = ownDomain
    }

    private func granting(_ d: DomID) -> GrantingDomain? {
        if let last = lastDomain, last.domain == d { return last }
        if let known = domains[d] { lastDomain = known; return known }
        guard let opened = try? GrantingDomain(layout: layout, domain: d) else { return nil }
        domains[d] = opened
        lastDomain = opened
        return opened
    }

    /// Forgets a domain's files (after it was destroyed).
    public func forget(domain d: DomID) {
        domains[d] = nil
        if lastDomain?.domain == d { lastDomain = nil }
    }

    public func map(domain: DomID, refs: [GrantRef], writable: Bool) throws(HypervisorError) -> GrantMapping {
        guard !refs.isEmpty, refs.count <= Self.maxPagesPerMapping else {
            throw HypervisorError("grant map", errno: EINVAL, detail: "\(refs.count) references")
        }
        guard let g = granting(domain) else {
            throw HypervisorError("grant map", errno: ESRCH, grantStatus: GrantStatus.badDomain, detail: "dom\(domain)")
        }
        var frames: [UInt32] = []
        for ref in refs {
            let (status, frame) = g.validate(ref: ref, grantee: ownDomain, write: writable)
            guard status == GrantStatus.okay else {
                throw HypervisorError("grant map", errno: EINVAL, grantStatus: status,
                                      detail: "dom\(domain) ref \(ref): \(GrantStatus.name(status))")
            }
            frames.append(frame)
        }
        let length = refs.count * XenPage.size
        // Reserve a contiguous range, then place each granted page in it.
        guard let region = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), region != MAP_FAILED else {
            throw HypervisorError("grant map", errno: errno, grantStatus: GrantStatus.noSpace)
        }
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        for (i, frame) in frames.enumerated() {
            let page = mmap(region + i * XenPage.size, XenPage.size, prot, MAP_SHARED | MAP_FIXED,
                            g.memory.fd, off_t(Int(frame) * XenPage.size))
            if page == MAP_FAILED {
                let e = errno
                munmap(region, length)
                throw HypervisorError("grant map", errno: e, grantStatus: GrantStatus.generalError)
            }
        }
        let token = UInt64(UInt(bitPattern: region))
        mappings[token] = (g, refs.count)
        return GrantMapping(address: region, pageCount: refs.count, writable: writable, token: token)
    }

    public func unmap(_ mapping: GrantMapping) {
        guard mappings.removeValue(forKey: mapping.token) != nil else { return }
        munmap(mapping.address, mapping.pageCount * XenPage.size)
    }

    public func copy(_ operations: UnsafeMutableBufferPointer<GrantCopyOperation>) {
        // A batch is nearly always one domain's: look it up once, and hold
        // it for the whole batch (no reference counting per operation).
        var current: GrantingDomain?
        for i in operations.indices {
            let op = operations[i]
            guard Int(op.guestOffset) + Int(op.length) <= XenPage.size else {
                operations[i].status = GrantStatus.badCopyArg
                continue
            }
            if current?.domain != op.domain { current = granting(op.domain) }
            guard let g = current else {
                operations[i].status = GrantStatus.badDomain
                continue
            }
            let toGuest = op.direction == .toGuest
            let (status, frame) = g.validate(ref: op.ref, grantee: ownDomain, write: toGuest)
            operations[i].status = status
            guard status == GrantStatus.okay else { continue }
            let guestBytes = g.page(frame) + Int(op.guestOffset)
            if toGuest {
                memcpy(guestBytes, op.local, Int(op.length))
            } else {
                memcpy(op.local, guestBytes, Int(op.length))
            }
        }
    }
}
