import Foundation
import Glibc
import Hypervisor
import LoopbackHost
import LoopbackHypervisor
import NetBackend
import NetFrontend
import SystemSupport
import Testing
import XenABI
import XenBus

/// The control ring (netif.h "Control ring", feature-ctrl-ring): our
/// netfront gives the backend one, sets receive-side hashing on it, and
/// the backend hashes every frame for the guest (a hash extra slot the
/// netfront checks against the frame's bytes) and steers it to the queue
/// the guest's table names, whichever TAP queue the kernel gave it to.
@Suite(.serialized) struct NetControlRingTests {
    static let backendOptions = NetBackendOptions(maxQueues: 2)

    /// Microsoft's RSS verification key (the NDIS "Verifying the RSS Hash
    /// Calculation" suite's).
    static let msKey: [UInt8] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
        0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
        0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ]

    /// A namespace that sends nothing on its own, from now on: no IPv6 (on
    /// every interface there and every one made later: router and listener
    /// chatter) and no IGMP reports for 224.0.0.x groups (xenbr0's
    /// multicast snooping joins 224.0.0.106, reported to every guest). Such
    /// frames would reach the guests on their own, and the tests count frames.
    static func quiet(_ namespace: String) throws {
        try sh(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.igmp_link_local_mcast_reports=0"])
    }

    /// `count` datagrams from each of `flows` source ports, `from` to `to`.
    static func udpFlows(from: BedGuest, to: BedGuest, flows: Int = 64, count: Int = 3, basePort: Int = 20000) throws {
        let udp = """
        import socket
        for i in range(\(flows)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(('\(from.address)', \(basePort) + i))
            for _ in range(\(count)): s.sendto(b'q' * 200, ('\(to.address)', 9))
            s.close()
        """
        try from.run(["python3", "-c", udp], timeout: 30)
    }

    /// The guest's table as the backend holds it.
    static func table(_ bed: NetTestBed, _ g: BedGuest) -> [UInt8]? {
        guard let s = bed.vifStatus(g)?.receiveHash else { return nil }
        return (0..<s.mappingSize).map { s.mapping[$0] }
    }

    @Test func theGuestsTableSteersEveryFrameAndEachCarriesTheHashOfItsBytes() throws {
        try withNetTestBed(netOptions: Self.backendOptions) { bed in
            try Self.quiet(bed.dom0Namespace)
            let a = try bed.addGuest(41, options: NetFrontendOptions(queues: 2), tapQueues: 2)
            try Self.quiet(a.namespace)
            let b = try bed.addGuest(42, options: NetFrontendOptions(queues: 2, controlRing: true), tapQueues: 2)
            try Self.quiet(b.namespace)
            // Each knows the other's MAC for good: no ARP (unhashed) mid-count.
            try a.run(["ip", "neigh", "replace", b.address, "lladdr", b.mac, "dev", "eth0", "nud", "permanent"])
            try b.run(["ip", "neigh", "replace", a.address, "lladdr", a.mac, "dev", "eth0", "nud", "permanent"])
            let store = bed.host.toolstack.store
            let fe = b.frontend.frontendPath

            // The handshake: offered, given, taken.
            #expect(try store.read(bed.backendPath(b) + "/feature-ctrl-ring") == "1")
            #expect(b.frontend.backendFeatures.controlRing && b.frontend.negotiated.controlRing)
            #expect(b.frontend.queueCount == 2)
            let ringRef = try #require(b.frontend.controlRingGrant)
            let port = try #require(b.frontend.controlEventChannelPort)
            #expect(try store.read(fe + "/ctrl-ring-ref") == String(ringRef))
            #expect(try store.read(fe + "/event-channel-ctrl") == String(port))
            #expect(!b.frontend.queueRingGrants.contains { $0.tx == ringRef || $0.rx == ringRef })
            // Status sees the connection once the control thread has recorded it.
            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.controlRing == true })
            let status = try #require(bed.vifStatus(b))
            #expect(status.state == .connected && status.queues == 2)
            #expect(status.controlRing)
            let initial = try #require(status.receiveHash)
            #expect(initial.algorithm == NetifHashAlgorithm.none && initial.flags == 0 && initial.mappingSize == 0)
            // The guest without one: no keys, no control ring.
            #expect(try store.read(a.frontend.frontendPath + "/ctrl-ring-ref") == nil)
            #expect(try store.read(a.frontend.frontendPath + "/event-channel-ctrl") == nil)
            #expect(bed.waitUntil(5) { bed.vifStatus(a)?.queues == 2 })
            #expect(bed.vifStatus(a)?.controlRing == false && bed.vifStatus(a)?.receiveHash == nil)
            #expect(throws: NetFrontendError.noControlRing) { try a.frontend.controlRequest(type: NetifCtrlType.getHashFlags) }

            // Every answer, as netif.h and Linux netback give it.
            let fb = b.frontend
            #expect(try fb.controlRequest(type: NetifCtrlType.getHashFlags).status == NetifCtrlStatus.notSupported)
            #expect(try fb.setHashAlgorithm(7) == NetifCtrlStatus.invalidParameter)
            #expect(try fb.setHashAlgorithm(NetifHashAlgorithm.toeplitz) == NetifCtrlStatus.success)
            let flags = try fb.controlRequest(type: NetifCtrlType.getHashFlags)
            #expect(flags.status == NetifCtrlStatus.success && flags.data == 0xF, "\(flags)")
            #expect(try fb.setHashFlags(0x10) == NetifCtrlStatus.invalidParameter)
            #expect(try fb.setHashKey(Self.msKey + [0]) == NetifCtrlStatus.bufferOverflow)
            let size = try fb.controlRequest(type: NetifCtrlType.getHashMappingSize)
            #expect(size.status == NetifCtrlStatus.success && size.data == 128, "\(size)")
            #expect(try fb.setHashMappingSize(129) == NetifCtrlStatus.invalidParameter)
            #expect(try fb.setHashMappingSize(8) == NetifCtrlStatus.success)
            #expect(try fb.setHashMapping(Array(repeating: 1, count: 8)) == NetifCtrlStatus.success)
            #expect(Self.table(bed, b) == Array(repeating: 1, count: 8))
            // Entry 2 names no queue of a two-queue vif: nothing changes.
            #expect(try fb.setHashMapping([0, 0, 2, 0], offset: 0) == NetifCtrlStatus.invalidParameter)
            #expect(Self.table(bed, b) == Array(repeating: 1, count: 8))
            #expect(try fb.setHashMapping([0, 0, 0], offset: 6) == NetifCtrlStatus.invalidParameter)
            #expect(Self.table(bed, b) == Array(repeating: 1, count: 8))
            let unknown = try fb.controlRequest(type: NetifCtrlType.addGrefMapping, data: (1, 2, 3))
            #expect(unknown.status == NetifCtrlStatus.notSupported && unknown.data == 0, "\(unknown)")
            #expect(try fb.setHashFlags(NetifHashType.ipv4 | NetifHashType.ipv4TCP) == NetifCtrlStatus.success)
            #expect(try fb.setHashKey(Self.msKey) == NetifCtrlStatus.success)
            #expect(fb.controlRequestsSent == 15)
            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.statistics.controlRequests == fb.controlRequestsSent },
                    "\(String(describing: bed.vifStatus(b)?.statistics))")
            let set = try #require(bed.vifStatus(b)?.receiveHash)
            #expect(set.algorithm == NetifHashAlgorithm.toeplitz && set.flags == NetifHashType.ipv4 | NetifHashType.ipv4TCP)
            #expect(set.keyLength == 40 && set.mappingSize == 8)

            /// Sends the flows a -> b and waits for b to take them all; returns
            /// how b's counters and the backend's moved.
            func flowsIntoB(basePort: Int, steering: Bool = true) throws
                -> (perQueue: [NetFrontendStatistics], total: NetFrontendStatistics, steered: UInt64) {
                let before = fb.queueStatistics, totalBefore = fb.statistics
                let steeredBefore = try #require(bed.vifStatus(b)).statistics.rxSteered
                try Self.udpFlows(from: a, to: b, basePort: basePort)
                #expect(bed.waitUntil(10) { fb.statistics.rxFrames - totalBefore.rxFrames >= 192 },
                        "\(fb.queueStatistics) \(String(describing: bed.vifStatus(b)?.statistics))")
                // The backend publishes its counters after the pass that moved them.
                if steering { _ = bed.waitUntil(2) { (bed.vifStatus(b)?.statistics.rxSteered ?? 0) > steeredBefore } }
                let after = fb.queueStatistics, total = fb.statistics
                func delta(_ x: NetFrontendStatistics, _ y: NetFrontendStatistics) -> NetFrontendStatistics {
                    var d = NetFrontendStatistics()
                    d.rxFrames = x.rxFrames - y.rxFrames
                    d.rxHashedFrames = x.rxHashedFrames - y.rxHashedFrames
                    d.rxHashMismatches = x.rxHashMismatches - y.rxHashMismatches
                    d.rxErrors = x.rxErrors - y.rxErrors
                    d.rxDropped = x.rxDropped - y.rxDropped
                    d.rxGSOFrames = x.rxGSOFrames - y.rxGSOFrames
                    return d
                }
                let steered = try #require(bed.vifStatus(b)).statistics.rxSteered - steeredBefore
                return (zip(after, before).map { delta($0, $1) }, delta(total, totalBefore), steered)
            }

            // Every entry 1: the 64 flows, spread by dom0's kernel over
            // both TAP queues of vif42.0, all reach queue 1, each frame
            // with the hash of its addresses.
            let one = try flowsIntoB(basePort: 20000)
            #expect(one.total.rxFrames == 192, "\(one)")
            #expect(one.perQueue[0].rxFrames == 0 && one.perQueue[1].rxFrames == 192, "\(one.perQueue)")
            #expect(one.total.rxHashedFrames == one.total.rxFrames && one.total.rxHashMismatches == 0, "\(one.total)")
            #expect(one.total.rxErrors == 0 && one.total.rxDropped == 0, "\(one.total)")
            #expect(one.steered > 0, "the kernel put no flow on TAP queue 0 (\(one))")

            // Every entry 0: the reverse.
            #expect(try fb.setHashMapping(Array(repeating: 0, count: 8)) == NetifCtrlStatus.success)
            #expect(Self.table(bed, b) == Array(repeating: 0, count: 8))
            let zero = try flowsIntoB(basePort: 21000)
            #expect(zero.total.rxFrames == 192, "\(zero)")
            #expect(zero.perQueue[0].rxFrames == 192 && zero.perQueue[1].rxFrames == 0, "\(zero.perQueue)")
            #expect(zero.total.rxHashedFrames == 192 && zero.total.rxHashMismatches == 0, "\(zero.total)")
            #expect(zero.steered > 0, "the kernel put no flow on TAP queue 1 (\(zero))")

            // Hashing off: no hash extras, and the kernel's steering again.
            #expect(try fb.setHashAlgorithm(NetifHashAlgorithm.none) == NetifCtrlStatus.success)
            #expect(bed.vifStatus(b)?.receiveHash?.algorithm == NetifHashAlgorithm.none)
            let off = try flowsIntoB(basePort: 22000, steering: false)
            #expect(off.total.rxFrames == 192, "\(off)")
            #expect(off.total.rxHashedFrames == 0 && off.steered == 0, "\(off)")
            #expect(off.perQueue.allSatisfy { $0.rxFrames > 0 }, "\(off.perQueue)")

            // Toeplitz again (key, types and table kept), and a TCP stream:
            // the ipv4+tcp hash type, and GSO super-frames carrying their
            // GSO extra, then the hash extra. Last, so that the stream's
            // closing segments count nowhere.
            #expect(try fb.setHashAlgorithm(NetifHashAlgorithm.toeplitz) == NetifCtrlStatus.success)
            let before = fb.queueStatistics, totalBefore = fb.statistics
            let (sent, received) = try tcpStream(from: a, to: b.namespace, address: b.address, bytes: 1 << 20, port: 5201)
            #expect(sent == received && sent.hasPrefix("\(1 << 20) "), "\(sent) \(received)")
            let tcp = fb.statistics
            #expect(fb.queueStatistics[1].rxFrames == before[1].rxFrames, "\(fb.queueStatistics)")
            #expect(tcp.rxFrames > totalBefore.rxFrames)
            #expect(tcp.rxHashedFrames - totalBefore.rxHashedFrames == tcp.rxFrames - totalBefore.rxFrames, "\(tcp)")
            #expect(tcp.rxHashMismatches == 0 && tcp.rxErrors == 0, "\(tcp)")
            #expect(tcp.rxGSOFrames > totalBefore.rxGSOFrames, "no GSO frame reached the guest: \(tcp)")

            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.statistics.controlRequests == fb.controlRequestsSent })
            let backend = try #require(bed.vifStatus(b)).statistics
            #expect(backend.rxErrors == 0 && backend.rxDroppedSteering == 0, "\(backend)")
            #expect(fb.statistics.rxHashMismatches == 0 && fb.statistics.protocolErrors == 0, "\(fb.statistics)")
        }
    }

    /// `ctrl-ring-ref` and `event-channel-ctrl` go together: one without
    /// the other closes the device with an error naming the missing key.
    /// Starting over with both, the device connects with its control ring
    /// and a one-queue vif hashes too (no steering to do).
    @Test func halfAControlRingIsRefusedAndAWholeOneServesOneQueue() throws {
        try withNetTestBed { bed in
            try Self.quiet(bed.dom0Namespace)
            let other = try bed.addGuest(44)
            try Self.quiet(other.namespace)
            let g = try bed.addGuest(43, options: NetFrontendOptions(controlRing: true), connect: false)
            try Self.quiet(g.namespace)
            let store = bed.host.toolstack.store
            let be = bed.backendPath(g)
            for (missing, present) in [("event-channel-ctrl", "ctrl-ring-ref"), ("ctrl-ring-ref", "event-channel-ctrl")] {
                g.frontend.publishOverrides = [missing: nil]
                #expect(throws: (any Error).self) { try g.frontend.connect(timeout: 5) }
                #expect(!g.frontend.isConnected && !g.frontend.hasControlRing)
                #expect(bed.waitUntil(5) { store.readState(be) == .closing })
                let error = try store.read(be + "/error") ?? ""
                #expect(error == "\(present) without \(missing)", "\(error)")
                #expect(bed.waitUntil(5) { bed.vifStatus(g)?.lastError == error },
                        "\(String(describing: bed.vifStatus(g)?.lastError))")
                #expect(try store.read(g.frontend.frontendPath + "/" + present) != nil)
                #expect(try store.read(g.frontend.frontendPath + "/" + missing) == nil)
            }

            g.frontend.publishOverrides = [:]
            try g.frontend.connect(timeout: 10)
            #expect(store.readState(be) == .connected)
            #expect(try store.read(be + "/error") == nil)
            #expect(bed.waitUntil(5) { bed.vifStatus(g)?.controlRing == true })
            let status = try #require(bed.vifStatus(g))
            #expect(status.controlRing && status.queues == 1)
            #expect(try store.read(g.frontend.frontendPath + "/event-channel-ctrl") == String(try #require(g.frontend.controlEventChannelPort)))
            #expect(try g.frontend.setHashAlgorithm(NetifHashAlgorithm.toeplitz) == NetifCtrlStatus.success)
            #expect(try g.frontend.setHashKey(Self.msKey) == NetifCtrlStatus.success)
            #expect(try g.frontend.setHashFlags(NetifHashType.ipv4) == NetifCtrlStatus.success)
            // A one-queue table: entry 1 names no queue.
            #expect(try g.frontend.setHashMappingSize(2) == NetifCtrlStatus.success)
            #expect(try g.frontend.setHashMapping([0, 1]) == NetifCtrlStatus.invalidParameter)
            #expect(try g.frontend.setHashMapping([0, 0]) == NetifCtrlStatus.success)

            let ping = try other.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", g.address], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")
            let s = g.frontend.statistics
            #expect(s.rxHashedFrames >= 3 && s.rxHashMismatches == 0 && s.rxErrors == 0, "\(s)")
            #expect(bed.vifStatus(g)?.statistics.rxSteered == 0)

            // A key set behind the frontend's back (a raw request of length
            // 0: the all-zero key, every hash 0): the checks catch each frame.
            let clear = try g.frontend.controlRequest(type: NetifCtrlType.setHashKey, data: (0, 0, 0))
            #expect(clear.status == NetifCtrlStatus.success)
            #expect(bed.vifStatus(g)?.receiveHash?.keyLength == 0)
            let hashedBefore = g.frontend.statistics.rxHashedFrames
            let again = try other.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", g.address], timeout: 30)
            #expect(again.contains("3 received"), "\(again)")
            let t = g.frontend.statistics
            #expect(t.rxHashedFrames - hashedBefore >= 3 && t.rxHashMismatches == t.rxHashedFrames - hashedBefore, "\(t)")

            // Disconnect gives the control ring back with the rest.
            try g.frontend.disconnect(timeout: 5)
            #expect(!g.frontend.hasControlRing && g.frontend.controlRingGrant == nil)
            #expect(throws: NetFrontendError.noControlRing) { try g.frontend.setHashAlgorithm(NetifHashAlgorithm.none) }
        }
    }
}
