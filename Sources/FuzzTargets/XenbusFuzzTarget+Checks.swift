import EngineDoubles
import Hypervisor
import XenABI
import XenBus

extension XenbusFuzzTarget.World {
    typealias Target = XenbusFuzzTarget
    typealias Device = XenbusFuzzTarget.Device

    func check() {
        for device in Device.allCases where state(backend(device, Target.bystander)) != "4" {
            findings.append("step \(step): the well-behaved guest's \(device) left Connected")
        }
        if interfaces.interface(named: "vif\(Target.bystander).\(Target.vifDevid)")?.carrier != true {
            findings.append("step \(step): the well-behaved guest's vif has no carrier")
        }
        for device in Device.allCases { check(device) }
        // Both guests' vbds (the hostile one up to maxQueues rings of order 4) and vifs.
        let rings = (Target.maxQueues * Target.ringGrants + 1) + (2 * Target.maxQueues + 2)
        if platform.mappedPages > rings {
            findings.append("step \(step): \(platform.mappedPages) pages mapped, at most \(rings) rings")
        }
    }

    private func check(_ device: Device) {
        let be = backend(device)
        let s = state(be)
        if let s, !(s.count == 1 && "123456".contains(s)) {
            findings.append("step \(step): \(device) backend state \(GuestText.quoted(s)) is not a XenbusState")
        }
        let connected = s == "4"
        if connected && wasConnected[device] != true && !(device == .vbd ? keysAreGood() : vifKeysAreGood()) {
            findings.append("step \(step): \(device) Connected with keys that name no usable ring: \(frontendKeys(device))")
        }
        wasConnected[device] = connected
        if let e = (try? store.read(be + "/error")) ?? nil,
           e.unicodeScalars.contains(where: { ($0.value < 0x20 || $0.value >= 0x7f) && $0 != "…" }) {
            findings.append("step \(step): \(device) error node not escaped: \(GuestText.quoted(e))")
        }
        // A bridge forwards to a port with carrier: only while served. (A
        // spoiled vifname may name another guest's interface: not checked.)
        if device == .vif, ((try? store.read(be + "/vifname")) ?? nil) == nil,
           let interface = interfaces.interface(named: "vif\(Target.hostile).\(Target.vifDevid)"),
           interface.carrier != connected {
            findings.append("step \(step): vif carrier \(interface.carrier ? "on" : "off") in state \(s ?? "gone")")
        }
    }

    private func key(_ device: Device, _ k: String) -> String? { (try? store.read(frontend(device) + "/" + k)) ?? nil }

    /// What Linux blkback would connect with: a valid protocol, 1...maxQueues
    /// rings (keys under queue-N/ when more than one), each with a port that
    /// is open and refs that are granted for the pages the order asks.
    func keysAreGood() -> Bool {
        func key(_ k: String) -> String? { self.key(.vbd, k) }
        if let p = key("protocol"), BlkifProtocol(name: p) == nil { return false }
        var queues = 1
        if let n = key("multi-queue-num-queues") {
            guard let n = XenStoreNumber.parse(n, as: UInt32.self), n >= 1, n <= Target.maxQueues else { return false }
            queues = Int(n)
        }
        var order: UInt32?
        if let o = key("ring-page-order") {
            guard let parsed = XenStoreNumber.parse(o, as: UInt32.self), parsed <= 4 else { return false }
            order = parsed
        }
        for q in 0..<queues {
            let prefix = queues == 1 ? "" : "queue-\(q)/"
            guard let port = key(prefix + "event-channel").flatMap({ XenStoreNumber.parse($0, as: UInt32.self) }),
                  Target.openPorts.contains(port) else { return false }
            let refs = order.map { o in (0..<(1 << o)).map { key(prefix + "ring-ref\($0)") } } ?? [key(prefix + "ring-ref")]
            let parsed = refs.map { $0.flatMap { XenStoreNumber.parse($0, as: UInt32.self) } }
            guard parsed.allSatisfy({ $0 != nil }) else { return false }
            let frames = parsed.map { Int($0!) }
            // The in-memory grant table maps consecutive frames only.
            guard frames.allSatisfy({ $0 < Target.ringGrants }),
                  frames.enumerated().allSatisfy({ $0.element == frames[0] + $0.offset }) else { return false }
        }
        return true
    }

    /// What netback (xen/io/netif.h) connects with: rx-copy and
    /// rx-notify, well-formed flags, 1...maxQueues queues, each with two
    /// granted ring refs and an open port (or two different open ports).
    func vifKeysAreGood() -> Bool {
        func key(_ k: String) -> String? { self.key(.vif, k) }
        func number(_ k: String) -> UInt32? { key(k).flatMap { XenStoreNumber.parse($0, as: UInt32.self) } }
        guard key("request-rx-copy") == "1", key("feature-rx-notify") == "1" else { return false }
        for flag in ["feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-no-csum-offload", "feature-ipv6-csum-offload"] {
            if let v = key(flag), v != "0", v != "1" { return false }
        }
        var queues = 1
        if key("multi-queue-num-queues") != nil {
            guard let n = number("multi-queue-num-queues"), n >= 1, n <= Target.maxQueues else { return false }
            queues = Int(n)
        }
        for q in 0..<queues {
            let prefix = queues == 1 ? "" : "queue-\(q)/"
            for ring in ["tx-ring-ref", "rx-ring-ref"] {
                guard let ref = number(prefix + ring), ref < Target.ringGrants else { return false }
            }
            if key(prefix + "event-channel") != nil {
                guard let port = number(prefix + "event-channel"), Target.openPorts.contains(port) else { return false }
            } else {
                guard let tx = number(prefix + "event-channel-tx"), let rx = number(prefix + "event-channel-rx"),
                      tx != rx, Target.openPorts.contains(tx), Target.openPorts.contains(rx) else { return false }
            }
        }
        return true
    }

    func frontendKeys(_ device: Device) -> String {
        let fe = frontend(device)
        func leaves(_ dir: String) -> [String] {
            let names = ((try? store.directory(fe + dir)) ?? nil) ?? []
            return names.flatMap { n -> [String] in
                let path = dir.isEmpty ? n : String(dir.dropFirst()) + "/" + n
                let children = leaves(dir + "/" + n)
                return children.isEmpty ? [path] : children
            }
        }
        return leaves("").map { "\($0)=\(GuestText.quoted(self.key(device, $0) ?? ""))" }.joined(separator: " ")
    }

    /// The frontend starts over as Linux does after an error (blkfront:
    /// Closing, Closed, its keys afresh, Initialising, Initialised;
    /// netfront: the same, then Connected); the device must come back.
    func startOver(_ device: Device) throws {
        step += 1
        let fe = frontend(device), be = backend(device)
        if tampered[device] == true || state(be) == nil {
            try? unplug(device, Target.hostile)
            settle()
            try plug(device, Target.hostile)
            settle()
        }
        try store.write(fe + "/state", "5")
        settle()
        try store.write(fe + "/state", "6")
        settle()
        // A frontend starting over writes its keys afresh.
        for k in (device == .vbd ? Target.keys : Target.vifKeys) where k != "state" { try store.remove(fe + "/" + k) }
        for dir in ["queue-0", "queue-1", "queue-2"] where device == .vif { try store.remove(fe + "/" + dir) }
        try store.write(fe + "/backend", be)
        try store.write(fe + "/backend-id", "0")
        if device == .vif { try store.write(fe + "/mac", "00:16:3e:00:00:0\(Target.hostile)") }
        try writeGoodKeys(device, fe)
        try store.write(fe + "/state", "1")
        settle()
        guard state(be) == "2" else {
            findings.append("start over: \(device) backend \(state(be) ?? "gone") after the frontend's Initialising, not InitWait (\(frontendKeys(device)))")
            return
        }
        // blkfront publishes its ring at Initialised, netfront goes Connected.
        try store.write(fe + "/state", device == .vbd ? "3" : "4")
        settle()
        if state(be) != "4" {
            let error = ((try? store.read(be + "/error")) ?? nil) ?? "none"
            findings.append("start over: \(device) backend \(state(be) ?? "gone") after good keys, not Connected (error: \(error); \(frontendKeys(device)))")
        }
        check()
    }
}
