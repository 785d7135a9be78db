import Glibc

/// A pthread mutex and condition variable, for threads that block until
/// another one changes shared state (Synchronization's Mutex cannot wait).
public final class Condition: @unchecked Sendable {  // the pthread objects are heap-allocated so they never move; they synchronise themselves
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits for `broadcast()`; call only inside `withLock`.
    public func wait() {
        pthread_cond_wait(condition, mutex)
    }

    /// Waits for `broadcast()` or until `seconds` have passed; call only
    /// inside `withLock`. Returns false on the timeout.
    public func wait(seconds: Int) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_sec += seconds
        return pthread_cond_timedwait(condition, mutex, &deadline) != ETIMEDOUT
    }

    public func broadcast() {
        pthread_cond_broadcast(condition)
    }
}
