/// The ids of requests in flight on one ring, to refuse a duplicate id
/// (the frontend could otherwise not tell two responses apart). A fixed
/// open-addressing table sized at twice the ring: no allocation after init.
struct InFlightIDs: ~Copyable {
    private let keys: UnsafeMutablePointer<UInt64>
    private let used: UnsafeMutablePointer<Bool>
    private let mask: Int
    private(set) var count = 0

    init(capacity: Int) {
        var size = 8
        while size < capacity * 2 { size *= 2 }
        keys = .allocate(capacity: size)
        keys.initialize(repeating: 0, count: size)
        used = .allocate(capacity: size)
        used.initialize(repeating: false, count: size)
        mask = size - 1
    }

    deinit {
        keys.deallocate()
        used.deallocate()
    }

    @inline(__always)
    private func home(_ id: UInt64) -> Int { Int(truncatingIfNeeded: (id &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask }

    /// Inserts `id`; false if it is already in flight.
    @inline(__always)
    mutating func insert(_ id: UInt64) -> Bool {
        var i = home(id)
        while used[i] {
            if keys[i] == id { return false }
            i = (i + 1) & mask
        }
        precondition(count < mask, "more ids in flight than the ring holds")
        used[i] = true
        keys[i] = id
        count += 1
        return true
    }

    /// Removes `id` (backward-shift deletion keeps probe chains intact).
    @inline(__always)
    mutating func remove(_ id: UInt64) {
        var i = home(id)
        while used[i] {
            if keys[i] == id { break }
            i = (i + 1) & mask
        }
        guard used[i] else { return }
        var hole = i
        var j = (i + 1) & mask
        while used[j] {
            let h = home(keys[j])
            // Move j into the hole if its home is not in (hole, j] cyclically.
            let inRange = hole <= j ? (h > hole && h <= j) : (h > hole || h <= j)
            if !inRange {
                keys[hole] = keys[j]
                hole = j
            }
            j = (j + 1) & mask
        }
        used[hole] = false
        count -= 1
    }

    func contains(_ id: UInt64) -> Bool {
        var i = home(id)
        while used[i] {
            if keys[i] == id { return true }
            i = (i + 1) & mask
        }
        return false
    }
}
