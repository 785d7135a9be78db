import Foundation
import Glibc
import LoopbackHost
import LoopbackHypervisor
import NetBackend
import NetFrontend
import SystemSupport
import Testing
import XenBus

/// The vif's life: the order libxl and the vif script expect, carrier with
/// the frontend, reconnects, removal, and bad keys from either side.
@Suite(.serialized) struct NetLifecycleTests {
    @Test func disconnectDropsCarrierReconnectServesAgainRemovalDeletesTheInterface() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1, nic: LoopbackToolstack.Nic(devid: 0, bridge: bed.bridge, mtu: 1400))
            let b = try bed.addGuest(2)
            let store = bed.host.toolstack.store
            #expect(try #require(bed.dom0Link(a.vifName)).contains("mtu 1400 "), "the mtu key")
            try a.frontend.disconnect()
            #expect(bed.waitUntil(5) { store.readState(bed.backendPath(a)) == .closed })
            let down = try #require(bed.dom0Link(a.vifName))
            #expect(down.contains("NO-CARRIER"), "\(down)")
            #expect(try store.read(bed.backendPath(a) + "/error") == nil)

            try a.frontend.connect()
            #expect(store.readState(bed.backendPath(a)) == .connected)
            let up = try #require(bed.dom0Link(a.vifName))
            #expect(!up.contains("NO-CARRIER") && up.contains("master xenbr0"), "\(up)")
            let ping = try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")

            try a.frontend.disconnect()
            try bed.host.toolstack.removeNic(domain: a.domid, devid: 0)
            #expect(bed.waitUntil(5) { bed.dom0Link(a.vifName) == nil }, "vif1.0 still exists after the device went")
            #expect(bed.vifStatus(a) == nil)
        }
    }

    /// With a `script` key the backend leaves the bridge to the script, as
    /// libxl runs it: `online type_if=vif` after InitWait, when vifD.N must
    /// already exist. The real scripts/xenbackd-vif-bridge does it here.
    @Test func theVifScriptFindsTheInterfaceAtInitWait() throws {
        try withNetTestBed { bed in
            let other = try bed.addGuest(2)
            let script = repoRoot + "/scripts/xenbackd-vif-bridge"
            let g = try bed.addGuest(3, nic: LoopbackToolstack.Nic(devid: 0, bridge: bed.bridge, script: script), connect: false)
            let store = bed.host.toolstack.store
            let be = bed.backendPath(g)
            #expect(bed.waitUntil(5) { store.readState(be) == .initWait })
            let before = try #require(bed.dom0Link(g.vifName), "vif3.0 must exist at InitWait")
            #expect(!before.contains("master"), "\(before)")
            #expect(try store.read(be + "/hotplug-status") == "")

            let scratch = "/tmp/" + bed.id + "-hotplug"
            try makeDirectories(scratch, mode: 0o700)
            defer { _ = try? sh(["rm", "-rf", scratch]) }
            let result = try runProcess(
                ["ip", "netns", "exec", bed.dom0Namespace, script, "online", "type_if=vif"],
                environment: ["PATH": toolPath, "XENBUS_PATH": "backend/vif/3/0", "XENBUS_TYPE": "vif",
                              "XENBUS_BASE_PATH": "backend", "XENSTORED_PATH": bed.host.xenStoreSocket,
                              "XENBACKD_HOTPLUG_LOG": scratch + "/hotplug.log", "XENBACKD_HOTPLUG_LOCK": scratch + "/lock"],
                timeout: 30)
            #expect(result.status == 0, "\(result)")
            #expect(try store.read(be + "/hotplug-status") == "connected")
            let after = try #require(bed.dom0Link(g.vifName))
            #expect(after.contains("master xenbr0") && after.contains("fe:ff:ff:ff:ff:ff"), "\(after)")

            try g.frontend.connect()
            let ping = try g.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", other.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")
        }
    }

    /// Netback's table: Closing is answered with Closing (carrier off,
    /// queues stopped) and Closed follows the frontend's Closed; then a
    /// clean reconnect is served.
    @Test func closingIsAnsweredWithClosingAndClosedFollowsTheFrontend() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1)
            let b = try bed.addGuest(2)
            let store = bed.host.toolstack.store
            let be = bed.backendPath(a)
            try a.frontend.store.writeState(a.frontend.frontendPath, .closing)
            #expect(bed.waitUntil(5) { store.readState(be) == .closing })
            #expect(bed.vifStatus(a)?.queues == 0)
            #expect(try #require(bed.dom0Link(a.vifName)).contains("NO-CARRIER"))
            usleep(200_000)
            #expect(store.readState(be) == .closing, "Closed before the frontend was")
            try a.frontend.store.writeState(a.frontend.frontendPath, .closed)
            #expect(bed.waitUntil(5) { store.readState(be) == .closed })
            #expect(try store.read(be + "/error") == nil)

            a.frontend.releaseResources()
            try a.frontend.connect()
            #expect(store.readState(be) == .connected)
            let ping = try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")
        }
    }

    /// A device closed by a frontend's bad key comes back when that
    /// frontend starts over (after Closing and Closed, or straight away),
    /// and then carries traffic.
    @Test(arguments: [true, false])
    func aDeviceFailedByItsFrontendComesBackWhenTheFrontendStartsOver(closesFirst: Bool) throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1, connect: false)
            let b = try bed.addGuest(2)
            let store = bed.host.toolstack.store
            a.frontend.publishOverrides = ["tx-ring-ref": "+9"]
            #expect(throws: (any Error).self) { try a.frontend.connect(timeout: 5) }
            let be = bed.backendPath(a)
            #expect(bed.waitUntil(5) { store.readState(be) == .closing })
            #expect(try store.read(be + "/error") == #"malformed tx-ring-ref "+9""#)
            if closesFirst {
                try a.frontend.store.writeState(a.frontend.frontendPath, .closing)
                try a.frontend.store.writeState(a.frontend.frontendPath, .closed)
                usleep(100_000)
                #expect(store.readState(be) == .closed)
            }
            a.frontend.publishOverrides = [:]
            try a.frontend.connect(timeout: 5)
            #expect(store.readState(be) == .connected)
            #expect(try store.read(be + "/error") == nil)
            let ping = try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")
        }
    }

    @Test(arguments: [("mtu", "9x"), ("mtu", "20"), ("mtu", "+1500"), ("mtu", " 1500"), ("rate", "fast"), ("rate", "100,0"), ("bridge", "a/b"),
                      ("vifname", "a-name-much-too-long")])
    func aBadToolstackKeyClosesTheDeviceWithAReason(key: String, value: String) throws {
        try withNetTestBed { bed in
            let nic = LoopbackToolstack.Nic(devid: 0, bridge: bed.bridge, extraBackendKeys: [key: value])
            let g = try bed.addGuest(4, nic: nic, withTap: false, connect: false)
            let store = bed.host.toolstack.store
            let be = bed.backendPath(g)
            #expect(bed.waitUntil(5) { store.readState(be) == .closing })
            let error = try store.read(be + "/error") ?? ""
            #expect(error.contains(key == "vifname" ? "interface name" : key), "\(key)=\(value): \(error)")
            #expect(bed.vifStatus(g)?.lastError != nil)
        }
    }

    @Test(arguments: [["request-rx-copy": "0"], ["feature-rx-notify": nil], ["multi-queue-num-queues": "9"],
                      ["tx-ring-ref": "x"], ["event-channel": nil]] as [[String: String?]])
    func aBadFrontendKeyClosesTheDeviceAndOthersCarryOn(overrides: [String: String?]) throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1)
            let b = try bed.addGuest(2)
            let h = try bed.addGuest(9, withTap: false, connect: false)
            h.frontend.publishOverrides = overrides
            #expect(throws: (any Error).self) { try h.frontend.connect(timeout: 5) }
            let store = bed.host.toolstack.store
            #expect(bed.waitUntil(5) { store.readState(bed.backendPath(h)) == .closing })
            let error = try store.read(bed.backendPath(h) + "/error") ?? ""
            #expect(!error.isEmpty, "\(overrides)")
            let ping = try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")
        }
    }
}

/// The package's root, found from this file's path.
let repoRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()
