import CXenBackSupport
import Glibc

/// Starts `body` on its own OS thread (one per ring: the data plane never
/// shares a thread with the control plane or another ring).
final class DataPlaneThread: @unchecked Sendable {   // `thread` is set once before use
    private var thread = pthread_t()
    private let body: () -> Void
    private let name: String

    init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }

    func start() {
        let box = Unmanaged.passRetained(self)
        let rc = pthread_create(&thread, nil, { raw in
            let me = Unmanaged<DataPlaneThread>.fromOpaque(raw!).takeRetainedValue()
            me.name.withCString { xb_set_thread_name($0) }
            me.body()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    func join() {
        pthread_join(thread, nil)
    }
}

/// An eventfd used to wake a thread's epoll loop from another thread.
struct Wakeup: Sendable {
    let fd: Int32
    init() {
        fd = xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC)
        precondition(fd >= 0, "eventfd failed: \(errno)")
    }
    func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }
    func drain() {
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
    }
    func close() { Glibc.close(fd) }
}
