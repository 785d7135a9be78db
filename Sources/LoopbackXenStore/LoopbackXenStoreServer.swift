import CXenBackSupport
import Glibc
import SystemSupport
import Hypervisor
import Logging
import XenStoreWire

/// A xenstored for the loopback hypervisor: the xenstore tree in memory,
/// served over unix sockets by one epoll thread.
///
/// - `socketPath` takes privileged (dom0) connections: libxenstore and the
///   xenstore-* tools reach it with XENSTORED_PATH set to it.
/// - Each introduced domain gets `domainSocketPath(for:)` in
///   `domainSocketDirectory`; a connection there acts as that unprivileged
///   domain (permissions enforced, relative paths below /local/domain/<domid>).
///
/// The tree starts with /, /tool/xenstored and /local/domain/0, owned by dom0
/// with no access for others (as a toolstack leaves it). Like xenstored,
/// introducing a domain creates none of its nodes: the toolstack (dom0)
/// creates /local/domain/<domid> and gives the domain ownership.
public final class LoopbackXenStoreServer: @unchecked Sendable {  // `thread` is used only inside `threadLock`
    public let socketPath: String
    public let domainSocketDirectory: String
    private let loop: EventLoop
    private let threadLock = PThreadMutex()
    private var thread: NativeThread?

    /// Creates the dom0 socket (clients may connect at once; they are served
    /// once `start()` runs) and the domain socket directory if missing.
    public init(socketPath: String, domainSocketDirectory: String,
                logger: Logger = Logger(label: "xenbackd.xenstored")) throws(XenStoreError) {
        self.socketPath = socketPath
        self.domainSocketDirectory = domainSocketDirectory
        let created = mkdir(domainSocketDirectory, 0o755) == 0
        if !created && errno != EEXIST {
            throw XenStoreError(errno: errno, context: "mkdir \(domainSocketDirectory)")
        }
        do throws(XenStoreError) {
            loop = try EventLoop(socketPath: socketPath, domainSocketDirectory: domainSocketDirectory, logger: logger)
        } catch {
            if created { rmdir(domainSocketDirectory) }
            throw error
        }
        loop.withCore { $0.createdDomainSocketDirectory = created }
    }

    deinit { stop() }

    /// The socket through which domain `domid` connects once introduced.
    public func domainSocketPath(for domid: DomID) -> String {
        ServerCore.domainSocketPath(directory: domainSocketDirectory, domain: domid)
    }

    /// Starts serving on a thread of its own. Starting twice does nothing;
    /// a stopped server cannot be started again.
    public func start() throws(XenStoreError) {
        try threadLock.withLock { () throws(XenStoreError) in
            guard thread == nil else { return }
            guard !loop.withCore({ $0.isShutDown }) else {
                throw XenStoreError(errno: XenStoreError.io, context: "xenstored stopped")
            }
            let loop = self.loop
            thread = try NativeThread.forXenStore(name: "xenstored") { loop.run() }
        }
    }

    /// Stops serving, closes every connection and removes the sockets (and
    /// the domain socket directory if it made it and it is empty). Idempotent.
    public func stop() {
        loop.requestStop()
        let running = threadLock.withLock { () -> NativeThread? in
            defer { thread = nil }
            return thread
        }
        running?.join()
        loop.shutDown()
    }

    /// Lets `domid` connect at `domainSocketPath(for:)` and fires @introduceDomain
    /// (what XS_INTRODUCE does). Introducing an introduced domain does nothing.
    public func introduceDomain(_ domid: DomID) throws(XenStoreError) {
        try loop.withCore { (core) throws(XenStoreError) in try core.introduce(domid) }
    }

    /// Removes the domain's socket, closes its connections and fires
    /// @releaseDomain (what XS_RELEASE does). ENOENT if it was not introduced.
    public func releaseDomain(_ domid: DomID) throws(XenStoreError) {
        try loop.withCore { (core) throws(XenStoreError) in try core.release(domid) }
    }

    public func isDomainIntroduced(_ domid: DomID) -> Bool {
        loop.withCore { $0.isIntroduced(domid) }
    }

    /// Open client connections (for tests and diagnostics).
    public var connectionCount: Int { loop.withCore { $0.connections.count } }
}

/// The epoll loop and the state it serves.
final class EventLoop: @unchecked Sendable {  // `core` is used only inside `lock` (loop thread per batch, API calls)
    private let epollFD: Int32
    private let wakeFD: Int32
    private let lock = PThreadMutex()
    private let core: ServerCore

    init(socketPath: String, domainSocketDirectory: String, logger: Logger) throws(XenStoreError) {
        let epollFD = xb_epoll_create()
        guard epollFD >= 0 else { throw XenStoreError(errno: errno, context: "epoll_create") }
        let wakeFD = xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC)
        guard wakeFD >= 0, xb_epoll_add(epollFD, wakeFD, xb_EPOLLIN, ServerCore.wakeToken) == 0 else {
            let saved = errno
            close(epollFD)
            if wakeFD >= 0 { close(wakeFD) }
            throw XenStoreError(errno: saved, context: "eventfd")
        }
        let core = ServerCore(epollFD: epollFD, domainSocketDirectory: domainSocketDirectory, logger: logger)
        do throws(XenStoreError) {
            let fd = try UnixSocket.xenStoreListen(at: socketPath)
            do throws(XenStoreError) {
                _ = try core.addListener(fd: fd, path: socketPath, domain: nil)
            } catch {
                close(fd)
                throw error
            }
        } catch {
            close(epollFD)
            close(wakeFD)
            throw error
        }
        logger.debug("xenstore: listening on \(socketPath)")
        self.epollFD = epollFD
        self.wakeFD = wakeFD
        self.core = core
    }

    deinit {
        close(epollFD)
        close(wakeFD)
    }

    func withCore<T>(_ body: (ServerCore) throws(XenStoreError) -> T) throws(XenStoreError) -> T {
        try lock.withLock { () throws(XenStoreError) -> T in
            let result = try body(core)
            core.flushPendingOutput()  // e.g. @introduceDomain events queued outside the loop
            return result
        }
    }

    func withCore<T>(_ body: (ServerCore) -> T) -> T {
        lock.withLock { body(core) }
    }

    func run() {
        xb_set_thread_name("xenstored")
        let capacity = 64
        var tokens = [UInt64](repeating: 0, count: capacity)
        var events = [UInt32](repeating: 0, count: capacity)
        while true {
            let count: Int32
            do {
                count = try Syscall.retryingOnInterrupt("epoll_wait") { xb_epoll_wait(epollFD, &tokens, &events, Int32(capacity), -1) }
            } catch {
                lock.withLock { core.logger.error("xenstore: \(error); stopping") }
                return
            }
            let keepRunning = lock.withLock { () -> Bool in
                for i in 0..<Int(count) {
                    if tokens[i] == ServerCore.wakeToken { drainWakeups() }
                    core.handle(token: tokens[i], events: events[i])
                }
                core.flushPendingOutput()
                return !core.isStopping
            }
            if !keepRunning { return }
        }
    }

    func requestStop() {
        lock.withLock { core.isStopping = true }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    func shutDown() {
        lock.withLock { core.shutDown() }
    }

    private func drainWakeups() {
        var value: UInt64 = 0
        _ = read(wakeFD, &value, 8)
    }
}
