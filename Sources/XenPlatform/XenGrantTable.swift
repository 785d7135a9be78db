import CXenStableLibs
import Glibc
import Hypervisor
import SystemSupport
import XenABI

/// Grant operations over libxengnttab (/dev/xen/gntdev): `map` is
/// xengnttab_map_domain_grant_refs (an ioctl that reserves the grants, then
/// an mmap that makes the GNTTABOP_map_grant_ref hypercalls), `copy` is
/// xengnttab_grant_copy (one IOCTL_GNTDEV_GRANT_COPY, the kernel batching
/// GNTTABOP_copy hypercalls).
///
/// What the library does not tell: a map that fails reports only errno
/// (gntdev answers EINVAL when any reference's hypercall status was not
/// GNTST_okay), never which reference failed nor its GNTST_ code; so a
/// failed map's HypervisorError carries `grantStatus` GNTST_general_error.
///
/// Opened with a logger that drops messages: libxengnttab would otherwise
/// print every failed map or copy to stderr.
public final class XenGrantTable: GrantTableHandle, @unchecked Sendable {   // one thread at a time (each data-plane thread opens its own)
    private var handle: OpaquePointer?
    /// Scratch segments for `copy`, grown only when a larger batch comes.
    private var segments: UnsafeMutablePointer<xengnttab_grant_copy_segment_t>
    private var segmentCapacity: Int
    /// Where each segment came from in the caller's batch (segments whose
    /// arguments are refused here are left out of the library call).
    private var segmentSource: UnsafeMutablePointer<Int>

    /// Bound on one mapping; gntdev's own limit (module parameter `limit`) may be lower.
    public static let maxPagesPerMapping = 1024

    public init() throws(HypervisorError) {
        do {
            handle = try Syscall.retryingOnInterrupt("xengnttab_open", nonNil: { xengnttab_open(xb_xtl_quiet_logger(), 0) })
        } catch {
            throw HypervisorError(error.call, errno: error.code, detail: XenHypervisorPlatform.grantDevice)
        }
        segmentCapacity = 64
        segments = .allocate(capacity: segmentCapacity)
        segmentSource = .allocate(capacity: segmentCapacity)
    }

    deinit {
        close()
        segments.deallocate()
        segmentSource.deallocate()
    }

    /// Closes the handle. Mappings stay valid until unmapped (gntdev keeps
    /// them with the memory map), but no further call may be made.
    public func close() {
        guard let h = handle else { return }
        handle = nil
        xengnttab_close(h)
    }

    public func map(domain: DomID, refs: [GrantRef], writable: Bool) throws(HypervisorError) -> GrantMapping {
        guard let h = handle else { throw HypervisorError("grant map", errno: EBADF, detail: "handle closed") }
        guard !refs.isEmpty, refs.count <= Self.maxPagesPerMapping else {
            throw HypervisorError("grant map", errno: EINVAL, detail: "\(refs.count) references")
        }
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        // The library takes `uint32_t *refs` without const but only reads it.
        let address = refs.withUnsafeBufferPointer { r in
            xengnttab_map_domain_grant_refs(h, UInt32(r.count), UInt32(domain),
                                            UnsafeMutablePointer(mutating: r.baseAddress!), prot)
        }
        guard let address else {
            let e = errno
            throw HypervisorError("xengnttab_map_domain_grant_refs", errno: e, grantStatus: GrantStatus.generalError,
                                  detail: "dom\(domain), \(refs.count) ref(s) from \(refs[0])\(writable ? ", writable" : "")")
        }
        return GrantMapping(address: address, pageCount: refs.count, writable: writable,
                            token: UInt64(UInt(bitPattern: address)))
    }

    public func unmap(_ mapping: GrantMapping) {
        try? unmapChecked(mapping)
    }

    /// `unmap`, reporting xengnttab_unmap's failure (EINVAL: not a mapping of this handle).
    public func unmapChecked(_ mapping: GrantMapping) throws(HypervisorError) {
        guard let h = handle else { throw HypervisorError("xengnttab_unmap", errno: EBADF, detail: "handle closed") }
        _ = try xenLibraryCall("xengnttab_unmap", detail: "\(mapping.pageCount) page(s)") {
            xengnttab_unmap(h, mapping.address, UInt32(mapping.pageCount))
        }
    }

    private func reserve(_ count: Int) {
        guard count > segmentCapacity else { return }
        var capacity = segmentCapacity
        while capacity < count { capacity *= 2 }
        segments.deallocate()
        segmentSource.deallocate()
        segments = .allocate(capacity: capacity)
        segmentSource = .allocate(capacity: capacity)
        segmentCapacity = capacity
    }

    public func copy(_ operations: UnsafeMutableBufferPointer<GrantCopyOperation>) {
        guard let h = handle else {
            for i in operations.indices { operations[i].status = GrantStatus.generalError }
            return
        }
        reserve(operations.count)
        // gntdev refuses the WHOLE batch (EINVAL) when one segment leaves its
        // granted page, so such segments are answered here and left out.
        var n = 0
        for i in operations.indices {
            let op = operations[i]
            guard Int(op.guestOffset) + Int(op.length) <= XenPage.size else {
                operations[i].status = GrantStatus.badCopyArg
                continue
            }
            segments[n] = grantCopySegment(op)
            segmentSource[n] = i
            n += 1
        }
        guard n > 0 else { return }
        if xengnttab_grant_copy(h, UInt32(n), segments) != 0 {
            // The call failed as a whole (a local buffer the kernel cannot
            // pin: EFAULT; ENOMEM): the statuses written so far cannot be
            // told from stale ones, so each segment is retried alone.
            for k in 0..<n {
                if xengnttab_grant_copy(h, 1, segments + k) != 0 {
                    segments[k].status = GrantStatus.generalError
                }
            }
        }
        for k in 0..<n { operations[segmentSource[k]].status = segments[k].status }
    }
}

/// The libxengnttab segment for one grant copy: the guest's side is a
/// foreign (ref, offset, domid) and carries the GNTCOPY_*_gref flag; the
/// local side is a virtual address of this process. `status` starts as
/// GNTST_general_error so that a segment the kernel never reached is not
/// taken for a success.
@inline(__always)
func grantCopySegment(_ op: GrantCopyOperation) -> xengnttab_grant_copy_segment_t {
    let guest = xengnttab_copy_ptr(foreign: .init(ref: op.ref, offset: op.guestOffset, domid: op.domain))
    let local = xengnttab_copy_ptr(virt: op.local)
    switch op.direction {
    case .fromGuest:
        return xengnttab_grant_copy_segment_t(source: guest, dest: local, len: op.length,
                                              flags: UInt16(GNTCOPY_source_gref), status: GrantStatus.generalError)
    case .toGuest:
        return xengnttab_grant_copy_segment_t(source: local, dest: guest, len: op.length,
                                              flags: UInt16(GNTCOPY_dest_gref), status: GrantStatus.generalError)
    }
}
