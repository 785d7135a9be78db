import Hypervisor
import XenABI

/// blkif's persistent grants (feature-persistent): a frontend that offers
/// them reuses a fixed set of granted pages, so the backend maps each page
/// once, keeps it mapped while the ring is connected, and reads and writes
/// the guest's page directly (no copy). A fixed-size table, filled on first
/// use of each reference; when full, further references use grant copies.
struct PersistentGrants: ~Copyable {
    /// Reference to its place in `mapped`.
    private var places: FixedHashMap<Int32>
    /// The mappings in the order they were made: unmapping walks these, not the table.
    private let mapped: UnsafeMutablePointer<GrantMapping>
    private let capacity: Int
    private var request: [GrantRef] = [0]

    init(capacity: Int) {
        self.capacity = capacity
        places = FixedHashMap(capacity: capacity)
        mapped = .allocate(capacity: max(1, capacity))
    }

    deinit { mapped.deallocate() }

    var count: Int { places.count }

    /// The mapped page of `ref`, mapping it writable on first use. Nil when
    /// the reference cannot be mapped writable (the caller falls back to a
    /// grant copy, which then reports the grant's error) or the table is full.
    @inline(__always)
    mutating func page(_ ref: GrantRef, domain: DomID, grants: any GrantTableHandle) -> UnsafeMutableRawPointer? {
        if let p = places[UInt64(ref)] { return mapped[Int(p)].address }
        guard places.count < capacity else { return nil }
        request[0] = ref
        guard let m = try? grants.map(domain: domain, refs: request, writable: true) else { return nil }
        mapped[places.count] = m
        _ = places.insert(UInt64(ref), Int32(places.count))
        return m.address
    }

    /// Unmaps every page (the ring disconnects).
    mutating func unmapAll(_ grants: any GrantTableHandle) {
        for i in 0..<places.count { grants.unmap(mapped[i]) }
        places.removeAll()
    }
}
