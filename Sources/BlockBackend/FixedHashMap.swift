/// A hash map of UInt64 keys with a capacity fixed at creation: open
/// addressing, linear probing, backward-shift deletion. Nothing is
/// allocated after init, so the data path can use it per request.
struct FixedHashMap<Value: BitwiseCopyable>: ~Copyable {
    // Keys and values are left uninitialised: only `used` says which
    // entries hold one, so creating a table costs one zeroed byte per
    // entry (an engine is created per ring connect, and per run under the
    // fuzzer, where initialising a 16384-entry table took a fifth of it).
    private let keys: UnsafeMutablePointer<UInt64>
    private let values: UnsafeMutablePointer<Value>
    private let used: UnsafeMutablePointer<Bool>
    private let mask: Int
    /// Entries it may hold (the table itself is at least twice as large).
    let capacity: Int
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        var size = 8
        while size < capacity * 2 { size *= 2 }
        keys = .allocate(capacity: size)
        values = .allocate(capacity: size)
        used = .allocate(capacity: size)
        used.initialize(repeating: false, count: size)
        mask = size - 1
    }

    deinit {
        used.deallocate()
        values.deallocate()
        keys.deallocate()
    }

    @inline(__always)
    private func home(_ key: UInt64) -> Int { Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask }

    /// The slot holding `key`, or the empty slot where it would go.
    @inline(__always)
    private func find(_ key: UInt64) -> Int {
        var i = home(key)
        while used[i] && keys[i] != key { i = (i + 1) & mask }
        return i
    }

    @inline(__always)
    subscript(key: UInt64) -> Value? {
        let i = find(key)
        return used[i] ? values[i] : nil
    }

    /// Inserts `key`; false if it is already present or the map is full.
    @inline(__always)
    mutating func insert(_ key: UInt64, _ value: Value) -> Bool {
        let i = find(key)
        guard !used[i], count < capacity else { return false }
        keys[i] = key
        values[i] = value
        used[i] = true
        count += 1
        return true
    }

    /// Removes `key` and returns its value; later entries of the probe
    /// chain shift back so that lookups stay correct.
    @discardableResult
    @inline(__always)
    mutating func remove(_ key: UInt64) -> Value? {
        var hole = find(key)
        guard used[hole] else { return nil }
        let removed = values[hole]
        var j = (hole + 1) & mask
        while used[j] {
            let h = home(keys[j])
            // j may fill the hole unless its home lies cyclically in (hole, j].
            let staysPut = hole <= j ? (h > hole && h <= j) : (h > hole || h <= j)
            if !staysPut {
                keys[hole] = keys[j]
                values[hole] = values[j]
                hole = j
            }
            j = (j + 1) & mask
        }
        used[hole] = false
        count -= 1
        return removed
    }

    /// Empties the map.
    mutating func removeAll() {
        used.update(repeating: false, count: mask + 1)
        count = 0
    }
}
