import CXenBackSupport
import Glibc
import Hypervisor
import Logging

/// The control plane's single thread (xenwatch in Linux terms): it waits
/// on xenstore watch events and on tasks posted by other threads, and runs
/// every handler itself, so device state machines need no locks.
public final class XenbusControlLoop: @unchecked Sendable {   // handlers and tasks guarded by `lock`; run on the loop thread
    public typealias WatchHandler = (XenStoreWatchEvent) -> Void
    public let store: any XenStore
    private let logger: Logger
    private var lock = pthread_mutex_t()
    private var handlers: [String: WatchHandler] = [:]
    private var tasks: [() -> Void] = []
    private var nextToken = 0
    private let wakeFD: Int32
    private var stopRequested = false

    public init(store: any XenStore, logger: Logger) {
        self.store = store
        self.logger = logger
        pthread_mutex_init(&lock, nil)
        wakeFD = xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC)
        precondition(wakeFD >= 0, "eventfd failed")
    }

    deinit {
        Glibc.close(wakeFD)
        pthread_mutex_destroy(&lock)
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        return body()
    }

    /// Watches `path`; `handler` runs on the loop thread for the initial
    /// firing and every later change at or below `path`. Returns the token.
    @discardableResult
    public func watch(_ path: String, handler: @escaping WatchHandler) throws(XenStoreError) -> String {
        let token: String = locked {
            nextToken += 1
            let t = "xenbackd-\(nextToken)"
            handlers[t] = handler
            return t
        }
        do { try store.watch(path, token: token) } catch {
            locked { handlers[token] = nil }
            throw error
        }
        return token
    }

    public func unwatch(_ path: String, token: String) {
        locked { handlers[token] = nil }
        try? store.unwatch(path, token: token)
    }

    /// Runs `task` on the loop thread soon. Callable from any thread.
    public func post(_ task: @escaping @Sendable () -> Void) {
        locked { tasks.append(task) }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Makes `run()` return after the current event. Callable from any thread.
    public func requestStop() {
        locked { stopRequested = true }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Serves watch events and tasks until `requestStop()`.
    public func run() {
        var fds = [pollfd(fd: store.watchFileDescriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
        while true {
            if locked({ stopRequested }) { return }
            let n = poll(&fds, 2, -1)
            if n < 0 && errno != EINTR {
                logger.error("control loop poll failed", metadata: ["errno": "\(errno)"])
                return
            }
            if fds[1].revents != 0 {
                var v: UInt64 = 0
                _ = read(wakeFD, &v, 8)
            }
            runTasks()
            dispatchWatchEvents()
        }
    }

    private func runTasks() {
        let pending: [() -> Void] = locked {
            let t = tasks
            tasks.removeAll()
            return t
        }
        for t in pending { t() }
    }

    private func dispatchWatchEvents() {
        while true {
            let event: XenStoreWatchEvent?
            do { event = try store.nextWatchEvent() } catch {
                logger.error("reading xenstore watch events failed", metadata: ["error": "\(error)"])
                return
            }
            guard let event else { return }
            if let h = locked({ handlers[event.token] }) { h(event) }
        }
    }
}
