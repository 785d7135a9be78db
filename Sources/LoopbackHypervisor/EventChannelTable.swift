import CXenBackSupport
import Glibc
import Hypervisor

/// One domain's event channel ports in shared memory. Every field is read
/// and written with atomics: several processes use the table at once.
///
/// Layout (little-endian u32 fields):
///   header, 64 bytes: magic "XBEV", version 1, port count, next handle id
///   entry p at 64 + 32*p: state, remote domain, remote port, handle,
///                         pending, masked (then 8 bytes of padding)
/// Port 0 is never allocated, as on Xen.
final class EventChannelTable: @unchecked Sendable {   // shared memory; all access atomic
    static let magic: UInt32 = 0x5645_4258          // "XBEV"
    static let version: UInt32 = 1
    static let defaultPortCount: UInt32 = 1024
    static let headerSize = 64
    static let entrySize = 32

    enum State: UInt32 { case free = 0, unbound = 1, interdomain = 2, busy = 3 }
    enum Field: Int { case state = 0, remoteDomain = 4, remotePort = 8, handle = 12, pending = 16, masked = 20 }

    let file: SharedFile
    let portCount: UInt32

    /// Opens a domain's table, creating and formatting it if `create`.
    init(path: String, create: Bool) throws(HypervisorError) {
        let size = Self.headerSize + Self.entrySize * Int(Self.defaultPortCount)
        file = try SharedFile(path: path, createLength: create ? size : nil, operation: "open event channel table")
        let base = file.base
        var expected: UInt32 = 0
        if xb_cas_u32(base, &expected, Self.magic) != 0 {
            Self.formatHeader(base)
        } else if expected != Self.magic {
            throw HypervisorError("open event channel table", errno: EINVAL, detail: "\(path): bad magic")
        }
        // Another process may have just won the race to format it.
        while xb_load_acquire_u32(base + 8) == 0 { sched_yield() }
        portCount = min(xb_load_acquire_u32(base + 8), UInt32((file.length - Self.headerSize) / Self.entrySize))
    }

    /// Fills in a header whose magic the caller has just claimed. The
    /// number of ports goes last, with a release store: another opener
    /// waits for it (acquire) and then finds the version and the
    /// next-handle counter stored, so its first handle cannot be 0 (a
    /// fetch-add on a counter not yet stored, then overwritten by it).
    /// `stored` runs after each store (tests look at the header there).
    static func formatHeader(_ base: UnsafeMutableRawPointer, stored: () -> Void = {}) {
        xb_store_release_u32(base + 4, version)
        stored()
        xb_store_release_u32(base + 12, 1)   // the next handle id; 0 is never given
        stored()
        xb_store_release_u32(base + 8, defaultPortCount)
        stored()
    }

    @inline(__always)
    func field(_ port: EventChannelPort, _ f: Field) -> UnsafeMutableRawPointer {
        file.base + Self.headerSize + Int(port) * Self.entrySize + f.rawValue
    }

    @inline(__always) func load(_ port: EventChannelPort, _ f: Field) -> UInt32 { xb_load_acquire_u32(field(port, f)) }
    @inline(__always) func store(_ port: EventChannelPort, _ f: Field, _ v: UInt32) { xb_store_release_u32(field(port, f), v) }
    @inline(__always) func cas(_ port: EventChannelPort, _ f: Field, from: UInt32, to: UInt32) -> Bool {
        var e = from
        return xb_cas_u32(field(port, f), &e, to) != 0
    }

    func isValid(_ port: EventChannelPort) -> Bool { port > 0 && port < portCount }

    /// A fresh handle id, unique within this domain.
    func allocateHandleID() -> UInt32 { xb_fetch_add_u32(file.base + 12, 1) }

    /// Claims a free port, leaving it `busy` for the caller to fill in.
    func claimFreePort() throws(HypervisorError) -> EventChannelPort {
        for p in 1..<portCount where cas(p, .state, from: State.free.rawValue, to: State.busy.rawValue) {
            store(p, .pending, 0)
            store(p, .masked, 0)
            return p
        }
        throw HypervisorError("allocate event channel", errno: ENOSPC, detail: "no free port")
    }

    func release(_ port: EventChannelPort) {
        store(port, .handle, 0)
        store(port, .remoteDomain, 0)
        store(port, .remotePort, 0)
        store(port, .state, State.free.rawValue)
    }
}
