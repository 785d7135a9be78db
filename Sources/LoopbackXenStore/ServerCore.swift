import CXenBackSupport
import Glibc
import SystemSupport
import Hypervisor
import Logging
import XenABI
import XenStoreWire

/// A listening socket: the privileged dom0 one, or one per introduced domain.
struct Listener {
    let fd: Int32
    let path: String
    /// nil for the dom0 socket.
    let domain: DomID?
}

/// Everything the loopback xenstored knows, and the socket work on it.
/// Used only with the server's lock held (by the event loop thread or a
/// Swift caller of the public API).
final class ServerCore {
    static let wakeToken: UInt64 = 1

    let epollFD: Int32
    let domainSocketDirectory: String
    /// Removed again on shutdown (if empty by then) when the server made it.
    var createdDomainSocketDirectory = false
    let logger: Logger
    var database = XenStoreDatabase()
    var connections: [UInt64: ClientConnection] = [:]
    var listeners: [UInt64: Listener] = [:]
    /// Introduced domains and the epoll token of their listening socket.
    var domainListenerTokens: [DomID: UInt64] = [:]
    var isStopping = false
    private(set) var isShutDown = false
    /// Connections with output queued since the last flush.
    private var needsFlush: Set<UInt64> = []
    private var lastToken: UInt64 = 1
    /// One recv's most (and an in-process connection's: the same chunks).
    static let readSize = 16 * 1024
    private var readBuffer = [UInt8](repeating: 0, count: readSize)

    init(epollFD: Int32, domainSocketDirectory: String, logger: Logger) {
        self.epollFD = epollFD
        self.domainSocketDirectory = domainSocketDirectory
        self.logger = logger
    }

    static func domainSocketPath(directory: String, domain: DomID) -> String {
        directory + "/domain-\(domain).sock"
    }

    // MARK: Listeners and domains

    func addListener(fd: Int32, path: String, domain: DomID?) throws(XenStoreError) -> UInt64 {
        let token = newToken()
        guard xb_epoll_add(epollFD, fd, xb_EPOLLIN, token) == 0 else {
            throw XenStoreError(errno: errno, context: "epoll add listener")
        }
        listeners[token] = Listener(fd: fd, path: path, domain: domain)
        return token
    }

    private func removeListener(_ token: UInt64) {
        guard let listener = listeners.removeValue(forKey: token) else { return }
        xb_epoll_del(epollFD, listener.fd)
        close(listener.fd)
        unlink(listener.path)
    }

    /// Opens the domain's socket and fires @introduceDomain. Introducing an
    /// introduced domain again does nothing (as xenstored).
    func introduce(_ domid: DomID) throws(XenStoreError) {
        guard !isShutDown else { throw XenStoreError(errno: XenStoreError.io, context: "xenstored stopped") }
        guard domid != 0, domid < 0x7FF0 else {  // DOMID_FIRST_RESERVED
            throw XenStoreError(errno: XenStoreError.invalid, context: "domain \(domid) cannot be introduced")
        }
        guard domainListenerTokens[domid] == nil else { return }
        let path = Self.domainSocketPath(directory: domainSocketDirectory, domain: domid)
        let fd = try UnixSocket.xenStoreListen(at: path)
        do throws(XenStoreError) {
            domainListenerTokens[domid] = try addListener(fd: fd, path: path, domain: domid)
        } catch {
            close(fd)
            unlink(path)
            throw error
        }
        logger.info("xenstore: domain \(domid) introduced, socket \(path)")
        fire([.special(XenStorePath.introduceDomain)])
    }

    /// Removes the domain's socket, disconnects it and fires @releaseDomain.
    func release(_ domid: DomID) throws(XenStoreError) {
        guard let token = domainListenerTokens.removeValue(forKey: domid) else {
            throw XenStoreError(errno: XenStoreError.noEntry, context: "domain \(domid) is not introduced")
        }
        removeListener(token)
        for connection in connections.values where !connection.requester.isPrivileged && connection.requester.domain == domid {
            closeConnection(connection, reason: "domain released")
        }
        logger.info("xenstore: domain \(domid) released")
        fire([.special(XenStorePath.releaseDomain)])
    }

    func isIntroduced(_ domid: DomID) -> Bool {
        domid == 0 || domainListenerTokens[domid] != nil
    }

    // MARK: Events from the loop

    func handle(token: UInt64, events: UInt32) {
        if token == Self.wakeToken { return }
        if let listener = listeners[token] {
            acceptConnections(on: listener)
        } else if let connection = connections[token] {
            if events & xb_EPOLLOUT != 0 { needsFlush.insert(connection.id) }
            if events & (xb_EPOLLIN | xb_EPOLLHUP | xb_EPOLLERR) != 0 { readRequests(from: connection) }
        }
    }

    private func acceptConnections(on listener: Listener) {
        while true {
            let fd: Int32
            do {
                guard let accepted = try Syscall.unlessWouldBlock({ () throws(SystemError) in try Syscall.accept(listener.fd) })
                else { return }
                fd = accepted
            } catch {
                logger.warning("xenstore: \(error) on \(listener.path)")
                return
            }
            // accept4 is hidden from Swift's Glibc; set the flags the same way afterwards.
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let requester = listener.domain.map(Requester.guest) ?? .dom0
            let connection = ClientConnection(id: newToken(), fd: fd, requester: requester)
            guard xb_epoll_add(epollFD, fd, xb_EPOLLIN, connection.id) == 0 else {
                logger.warning("xenstore: epoll add failed for a new connection, errno \(errno)")
                close(fd)
                continue
            }
            connections[connection.id] = connection
            logger.debug("xenstore: connection \(connection.id) from domain \(requester.domain) opened")
        }
    }

    /// Reads what the socket has (bounded per wake-up, for fairness) and answers each complete request.
    private func readRequests(from connection: ClientConnection) {
        var endOfStream = false
        for _ in 0..<16 {
            let received = readBuffer.withUnsafeMutableBytes { raw in
                Result { () throws(SystemError) in
                    try Syscall.unlessWouldBlock { () throws(SystemError) in
                        try Syscall.recv(connection.fd, raw.baseAddress!, raw.count, Int32(MSG_DONTWAIT))
                    }
                }
            }
            guard case .success(let result) = received else {
                endOfStream = true   // a failed socket
                break
            }
            guard let n = result else { break }   // nothing more now
            if n > 0 {
                readBuffer.withUnsafeBytes { connection.decoder.append(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
                if n < readBuffer.count { break }
            } else {
                endOfStream = true
                break
            }
        }
        answerBufferedRequests(from: connection)
        if endOfStream { closeConnection(connection, reason: "closed by peer") }
    }

    /// Answers every complete request the connection's input holds; a stream
    /// that cannot be framed any more closes the connection (only it).
    func answerBufferedRequests(from connection: ClientConnection) {
        do {
            while connections[connection.id] != nil, let message = try connection.decoder.nextMessage() {
                respond(to: message, from: connection)
            }
        } catch {
            logger.warning("xenstore: connection \(connection.id) (domain \(connection.requester.domain)) sent \(error); closing it")
            closeConnection(connection, reason: "malformed input")
        }
    }

    /// A connection without a socket (InProcessXenStoreServer): its input is
    /// handed over by the caller and its replies land in `pipe`.
    func openInProcessConnection(requester: Requester, pipe: InProcessPipe) -> ClientConnection {
        let connection = ClientConnection(id: newToken(), pipe: pipe, requester: requester)
        connections[connection.id] = connection
        return connection
    }

    func closeConnection(_ connection: ClientConnection, reason: String) {
        guard connections.removeValue(forKey: connection.id) != nil else { return }
        needsFlush.remove(connection.id)
        if connection.pipe == nil {
            xb_epoll_del(epollFD, connection.fd)
            close(connection.fd)
        }
        database.abortTransactions(owner: connection.id)
        logger.debug("xenstore: connection \(connection.id) from domain \(connection.requester.domain) closed: \(reason)")
    }

    // MARK: Output

    func queue(_ message: XenStoreMessage, to connection: ClientConnection) {
        connection.queue(message)
        needsFlush.insert(connection.id)
    }

    func queueWatchEvent(path: String, token: String, to connection: ClientConnection) {
        connection.queueWatchEvent(path: path, token: token)
        needsFlush.insert(connection.id)
    }

    /// Sends queued output; asks for EPOLLOUT where the socket is full.
    func flushPendingOutput() {
        let pending = needsFlush
        needsFlush.removeAll(keepingCapacity: true)
        for id in pending {
            guard let connection = connections[id] else { continue }
            switch connection.flush() {
            case .done:
                if connection.isWaitingForWritable {
                    connection.isWaitingForWritable = false
                    if connection.pipe == nil { xb_epoll_mod(epollFD, connection.fd, xb_EPOLLIN, connection.id) }
                }
            case .wouldBlock:
                if connection.isOverflowing {
                    logger.warning("xenstore: connection \(id) does not read its replies; closing it")
                    closeConnection(connection, reason: "output overflow")
                } else if !connection.isWaitingForWritable {
                    connection.isWaitingForWritable = true
                    if connection.pipe == nil { xb_epoll_mod(epollFD, connection.fd, xb_EPOLLIN | xb_EPOLLOUT, connection.id) }
                }
            case .failed:
                closeConnection(connection, reason: "write failed, errno \(errno)")
            }
        }
    }

    // MARK: Shutdown

    /// Closes every connection and listener and removes the socket files.
    func shutDown() {
        guard !isShutDown else { return }
        isShutDown = true
        for connection in Array(connections.values) { closeConnection(connection, reason: "server stopping") }
        for token in Array(listeners.keys) { removeListener(token) }
        domainListenerTokens.removeAll()
        if createdDomainSocketDirectory { rmdir(domainSocketDirectory) }
    }

    private func newToken() -> UInt64 {
        lastToken += 1
        return lastToken
    }
}
