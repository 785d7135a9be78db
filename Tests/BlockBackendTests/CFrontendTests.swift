import Glibc
import LoopbackHost
import Testing

/// The loopback hypervisor's page (docs/loopback-hypervisor.md) claims a
/// frontend can be written in C from it alone. Tests/CFrontend is that
/// frontend; here it runs as a separate process, playing the toolstack and
/// a guest, against the backend of an in-process LoopbackHost.
@Suite("a C frontend written from docs/loopback-hypervisor.md alone")
struct CFrontendTests {
    /// What the C frontend checks, one output line each, in order.
    static let checks = [
        "guest-domain", "toolstack-domain", "domain-socket", "toolstack-vbd", "guest-store",
        "initwait", "initialised", "connected", "disk-size", "port-bound",
        "write", "flush", "read-back", "read-back-data", "read-untouched", "reads-in-flight",
        "read-past-end", "disk-file", "events", "closed", "vbd-removed", "domain-released",
    ]
    static let firstSector: UInt64 = 1000
    static let writtenSectors: UInt64 = 15

    /// Byte `j` of disk sector `s` as the C frontend writes it (main.c's pattern()).
    static func pattern(sector s: UInt64, byte j: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: s &* 37 &+ UInt64(j) &* 11 &+ 1)
    }

    @Test("handshake, multi-segment write, flush, read back, read past the end, unplug: every check passes")
    func cFrontendAgainstBackend() throws {
        let exe = try #require(Self.executable(),
                               "loopback-c-frontend is not next to the test binary: build it with `swift build --build-tests`")
        let bed = try TestBed()
        defer { bed.close() }
        let disk = TempDisk(megabytes: 8)
        defer { disk.remove() }
        let domid = 3

        let (status, output) = try Self.run(exe, [
            "--root", bed.host.layout.root, "--domid", String(domid), "--disk", disk.path,
            "--first-sector", String(Self.firstSector),
        ])

        let lines = output.split(separator: "\n").map(String.init)
        #expect(status == 0, "exit status \(status); output:\n\(output)")
        for name in Self.checks {
            #expect(lines.contains { $0.hasPrefix("check \(name): ok") }, "no passing '\(name)' line in:\n\(output)")
        }
        #expect(!lines.contains { $0.contains("FAILED") }, "\(output)")
        #expect(lines.last == "PASSED: \(Self.checks.count) of \(Self.checks.count) checks passed", "\(output)")

        // The disk file, read without the ring, holds what the C frontend wrote.
        for s in Self.firstSector..<(Self.firstSector + Self.writtenSectors) {
            let expected = (0..<512).map { Self.pattern(sector: s, byte: $0) }
            #expect(disk.sector(s) == expected, "sector \(s)")
        }
        #expect(disk.sector(Self.firstSector - 1) == [UInt8](repeating: 0, count: 512), "the sector before is untouched")
        #expect(disk.sector(Self.firstSector + Self.writtenSectors) == [UInt8](repeating: 0, count: 512),
                "the sector after is untouched")

        // The guest took its domain away: no files left, and the backend let go of the vbd.
        #expect(access(bed.host.layout.root + "/dom\(domid)", F_OK) != 0, "dom\(domid)/ was not removed")
        var left = bed.host.blockStatus.count
        for _ in 0..<200 where left > 0 {
            usleep(10_000)
            left = bed.host.blockStatus.count
        }
        #expect(left == 0, "the backend still serves \(left) vbd(s) after the C toolstack removed it")
    }

    /// `loopback-c-frontend` in the build folder that holds the running test binary.
    static func executable() -> String? {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        let me = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = me.lastIndex(of: "/") else { return nil }
        let path = String(me[..<slash]) + "/loopback-c-frontend"
        return access(path, X_OK) == 0 ? path : nil
    }

    /// Runs `exe` with stdout and stderr into one pipe; returns its exit
    /// status (128+signal if killed) and everything it printed.
    static func run(_ exe: String, _ args: [String]) throws -> (Int32, String) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SpawnError("pipe", errno) }
        // Close-on-exec, so that no other child keeps the write end (and our EOF) open.
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)

        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, argv, environ)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw SpawnError("posix_spawn \(exe)", rc)
        }

        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let got = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if got > 0 { output += chunk[0..<got]; continue }
            if got < 0 && errno == EINTR { continue }
            break
        }
        close(fds[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS are macros Swift does not import.
        let signal = status & 0x7f
        let code = signal == 0 ? (status >> 8) & 0xff : 128 + signal
        return (code, String(decoding: output, as: UTF8.self))
    }

    struct SpawnError: Error, CustomStringConvertible {
        let description: String
        init(_ what: String, _ code: Int32) { description = "\(what): \(String(cString: strerror(code)))" }
    }
}
