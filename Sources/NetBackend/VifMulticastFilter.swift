import CXenBackSupport
import Synchronization

/// The guest's multicast filter (netif.h's feature-multicast-control): one
/// per vif, shared by its queues. The guest edits it with MCAST_ADD and
/// MCAST_DEL extra slots on any tx ring; every rx queue consults it for
/// each multicast frame. Edits are rare and take a lock; lookups take
/// none: each entry is one atomic word, so a lookup racing an edit sees
/// the entry before or after it, as if the frame had come a moment
/// earlier or later.
public final class VifMulticastFilter: @unchecked Sendable {   // entries accessed atomically; edits under `editing`
    /// Linux netback's XEN_NETBK_MCAST_MAX.
    public static let capacity = 64
    /// The guest asked for filtering (`request-multicast-control` at
    /// Connected); without it multicast frames are flooded to it, and its
    /// edits still kept (netif.h).
    /// The guest may turn it on and off while connected
    /// (feature-dynamic-multicast-control): one atomic word, read per frame.
    public var enabled: Bool { xb_load_acquire_u32(enabledWord) != 0 }
    private let enabledWord = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    /// 0: free; otherwise the address in the low 48 bits and bit 63 set.
    private let entries = UnsafeMutablePointer<UInt64>.allocate(capacity: capacity)
    private let editing = Mutex<Void>(())

    public init(enabled: Bool) {
        enabledWord.initialize(to: enabled ? 1 : 0)
        entries.initialize(repeating: 0, count: Self.capacity)
    }

    deinit { entries.deallocate(); enabledWord.deallocate() }

    /// The guest changed `request-multicast-control` under the connection;
    /// the addresses it added are kept either way (Linux netback too).
    public func setEnabled(_ on: Bool) { xb_store_release_u32(enabledWord, on ? 1 : 0) }

    /// The six bytes at `p` as a filter key.
    @inline(__always)
    public static func key(_ p: UnsafeRawPointer) -> UInt64 {
        var k: UInt64 = 1 << 63
        for i in 0..<6 { k |= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << (8 * UInt64(5 - i)) }
        return k
    }

    /// Adds an address; false when the filter is full (the guest's request
    /// is answered NETIF_RSP_ERROR, as netback does).
    public func add(_ key: UInt64) -> Bool {
        editing.withLock { _ in
            var free = -1
            for i in 0..<Self.capacity {
                let e = xb_load_acquire_u64(entries + i)
                if e == key { return true }
                if e == 0 && free < 0 { free = i }
            }
            guard free >= 0 else { return false }
            xb_store_release_u64(entries + free, key)
            return true
        }
    }

    public func remove(_ key: UInt64) {
        editing.withLock { _ in
            for i in 0..<Self.capacity where xb_load_acquire_u64(entries + i) == key {
                xb_store_release_u64(entries + i, 0)
            }
        }
    }

    @inline(__always)
    public func contains(_ key: UInt64) -> Bool {
        for i in 0..<Self.capacity where xb_load_acquire_u64(entries + i) == key { return true }
        return false
    }

    public var count: Int { (0..<Self.capacity).filter { xb_load_acquire_u64(entries + $0) != 0 }.count }

    /// Whether a frame for `destination` (its first six bytes) reaches the
    /// guest: unicast and broadcast always; multicast when filtering is off
    /// or the address is in the filter.
    @inline(__always)
    public func admits(destination p: UnsafeRawPointer) -> Bool {
        guard enabled, p.load(as: UInt8.self) & 1 != 0 else { return true }
        let k = Self.key(p)
        if k == (1 << 63 | 0xFFFF_FFFF_FFFF) { return true }   // broadcast
        return contains(k)
    }
}
