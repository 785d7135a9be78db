/// The ids of requests in flight on one ring, to refuse a duplicate id
/// (the frontend could otherwise not tell two responses apart).
struct InFlightIDs: ~Copyable {
    private var ids: FixedHashMap<Bool>

    init(capacity: Int) { ids = FixedHashMap(capacity: capacity) }

    var count: Int { ids.count }

    /// Inserts `id`; false if it is already in flight.
    @inline(__always)
    mutating func insert(_ id: UInt64) -> Bool { ids.insert(id, true) }

    @inline(__always)
    mutating func remove(_ id: UInt64) { ids.remove(id) }

    func contains(_ id: UInt64) -> Bool { ids[id] != nil }
}
