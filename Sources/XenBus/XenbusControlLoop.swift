import Glibc
import Hypervisor
import Logging
import SystemSupport

/// The control plane's single thread (xenwatch in Linux terms): it waits
/// on xenstore watch events and on tasks posted by other threads, and runs
/// every handler itself, so device state machines need no locks.
public final class XenbusControlLoop: @unchecked Sendable {   // handlers, tasks, stopRequested guarded by `lock`
    public typealias WatchHandler = (XenStoreWatchEvent) -> Void
    public let store: any XenStore
    private let logger: Logger
    private let lock = PThreadMutex()
    private var handlers: [String: WatchHandler] = [:]
    private var tasks: [() -> Void] = []
    private var readableHandlers: [(fd: Int32, handler: () -> Void)] = []
    private var nextToken = 0
    private let wakeup: Wakeup
    private var stopRequested = false
    /// Where devices' blocking work runs (`XenbusDevice`).
    let jobs: XenbusJobQueue

    /// - workers: `.threads` in the daemon; `.inline` for a test or fuzzer
    ///   that steps the loop with `runPending()` on one thread.
    public init(store: any XenStore, logger: Logger, workers: XenbusWorkers = .threads(XenbusWorkers.defaultThreads)) {
        self.store = store
        self.logger = logger
        self.jobs = XenbusJobQueue(workers)
        do { wakeup = try Wakeup() } catch { fatalError("the control loop cannot run without an eventfd: \(error)") }
    }

    deinit { wakeup.close() }

    private func locked<T>(_ body: () -> T) -> T { lock.withLock(body) }

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
        wakeup.signal()
    }

    /// Makes `run()` return after the current event. Callable from any thread.
    public func requestStop() {
        locked { stopRequested = true }
        wakeup.signal()
    }

    /// Calls `handler` on the loop thread whenever `fd` is readable (a
    /// control socket's listener, say). Register before `run()`.
    public func whenReadable(_ fd: Int32, _ handler: @escaping () -> Void) {
        locked { readableHandlers.append((fd, handler)) }
    }

    /// Serves watch events, tasks and readable descriptors until `requestStop()`.
    public func run() {
        let extra = locked { readableHandlers }
        var fds = [pollfd(fd: store.watchFileDescriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeup.fd, events: Int16(POLLIN), revents: 0)]
            + extra.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
        defer { jobs.stop() }
        while true {
            if locked({ stopRequested }) { return }
            do {
                _ = try Syscall.poll(&fds, fds.count, timeoutMilliseconds: -1)
            } catch {
                logger.error("control loop poll failed", metadata: ["error": "\(error)"])
                return
            }
            if fds[1].revents != 0 { wakeup.drain() }
            runTasks()
            dispatchWatchEvents()
            for (i, h) in extra.enumerated() where fds[i + 2].revents != 0 { h.handler() }
        }
    }

    /// Runs what is ready now (posted tasks, then queued watch events) and
    /// returns: for a test or fuzzer that steps the control plane on its
    /// own thread instead of `run()`.
    public func runPending() {
        runTasks()
        dispatchWatchEvents()
    }

    /// Tasks posted and not yet run (a stepping test settles when none are left).
    public var hasPendingTasks: Bool { locked { !tasks.isEmpty } }

    /// Runs the tasks posted so far, not watch events (a shutdown that
    /// collects what finished jobs report).
    func runPostedTasks() { runTasks() }

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
