import BlockFrontend
import Glibc
import Testing

/// `xenbackd-lab fuzz` against real `xenbackd-lab xenstored` and `xenbackd run`
/// processes: a hostile guest next to a verified bystander, every invariant
/// checked from outside; a seed that once failed is replayed here for good.
@Suite("live fuzz against a running daemon", .serialized)
struct LiveFuzzTests {
    /// Runs `xenbackd-lab fuzz` in a fresh world; its output, to show on failure.
    /// `net`: the daemon in a namespace of its own with a bridge xenbr0
    /// (as scripts/fuzz-live --net makes it), and `--net`.
    func fuzz(seed: UInt64, seconds: Int, net: Bool = false) throws -> (status: Int32, output: String) {
        var namespace: String?
        if net {
            let ns = "xblive\(getpid())"
            try ip(["netns", "add", ns])
            namespace = ns
            _ = try runProgram("/usr/sbin/ip", ["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                                "net.ipv6.conf.default.disable_ipv6=1"])
            try ip(["-n", ns, "link", "set", "lo", "up"])
            try ip(["-n", ns, "link", "add", "xenbr0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            try ip(["-n", ns, "link", "set", "xenbr0", "up"])
        }
        defer { if let namespace { _ = try? runProgram("/usr/sbin/ip", ["netns", "delete", namespace]) } }
        let w = try DaemonRestartTests.World(networkNamespace: namespace)
        defer { w.close() }
        try w.waitFor(path: w.controlSocket)
        return try runProgram(w.lab, ["fuzz", "--root", w.root, "--control-socket", w.controlSocket,
                                         "--seed", String(seed), "--seconds", String(seconds), "--disk-megabytes", "16",
                                         // The device comes back after a ring breach (issue 12's xenbus fixes).
                                         "--expect-reconnect"] + (net ? ["--net"] : []))
    }

    private func ip(_ arguments: [String]) throws {
        let (status, output) = try runProgram("/usr/sbin/ip", arguments)
        guard status == 0 else { throw FrontendError("ip \(arguments.joined(separator: " ")) failed: \(output)") }
    }

    /// The figure before `label` in the line that starts with `prefix`.
    func figure(_ output: String, line prefix: String, before label: String) -> Int? {
        guard let line = output.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }),
              let r = line.range(of: " " + label) else { return nil }
        return Int(line[..<r.lowerBound].split(separator: " ").last ?? "")
    }

    @Test("15 s of a hostile guest with a fixed seed: no invariant broken, the bystander unharmed")
    func fixedSeed() throws {
        let (status, output) = try fuzz(seed: 20261206, seconds: 15)
        #expect(status == 0, "\(output)")
        #expect(output.contains("failures: PASS"), "\(output)")
        #expect(output.contains("0 errors, 0 mismatches"), "\(output)")
    }

    @Test("12 s with the net side too: a hostile netfront next to a net bystander, every frame intact")
    func withNet() throws {
        let (status, output) = try fuzz(seed: 20261206, seconds: 12, net: true)
        #expect(status == 0, "\(output)")
        #expect(output.contains("failures: PASS"), "\(output)")
        #expect(output.contains("0 errors, 0 mismatches"), "\(output)")
        let verified = figure(output, line: "fuzz: net bystander:", before: "verified")
        #expect((verified ?? 0) > 0, "\(output)")
        #expect(figure(output, line: "fuzz: net bystander:", before: "corrupted") == 0, "\(output)")
        #expect((figure(output, line: "fuzz: seed 20261206,", before: "frames (") ?? 0) > 0, "\(output)")
    }

    @Test("a short run with a second seed")
    func secondSeed() throws {
        let (status, output) = try fuzz(seed: 7, seconds: 5)
        #expect(status == 0, "\(output)")
        #expect(output.contains("failures: PASS"), "\(output)")
    }
}
