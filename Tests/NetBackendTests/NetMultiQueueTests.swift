import Foundation
import Glibc
import Hypervisor
import LoopbackHost
import LoopbackHypervisor
import NetBackend
import NetFrontend
import SystemSupport
import Testing
import XenBus

/// Multi-queue vifs (netif.h "Multi-queue support"): our netfront asks for
/// several ring pairs, the backend serves one thread per pair, and the
/// guests' kernels spread their flows over the TAP queues.
@Suite(.serialized) struct NetMultiQueueTests {
    /// The bed's backend offers two queues whatever the machine's CPUs.
    static let backendOptions = NetBackendOptions(maxQueues: 2)

    @Test func twoQueueGuestsSpreadParallelStreamsOverBothQueues() throws {
        try withNetTestBed(netOptions: Self.backendOptions) { bed in
            let a = try bed.addGuest(21, options: NetFrontendOptions(queues: 2), tapQueues: 2)
            let b = try bed.addGuest(22, options: NetFrontendOptions(splitEventChannels: true, queues: 2), tapQueues: 2)
            let store = bed.host.toolstack.store
            for g in [a, b] {
                #expect(g.frontend.queueCount == 2)
                #expect(try store.read(bed.backendPath(g) + "/multi-queue-max-queues") == "2")
                let fe = g.frontend.frontendPath
                #expect(try store.read(fe + "/multi-queue-num-queues") == "2")
                // Per-queue keys under queue-N/, none of them top-level.
                let grants = g.frontend.queueRingGrants
                let ports = g.frontend.queueEventChannelPorts
                try #require(grants.count == 2 && ports.count == 2)
                for i in 0..<2 {
                    #expect(try store.read(fe + "/queue-\(i)/tx-ring-ref") == String(grants[i].tx))
                    #expect(try store.read(fe + "/queue-\(i)/rx-ring-ref") == String(grants[i].rx))
                    if g === b {
                        #expect(try store.read(fe + "/queue-\(i)/event-channel-tx") == String(ports[i].tx))
                        #expect(try store.read(fe + "/queue-\(i)/event-channel-rx") == String(ports[i].rx))
                    } else {
                        #expect(try store.read(fe + "/queue-\(i)/event-channel") == String(ports[i].tx))
                    }
                }
                #expect(grants[0].tx != grants[1].tx && ports[0].tx != ports[1].tx)
                for key in ["tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx"] {
                    #expect(try store.read(fe + "/" + key) == nil, "top-level \(key)")
                }
                #expect(try store.read(fe + "/request-rx-copy") == "1")
                // The backend connected both ring pairs, on both TAP queues of vifD.0.
                let status = try #require(bed.vifStatus(g))
                #expect(status.state == .connected)
                #expect(status.queues == 2)
                #expect(status.splitEventChannels == (g === b))
                #expect(try txQueues(of: g.vifName, in: bed.dom0Namespace) == 2)
                #expect(try txQueues(of: "eth0", in: g.namespace) == 2)
            }

            let ping = try a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")

            // Four connections each way at once, every byte checked at both ends.
            let bytes = 4 << 20
            let ab = try ParallelStreams(from: a, to: b, connections: 4, bytesEach: bytes, port: 5101)
            let ba = try ParallelStreams(from: b, to: a, connections: 4, bytesEach: bytes, port: 5102)
            for run in [ab, ba] {
                let (sent, received) = try run.wait()
                #expect(sent.count == 4, "\(sent)")
                #expect(sent == received)
                for line in sent { #expect(line.split(separator: " ")[1] == "\(bytes)", "\(line)") }
            }

            // Many small flows (distinct source ports) each way: the kernels
            // hash each to a TAP queue, so both queues of both guests carry
            // frames (a flow's queue is the kernel's choice: 64 flows all on
            // one queue would be odds of 2^-63).
            for (from, to) in [(a, b), (b, a)] {
                let udp = """
                import socket
                for i in range(64):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind(('\(from.address)', 20000 + i))
                    for _ in range(3): s.sendto(b'q' * 200, ('\(to.address)', 9))
                    s.close()
                """
                try from.run(["python3", "-c", udp], timeout: 30)
            }
            #expect(bed.waitUntil(5) {
                [a, b].allSatisfy { g in g.frontend.queueStatistics.allSatisfy { $0.txFrames > 0 && $0.rxFrames > 0 } }
            }, "\(a.frontend.queueStatistics) \(b.frontend.queueStatistics)")

            for g in [a, b] {
                let perQueue = g.frontend.queueStatistics
                let total = g.frontend.statistics
                try #require(perQueue.count == 2)
                for (i, s) in perQueue.enumerated() {
                    #expect(s.txFrames + s.rxFrames > 0, "guest \(g.domid) queue \(i) carried nothing: \(s)")
                    #expect(s.txErrors == 0 && s.rxErrors == 0 && s.protocolErrors == 0 && s.rxDropped == 0,
                            "guest \(g.domid) queue \(i): \(s)")
                }
                // The totals are the sums over the queues.
                #expect(total.txFrames == perQueue[0].txFrames + perQueue[1].txFrames)
                #expect(total.rxBytes == perQueue[0].rxBytes + perQueue[1].rxBytes)
                #expect(total.txBytes >= UInt64(4 * bytes) && total.rxBytes >= UInt64(4 * bytes), "\(total)")
                let backend = try #require(bed.vifStatus(g)).statistics
                #expect(backend.txErrors == 0 && backend.rxErrors == 0 && backend.txMalformed == 0, "\(backend)")
                #expect(backend.txBytes >= UInt64(4 * bytes) && backend.rxBytes >= UInt64(4 * bytes), "\(backend)")
            }
        }
    }

    /// A guest asking for more queues than the backend offers gets the
    /// backend's maximum; its TAP's extra queues are detached while it is
    /// connected (else the kernel would steer flows to queues nobody reads)
    /// and attached again at disconnect. A single-queue guest on the same
    /// multi-queue backend keeps the flat keys.
    @Test func aGuestAskingForFourQueuesGetsTheBackendsTwo() throws {
        try withNetTestBed(netOptions: Self.backendOptions) { bed in
            let a = try bed.addGuest(23, options: NetFrontendOptions(queues: 4), tapQueues: 4)
            let c = try bed.addGuest(24)
            let store = bed.host.toolstack.store
            #expect(a.frontend.backendFeatures.maxQueues == 2)
            #expect(a.frontend.queueCount == 2)
            #expect(a.frontend.queueRingGrants.count == 2)
            #expect(try store.read(a.frontend.frontendPath + "/multi-queue-num-queues") == "2")
            #expect(try store.read(a.frontend.frontendPath + "/queue-2/tx-ring-ref") == nil)
            #expect(try #require(bed.vifStatus(a)).queues == 2)
            #expect(try txQueues(of: "eth0", in: a.namespace) == 2)

            // One queue: flat keys, and multi-queue-num-queues = 1 as Linux
            // writes it when the backend offers multi-queue.
            #expect(c.frontend.queueCount == 1)
            let cfe = c.frontend.frontendPath
            #expect(try store.read(cfe + "/multi-queue-num-queues") == "1")
            #expect(try store.read(cfe + "/tx-ring-ref") == String(try #require(c.frontend.ringGrants).tx))
            #expect(try store.read(cfe + "/queue-0/tx-ring-ref") == nil)
            #expect(try #require(bed.vifStatus(c)).queues == 1)
            #expect(try txQueues(of: c.vifName, in: bed.dom0Namespace) == 1)

            let ping = try a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", c.address], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")
            let run = try ParallelStreams(from: a, to: c, connections: 4, bytesEach: 1 << 20, port: 5103)
            let (sent, received) = try run.wait()
            #expect(sent.count == 4 && sent == received, "\(sent) \(received)")

            // Disconnect: the TAP's four queues are back; reconnect: two again.
            try a.frontend.disconnect(timeout: 5)
            #expect(try txQueues(of: "eth0", in: a.namespace) == 4)
            #expect(bed.waitUntil(5) { bed.host.toolstack.store.readState(bed.backendPath(a)) == .closed })
            try a.frontend.connect(timeout: 10)
            #expect(a.frontend.queueCount == 2)
            #expect(try txQueues(of: "eth0", in: a.namespace) == 2)
            let again = try a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", c.address], timeout: 30)
            #expect(again.contains("3 received"), "\(again)")
        }
    }

    /// A TAP with fewer queues than negotiated is refused at connect, before
    /// any ring is granted or key published.
    @Test func aTapWithTooFewQueuesIsRefused() throws {
        try withNetTestBed(netOptions: Self.backendOptions) { bed in
            let g = try bed.addGuest(25, options: NetFrontendOptions(queues: 2), connect: false, tapQueues: 1)
            #expect(throws: NetFrontendError.tapHasTooFewQueues(tap: "eth0", has: 1, needs: 2)) {
                try g.frontend.connect(timeout: 5)
            }
            #expect(!g.frontend.isConnected)
            let store = bed.host.toolstack.store
            let fe = g.frontend.frontendPath
            #expect(try store.read(fe + "/multi-queue-num-queues") == nil)
            #expect(try store.read(fe + "/queue-0/tx-ring-ref") == nil)
            #expect(try store.read(fe + "/tx-ring-ref") == nil)
            #expect(store.readState(bed.backendPath(g)) == .initWait)
        }
    }
}

/// The number of transmit queues the kernel has for `interface` in
/// `namespace` (its real_num_tx_queues: a TAP's attached queues).
func txQueues(of interface: String, in namespace: String) throws -> Int {
    let out = try sh(["ip", "netns", "exec", namespace, "ls", "/sys/class/net/\(interface)/queues"])
    return out.split(whereSeparator: \.isWhitespace).filter { $0.hasPrefix("tx-") }.count
}

/// `connections` TCP connections at once from `sender` to `receiver`
/// (python3 threads on both ends), each carrying `bytesEach` pseudo-random
/// bytes; both ends report one line per connection, "index bytes sha256".
final class ParallelStreams: @unchecked Sendable {   // the handoffs are the only shared state
    private let server = Handoff<Result<String, any Error>>()
    private let client = Handoff<Result<String, any Error>>()
    private var threads: [NativeThread] = []

    init(from sender: BedGuest, to receiver: BedGuest, connections: Int, bytesEach: Int, port: Int) throws {
        let serverScript = """
        import hashlib, socket, struct, threading
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('\(receiver.address)', \(port))); s.listen(\(connections)); s.settimeout(60)
        out = []
        def serve(c):
            c.settimeout(60); h = hashlib.sha256(); n = 0; head = b''
            while len(head) < 4:
                d = c.recv(4 - len(head))
                if not d: break
                head += d
            while True:
                d = c.recv(1 << 20)
                if not d: break
                h.update(d); n += len(d)
            out.append('%d %d %s' % (struct.unpack('!I', head)[0], n, h.hexdigest()))
        ts = []
        for _ in range(\(connections)):
            c, _ = s.accept(); t = threading.Thread(target=serve, args=(c,)); t.start(); ts.append(t)
        for t in ts: t.join()
        print('\\n'.join(sorted(out)))
        """
        let clientScript = """
        import hashlib, random, socket, struct, threading, time
        out = []
        def send(i):
            r = random.Random(\(port) * 1000 + i); h = hashlib.sha256(); left = \(bytesEach)
            for attempt in range(200):
                try:
                    c = socket.create_connection(('\(receiver.address)', \(port)), timeout=60); break
                except OSError:
                    time.sleep(0.05)
            c.sendall(struct.pack('!I', i))
            while left > 0:
                d = r.randbytes(min(left, 1 << 16)); h.update(d); c.sendall(d); left -= len(d)
            c.close(); out.append('%d %d %s' % (i, \(bytesEach), h.hexdigest()))
        ts = [threading.Thread(target=send, args=(i,)) for i in range(\(connections))]
        for t in ts: t.start()
        for t in ts: t.join()
        print('\\n'.join(sorted(out)))
        """
        let receiverNamespace = receiver.namespace, senderNamespace = sender.namespace
        let server = self.server, client = self.client
        threads.append(try NativeThread(name: "mq-server") {
            server.put(Result { try sh(["ip", "netns", "exec", receiverNamespace, "python3", "-c", serverScript], timeout: 120) })
        })
        usleep(200_000)   // the clients retry anyway
        threads.append(try NativeThread(name: "mq-client") {
            client.put(Result { try sh(["ip", "netns", "exec", senderNamespace, "python3", "-c", clientScript], timeout: 120) })
        })
    }

    /// Both ends' lines, sorted by connection.
    func wait() throws -> (sent: [String], received: [String]) {
        let sent = client.take(), received = server.take()
        for t in threads { t.join() }
        threads = []
        func lines(_ s: String) -> [String] { s.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) } }
        return (lines(try sent.get()), lines(try received.get()))
    }
}
