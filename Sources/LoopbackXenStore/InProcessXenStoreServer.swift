import CXenBackSupport
import Hypervisor
import Logging
import XenStoreWire

/// The loopback xenstored without its thread and sockets: the caller hands
/// a connection's bytes in and takes its replies out, in the same process
/// (the xenstore-wire fuzz target, unit tests). Requests go through the same
/// code as on a socket; only reading the socket and writing to it differ.
/// Not thread-safe: one caller at a time. INTRODUCE fails (no socket directory).
package final class InProcessXenStoreServer {
    private let core: ServerCore
    private var pipes: [UInt64: InProcessPipe] = [:]
    /// Bytes of replies a connection's pipe holds before the server must queue them.
    private let window: Int

    package init(window: Int = 64 * 1024) {
        self.window = window
        var logger = Logger(label: "xenbackd.xenstored.in-process", factory: { _ in SwiftLogNoOpLogHandler() })
        logger.logLevel = .critical
        core = ServerCore(epollFD: -1, domainSocketDirectory: "/nonexistent/xenstored-in-process", logger: logger)
    }

    /// A new connection: dom0's privileged socket (nil) or domain `domid`'s.
    package func connect(as domid: DomID?) -> UInt64 {
        let pipe = InProcessPipe(window: window)
        let connection = core.openInProcessConnection(requester: domid.map(Requester.guest) ?? .dom0, pipe: pipe)
        pipes[connection.id] = pipe
        return connection.id
    }

    package func isOpen(_ id: UInt64) -> Bool { core.connections[id] != nil }

    /// Bytes arriving on the connection: every complete request is answered
    /// (and watch events fired) before this returns. They are taken in reads
    /// of at most 16 KiB, each answered before the next, as the event loop does.
    package func send(_ bytes: [UInt8], on id: UInt64) {
        var from = 0
        while from < bytes.count, let connection = core.connections[id] {
            let to = min(bytes.count, from + ServerCore.readSize)
            connection.decoder.append(contentsOf: bytes[from..<to])
            core.answerBufferedRequests(from: connection)
            core.flushPendingOutput()
            from = to
        }
    }

    /// What the peer reads: the replies and events delivered so far. Taking
    /// them makes room, as reading a socket does (EPOLLOUT).
    package func takeReplies(of id: UInt64) -> [UInt8] {
        guard let pipe = pipes[id] else { return [] }
        let bytes = pipe.delivered
        pipe.delivered.removeAll(keepingCapacity: true)
        if core.connections[id] == nil {
            pipes[id] = nil
        } else {
            core.handle(token: id, events: xb_EPOLLOUT)
            core.flushPendingOutput()
        }
        return bytes
    }

    /// The peer hangs up.
    package func close(_ id: UInt64) {
        if let connection = core.connections[id] { core.closeConnection(connection, reason: "closed by peer") }
        pipes[id] = nil
    }

    // MARK: Inspection (for invariants)

    /// Every node of the live tree, by absolute path.
    package var nodes: [String: XenStoreNode] { core.database.tree.nodes }

    /// Nodes `domid` owns: live first, then in each of its open transactions.
    package func ownedNodeCounts(of domid: DomID) -> [Int] { core.database.ownedNodeCounts(of: UInt32(domid)) }

    package func watchCount(of domid: DomID) -> Int { core.watchCount(of: .guest(domid)) }

    package func openTransactionCount(of domid: DomID) -> Int { core.database.openTransactionCount(of: .guest(domid)) }

    /// Nodes each of `domid`'s open transactions has touched.
    package func transactionTouchedCounts(of domid: DomID) -> [Int] { core.database.transactionTouchedCounts(of: .guest(domid)) }

    /// Replies queued on the connection that its pipe has not taken yet.
    package func queuedOutputCount(of id: UInt64) -> Int { core.connections[id]?.queuedOutputCount ?? 0 }

    /// Bytes received on the connection that are not a whole request yet.
    package func bufferedInputCount(of id: UInt64) -> Int { core.connections[id]?.decoder.bufferedByteCount ?? 0 }
}
