import Hypervisor
import LoopbackXenStore
import Testing
import XenABI
import XenStoreWire

/// One connection to an in-process xenstored: a request in, its reply out.
private struct InProcessClient {
    let server: InProcessXenStoreServer
    let id: UInt64

    init(_ server: InProcessXenStoreServer, domain: DomID?) {
        self.server = server
        id = server.connect(as: domain)
    }

    /// The reply's payload text: "OK", a value, or an error's name.
    @discardableResult
    func request(_ type: XenStoreMessageType, _ strings: [String], tx: UInt32 = 0) -> String {
        reply(to: XenStoreMessage(type, requestID: 7, transactionID: tx, payload: XenStorePayload.terminated(strings)))
    }

    /// WRITE's payload: the path's string, then the value without a NUL.
    @discardableResult
    func write(_ path: String, _ value: [UInt8], tx: UInt32 = 0) -> String {
        reply(to: XenStoreMessage(.write, requestID: 8, transactionID: tx, payload: XenStorePayload.terminated(path) + value))
    }

    private func reply(to message: XenStoreMessage) -> String {
        server.send(message.encoded(), on: id)
        var decoder = XenStoreFrameDecoder()
        decoder.append(contentsOf: server.takeReplies(of: id))
        while let reply = try? decoder.nextMessage() {
            if reply.type != .watchEvent { return XenStorePayload.text(reply.payload) }
        }
        return "(no reply)"
    }
}

/// A server where dom0 gave domain 5 its home, and a connection of domain 5.
private func serverWithGuestHome() -> (InProcessXenStoreServer, dom0: InProcessClient, guest: InProcessClient) {
    let server = InProcessXenStoreServer()
    let dom0 = InProcessClient(server, domain: nil)
    dom0.request(.mkdir, ["/local/domain/5"])
    dom0.request(.setPerms, ["/local/domain/5", "n5"])
    return (server, dom0, InProcessClient(server, domain: 5))
}

@Suite("xenstore guest quotas (C xenstored's defaults)")
struct QuotaTests {
    @Test("a domain owns at most 1000 nodes; the next is ENOSPC, and dom0 is not limited")
    func nodeQuota() {
        let (server, dom0, guest) = serverWithGuestHome()
        // Its home is one; 999 more fit: 37 directories of 26 children
        // (one directory of 999 would pass the 2048 bytes of a node's record).
        for d in 0..<37 {
            #expect(guest.request(.mkdir, ["d\(d)"]) == "OK")
            for c in 0..<26 { #expect(guest.request(.mkdir, ["d\(d)/c\(c)"]) == "OK") }
        }
        #expect(server.ownedNodeCounts(of: 5) == [1000])
        #expect(guest.request(.mkdir, ["one-more"]) == "ENOSPC")
        #expect(guest.request(.mkdir, ["d0/a"]) == "ENOSPC")
        // dom0 may create there; the node is the domain's (it inherits the home's owner).
        #expect(dom0.request(.mkdir, ["/local/domain/5/by-dom0"]) == "OK")
        #expect(server.ownedNodeCounts(of: 5) == [1001])
        #expect(guest.request(.rm, ["d0"]) == "OK")
        #expect(guest.request(.mkdir, ["again"]) == "OK")
    }

    @Test("a transaction's commit may not take the domain past its node quota")
    func nodeQuotaAtCommit() {
        let (server, _, guest) = serverWithGuestHome()
        // Each transaction changes only its own directory: no conflict between them.
        #expect(guest.request(.mkdir, ["a"]) == "OK")
        #expect(guest.request(.mkdir, ["b"]) == "OK")
        let first = UInt32(guest.request(.transactionStart, [""]))!
        let second = UInt32(guest.request(.transactionStart, [""]))!
        for i in 0..<600 {
            #expect(guest.request(.mkdir, ["a/\(i / 20)/\(i % 20)"], tx: first) == "OK")
            #expect(guest.request(.mkdir, ["b/\(i / 20)/\(i % 20)"], tx: second) == "OK")
        }
        #expect(guest.request(.transactionEnd, ["T"], tx: first) == "OK")
        #expect(guest.request(.transactionEnd, ["T"], tx: second) == "ENOSPC")
        #expect(server.ownedNodeCounts(of: 5) == [633])  // home, a, b, a/0…a/29, 600 below them
    }

    @Test("a value of 2048 bytes is taken, 2049 is ENOSPC; child names count toward a node's 2048 bytes")
    func nodeSizeQuota() {
        let (_, dom0, guest) = serverWithGuestHome()
        #expect(guest.write("x", [UInt8](repeating: 65, count: 2048)) == "OK")
        #expect(guest.write("x", [UInt8](repeating: 65, count: 2049)) == "ENOSPC")
        #expect(guest.write("new", [UInt8](repeating: 65, count: 2049)) == "ENOSPC")
        // 2040 bytes of value leave room for one 6-byte name and its NUL, not two.
        #expect(guest.write("dir", [UInt8](repeating: 65, count: 2040)) == "OK")
        #expect(guest.request(.mkdir, ["dir/abcdef"]) == "OK")
        #expect(guest.request(.mkdir, ["dir/ghijkl"]) == "ENOSPC")
        #expect(dom0.write("/local/domain/5/dir", [UInt8](repeating: 65, count: 3000)) == "OK")
    }

    @Test("128 watches per domain over all its connections; the next is E2BIG")
    func watchQuota() {
        let (server, _, guest) = serverWithGuestHome()
        let second = InProcessClient(server, domain: 5)
        for i in 0..<64 {
            #expect(guest.request(.watch, ["w\(i)", "t"]) == "OK")
            #expect(second.request(.watch, ["v\(i)", "t"]) == "OK")
        }
        #expect(server.watchCount(of: 5) == 128)
        #expect(guest.request(.watch, ["one-more", "t"]) == "E2BIG")
        #expect(guest.request(.unwatch, ["w0", "t"]) == "OK")
        #expect(second.request(.watch, ["one-more", "t"]) == "OK")
    }

    @Test("10 open transactions per domain; the next is ENOSPC")
    func transactionQuota() {
        let (server, _, guest) = serverWithGuestHome()
        let second = InProcessClient(server, domain: 5)
        var ids: [UInt32] = []
        for _ in 0..<5 {
            ids.append(UInt32(guest.request(.transactionStart, [""]))!)
            #expect(UInt32(second.request(.transactionStart, [""])) != nil)
        }
        #expect(server.openTransactionCount(of: 5) == 10)
        #expect(guest.request(.transactionStart, [""]) == "ENOSPC")
        #expect(guest.request(.transactionEnd, ["F"], tx: ids[0]) == "OK")
        #expect(UInt32(guest.request(.transactionStart, [""])) != nil)
        server.close(second.id)
        #expect(server.openTransactionCount(of: 5) == 5)
    }

    @Test("a guest's transaction touches at most 1024 nodes; the next request in it is ENOSPC")
    func transactionNodeQuota() {
        let (server, _, guest) = serverWithGuestHome()
        let tx = UInt32(guest.request(.transactionStart, [""]))!
        #expect(guest.request(.mkdir, ["kept"], tx: tx) == "OK")  // the home and "kept": two nodes
        for i in 0..<1022 { #expect(guest.request(.read, ["missing\(i)"], tx: tx) == "ENOENT") }
        #expect(server.transactionTouchedCounts(of: 5) == [1024])
        #expect(guest.request(.read, ["one-more"], tx: tx) == "ENOSPC")
        #expect(guest.request(.write, ["kept", "v"], tx: tx) == "ENOSPC")
        #expect(guest.request(.read, ["missing0"], tx: tx) == "ENOENT")  // touched already
        #expect(guest.request(.transactionEnd, ["T"], tx: tx) == "OK")
        #expect(guest.request(.read, ["kept"]) == "")
    }

    @Test("a transaction that changes one node 300 times fires one event at commit (its log does not grow)")
    func repeatedChangesInATransactionFireOnce() {
        let (server, _, guest) = serverWithGuestHome()
        let watcher = InProcessClient(server, domain: nil)
        #expect(watcher.request(.watch, ["/local/domain/5/x", "t"]) == "OK")
        _ = server.takeReplies(of: watcher.id)  // the watch's first event
        let tx = UInt32(guest.request(.transactionStart, [""]))!
        for i in 0..<300 { #expect(guest.request(.write, ["x", "\(i)"], tx: tx) == "OK") }
        #expect(guest.request(.transactionEnd, ["T"], tx: tx) == "OK")
        var decoder = XenStoreFrameDecoder()
        decoder.append(contentsOf: server.takeReplies(of: watcher.id))
        var events: [[String]] = []
        while let message = try? decoder.nextMessage() { events.append(XenStorePayload.strings(message.payload)) }
        #expect(events == [["/local/domain/5/x", "t"]])
    }

    @Test("a transaction held open while others change ever new paths keeps nothing of theirs and still commits")
    func unrelatedChurnDoesNotFailATransaction() {
        let (server, dom0, guest) = serverWithGuestHome()
        let tx = UInt32(guest.request(.transactionStart, [""]))!
        #expect(guest.request(.write, ["x", "v"], tx: tx) == "OK")
        for i in 0..<20_000 {
            dom0.request(.mkdir, ["/churn/\(i)"])
            dom0.request(.rm, ["/churn/\(i)"])
        }
        #expect(server.transactionTouchedCounts(of: 5) == [2])
        #expect(guest.request(.transactionEnd, ["T"], tx: tx) == "OK")
        #expect(dom0.request(.read, ["/local/domain/5/x"]) == "v")
    }

    @Test("a guest that stops reading its replies is cut off once 8 MiB are queued; dom0 is not")
    func unreadRepliesAreBounded() {
        let (server, dom0, guest) = serverWithGuestHome()
        #expect(guest.write("v", [UInt8](repeating: 65, count: 2048)) == "OK")
        // 4200 reads of 2048 bytes: 8.7 MiB of replies that nobody takes.
        let read = XenStoreMessage(.read, requestID: 1, payload: XenStorePayload.terminated("v")).encoded()
        server.send(Array([[UInt8]](repeating: read, count: 4200).joined()), on: guest.id)
        #expect(!server.isOpen(guest.id))
        #expect(dom0.request(.read, ["/local/domain/5/v"]).count == 2048)
        // A guest that reads as it sends (100 requests ahead) gets all of them.
        let reader = InProcessClient(server, domain: 5)
        var replies = 0
        var decoder = XenStoreFrameDecoder()
        for _ in 0..<42 {
            server.send(Array([[UInt8]](repeating: read, count: 100).joined()), on: reader.id)
            while case let bytes = server.takeReplies(of: reader.id), !bytes.isEmpty {
                decoder.append(contentsOf: bytes)
                while let reply = try? decoder.nextMessage() {
                    #expect(reply.payload.count == 2048)
                    replies += 1
                }
            }
        }
        #expect(server.isOpen(reader.id))
        #expect(replies == 4200)
        #expect(server.queuedOutputCount(of: reader.id) == 0)
    }

    @Test("a header announcing more than 4096 bytes closes that guest's connection only")
    func oversizedFrameClosesOnlyThatConnection() {
        let (server, dom0, guest) = serverWithGuestHome()
        let header = XenStoreMessageHeader(type: XenStoreMessageType.read.rawValue, reqId: 1, txId: 0, len: 5000)
        var bytes = [UInt8](repeating: 0, count: XenStoreMessageHeader.size)
        bytes.withUnsafeMutableBytes { header.encode(to: $0.baseAddress!) }
        server.send(bytes, on: guest.id)
        #expect(!server.isOpen(guest.id))
        #expect(server.isOpen(dom0.id))
        #expect(dom0.request(.read, ["/local/domain/5"]) == "")
    }
}
