import CXenBackSupport
import Glibc

/// A joinable POSIX thread running one closure. The data planes, the
/// control loop, xenstored and the clients' readers each get one.
public final class NativeThread: @unchecked Sendable {  // `thread` is written once, in init, before any other use
    private var thread = pthread_t()

    private final class Body {
        let name: String?
        let run: @Sendable () -> Void
        init(_ name: String?, _ run: @escaping @Sendable () -> Void) { self.name = name; self.run = run }
    }

    /// Starts `body` on a new thread named `name` (shown by top -H and gdb).
    public init(name: String? = nil, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        let context = Unmanaged.passRetained(Body(name, body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let body = Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue()
            if let name = body.name { name.withCString { xb_set_thread_name($0) } }
            body.run()
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<Body>.fromOpaque(context).release()
            throw SystemError("pthread_create", errno: rc)
        }
    }

    /// True when called on this thread (joining oneself would deadlock).
    public var isCurrent: Bool { pthread_equal(pthread_self(), thread) != 0 }

    public func join() {
        pthread_join(thread, nil)
    }

    /// Lets the thread's resources go when it ends, with no join (a thread
    /// that leaves on its own, such as an idle worker).
    public func detach() {
        pthread_detach(thread)
    }
}

/// A pthread mutex. Synchronization's Mutex would do as well, but on Linux it
/// waits on futexes that ThreadSanitizer cannot see, so it would report every
/// access it guards as a race.
public final class PThreadMutex: @unchecked Sendable {  // the pthread mutex is heap-allocated so it never moves; it synchronises itself
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init() { pthread_mutex_init(mutex, nil) }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// A value handed from one thread to another that waits for it.
public final class Handoff<T>: @unchecked Sendable {   // `value` guarded by `condition`
    private let condition = Condition()
    private var value: T?

    public init() {}

    public func put(_ v: T) {
        condition.withLock {
            value = v
            condition.broadcast()
        }
    }

    public func take() -> T {
        condition.withLock {
            while value == nil { condition.wait() }
            return value!
        }
    }
}
