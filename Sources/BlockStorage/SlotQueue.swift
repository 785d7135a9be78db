/// A first-in first-out queue of operation slots with room for every slot
/// of a storage (so it never overflows): the operations that finished
/// outside the kernel's completion queue, waiting to be reaped. Allocated
/// once; push and pop do not allocate.
struct SlotQueue: ~Copyable {
    private let entries: UnsafeMutablePointer<Int32>
    private let capacity: Int
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        entries = .allocate(capacity: capacity)
        entries.initialize(repeating: 0, count: capacity)
    }

    deinit { entries.deallocate() }

    @inline(__always)
    mutating func push(_ slot: Int) {
        precondition(count < capacity, "more finished operations than slots")
        var tail = head + count
        if tail >= capacity { tail -= capacity }
        entries[tail] = Int32(slot)
        count += 1
    }

    @inline(__always)
    mutating func pop() -> Int? {
        guard count > 0 else { return nil }
        let slot = Int(entries[head])
        head = head + 1 == capacity ? 0 : head + 1
        count -= 1
        return slot
    }
}
