import Glibc
import SystemSupport

/// Holds threads until `open()`, then lets all of them go at once: how
/// `bench scale` starts every guest at the same moment.
final class StartGate: @unchecked Sendable {   // `isOpen`, `waiting` only under `condition`
    private let condition = Condition()
    private var isOpen = false
    private var waiting = 0

    func wait() {
        condition.withLock {
            waiting += 1
            while !isOpen { condition.wait() }
        }
    }

    /// Threads waiting now.
    var waitingCount: Int { condition.withLock { waiting } }

    func open() {
        condition.withLock {
            isOpen = true
            condition.broadcast()
        }
    }
}

/// Runs `body(i)` for each of `count` items on a thread of its own, all
/// released at the same moment, and returns when all are done. `progress`
/// is called about once a second with how many are done.
func runAtOnce(_ count: Int, name: String, progress: (Int) -> Void = { _ in },
               _ body: @escaping @Sendable (Int) -> Void) throws -> (released: Double, finished: Double) {
    let gate = StartGate()
    let done = DoneCount()
    var threads: [NativeThread] = []
    for i in 0..<count {
        threads.append(try NativeThread(name: "\(name)-\(i)") {
            gate.wait()
            body(i)
            done.increment()
        })
    }
    while gate.waitingCount < count { usleep(1_000) }
    let released = MonotonicClock.seconds()
    gate.open()
    var lastReport = released
    while true {
        let n = done.value
        if n == count { break }
        if MonotonicClock.seconds() - lastReport >= 1 {
            progress(n)
            lastReport = MonotonicClock.seconds()
        }
        usleep(20_000)
    }
    let end = MonotonicClock.seconds()
    for t in threads { t.join() }
    return (released, end)
}

/// A count of finished threads.
final class DoneCount: @unchecked Sendable {   // `count` only under `lock`
    private let lock = PThreadMutex()
    private var count = 0
    func increment() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}
