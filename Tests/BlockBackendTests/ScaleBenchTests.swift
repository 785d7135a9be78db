import Foundation
import Glibc
import Hypervisor
import Testing
import XenStoreClient

/// `xenbackd-lab bench scale` at 20 guests (40 devices) against the real
/// daemon: all connect, carry verified I/O and a ping, and once they are
/// destroyed nothing is left. The last line is parsed, and the leftovers
/// are looked for here too, while the bench holds its world after teardown.
@Suite("bench scale", .serialized)
struct ScaleBenchTests {
    @Test("20 guests started at once: all connect, verify their I/O, ping dom0, and leave nothing behind")
    func twentyGuests() throws {
        if geteuid() != 0 { try Test.cancel("bench scale needs root (a namespace, TAPs, a bridge)") }
        let binary = try DaemonRestartTests.World.builtBinary("xenbackd-lab")
        let pauseFile = "/tmp/xenbackd-scale-test-\(getpid()).world"
        unlink(pauseFile)
        defer { unlink(pauseFile) }
        let bench = Process()
        bench.executableURL = URL(fileURLWithPath: binary)
        bench.arguments = ["bench", "scale", "--guests", "20", "--idle-seconds", "2", "--pause-after-teardown", pauseFile]
        let out = Pipe()
        bench.standardOutput = out
        bench.standardError = FileHandle.nullDevice
        try bench.run()
        defer { if bench.isRunning { bench.terminate() } }

        let deadline = Date().addingTimeInterval(600)
        while access(pauseFile, F_OK) != 0 && bench.isRunning && Date() < deadline { usleep(100_000) }
        try #require(access(pauseFile, F_OK) == 0, "the bench never reached its teardown")
        let world = try parseWorld(String(contentsOfFile: pauseFile, encoding: .utf8))
        try checkNothingLeft(world)
        unlink(pauseFile)

        // A dozen lines: they fit in the pipe, so it is read once the bench is done.
        while bench.isRunning && Date() < deadline { usleep(50_000) }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(bench.terminationStatus == 0, "\(text)")
        let last = try #require(text.split(separator: "\n").last.map(String.init))
        let figures = try #require(ScaleLine(last), "last line: \(last)")
        #expect(figures.guests == 20)
        #expect(figures.ready == 20, "\(text)")
        #expect(figures.leftovers == 0, "\(text)")
        #expect(figures.threads > 40, "a data-plane thread per vbd and per vif: \(last)")
        #expect(figures.teardownSeconds < 30, "\(last)")
        // Every guest's I/O was read back and compared, and each ping answered.
        let readyLine = text.split(separator: "\n").first { $0.hasPrefix("ready 20/20") } ?? ""
        #expect(readyLine.contains("20 pings of dom0 answered"), "\(text)")
        #expect(!readyLine.contains("(0 sectors"), "\(text)")
    }

    struct World {
        var namespace: String, root: String, daemon: pid_t, baselineFDs: Int
    }

    private func parseWorld(_ text: String) throws -> World {
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
        }
        return World(namespace: try #require(fields["namespace"]), root: try #require(fields["root"]),
                     daemon: try #require(fields["daemon"].flatMap { pid_t($0) }),
                     baselineFDs: try #require(fields["baseline-fds"].flatMap { Int($0) }))
    }

    /// No vif in dom0's namespace, no guest in xenstore, the daemon's
    /// descriptors back to what it had before the guests, no guest memory mapped.
    private func checkNothingLeft(_ w: World) throws {
        let links = try runProgram("/usr/sbin/ip", ["-n", w.namespace, "-o", "link", "show"])
        #expect(links.status == 0)
        #expect(!links.output.contains("vif"), "interfaces left: \(links.output)")
        let store = try XenStoreSocketClient(socketPath: w.root + "/xenstored.sock")
        defer { store.close() }
        #expect(try store.directory("/local/domain/0/backend/vbd") ?? [] == [])
        #expect(try store.directory("/local/domain/0/backend/vif") ?? [] == [])
        #expect(try store.directory("/local/domain") == ["0"])
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(w.daemon)/fd").count
        #expect(fds <= w.baselineFDs + 1, "the daemon holds \(fds) descriptors, \(w.baselineFDs) before the guests")
        let maps = try String(contentsOfFile: "/proc/\(w.daemon)/maps", encoding: .utf8)
        #expect(!maps.contains(w.root + "/dom"), "guest memory still mapped")
    }
}

/// `scale N guests: ready R/N, connected p99 X ms, max Y ms, RSS Z MiB,
/// threads T, fds F, idle CPU C %, teardown S s, leftovers L`.
struct ScaleLine {
    var guests = 0, ready = 0, rssMiB = 0, threads = 0, fds = 0, leftovers = 0
    var p99ms = 0.0, maxms = 0.0, idleCPU = 0.0, teardownSeconds = 0.0

    init?(_ line: String) {
        let pattern = #"^scale (\d+) guests: ready (\d+)/(\d+), connected p99 ([\d.]+) ms, max ([\d.]+) ms, RSS (\d+) MiB, threads (\d+), fds (\d+), idle CPU ([\d.]+) %, teardown ([\d.]+) s, leftovers (\d+)$"#
        guard let regex = try? NSRegularExpression(pattern: pattern),
              let m = regex.firstMatch(in: line, range: NSRange(line.startIndex..., in: line)) else { return nil }
        func group(_ i: Int) -> String { String(line[Range(m.range(at: i), in: line)!]) }
        guard group(1) == group(3) else { return nil }
        guests = Int(group(1))!; ready = Int(group(2))!; p99ms = Double(group(4))!; maxms = Double(group(5))!
        rssMiB = Int(group(6))!; threads = Int(group(7))!; fds = Int(group(8))!; idleCPU = Double(group(9))!
        teardownSeconds = Double(group(10))!; leftovers = Int(group(11))!
    }
}
