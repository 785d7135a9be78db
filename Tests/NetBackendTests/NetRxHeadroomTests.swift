import Foundation
import LoopbackHost
import NetBackend
import NetFrontend
import Testing
import XenABI
import XenBus

/// Linux's xdp-headroom (feature-xdp-headroom): our netfront asks for room
/// before each received frame the way Linux netfront does when an XDP
/// program is attached (Reconfiguring, then the key, then Connected again),
/// and every frame then comes that far into its first buffer, with an XDP
/// extra slot saying so; given back, frames come as before.
@Suite(.serialized) struct NetRxHeadroomTests {
    @Test func aGuestAsksForRoomGetsItPerFrameAndGivesItBack() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(45)
            let b = try bed.addGuest(46)
            let store = bed.host.toolstack.store
            #expect(try store.read(bed.backendPath(a) + "/feature-xdp-headroom") == "1")
            #expect(a.frontend.backendFeatures.xdpHeadroom)
            #expect(bed.vifStatus(a)?.rxHeadroom == 0)

            try a.frontend.setRxHeadroom(256)
            #expect(store.readState(bed.backendPath(a)) == .connected)
            #expect(try store.read(a.frontend.frontendPath + "/xdp-headroom") == "256")
            #expect(bed.waitUntil(5) { bed.vifStatus(a)?.rxHeadroom == 256 })
            let before = a.frontend.statistics
            let ping = try b.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", a.address], timeout: 30)
            #expect(ping.contains("3 received"), "\(ping)")
            // Every byte of a 1 MiB stream to the guest, through buffers that start 256 bytes in.
            let run = try ParallelStreams(from: b, to: a, connections: 1, bytesEach: 1 << 20, port: 5301)
            let (sent, received) = try run.wait()
            #expect(sent.count == 1 && sent == received, "\(sent) \(received)")
            let with = a.frontend.statistics
            #expect(with.rxHeadroomFrames - before.rxHeadroomFrames >= 3, "\(with)")
            #expect(with.rxHeadroomMismatches == 0 && with.rxErrors == 0, "\(with)")

            // Given back: no XDP extra, data at offset 0 (a mismatch otherwise).
            try a.frontend.setRxHeadroom(0)
            #expect(bed.waitUntil(5) { bed.vifStatus(a)?.rxHeadroom == 0 })
            let again = try b.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", a.address], timeout: 30)
            #expect(again.contains("3 received"), "\(again)")
            let after = a.frontend.statistics
            #expect(after.rxHeadroomFrames == with.rxHeadroomFrames, "\(after)")
            #expect(after.rxFrames > with.rxFrames && after.rxHeadroomMismatches == 0 && after.rxErrors == 0, "\(after)")

            // More room than the backend leaves: the device fails with the
            // reason; the other guest carries on.
            #expect(throws: NetFrontendError.self) { try a.frontend.setRxHeadroom(5000, timeout: 5) }
            #expect(bed.waitUntil(5) { bed.vifStatus(a)?.lastError?.contains("xdp-headroom 5000 is more than 2048") == true },
                    "\(String(describing: bed.vifStatus(a)?.lastError))")
            #expect(try store.read(bed.backendPath(a) + "/error")?.contains("xdp-headroom 5000") == true)
            #expect(bed.vifStatus(b)?.state == .connected)
            let c = try bed.addGuest(47)
            let other = try b.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", c.address], timeout: 30)
            #expect(other.contains("2 received"), "\(other)")
        }
    }
}
