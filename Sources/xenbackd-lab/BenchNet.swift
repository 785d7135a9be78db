import DaemonCLI
import ArgumentParser
import Foundation
import Glibc
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
        var reference: [String: Double] = [:]
        if !noReference {
            let veth = try VethPair()
            defer { veth.tearDown() }
            for row in rows where reference[kindKey(row.kind)] == nil {
                progress("reference: \(kindKey(row.kind)) over veth")
                reference[kindKey(row.kind)] = try iperf(kind: row.kind, client: veth.clientNamespace,
                                                         server: veth.serverNamespace, address: veth.serverAddress)
            }
        }

        let bed = try NetworkBed(netOptions: .init(), logger: logger)
        defer { bed.tearDown() }
        let outside = try bed.addOutsideHost(address: "10.99.0.200")
        let a = try bed.addGuest(1)
        let b = try bed.addGuest(2)
        say("")
        say(pad("row", 26) + pad("xenbackd", 16) + pad("veth", 16) + "ratio")
        for row in rows {
            progress("\(row.name)")
            let server = row.toOutside ? outside : b.namespace
            let address = row.toOutside ? "10.99.0.200" : b.address
            let ours = try iperf(kind: row.kind, client: a.namespace, server: server, address: address)
            let ref = reference[kindKey(row.kind)]
            let unit = row.kind == .tcp ? "Gbit/s" : "kpps"
            let scale = row.kind == .tcp ? 1e-9 : 1e-3
            let refText = ref.map { format($0 * scale) + " " + unit } ?? "-"
            let ratio = ref.map { format(ours / $0) } ?? "-"
            say(pad(row.name, 26) + pad(format(ours * scale) + " " + unit, 16) + pad(refText, 16) + ratio)
        }
        if let s = bed.vifStatus(a)?.statistics {
            say("\nvif1.0: tx \(s.txPackets) frames \(s.txBytes) bytes, malformed \(s.txMalformed), dropped \(s.txDropped); "
                + "rx \(s.rxPackets) frames, dropped \(s.rxDropped)")
        }
    }

    private func kindKey(_ k: Kind) -> String { k == .tcp ? "tcp" : "udp-64B" }

    /// One iperf3 run; TCP: bits per second received; UDP: packets per
    /// second received (64-byte payloads, unthrottled).
    private func iperf(kind: Kind, client: String, server: String, address: String) throws -> Double {
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
            return received?["bits_per_second"] as? Double ?? 0
        case .udp64:
            let sum = end?["sum"] as? [String: Any]
            let packets = (sum?["packets"] as? Double) ?? Double(sum?["packets"] as? Int ?? 0)
            let lost = (sum?["lost_packets"] as? Double) ?? Double(sum?["lost_packets"] as? Int ?? 0)
            let secs = sum?["seconds"] as? Double ?? Double(seconds)
            return (packets - lost) / max(secs, 0.001)
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
