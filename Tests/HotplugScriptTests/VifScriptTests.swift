import Foundation
import Glibc
import SystemSupport
import Testing

/// A private network namespace, so the tests' bridges and taps never touch
/// the host's network. Deleted by `delete()` (defer).
final class NetNamespace {
    let name: String

    init?() {
        name = "xbhp" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        guard sh(["ip", "netns", "add", name]) != nil else { return nil }
    }

    @discardableResult
    func run(_ arguments: [String]) -> String? { sh(["ip", "netns", "exec", name] + arguments) }

    func delete() { sh(["ip", "netns", "delete", name]) }

    /// `ip -o link show DEV` inside the namespace (one line), or nil if absent.
    func link(_ dev: String) -> String? { run(["ip", "-o", "link", "show", "dev", dev]) }
}

/// scripts/xenbackd-vif-bridge run as libxl runs it (`online type_if=vif`,
/// `offline type_if=vif`, XENBUS_PATH=backend/vif/D/N) inside a private
/// network namespace where the test plays xenbackd's part (a tap named
/// vif7.0) and the admin's (a bridge).
@Suite struct VifScriptTests {
    func namespace() throws -> NetNamespace {
        if !isRoot() { try Test.cancel("needs root (ip netns)") }
        guard let ns = NetNamespace() else { try Test.cancel("ip netns add failed") }
        return ns
    }

    func runVifScript(_ f: HotplugFixture, _ ns: NetNamespace, _ command: String,
                      extra: [String: String] = [:]) throws -> ProcessResult {
        try runProcess(["ip", "netns", "exec", ns.name, scriptPath("xenbackd-vif-bridge"), command, "type_if=vif"],
                       environment: f.environment(xenbusPath: "backend/vif/7/0", type: "vif", extra: extra))
    }

    /// bridge key given, or absent (then xenbr0).
    @Test(arguments: ["xenbr-t", nil] as [String?])
    func onlineEnslavesTheVifAndOfflineDetachesIt(bridgeKey: String?) throws {
        let ns = try namespace()
        defer { ns.delete() }
        try withFixture { f in
            let bridge = bridgeKey ?? "xenbr0"
            #expect(ns.run(["ip", "link", "add", bridge, "type", "bridge"]) != nil)
            #expect(ns.run(["ip", "link", "set", bridge, "mtu", "1400"]) != nil)
            #expect(ns.run(["ip", "tuntap", "add", "dev", "vif7.0", "mode", "tap"]) != nil)
            try f.addVif(domid: 7, bridge: bridgeKey)

            let online = try runVifScript(f, ns, "online")
            #expect(online.status == 0, "\(online)\n\(f.log)")
            let link = try #require(ns.link("vif7.0"))
            #expect(link.contains("master \(bridge) "), "\(link)")
            #expect(link.contains("link/ether fe:ff:ff:ff:ff:ff "), "\(link)")
            #expect(link.contains(",UP"), "\(link)")
            #expect(link.contains("mtu 1400 "), "\(link)")
            #expect(try f.hotplugKeys(type: "vif", domid: 7, devid: 0) == ["hotplug-status": "connected"])

            let offline = try runVifScript(f, ns, "offline")
            #expect(offline.status == 0, "\(offline)")
            let after = try #require(ns.link("vif7.0"))
            #expect(!after.contains("master "), "\(after)")
        }
    }

    /// xenbackd creates the interface around InitWait; the script waits.
    @Test func interfaceThatAppearsLateIsWaitedFor() throws {
        let ns = try namespace()
        defer { ns.delete() }
        try withFixture { f in
            ns.run(["ip", "link", "add", "xenbr0", "type", "bridge"])
            try f.addVif(domid: 7, bridge: "xenbr0")
            let env = f.environment(xenbusPath: "backend/vif/7/0", type: "vif")
            let result = Locked<ProcessResult?>(nil)
            let name = ns.name
            let thread = TestThread {
                let r = try? runProcess(["ip", "netns", "exec", name, scriptPath("xenbackd-vif-bridge"), "online", "type_if=vif"],
                                        environment: env)
                result.withLock { $0 = r }
            }
            usleep(1_000_000)
            ns.run(["ip", "tuntap", "add", "dev", "vif7.0", "mode", "tap"])
            thread.join()
            let r = try #require(result.withLock { $0 })
            #expect(r.status == 0, "\(r)\n\(f.log)")
            #expect(ns.link("vif7.0")?.contains("master xenbr0 ") == true)
        }
    }

    @Test func missingInterfaceIsAnError() throws {
        let ns = try namespace()
        defer { ns.delete() }
        try withFixture { f in
            ns.run(["ip", "link", "add", "xenbr0", "type", "bridge"])
            try f.addVif(domid: 7, bridge: "xenbr0")
            let result = try runVifScript(f, ns, "online", extra: ["XENBACKD_VIF_WAIT": "1"])
            #expect(result.status == 1)
            let keys = try f.hotplugKeys(type: "vif", domid: 7, devid: 0)
            #expect(keys["hotplug-status"] == "error")
            let error = keys["hotplug-error"] ?? ""
            #expect(error.hasPrefix("timed out after 1.") && error.hasSuffix(" s waiting for interface vif7.0 (xenbackd creates it)"),
                    "\(error)")
        }
    }

    @Test func missingBridgeIsAnError() throws {
        let ns = try namespace()
        defer { ns.delete() }
        try withFixture { f in
            ns.run(["ip", "tuntap", "add", "dev", "vif7.0", "mode", "tap"])
            try f.addVif(domid: 7, bridge: "nobr0")
            let result = try runVifScript(f, ns, "online")
            #expect(result.status == 1)
            #expect(try f.hotplugKeys(type: "vif", domid: 7, devid: 0) == [
                "hotplug-status": "error", "hotplug-error": "bridge nobr0 does not exist (or is not a bridge)",
            ])
        }
    }

    /// offline after xenbackd removed the interface (and libxl the directory).
    @Test func offlineOfAGoneInterfaceSucceeds() throws {
        let ns = try namespace()
        defer { ns.delete() }
        try withFixture { f in
            let result = try runVifScript(f, ns, "offline")
            #expect(result.status == 0, "\(result)")
            #expect(try f.read(f.backendPath(type: "vif", domid: 7, devid: 0)) == nil)
        }
    }
}
