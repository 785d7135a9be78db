import BlockBackend
import BlockStorage
import EngineDoubles
import Glibc
import Hypervisor
import Logging
import LoopbackHypervisor
import SystemSupport
import XenABI
import XenBus

/// The vbd handshake driven by a hostile frontend: the fuzzer's bytes are
/// a program of writes and removals of the frontend's keys (`ring-ref*`,
/// `ring-page-order`, `event-channel`, `protocol`, `feature-persistent`,
/// `state`, … with plausible values, edge numbers and arbitrary bytes),
/// a few toolstack moves (unplug and replug, a bad `mode`), run against
/// `BlockBackendService` on an in-memory xenstore and platform, stepped
/// with `XenbusControlLoop.runPending()`.
///
/// Invariants, after every step: a well-behaved second guest's device stays
/// Connected; the hostile device's `state` is a valid XenbusState; it is
/// never Connected with keys that do not name a mappable ring and an open
/// port; its `error` node and every log line are free of control
/// characters (guest bytes are escaped); at most the two devices' rings
/// are mapped. At the end the frontend starts over as Linux does
/// (Closing, Closed, Initialising with good keys) and must be Connected
/// again; after both devices are unplugged nothing is mapped or bound.
public enum XenbusFuzzTarget: FuzzTarget {
    public static let name = "xenbus"

    static let hostile: DomID = 1
    static let bystander: DomID = 2
    static let devid: UInt32 = 51712
    /// Ring pages each guest grants (refs 0..<ringGrants on frames 0..<ringGrants).
    static let ringGrants = 16
    static let openPort: EventChannelPort = 3

    static let keys = ["ring-ref", "ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3", "ring-page-order", "event-channel",
                       "protocol", "feature-persistent", "state", "multi-queue-num-queues", "backend", "backend-id",
                       "feature-large-sector-size", "ring-ref15", "ring-ref16"]
    static let values = ["0", "1", "2", "3", "4", "5", "6", "7", "15", "16", "4294967295", "4294967296", "-1", "+1",
                         " 1", "1 ", "0x1", "007", "", "x86_64-abi", "x86_32-abi", "x86_64-abi\n\u{1b}[31m",
                         "\u{7f}\u{1}", "٣", "1e3", "18446744073709551616"]

    public static func run(_ input: UnsafeRawBufferPointer) -> [String] {
        var program = ProgramBytes(input)
        let world = World()
        defer { world.close() }
        return world.run(&program)
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

    final class World {
        let store = InMemoryXenStore()
        let guests: [InMemoryGuest]
        let platform: InMemoryPlatform
        let loop: XenbusControlLoop
        let service: BlockBackendService
        let toolstack: LoopbackToolstack
        let logCheck = LogCheck()
        var findings: [String] = []
        var step = 0
        var wasConnected = false

        init() {
            guests = [hostile, bystander].map { d in
                let g = InMemoryGuest(domain: d, pages: ringGrants, grants: ringGrants)
                for p in 0..<ringGrants { g.grant(GrantRef(p), frame: p) }
                return g
            }
            platform = InMemoryPlatform(store: store, guests: guests, openPorts: [hostile: [openPort], bystander: [openPort]])
            let check = logCheck
            let logger = Logger(label: "fuzz") { _ in
                LineLogHandler(level: .debug) { message, metadata in
                    check.check(message)
                    for v in metadata.values { check.check(v) }
                }
            }
            loop = XenbusControlLoop(store: store, logger: logger)
            service = BlockBackendService(platform: platform, loop: loop, openStorage: { params, _, depth in
                guard params.hasPrefix("mem:") else { throw StorageError("open", errno: ENOENT, path: params) }
                let disk = InMemoryStorage(sizeBytes: 1 << 16, queueDepth: depth)
                disk.completesAtOnce = true   // the flush at unplug is waited for
                return disk
            }, options: .init(pollMicroseconds: 0, persistentGrants: true, maxIndirectSegments: 32), logger: logger)
            toolstack = LoopbackToolstack(store: store)
        }

        func close() {
            // Whatever happened, nothing may keep a thread or a mapping.
            try? toolstack.removeDisk(domain: hostile, devid: devid)
            try? toolstack.removeDisk(domain: bystander, devid: devid)
            settle()
        }

        var frontend: String { toolstack.frontendPath(domain: hostile, devid: devid) }
        var backend: String { toolstack.backendPath(domain: hostile, devid: devid) }
        func state(_ path: String) -> String? { (try? store.read(path + "/state")) ?? nil }

        /// Runs watch events and tasks until none are left (bounded: a
        /// handshake that never settles is itself a finding).
        func settle() {
            for _ in 0..<64 {
                loop.runPending()
                if store.pendingEvents == 0 { return }
            }
            findings.append("step \(step): the control plane never settled")
        }

        func plug(_ d: DomID) throws {
            try toolstack.createDomain(d, name: "guest\(d)")
            try toolstack.addDisk(domain: d, .init(devid: devid, params: "mem:\(d)"))
        }

        func writeGoodKeys(_ fe: String) throws {
            try store.remove(fe + "/ring-page-order")
            try store.write(fe + "/ring-ref", "0")
            try store.write(fe + "/event-channel", String(openPort))
            try store.write(fe + "/protocol", "x86_64-abi")
        }

        func run(_ program: inout ProgramBytes) -> [String] {
            do {
                try service.start()
                try plug(hostile)
                try plug(bystander)
                settle()
                let other = toolstack.frontendPath(domain: bystander, devid: devid)
                try writeGoodKeys(other)
                try store.write(other + "/state", "3")
                settle()
                try store.write(other + "/state", "4")
                settle()
                guard state(toolstack.backendPath(domain: bystander, devid: devid)) == "4" else {
                    return ["setup: the well-behaved guest did not connect"]
                }
                var tampered = false
                while !program.done && step < 200 {
                    step += 1
                    switch program.u8() % 8 {
                    case 0, 1, 2:
                        let key = keys[Int(program.u8()) % keys.count]
                        try store.write(frontend + "/" + key, value(&program))
                    case 3:
                        try store.remove(frontend + "/" + keys[Int(program.u8()) % keys.count])
                    case 4, 5:
                        try store.write(frontend + "/state", values[Int(program.u8()) % 10])
                    case 6:
                        try toolstack.removeDisk(domain: hostile, devid: devid)
                        settle()
                        try plug(hostile)
                        tampered = false
                    default:
                        try store.write(backend + "/mode", value(&program))
                        tampered = true
                    }
                    settle()
                    check()
                }
                try startOver(replug: tampered)
            } catch {
                findings.append("step \(step): xenstore refused the harness: \(error)")
            }
            findings += logCheck.findings.map { "a log line holds a raw control character: \(GuestText.escaped($0))" }
            try? toolstack.removeDisk(domain: hostile, devid: devid)
            try? toolstack.removeDisk(domain: bystander, devid: devid)
            settle()
            if platform.mappedPages != 0 || platform.portsBound != 0 {
                findings.append("after unplug: \(platform.mappedPages) pages mapped, \(platform.portsBound) ports bound")
            }
            return findings
        }

        func value(_ program: inout ProgramBytes) -> String {
            let choice = Int(program.u8())
            if choice < 200 { return values[choice % values.count] }
            return String(decoding: program.bytes(Int(program.u8()) % 24), as: UTF8.self)
        }

        func check() {
            if state(toolstack.backendPath(domain: bystander, devid: devid)) != "4" {
                findings.append("step \(step): the well-behaved guest's device left Connected")
            }
            let s = state(backend)
            if let s, !(s.count == 1 && "123456".contains(s)) {
                findings.append("step \(step): backend state \(GuestText.quoted(s)) is not a XenbusState")
            }
            let connected = s == "4"
            if connected && !wasConnected && !keysAreGood() {
                findings.append("step \(step): Connected with keys that name no usable ring: \(frontendKeys())")
            }
            wasConnected = connected
            if let e = (try? store.read(backend + "/error")) ?? nil,
               e.unicodeScalars.contains(where: { ($0.value < 0x20 || $0.value >= 0x7f) && $0 != "…" }) {
                findings.append("step \(step): error node not escaped: \(GuestText.quoted(e))")
            }
            if platform.mappedPages > 2 * ringGrants {
                findings.append("step \(step): \(platform.mappedPages) pages mapped")
            }
        }

        /// What Linux blkback would connect with: a valid protocol, a port
        /// that is open, refs that are granted for the pages the order asks.
        func keysAreGood() -> Bool {
            func key(_ k: String) -> String? { (try? store.read(frontend + "/" + k)) ?? nil }
            if let p = key("protocol"), p != "x86_64-abi" { return false }
            guard let port = key("event-channel").flatMap({ XenStoreNumber.parse($0, as: UInt32.self) }),
                  port == openPort else { return false }
            var refs: [String?] = []
            if let o = key("ring-page-order") {
                guard let order = XenStoreNumber.parse(o, as: UInt32.self), order <= 4 else { return false }
                refs = (0..<(1 << order)).map { key("ring-ref\($0)") }
            } else {
                refs = [key("ring-ref")]
            }
            let parsed = refs.map { $0.flatMap { XenStoreNumber.parse($0, as: UInt32.self) } }
            guard parsed.allSatisfy({ $0 != nil }) else { return false }
            let frames = parsed.map { Int($0!) }
            // The in-memory grant table maps consecutive frames only.
            return frames.allSatisfy { $0 < ringGrants } && frames.enumerated().allSatisfy { $0.element == frames[0] + $0.offset }
        }

        func frontendKeys() -> String {
            let names = ((try? store.directory(frontend)) ?? nil) ?? []
            return names.map { "\($0)=\(GuestText.quoted(((try? store.read(frontend + "/" + $0)) ?? nil) ?? ""))" }
                .joined(separator: " ")
        }

        /// The frontend starts over as Linux blkfront does after an error;
        /// the device must come back.
        func startOver(replug: Bool) throws {
            step += 1
            if replug || state(backend) == nil {
                try? toolstack.removeDisk(domain: hostile, devid: devid)
                settle()
                try plug(hostile)
                settle()
            }
            try store.write(frontend + "/state", "5")
            settle()
            try store.write(frontend + "/state", "6")
            settle()
            // A frontend starting over writes its keys afresh.
            for k in keys where k != "state" { try store.remove(frontend + "/" + k) }
            try store.write(frontend + "/backend", backend)
            try store.write(frontend + "/backend-id", "0")
            try writeGoodKeys(frontend)
            try store.write(frontend + "/state", "1")
            settle()
            guard state(backend) == "2" else {
                findings.append("start over: backend \(state(backend) ?? "gone") after the frontend's Initialising, not InitWait (\(frontendKeys()))")
                return
            }
            try store.write(frontend + "/state", "3")
            settle()
            if state(backend) != "4" {
                let error = ((try? store.read(backend + "/error")) ?? nil) ?? "none"
                findings.append("start over: backend \(state(backend) ?? "gone") after Initialised with good keys, not Connected (error: \(error); \(frontendKeys()))")
            }
            check()
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
