import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import Hypervisor
import Logging
import LoopbackHost
import Testing
import XenBus
import XenStoreClient

/// The backend's whole xenstore conversation (libxenstore watches, reads,
/// the Connected transaction) against Xen's own daemon: Debian's oxenstored
/// from xen-utils-4.17, run without a hypervisor by scripts/oxenstored-sandbox.
@Suite("the vbd handshake against Debian's oxenstored", .serialized)
struct OXenstoredTests {
    @Test("handshake, verified I/O, keys seen by xenstore-ls, disconnect and removal over oxenstored")
    func vbdOverOXenstored() throws {
        let sandbox = try OXenstoredSandbox.start()
        defer { sandbox.stop() }

        var logger = Logger(label: "oxenstored-test")
        logger.logLevel = .error
        let host = try LoopbackHost(logger: logger, externalXenStore: sandbox.socket)
        defer { host.shutdown() }
        let disk = TempDisk(megabytes: 16)
        defer { disk.remove() }

        let domid: DomID = 7
        let guest = try host.createGuest(domid)
        let fe = try host.attachDisk(to: guest, .init(params: disk.path))
        try fe.connect(ringPageOrder: 1)
        #expect(fe.info.sectors == 16 * 2048)
        #expect(fe.info.flush && !fe.info.readOnly)

        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 4_17, queueDepth: 16,
                                 canDiscard: fe.info.discard, canFlush: fe.info.flush)
        let s = try w.run(on: fe, seconds: 60, operations: 400)
        #expect(s.errors == 0, "\(s)")
        #expect(s.mismatches == 0, "\(s)")
        #expect(s.writes > 50 && s.reads > 50, "\(s)")
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 100)

        // The backend's keys, read back through oxenstored by another connection.
        let be = fe.backendPath
        let store = try XenStoreSocketClient(socketPath: sandbox.socket)
        defer { store.close() }
        #expect(try store.read(be + "/sectors") == "32768")
        #expect(try store.read(be + "/sector-size") == "512")
        #expect(try store.read(be + "/feature-flush-cache") == "1")
        #expect(try store.read(be + "/state") == "4")
        #expect(try store.read(fe.frontendPath + "/state") == "4")

        // Xen's own client sees the same tree.
        let ls = try OXenstoredSandbox.run(["xenstore-ls", "-p", "/local/domain/0/backend/vbd"],
                                           environment: ["XENSTORED_PATH": sandbox.socket])
        #expect(ls.status == 0, "xenstore-ls: \(ls)")
        #expect(ls.stdout.contains("\(domid) = \"\""), "xenstore-ls: \(ls)")
        #expect(ls.stdout.contains("\(fe.devid) = \"\""), "xenstore-ls: \(ls)")
        #expect(ls.stdout.contains("state = \"4\""), "xenstore-ls: \(ls)")
        #expect(ls.stdout.contains("sectors = \"32768\""), "xenstore-ls: \(ls)")
        #expect(ls.stdout.contains("params = \"\(disk.path)\""), "xenstore-ls: \(ls)")

        try fe.disconnect()
        #expect(host.toolstack.store.readState(be) == .closed)
        try host.toolstack.removeDisk(domain: domid, devid: fe.devid)
        let gone = OXenstoredSandbox.poll(seconds: 10) { host.blockStatus.isEmpty }
        #expect(gone, "the backend still lists the removed vbd: \(host.blockStatus)")
        #expect(try store.read(be + "/state") == nil)
        try host.toolstack.destroyDomain(domid)

        // oxenstored refused nothing: its only error answers are ENOENT
        // (optional keys read, directories listed or removed before they exist).
        let log = sandbox.accessLog.split(separator: "\n").map(String.init)
        #expect(log.contains { $0.contains("commit") }, "oxenstored's access log is missing or empty")
        let refusals = log.indices.filter {
            log[$0].contains(" error ") && !log[$0].trimmingCharacters(in: .whitespaces).hasSuffix("ENOENT")
        }
        let context = refusals.prefix(10).map { log[max(0, $0 - 2)...$0].joined(separator: "\n") }
        #expect(refusals.isEmpty, "oxenstored refused requests:\n\(context.joined(separator: "\n--\n"))")
    }
}

/// oxenstored started by scripts/oxenstored-sandbox, killed by `stop()`.
private final class OXenstoredSandbox {
    let process: Process
    let socket: String
    let token: String
    let stderrPath: String

    static let script: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path + "/scripts/oxenstored-sandbox"
    }()

    private init(process: Process, socket: String, token: String, stderrPath: String) {
        self.process = process; self.socket = socket; self.token = token; self.stderrPath = stderrPath
    }

    /// Starts the sandbox and waits until its socket answers; cancels the
    /// test when this machine cannot have one (not root, no package).
    static func start() throws -> OXenstoredSandbox {
        guard getuid() == 0 else {
            try Test.cancel("oxenstored sandbox needs root (unshare -m and a tmpfs mount); running as uid \(getuid())")
        }
        let token = "xenbackd-oxenstored-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let stderrPath = NSTemporaryDirectory() + "/\(token).stderr"
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        guard let stderrFile = FileHandle(forWritingAtPath: stderrPath) else {
            throw FrontendError("cannot create \(stderrPath)")
        }
        defer { try? stderrFile.close() }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script, "--print-socket"]
        var env = ProcessInfo.processInfo.environment
        env["XENBACKD_OXENSTORED_TEST_TOKEN"] = token   // finds every process it started, for the cleanup check
        p.environment = env
        let out = Pipe()
        p.standardOutput = out
        p.standardError = stderrFile
        p.standardInput = FileHandle.nullDevice
        try p.run()
        // The script closes stdout after the socket line (or exits): read to the end.
        let line = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        if line.isEmpty || !p.isRunning {
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
            let err = ((try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "")
                .trimmingCharacters(in: .whitespacesAndNewlines)
            unlink(stderrPath)
            switch p.terminationStatus {
            case 3, 4: try Test.cancel("oxenstored sandbox unavailable: \(err)")
            default: throw FrontendError("scripts/oxenstored-sandbox exited \(p.terminationStatus): \(err)")
            }
        }
        let sandbox = OXenstoredSandbox(process: p, socket: line, token: token, stderrPath: stderrPath)
        // The namespace's tmpfs is private: the host's mount table never shows it.
        #expect(!hostMountsMention("xenbackd-oxenstored"), "the sandbox's tmpfs leaked into the host's mounts")
        return sandbox
    }

    /// oxenstored's access log (every request and its error answers).
    var accessLog: String {
        let dir = (socket as NSString).deletingLastPathComponent
        return (try? String(contentsOfFile: dir + "/access.log", encoding: .utf8)) ?? ""
    }

    /// Kills oxenstored by its PID and checks that nothing it started is left.
    func stop() {
        let pid = process.processIdentifier
        if process.isRunning {
            kill(pid, SIGTERM)
            if !Self.poll(seconds: 3, { !self.process.isRunning }) { kill(pid, SIGKILL) }
        }
        process.waitUntilExit()
        // The watcher subshell notices within half a second; its namespace goes with the last process.
        let left = Self.poll(seconds: 5) { Self.processes(carrying: self.token).isEmpty }
        #expect(left, "processes of the sandbox still running: \(Self.processes(carrying: token))")
        #expect(!Self.hostMountsMention("xenbackd-oxenstored"))
        let err = ((try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(err.isEmpty, "oxenstored-sandbox wrote to stderr: \(err)")
        unlink(stderrPath)
    }

    /// PIDs whose environment holds `token`.
    static func processes(carrying token: String) -> [Int32] {
        let needle = Array(token.utf8)
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return false }
            return [UInt8](env).firstRange(of: needle) != nil
        }
    }

    static func hostMountsMention(_ source: String) -> Bool {
        ((try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? "").contains(source)
    }

    static func poll(seconds: Double, _ done: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !done() {
            if Date() > deadline { return false }
            usleep(20_000)
        }
        return true
    }

    struct Output: CustomStringConvertible {
        var status: Int32, stdout: String, stderr: String
        var description: String { "exit \(status); stdout: \(stdout) stderr: \(stderr)" }
    }

    /// Runs a command (found on PATH) to its end.
    static func run(_ arguments: [String], environment extra: [String: String]) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = arguments
        p.environment = ProcessInfo.processInfo.environment.merging(extra) { $1 }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()   // small outputs: stderr fits its pipe
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Output(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                      stderr: String(decoding: e, as: UTF8.self))
    }
}
