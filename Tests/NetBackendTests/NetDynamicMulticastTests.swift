import Foundation
import LoopbackHost
import NetBackend
import NetFrontend
import Testing
import XenBus

/// feature-dynamic-multicast-control: a guest turns its multicast filter on
/// and off by writing request-multicast-control under a running connection,
/// and the backend applies it at once (netback's watch on the key).
@Suite(.serialized) struct NetDynamicMulticastTests {
    @Test func theGuestTurnsFilteringOnAndOffWhileConnected() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(48)
            let b = try bed.addGuest(49)
            let store = bed.host.toolstack.store
            #expect(try store.read(bed.backendPath(b) + "/feature-dynamic-multicast-control") == "1")
            #expect(bed.vifStatus(b)?.multicastFiltering == false)
            func dropped() -> UInt64 { bed.vifStatus(b)?.statistics.rxDroppedFiltered ?? 0 }
            func pingGroup() { _ = try? a.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "eth0", "224.0.0.1"], timeout: 30) }

            pingGroup()
            #expect(dropped() == 0, "filtering is off: every multicast frame reaches b")
            try b.frontend.store.write(b.frontend.frontendPath + "/request-multicast-control", "1")
            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.multicastFiltering == true })
            pingGroup()
            #expect(bed.waitUntil(5) { dropped() >= 3 }, "b's empty filter drops a's pings to 224.0.0.1: \(dropped())")
            try b.frontend.store.write(b.frontend.frontendPath + "/request-multicast-control", "0")
            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.multicastFiltering == false })
            let before = dropped()
            pingGroup()
            #expect(dropped() == before)
            // Unicast went through all along; the device never left Connected.
            #expect(try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30).contains("2 received"))
            #expect(store.readState(bed.backendPath(b)) == .connected)
            // A value that is not 0 or 1 fails the device with the reason.
            try b.frontend.store.write(b.frontend.frontendPath + "/request-multicast-control", "yes")
            #expect(bed.waitUntil(5) { bed.vifStatus(b)?.lastError?.contains("request-multicast-control") == true },
                    "\(String(describing: bed.vifStatus(b)?.lastError))")
        }
    }
}
