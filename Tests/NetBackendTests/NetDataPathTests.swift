import Foundation
import Glibc
import LoopbackHypervisor
import NetBackend
import NetFrontend
import SystemSupport
import Testing
import XenABI
import XenBus

/// Real traffic between guests: the kernel's own stacks in namespaces,
/// through our netfront, the rings, the backend, the vif TAPs and a bridge.
@Suite(.serialized) struct NetDataPathTests {
    @Test func twoGuestsPingAndExchangeAVerifiedStream() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1)
            let b = try bed.addGuest(2)
            // The vifs as Xen's scripts leave them: on the bridge, up, the
            // dummy MAC, carrier on while the frontend is Connected.
            for g in [a, b] {
                let link = try #require(bed.dom0Link(g.vifName))
                #expect(link.contains("master xenbr0"), "\(link)")
                #expect(link.contains("fe:ff:ff:ff:ff:ff"), "\(link)")
                #expect(link.contains("LOWER_UP"), "\(link)")
                let store = bed.host.toolstack.store
                #expect(store.readState(bed.backendPath(g)) == .connected)
                #expect(try store.read(bed.backendPath(g) + "/feature-rx-copy") == "1")
                #expect(try store.read(bed.backendPath(g) + "/hotplug-status") == "connected")
            }
            let ping = try a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")

            let (sent, received) = try tcpStream(from: a, to: b.namespace, address: b.address, bytes: 4 << 20)
            #expect(sent == received)
            #expect(sent.hasPrefix("\(4 << 20) "))

            let sa = try #require(bed.vifStatus(a)).statistics
            let sb = try #require(bed.vifStatus(b)).statistics
            #expect(sa.txBytes >= 4 << 20)
            #expect(sb.rxBytes >= 4 << 20)
            #expect(sa.txErrors == 0 && sb.rxErrors == 0 && sa.txMalformed == 0)
        }
    }

    @Test func aGuestReachesTheOutsideNetworkThroughTheBridge() throws {
        try withNetTestBed { bed in
            let outside = try bed.addOutsideHost(address: "10.99.0.200")
            let g = try bed.addGuest(3, options: NetFrontendOptions(splitEventChannels: true))
            let ping = try g.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.99.0.200"], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")
            #expect(try #require(bed.vifStatus(g)).splitEventChannels)
            let (sent, received) = try tcpStream(from: g, to: outside, address: "10.99.0.200", bytes: 2 << 20)
            #expect(sent == received)
        }
    }

    /// Large TCP transfers cross as GSO super-frames both ways: far fewer
    /// frames on the rings than 1500-byte segments would need.
    @Test func largeTransfersUseGSOEndToEnd() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(4)
            let b = try bed.addGuest(5)
            let bytes = 16 << 20
            let (sent, received) = try tcpStream(from: a, to: b.namespace, address: b.address, bytes: bytes)
            #expect(sent == received)
            let sa = try #require(bed.vifStatus(a)).statistics
            let sb = try #require(bed.vifStatus(b)).statistics
            // 16 MiB in 1448-byte segments would be ~11600 frames.
            #expect(sa.txPackets < 4000, "\(sa)")
            #expect(sa.txBytes / max(sa.txPackets, 1) > 4000, "\(sa)")
            #expect(sb.rxBytes / max(sb.rxPackets, 1) > 4000, "\(sb)")
        }
    }

    /// A guest that never posts rx buffers: the backend holds one frame,
    /// then drops and counts. Nothing piles up in the daemon: every frame
    /// the kernel handed to the vif is, once the TAP's own bounded queue
    /// (txqueuelen) has drained, counted as dropped, but for the one held.
    /// (The process's resident memory is no measure here: other suites run
    /// in parallel in the same process.)
    @Test func aGuestWithoutRxBuffersLosesFramesBackendStaysBounded() throws {
        try withNetTestBed(netOptions: NetBackendOptions(rxStallMilliseconds: 200)) { bed in
            let a = try bed.addGuest(6)
            let b = try bed.addGuest(7, options: NetFrontendOptions(postRxBuffers: false))
            // b never answers ARP: give a its neighbour entry, then flood UDP at it.
            try a.run(["ip", "neigh", "replace", b.address, "lladdr", b.mac, "dev", "eth0", "nud", "permanent"])
            let blast = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(20000): s.sendto(b'x' * 1000, ('\(b.address)', 9))
            """
            try a.run(["python3", "-c", blast], timeout: 60)
            #expect(bed.waitUntil(5) { (bed.vifStatus(b)?.statistics.rxDropped ?? 0) > 1000 },
                    "\(String(describing: bed.vifStatus(b)?.statistics))")
            let s = try #require(bed.vifStatus(b)).statistics
            #expect(s.rxPackets == 0)
            #expect(s.rxErrors == 0)
            #expect(s.rxDroppedUnfit == 0, "dropped for want of buffers, not as unfit")
            // 20 MB went at the guest: the kernel queued some of it on vif7.0
            // (tx_packets; the rest it dropped itself), and the backend
            // dropped every one of those it read, holding at most one.
            let queued = try vifTransmitted(bed, b.vifName)
            #expect(queued > 1000, "frames the kernel queued on \(b.vifName): \(queued)")
            #expect(bed.waitUntil(5) { (bed.vifStatus(b)?.statistics.rxDropped ?? 0) + 1 >= queued },
                    "queued \(queued), dropped \(String(describing: bed.vifStatus(b)?.statistics.rxDropped))")
            // The device is still up and serving the other direction.
            #expect(bed.host.toolstack.store.readState(bed.backendPath(b)) == .connected)
        }
    }
}

/// tx_packets of a vif in dom0's namespace: frames the kernel queued on the
/// TAP for the backend to read.
func vifTransmitted(_ bed: NetTestBed, _ vif: String) throws -> UInt64 {
    let json = try sh(["ip", "-n", bed.dom0Namespace, "-s", "-j", "link", "show", vif])
    guard let links = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]],
          let stats = links.first?["stats64"] as? [String: Any], let tx = stats["tx"] as? [String: Any],
          let packets = tx["packets"] as? NSNumber else {
        throw CommandFailed(description: "no tx statistics in: \(json)")
    }
    return packets.uint64Value
}
