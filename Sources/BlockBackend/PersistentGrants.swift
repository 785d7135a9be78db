import Hypervisor
import XenABI

/// blkif's persistent grants (feature-persistent): a frontend that offers
/// them reuses a fixed set of granted pages, so the backend maps each page
/// once, keeps it mapped while the ring is connected, and reads and writes
/// the guest's page directly (no copy). A fixed-size table, filled on first
/// use of each reference; when full, further references use grant copies.
struct PersistentGrants: ~Copyable {
    private var mappings: FixedHashMap<GrantMapping>
    private var request: [GrantRef] = [0]

    init(capacity: Int) {
        mappings = FixedHashMap(capacity: capacity)
    }

    var count: Int { mappings.count }

    /// The mapped page of `ref`, mapping it writable on first use. Nil when
    /// the reference cannot be mapped writable (the caller falls back to a
    /// grant copy, which then reports the grant's error) or the table is full.
    @inline(__always)
    mutating func page(_ ref: GrantRef, domain: DomID, grants: any GrantTableHandle) -> UnsafeMutableRawPointer? {
        if let m = mappings[UInt64(ref)] { return m.address }
        guard mappings.count < mappings.capacity else { return nil }
        request[0] = ref
        guard let m = try? grants.map(domain: domain, refs: request, writable: true) else { return nil }
        _ = mappings.insert(UInt64(ref), m)
        return m.address
    }

    /// Unmaps every page (the ring disconnects).
    mutating func unmapAll(_ grants: any GrantTableHandle) {
        mappings.removeAll { grants.unmap($0) }
    }
}
