import Glibc
import Hypervisor
import SystemSupport
import Testing
import XenABI
import XenStoreWire

/// A bare socket to the server, for sending what no client library would.
final class RawConnection {
    let fd: Int32
    private var decoder = XenStoreFrameDecoder()

    init(_ path: String) throws {
        fd = try UnixSocket.connect(to: path)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) { #expect(sendAll(fd, bytes)) }

    func send(_ message: XenStoreMessage) { send(message.encoded()) }

    /// The next message, or nil if the server closed the connection (or 5 s passed).
    func receive() -> XenStoreMessage? {
        var buffer = [UInt8](repeating: 0, count: 8192)
        while true {
            if let message = try? decoder.nextMessage() { return message }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            guard n > 0 else { return nil }
            decoder.append(contentsOf: buffer[..<n])
        }
    }

    /// True once the server has closed this connection (end of stream within 5 s).
    func isClosedByServer() -> Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }
}

@Suite("xenstore malformed input")
struct MalformedInputTests {
    /// The server still answers a new connection.
    private func expectAlive(_ fixture: LoopbackFixture, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let xs = try fixture.dom0SocketClient()
        try xs.write("/alive", "yes")
        #expect(try xs.read("/alive") == "yes", sourceLocation: sourceLocation)
    }

    private func errorName(_ reply: XenStoreMessage?) -> String? {
        guard let reply, reply.type == .error else { return nil }
        return XenStorePayload.text(reply.payload)
    }

    @Test("a reply echoes req_id and tx_id; unknown types get EINVAL")
    func echoAndUnknownType() throws {
        try withLoopbackXenStore { fixture in
            let raw = try RawConnection(fixture.socketPath)
            raw.send(XenStoreMessage(.getDomainPath, requestID: 0xDEADBEEF, payload: Array("7\u{0}".utf8)))
            let reply = raw.receive()
            #expect(reply == XenStoreMessage(.getDomainPath, requestID: 0xDEADBEEF, payload: Array("/local/domain/7\u{0}".utf8)))

            raw.send(XenStoreMessage(rawType: 99, requestID: 5, transactionID: 77, payload: [1, 2, 3]))
            #expect(raw.receive() == XenStoreMessage(.error, requestID: 5, transactionID: 77, payload: Array("EINVAL\u{0}".utf8)))
            for type in [XenStoreMessageType.watchEvent, .error, .invalid] {
                raw.send(XenStoreMessage(type, requestID: 6))
                #expect(errorName(raw.receive()) == "EINVAL")
            }
            try expectAlive(fixture)
        }
    }

    @Test("malformed payloads get EINVAL and the connection stays usable")
    func badPayloads() throws {
        try withLoopbackXenStore { fixture in
            let raw = try RawConnection(fixture.socketPath)
            let cases: [(XenStoreMessageType, String)] = [
                (.read, "/no-terminator"),
                (.read, "/two\u{0}strings\u{0}"),
                (.read, ""),
                (.read, "//double\u{0}"),
                (.read, "/trailing/\u{0}"),
                (.read, "/bad char\u{0}"),
                (.read, "/\u{00e9}\u{0}"),
                (.write, "no nul at all"),
                (.mkdir, "@introduceDomain\u{0}"),
                (.watch, "/only-path\u{0}"),
                (.directoryPart, "/\u{0}"),
                (.directoryPart, "/\u{0}minus\u{0}"),
                (.setPerms, "/\u{0}"),
                (.setPerms, "/\u{0}q0\u{0}"),
                (.transactionEnd, "X\u{0}"),
                (.getDomainPath, "seven\u{0}"),
                (.introduce, "5\u{0}"),
            ]
            for (type, payload) in cases {
                raw.send(XenStoreMessage(type, requestID: 1, payload: Array(payload.utf8)))
                #expect(errorName(raw.receive()) == "EINVAL", "\(type) \(payload.debugDescription)")
            }
            let tooLong = "/" + String(repeating: "a", count: XenStoreLimits.absolutePathMax)
            raw.send(XenStoreMessage(.write, payload: Array(tooLong.utf8) + [0]))
            #expect(errorName(raw.receive()) == "EINVAL")
            let longest = String(tooLong.dropLast())
            raw.send(XenStoreMessage(.write, payload: Array(longest.utf8) + [0]))
            #expect(raw.receive()?.payload == XenStorePayload.ok)
            raw.send(XenStoreMessage(.read, transactionID: 4242, payload: Array("/alive\u{0}".utf8)))
            #expect(errorName(raw.receive()) == "ENOENT")  // no such transaction
            raw.send(XenStoreMessage(.transactionStart, transactionID: 4242, payload: [0]))
            #expect(errorName(raw.receive()) == "EBUSY")   // no nesting
            raw.send(XenStoreMessage(.read, requestID: 2, payload: Array("/tool/xenstored\u{0}".utf8)))
            #expect(raw.receive() == XenStoreMessage(.read, requestID: 2, payload: []))
            try expectAlive(fixture)
        }
    }

    @Test("a header announcing more than 4096 bytes closes that connection only")
    func oversizedFrame() throws {
        try withLoopbackXenStore { fixture in
            let bystander = try fixture.dom0SocketClient()
            let raw = try RawConnection(fixture.socketPath)
            let header = XenStoreMessageHeader(type: XenStoreMessageType.write.rawValue, reqId: 1, txId: 0,
                                               len: UInt32(XenStoreLimits.payloadMax + 1))
            var bytes = [UInt8](repeating: 0, count: XenStoreMessageHeader.size)
            bytes.withUnsafeMutableBytes { header.encode(to: $0.baseAddress!) }
            raw.send(bytes + [UInt8](repeating: 0x41, count: 100))
            #expect(raw.isClosedByServer())
            #expect(try bystander.domainPath(of: 1) == "/local/domain/1")
            try expectAlive(fixture)
        }
    }

    @Test("random garbage, a truncated frame, and a frame dribbled byte by byte")
    func garbage() throws {
        try withLoopbackXenStore { fixture in
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<20 {
                let raw = try RawConnection(fixture.socketPath)
                raw.send((0..<200).map { _ in UInt8.random(in: 0...255, using: &generator) })
                // Whatever it made of it (error replies, or a closed connection), the server lives on.
            }
            let truncated = try RawConnection(fixture.socketPath)
            truncated.send(Array(XenStoreMessage(.read, payload: Array("/alive\u{0}".utf8)).encoded().prefix(20)))
            // the connection is then dropped mid-frame (deinit closes it)
            _ = truncated

            let slow = try RawConnection(fixture.socketPath)
            for byte in XenStoreMessage(.read, requestID: 9, payload: Array("/tool/xenstored\u{0}".utf8)).encoded() {
                slow.send([byte])
                usleep(200)
            }
            #expect(slow.receive() == XenStoreMessage(.read, requestID: 9, payload: []))
            try expectAlive(fixture)
        }
    }

    @Test("a client that sends requests but never reads replies is cut off")
    func clientThatDoesNotRead() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0SocketClient()
            try xs.write("/big", String(repeating: "x", count: 4000))
            let raw = try RawConnection(fixture.socketPath)
            var size: Int32 = 4096
            setsockopt(raw.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(4))
            let request = XenStoreMessage(.read, payload: Array("/big\u{0}".utf8)).encoded()
            var batch: [UInt8] = []
            for _ in 0..<64 { batch += request }
            // ~12 MiB of replies would be owed: more than the server queues for one client.
            var sent = 0
            while sent < 3200, sendAll(raw.fd, batch) { sent += 64 }
            // Only `xs` remains connected once the server has dropped the raw connection.
            for _ in 0..<500 where fixture.server.connectionCount > 1 { usleep(10_000) }
            #expect(fixture.server.connectionCount == 1)
            #expect(try xs.read("/big")?.count == 4000)
            try expectAlive(fixture)
        }
    }
}
