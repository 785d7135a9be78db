import BlockBackend
import BlockStorage
import EngineDoubles
import Glibc
import Hypervisor
import Logging
import LoopbackHypervisor
import NetBackend
import NetworkPlumbing
import SystemSupport
import XenABI
import XenBus

/// The vbd and vif handshakes driven by a hostile frontend: the fuzzer's
/// bytes are a program of writes and removals of one of its devices'
/// frontend keys (`ring-ref*`, `event-channel*`, `tx-ring-ref`,
/// `queue-N/…`, `feature-*`, `state`, … with plausible values, edge numbers
/// and arbitrary bytes) and a few toolstack moves (unplug and replug, a bad
/// `mode`, a bad `vifname`/`mtu`/`bridge`/`rate`), run against
/// `BlockBackendService` and `NetBackendService` on an in-memory xenstore,
/// platform and interfaces, stepped with `XenbusControlLoop.runPending()`.
///
/// Invariants, after every step: a well-behaved second guest's vbd and vif
/// stay Connected; each hostile device's `state` is a valid XenbusState;
/// it is never Connected with keys that do not name mappable rings and open
/// ports; the hostile vif's carrier is on exactly while it is Connected;
/// `error` nodes and every log line are free of control characters (guest
/// bytes are escaped); no more rings are mapped than the devices may have.
/// At the end each hostile frontend starts over as Linux does and must be
/// Connected again; after every device is unplugged nothing is mapped or
/// bound, and no interface or socket is left.
public enum XenbusFuzzTarget: FuzzTarget {
    public static let name = "xenbus"

    static let hostile: DomID = 1
    static let bystander: DomID = 2
    static let devid: UInt32 = 51712
    static let vifDevid: UInt32 = 0
    /// Ring pages each guest grants (refs 0..<ringGrants on frames 0..<ringGrants).
    static let ringGrants = 16
    static let openPort: EventChannelPort = 3
    /// Two, so that split event channels (tx != rx) can connect.
    static let openPorts: Set<EventChannelPort> = [3, 4]
    /// multi-queue-max-queues of the vbds and the vifs.
    static let maxQueues = 2

    static let keys = ["ring-ref", "ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3", "ring-page-order", "event-channel",
                       "protocol", "feature-persistent", "state", "multi-queue-num-queues", "backend", "backend-id",
                       "feature-large-sector-size", "ring-ref15", "ring-ref16",
                       "queue-0/ring-ref", "queue-0/event-channel", "queue-1/ring-ref", "queue-1/event-channel",
                       "queue-0/ring-ref0", "queue-1/ring-ref0", "queue-1/ring-ref1", "queue-2/ring-ref"]
    static let vifKeys = ["tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx",
                          "multi-queue-num-queues", "request-rx-copy", "feature-rx-notify", "state",
                          "queue-0/tx-ring-ref", "queue-0/rx-ring-ref", "queue-0/event-channel",
                          "queue-0/event-channel-tx", "queue-0/event-channel-rx",
                          "queue-1/tx-ring-ref", "queue-1/rx-ring-ref", "queue-1/event-channel",
                          "queue-1/event-channel-tx", "queue-1/event-channel-rx", "queue-2/tx-ring-ref",
                          "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-no-csum-offload",
                          "feature-ipv6-csum-offload", "feature-split-event-channels", "mac", "backend"]
    static let values = ["0", "1", "2", "3", "4", "5", "6", "7", "15", "16", "4294967295", "4294967296", "-1", "+1",
                         " 1", "1 ", "0x1", "007", "", "x86_64-abi", "x86_32-abi", "x86_64-abi\n\u{1b}[31m",
                         "\u{7f}\u{1}", "٣", "1e3", "18446744073709551616"]
    /// The toolstack's vif keys a replug may spoil (the device then fails for good).
    static let vifToolstackKeys = ["vifname", "mtu", "bridge", "rate"]
    static let vifToolstackValues = ["vif2.0", "vif1.0", "xenbr0", "xenbr1", "eth0/1", "a b", "vif%d", "vif1.0\u{1b}",
                                     "sixteen-bytes-ab", "67", "68", "9000", "65536", "100000,20000", "0,0"]

    /// What a run did, for tests that require the vif part to take part.
    public struct Outcome: Sendable {
        public var findings: [String]
        /// The hostile vif was Connected after some step of the program.
        public var hostileVifConnected = false
        /// The hostile vbd was, likewise.
        public var hostileVbdConnected = false
        /// In-memory interfaces created (both guests' vifs, replugs included).
        public var interfacesCreated = 0
    }

    public static func run(_ input: UnsafeRawBufferPointer) -> [String] { outcome(input).findings }

    public static func outcome(_ input: UnsafeRawBufferPointer) -> Outcome {
        var program = ProgramBytes(input)
        let world = World()
        defer { world.close() }
        let findings = world.run(&program)
        return Outcome(findings: findings, hostileVifConnected: world.everConnected[.vif] ?? false,
                       hostileVbdConnected: world.everConnected[.vbd] ?? false,
                       interfacesCreated: world.interfaces.created)
    }

    /// Log lines are checked for raw control characters as they are written.
    final class LogCheck: @unchecked Sendable {   // guarded by `lock`
        private let lock = PThreadMutex()
        private var bad: [String] = []
        func check(_ text: String) {
            guard text.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else { return }
            lock.withLock { if bad.count < 4 { bad.append(text) } }
        }
        var findings: [String] { lock.withLock { bad } }
    }

    enum Device: CaseIterable { case vbd, vif }

    final class World {
        let store = InMemoryXenStore()
        let guests: [InMemoryGuest]
        let platform: InMemoryPlatform
        let interfaces = InMemoryInterfaces()
        let loop: XenbusControlLoop
        let service: BlockBackendService
        let net: NetBackendService
        let toolstack: LoopbackToolstack
        let logCheck = LogCheck()
        var findings: [String] = []
        var step = 0
        var wasConnected: [Device: Bool] = [:]
        var everConnected: [Device: Bool] = [:]
        /// The toolstack spoiled the device: only a replug brings it back.
        var tampered: [Device: Bool] = [:]

        init() {
            guests = [hostile, bystander].map { d in
                let g = InMemoryGuest(domain: d, pages: ringGrants, grants: ringGrants)
                for p in 0..<ringGrants { g.grant(GrantRef(p), frame: p) }
                return g
            }
            platform = InMemoryPlatform(store: store, guests: guests, openPorts: [hostile: openPorts, bystander: openPorts])
            let check = logCheck
            let logger = Logger(label: "fuzz") { _ in
                LineLogHandler(level: .debug) { message, metadata in
                    check.check(message)
                    for v in metadata.values { check.check(v) }
                }
            }
            // One thread, deterministic: jobs run inline, their ends are posted tasks.
            loop = XenbusControlLoop(store: store, logger: logger, workers: .inline)
            service = BlockBackendService(platform: platform, loop: loop, openStorage: { params, _, depth in
                guard params.hasPrefix("mem:") else { throw StorageError("open", errno: ENOENT, path: params) }
                func disk() -> InMemoryStorage {
                    let disk = InMemoryStorage(sizeBytes: 1 << 16, queueDepth: depth)
                    disk.completesAtOnce = true   // the flush at unplug is waited for
                    return disk
                }
                let first = disk()
                // Rings 1...: a handle of their own (the handshake is fuzzed here, not the data).
                first.anotherQueue = { disk() }
                return first
            }, options: .init(pollMicroseconds: 0, persistentGrants: true, maxIndirectSegments: 32, maxQueues: maxQueues),
               logger: logger)
            net = NetBackendService(platform: platform, loop: loop,
                                    options: .init(maxQueues: maxQueues, interfaces: interfaces), logger: logger)
            toolstack = LoopbackToolstack(store: store)
        }

        func close() {
            // Whatever happened, nothing may keep a thread, a mapping or a socket.
            unplugAll()
        }

        func unplugAll() {
            for d in [hostile, bystander] {
                try? toolstack.removeDisk(domain: d, devid: devid)
                try? toolstack.removeNic(domain: d, devid: vifDevid)
            }
            settle()
        }

        func frontend(_ device: Device, _ d: DomID = hostile) -> String {
            device == .vbd ? toolstack.frontendPath(domain: d, devid: devid) : toolstack.nicFrontendPath(domain: d, devid: vifDevid)
        }
        func backend(_ device: Device, _ d: DomID = hostile) -> String {
            device == .vbd ? toolstack.backendPath(domain: d, devid: devid) : toolstack.nicBackendPath(domain: d, devid: vifDevid)
        }
        func state(_ path: String) -> String? { (try? store.read(path + "/state")) ?? nil }

        /// Runs watch events and tasks until none are left (bounded: a
        /// handshake that never settles is itself a finding).
        func settle() {
            for _ in 0..<64 {
                loop.runPending()
                if store.pendingEvents == 0 && !loop.hasPendingTasks { return }
            }
            findings.append("step \(step): the control plane never settled")
        }

        func plug(_ device: Device, _ d: DomID, toolstackKey: (String, String)? = nil) throws {
            switch device {
            case .vbd:
                try toolstack.addDisk(domain: d, .init(devid: devid, params: "mem:\(d)"))
            case .vif:
                var nic = LoopbackToolstack.Nic(devid: vifDevid, mac: "00:16:3e:00:00:0\(d)")
                if let kv = toolstackKey { nic.extraBackendKeys[kv.0] = kv.1 }
                try toolstack.addNic(domain: d, nic)
            }
        }

        func unplug(_ device: Device, _ d: DomID) throws {
            switch device {
            case .vbd: try toolstack.removeDisk(domain: d, devid: devid)
            case .vif: try toolstack.removeNic(domain: d, devid: vifDevid)
            }
        }

        func replug(_ device: Device, toolstackKey: (String, String)? = nil) throws {
            try unplug(device, hostile)
            settle()
            try plug(device, hostile, toolstackKey: toolstackKey)
        }

        func writeGoodKeys(_ device: Device, _ fe: String) throws {
            switch device {
            case .vbd:
                try store.remove(fe + "/ring-page-order")
                try store.write(fe + "/ring-ref", "0")
                try store.write(fe + "/event-channel", String(openPort))
                try store.write(fe + "/protocol", "x86_64-abi")
            case .vif:
                // What Linux netfront writes for one queue.
                for (k, v) in [("tx-ring-ref", "1"), ("rx-ring-ref", "2"), ("event-channel", String(openPort)),
                               ("request-rx-copy", "1"), ("feature-rx-notify", "1"), ("feature-sg", "1"),
                               ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1")] {
                    try store.write(fe + "/" + k, v)
                }
            }
        }

        func run(_ program: inout ProgramBytes) -> [String] {
            do {
                try service.start()
                try net.start()
                for d in [hostile, bystander] {
                    try toolstack.createDomain(d, name: "guest\(d)")
                    for device in Device.allCases { try plug(device, d) }
                }
                settle()
                for device in Device.allCases {
                    let other = frontend(device, bystander)
                    try writeGoodKeys(device, other)
                    if device == .vbd {
                        try store.write(other + "/state", "3")
                        settle()
                    }
                    try store.write(other + "/state", "4")
                    settle()
                    guard state(backend(device, bystander)) == "4" else {
                        return ["setup: the well-behaved guest's \(device) did not connect"]
                    }
                }
                while !program.done && step < 200 {
                    step += 1
                    let op = program.u8()
                    // The high bit picks the vif: programs of bytes below 0x80 (the
                    // seeds from before the vif) still drive only the vbd.
                    let device: Device = op >= 0x80 ? .vif : .vbd
                    let names = device == .vbd ? keys : vifKeys
                    let fe = frontend(device)
                    switch op % 8 {
                    case 0, 1, 2:
                        let key = names[Int(program.u8()) % names.count]
                        try store.write(fe + "/" + key, value(&program))
                    case 3:
                        try store.remove(fe + "/" + names[Int(program.u8()) % names.count])
                    case 4, 5:
                        try store.write(fe + "/state", values[Int(program.u8()) % 10])
                    case 6:
                        try replug(device)
                        tampered[device] = false
                    default:
                        if device == .vbd {
                            try store.write(backend(.vbd) + "/mode", value(&program))
                        } else {
                            let key = vifToolstackKeys[Int(program.u8()) % vifToolstackKeys.count]
                            let choice = program.u8()
                            let v = choice < 128 ? vifToolstackValues[Int(choice) % vifToolstackValues.count] : value(&program)
                            try replug(.vif, toolstackKey: (key, v))
                        }
                        tampered[device] = true
                    }
                    settle()
                    check()
                    for d in Device.allCases where state(backend(d)) == "4" { everConnected[d] = true }
                }
                for device in Device.allCases { try startOver(device) }
            } catch {
                findings.append("step \(step): xenstore refused the harness: \(error)")
            }
            findings += logCheck.findings.map { "a log line holds a raw control character: \(GuestText.escaped($0))" }
            unplugAll()
            if platform.mappedPages != 0 || platform.portsBound != 0 {
                findings.append("after unplug: \(platform.mappedPages) pages mapped, \(platform.portsBound) ports bound")
            }
            if interfaces.liveInterfaces != 0 || interfaces.openDescriptors != 0 {
                findings.append("after unplug: \(interfaces.liveInterfaces) interfaces alive, \(interfaces.openDescriptors) sockets open")
            }
            return findings
        }

        func value(_ program: inout ProgramBytes) -> String {
            let choice = Int(program.u8())
            if choice < 200 { return values[choice % values.count] }
            return String(decoding: program.bytes(Int(program.u8()) % 24), as: UTF8.self)
        }
    }
}

/// The fuzzer's bytes, read front to back; zeros once they run out.
struct ProgramBytes {
    private let input: UnsafeRawBufferPointer
    private var next = 0
    init(_ input: UnsafeRawBufferPointer) { self.input = input }
    var done: Bool { next >= input.count }
    mutating func u8() -> UInt8 {
        guard next < input.count else { return 0 }
        defer { next += 1 }
        return input[next]
    }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in u8() } }
}
