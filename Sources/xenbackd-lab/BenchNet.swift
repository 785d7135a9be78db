import DaemonCLI
import ArgumentParser
import Foundation
import Glibc
import Hypervisor
import XenABI
import LoopbackHost
import NetBackend
import NetFrontend
import SystemSupport

/// `xenbackd-lab bench net`: the net backend on the loopback hypervisor, with
/// guests played by the kernel's stacks in namespaces (LoopbackHost's
/// NetworkBed), next to the same measurement between two namespaces joined
/// by a veth pair: the machine's own limit for namespace-to-namespace
/// traffic.
struct BenchNet: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "net", abstract: "Benchmark the net backend against a veth pair.")

    @Option(help: "Seconds per measurement.")
    var seconds: Int = 5
    @Flag(help: "Skip the veth reference runs.")
    var noReference = false
    @Option(help: "Only rows whose name contains this.")
    var only: String?
    @Flag(help: "Also time mapping a 64 KiB tx frame's 16 grants against grant-copying them (the loopback hypervisor's costs).")
    var grantCosts = false
    @Flag(help: "Turn br_netfilter's hooks off on the bench's bridge (bridge-nf-call-*tables=0 in its dom0 namespace only); by default they are as the host's kernel sets them.")
    var noBridgeNetfilter = false

    @Flag(help: "The receiving guest gives a control ring and turns Toeplitz hashing on for every type: each frame to it is hashed and carries a hash extra (feature-ctrl-ring).")
    var rxHash = false
    @Option(help: "Bytes of rx headroom the receiving guest asks for (xdp-headroom, as Linux netfront for XDP: 256).")
    var rxHeadroom: Int = 0

    @OptionGroup var logging: LoggingOptions

    enum Kind { case tcp, udp64 }
    struct Row {
        let name: String
        let kind: Kind
        let toOutside: Bool
    }

    static let rows = [
        Row(name: "tcp guest->guest", kind: .tcp, toOutside: false),
        Row(name: "tcp guest->namespace", kind: .tcp, toOutside: true),
        Row(name: "udp-64B guest->guest", kind: .udp64, toOutside: false),
        Row(name: "udp-64B guest->namespace", kind: .udp64, toOutside: true),
    ]

    func run() throws {
        guard geteuid() == 0 else { throw ValidationError("bench net needs root (namespaces, TAP, bridge)") }
        guard access("/usr/bin/iperf3", X_OK) == 0 else { throw ValidationError("iperf3 is missing (scripts/setup installs it)") }
        var logger = logging.makeLogger("xenbackd.bench")
        logger.logLevel = max(logger.logLevel, .warning)
        let rows = Self.rows.filter { only == nil || $0.name.contains(only!) }

        say("xenbackd-lab bench net: iperf3, \(seconds) s per row; reference: two namespaces joined by a veth pair")
        var reference: [String: Measurement] = [:]
        if !noReference {
            let veth = try VethPair()
            defer { veth.tearDown() }
            for row in rows where reference[kindKey(row.kind)] == nil {
                progress("reference: \(kindKey(row.kind)) over veth")
                reference[kindKey(row.kind)] = try measure(kind: row.kind, client: veth.clientNamespace,
                                                           server: veth.serverNamespace, address: veth.serverAddress)
            }
        }

        let bed = try NetworkBed(netOptions: .init(), logger: logger)
        defer { bed.tearDown() }
        let outside = try bed.addOutsideHost(address: "10.99.0.200")
        // With br_netfilter loaded, every bridged IPv4 frame also goes through
        // iptables' hooks (a third of a 64-byte frame's bridge transit in
        // profiles); the veth pair crosses no bridge. Say which it is.
        let hooks = ["iptables", "ip6tables", "arptables"].map { "net.bridge.bridge-nf-call-\($0)" }
        if noBridgeNetfilter {
            for h in hooks { _ = try? sh(["ip", "netns", "exec", bed.dom0Namespace, "sysctl", "-qw", h + "=0"]) }
        }
        let iptablesHook = (try? sh(["ip", "netns", "exec", bed.dom0Namespace, "sysctl", "-n", hooks[0]]))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        say("bridge: br_netfilter hooks " + (iptablesHook == nil ? "absent (module not loaded)"
                                              : iptablesHook == "0" ? "off" : "on (bridge-nf-call-iptables=\(iptablesHook!))"))
        let a = try bed.addGuest(1)
        let b = try bed.addGuest(2, options: NetFrontendOptions(controlRing: rxHash))
        if rxHash {
            let key = (0..<ToeplitzKey.maxLength).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            for status in [try b.frontend.setHashAlgorithm(NetifHashAlgorithm.toeplitz), try b.frontend.setHashKey(key),
                           try b.frontend.setHashFlags(NetifHashType.all)] where status != NetifCtrlStatus.success {
                throw ValidationError("the backend refused a hash setting: status \(status)")
            }
            say("guest 2 hashes what it receives: Toeplitz over every type, a 40-byte key")
        }
        if rxHeadroom > 0 {
            try b.frontend.setRxHeadroom(rxHeadroom)
            say("guest 2 asked for \(rxHeadroom) bytes of rx headroom")
        }
        if grantCosts {
            progress("grant map against grant copy")
            let c = try GrantCosts.measure(host: bed.host)
            say(String(format: "\n64 KiB tx frame (16 grants), %d rounds: grant copy %.2f µs; map %.2f µs + first touch %.2f µs + unmap %.2f µs = %.2f µs",
                       c.rounds, c.copy, c.map, c.touch, c.unmap, c.map + c.touch + c.unmap))
        }
        var cpuLines: [String] = []
        say("")
        say(pad("row", 26) + pad("xenbackd", 16) + pad("veth", 16) + "ratio")
        for row in rows {
            progress("\(row.name)")
            let server = row.toOutside ? outside : b.namespace
            let address = row.toOutside ? "10.99.0.200" : b.address
            let before = Notifications(bed: bed, guests: [a, b])
            let ours = try measure(kind: row.kind, client: a.namespace, server: server, address: address)
            let after = Notifications(bed: bed, guests: [a, b])
            let ref = reference[kindKey(row.kind)]
            let unit = row.kind == .tcp ? "Gbit/s" : "kpps"
            let scale = row.kind == .tcp ? 1e-9 : 1e-3
            let refText = ref.map { format($0.rate * scale) + " " + unit } ?? "-"
            let ratio = ref.map { format(ours.rate / $0.rate) } ?? "-"
            say(pad(row.name, 26) + pad(format(ours.rate * scale) + " " + unit, 16) + pad(refText, 16) + ratio)
            let perPacket = { (ns: UInt64) in String(Int((Double(ns) / max(ours.packets, 1)).rounded())) }
            let toBackend = Double(after.fromGuests &- before.fromGuests) / max(ours.packets, 1)
            let toGuests = Double(after.fromBackend &- before.fromBackend) / max(ours.packets, 1)
            var line = pad(row.name, 26) + pad(perPacket(ours.cpu.backend), 9) + pad(perPacket(ours.cpu.guests), 9)
                + pad(perPacket(ours.cpu.iperf), 9) + pad(perPacket(ours.cpu.softirq), 9) + pad(perPacket(ours.cpu.total), 9)
            if let ref {
                let refPerPacket = { (ns: UInt64) in String(Int((Double(ns) / max(ref.packets, 1)).rounded())) }
                line += pad(refPerPacket(ref.cpu.iperf), 9) + pad(refPerPacket(ref.cpu.softirq), 9) + pad(refPerPacket(ref.cpu.total), 9)
            } else {
                line += pad("-", 9) + pad("-", 9) + pad("-", 9)
            }
            line += pad(String(format: "%.3f", toBackend), 9) + pad(String(format: "%.3f", toGuests), 10)
            let waits = { (n: UInt64) in String(format: "%.3f", Double(n) / max(ours.packets, 1)) }
            line += pad(waits(after.backendWaits &- before.backendWaits), 9) + waits(after.guestWaits &- before.guestWaits)
            cpuLines.append(line)
        }
        say("\nCPU per packet, ns (packets: UDP datagrams received; TCP bytes received / 1448, one MSS each);"
            + " notifications and waits per packet")
        say(pad("", 26) + pad("--------------- xenbackd ----------------", 45) + pad("----------- veth -----------", 27)
            + pad("-- notifications --", 19) + "---- waits ----")
        say(pad("row", 26) + pad("backend", 9) + pad("guests", 9) + pad("iperf3", 9) + pad("softirq", 9) + pad("total", 9)
            + pad("iperf3", 9) + pad("softirq", 9) + pad("total", 9) + pad("to back", 9) + pad("to guests", 10)
            + pad("backend", 9) + "guests")
        for line in cpuLines { say(line) }
        if let s = bed.vifStatus(a)?.statistics {
            say("\nvif1.0: tx \(s.txPackets) frames \(s.txBytes) bytes, malformed \(s.txMalformed), dropped \(s.txDropped); "
                + "rx \(s.rxPackets) frames, dropped \(s.rxDropped)")
        }
        if rxHash || rxHeadroom > 0 {
            let f = b.frontend.statistics
            say("guest 2: \(f.rxFrames) frames received, \(f.rxHashedFrames) hashed (\(f.rxHashMismatches) wrong), "
                + "\(f.rxHeadroomFrames) with headroom (\(f.rxHeadroomMismatches) wrong)")
        }
    }

    /// One row's traffic and the CPU it took.
    struct Measurement {
        /// Bits per second (TCP) or packets per second (UDP) received.
        var rate: Double
        /// Packets received in the run (TCP: bytes / 1448).
        var packets: Double
        var cpu: ThreadCPU.Delta
    }

    private func measure(kind: Kind, client: String, server: String, address: String) throws -> Measurement {
        let start = ThreadCPU.sample()
        let r = try iperf(kind: kind, client: client, server: server, address: address)
        let cpu = ThreadCPU.sample().since(start)
        let packets = kind == .tcp ? r.bytes / 1448 : r.packets
        return Measurement(rate: kind == .tcp ? r.bytes * 8 / r.seconds : r.packets / r.seconds, packets: packets, cpu: cpu)
    }

    /// Event-channel notifications sent so far, both ways, and the waits
    /// (epoll or poll) of the vif queues' and the netfronts' threads, over
    /// the guests' vifs.
    struct Notifications {
        var fromGuests: UInt64 = 0
        var fromBackend: UInt64 = 0
        var backendWaits: UInt64 = 0
        var guestWaits: UInt64 = 0
        init(bed: NetworkBed, guests: [BedGuest]) {
            for g in guests {
                let front = g.frontend.statistics
                let back = bed.vifStatus(g)?.statistics ?? NetStatistics()
                fromGuests &+= front.notificationsSent
                guestWaits &+= front.waits
                fromBackend &+= back.notificationsSent
                backendWaits &+= back.waits
            }
        }
    }

    private func kindKey(_ k: Kind) -> String { k == .tcp ? "tcp" : "udp-64B" }

    /// One iperf3 run: what was received (TCP: bytes; UDP: 64-byte
    /// datagrams, unthrottled, the lost ones not counted) over how long.
    private func iperf(kind: Kind, client: String, server: String, address: String) throws
        -> (bytes: Double, packets: Double, seconds: Double) {
        let serverResult = Handoff<Result<String, Error>>()
        let serverThread = try NativeThread(name: "iperf3-server") {
            serverResult.put(Result {
                try sh(["ip", "netns", "exec", server, "iperf3", "-s", "-1", "-B", address, "-J"], timeout: seconds + 30)
            })
        }
        defer { serverThread.join() }
        var args = ["ip", "netns", "exec", client, "iperf3", "-c", address, "-t", String(seconds), "-J"]
        if kind == .udp64 { args += ["-u", "-l", "64", "-b", "0"] }
        // iperf3 3.12 exits 0 even when it cannot connect (the error is in
        // its JSON), so look there; retry while the server starts.
        var json: [String: Any]?
        for attempt in 0..<50 {
            let output = try? sh(args, timeout: seconds + 30)
            json = output.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            if let j = json, j["error"] == nil { break }
            if attempt == 49 {
                throw ValidationError("iperf3 client failed: \(json?["error"] as? String ?? output ?? "no output")")
            }
            usleep(100_000)
        }
        _ = try serverResult.take().get()
        let end = json?["end"] as? [String: Any]
        switch kind {
        case .tcp:
            let received = end?["sum_received"] as? [String: Any]
            let bytes = (received?["bytes"] as? Double) ?? Double(received?["bytes"] as? Int ?? 0)
            return (bytes, 0, max(received?["seconds"] as? Double ?? Double(seconds), 0.001))
        case .udp64:
            let sum = end?["sum"] as? [String: Any]
            let packets = (sum?["packets"] as? Double) ?? Double(sum?["packets"] as? Int ?? 0)
            let lost = (sum?["lost_packets"] as? Double) ?? Double(sum?["lost_packets"] as? Int ?? 0)
            return (0, packets - lost, max(sum?["seconds"] as? Double ?? Double(seconds), 0.001))
        }
    }

    private func format(_ v: Double) -> String { String(format: "%.2f", v) }
    private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
    private func progress(_ s: String) {
        FileHandle.standardError.write(Data("  measuring \(s) ...\n".utf8))
    }
}

/// Two namespaces joined by a veth pair: the reference.
struct VethPair {
    let clientNamespace: String
    let serverNamespace: String
    let serverAddress = "10.98.0.2"

    init() throws {
        let id = "xbv" + String(UInt32.random(in: 0...0xff_ffff), radix: 16)
        clientNamespace = id + "a"
        serverNamespace = id + "b"
        try sh(["ip", "netns", "add", clientNamespace])
        do {
            try sh(["ip", "netns", "add", serverNamespace])
            try sh(["ip", "-n", clientNamespace, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", serverNamespace])
            for (ns, address) in [(clientNamespace, "10.98.0.1"), (serverNamespace, serverAddress)] {
                try sh(["ip", "-n", ns, "link", "set", "lo", "up"])
                try sh(["ip", "-n", ns, "addr", "add", address + "/24", "dev", "eth0"])
                try sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            }
        } catch {
            tearDown()
            throw error
        }
    }

    func tearDown() {
        _ = try? sh(["ip", "netns", "delete", clientNamespace])
        _ = try? sh(["ip", "netns", "delete", serverNamespace])
    }
}

/// CPU time by who spent it, from the kernel's per-task run time
/// (`/proc/PID/task/TID/schedstat`, nanoseconds on the CPU, user and system
/// together): this process's vif queue threads (`vif-*`, the backend) and
/// netfront threads (`netfront-*`, the guests' drivers), the iperf3
/// processes (children, from `getrusage(RUSAGE_CHILDREN)` once waited for),
/// and the kernel's `ksoftirqd` threads (softirq work that ran outside the
/// task that raised it; softirqs run on the way out of a system call are in
/// that task's time). The kernel's stacks of the "guests" are in the iperf3
/// and softirq figures, as they are for the veth pair.
enum ThreadCPU {
    struct Sample {
        var backend: UInt64 = 0
        var guests: UInt64 = 0
        var softirq: UInt64 = 0
        var children: UInt64 = 0

        func since(_ s: Sample) -> Delta {
            Delta(backend: backend &- s.backend, guests: guests &- s.guests, iperf: children &- s.children,
                  softirq: softirq &- s.softirq)
        }
    }

    struct Delta {
        var backend: UInt64
        var guests: UInt64
        var iperf: UInt64
        var softirq: UInt64
        var total: UInt64 { backend + guests + iperf + softirq }
    }

    static func sample() -> Sample {
        var s = Sample()
        let pid = getpid()
        for tid in entries("/proc/\(pid)/task") {
            let base = "/proc/\(pid)/task/\(tid)"
            guard let comm = firstLine(base + "/comm") else { continue }
            let ns = runTime(base + "/schedstat")
            if comm.hasPrefix("vif-") { s.backend &+= ns } else if comm.hasPrefix("netfront-") { s.guests &+= ns }
        }
        for p in entries("/proc") where p.allSatisfy(\.isNumber) {
            if firstLine("/proc/\(p)/comm")?.hasPrefix("ksoftirqd/") == true { s.softirq &+= runTime("/proc/\(p)/schedstat") }
        }
        var usage = rusage()
        getrusage(RUSAGE_CHILDREN.rawValue, &usage)
        let micros = { (t: timeval) in UInt64(t.tv_sec) * 1_000_000 + UInt64(t.tv_usec) }
        s.children = (micros(usage.ru_utime) + micros(usage.ru_stime)) * 1000
        return s
    }

    private static func entries(_ directory: String) -> [String] {
        (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
    }

    private static func firstLine(_ path: String) -> String? {
        (try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: "\n").first.map(String.init)
    }

    /// The first field of a schedstat file: nanoseconds on the CPU.
    private static func runTime(_ path: String) -> UInt64 {
        firstLine(path).flatMap { $0.split(separator: " ").first }.flatMap { UInt64($0) } ?? 0
    }
}

/// What the backend would pay per 64 KiB tx frame (16 granted pages) to map
/// the fragments instead of copying them: the grant copy into a local
/// buffer (what the engine does), against a map of the 16 grants, the first
/// touch of each page (the TAP's copy would fault them in: the loopback
/// maps with mmap of the guest's memory file) and the unmap. The TAP's own
/// copy out of either buffer is the same and not timed.
enum GrantCosts {
    struct Result {
        var rounds: Int
        /// Microseconds per frame.
        var copy: Double, map: Double, touch: Double, unmap: Double
    }

    static func measure(host: LoopbackHost, rounds: Int = 2000) throws -> Result {
        let domid: DomID = 77
        let guest = try host.createGuest(domid)
        let grants = try host.platform.openGrantTable()
        var refs: [GrantRef] = []
        for i in 0..<16 {
            let frame = try guest.allocatePage()
            memset(guest.page(frame), Int32(i), XenPage.size)
            refs.append(try guest.grantAccess(frame: frame, to: 0, readOnly: true))
        }
        defer { for r in refs { guest.endAccess(r) } }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 16 * XenPage.size, alignment: XenPage.size)
        defer { buffer.deallocate() }
        let ops = UnsafeMutableBufferPointer<GrantCopyOperation>.allocate(capacity: 16)
        defer { ops.deallocate() }
        var copy = 0, map = 0, touch = 0, unmap = 0
        var sum: UInt64 = 0
        for _ in 0..<rounds {
            var t = MonotonicClock.nanoseconds()
            for i in 0..<16 {
                ops[i] = GrantCopyOperation(direction: .fromGuest, domain: domid, ref: refs[i], guestOffset: 0,
                                            length: UInt16(XenPage.size), local: buffer + i * XenPage.size)
            }
            grants.copy(ops)
            var u = MonotonicClock.nanoseconds()
            copy += u - t
            t = u
            let m = try grants.map(domain: domid, refs: refs, writable: false)
            u = MonotonicClock.nanoseconds()
            map += u - t
            t = u
            for i in 0..<16 { sum &+= UInt64(m.address.load(fromByteOffset: i * XenPage.size, as: UInt8.self)) }
            u = MonotonicClock.nanoseconds()
            touch += u - t
            t = u
            grants.unmap(m)
            unmap += MonotonicClock.nanoseconds() - t
        }
        guard sum == UInt64(rounds) * 120 else { throw ValidationError("mapped pages read back wrong") }   // 0+1+...+15
        let perFrame = { (ns: Int) in Double(ns) / Double(rounds) / 1000 }
        return Result(rounds: rounds, copy: perFrame(copy), map: perFrame(map), touch: perFrame(touch), unmap: perFrame(unmap))
    }
}
