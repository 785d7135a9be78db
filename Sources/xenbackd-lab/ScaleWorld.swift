import Foundation
import Glibc
import LoopbackHypervisor
import SystemSupport

/// The host `bench scale` runs on, as the demo builds it: the loopback
/// xenstored and the real daemon as processes of their own, the daemon in
/// a "dom0" network namespace with the bridge xenbr0 (its vif TAPs are
/// created there, and the bridge's address answers the guests' pings).
/// IPv6 is off in that namespace, so that new interfaces send no
/// neighbour discovery or MLD frames that would flood every guest.
final class ScaleWorld {
    let root: String
    let layout: LoopbackLayout
    let diskDirectory: String
    let namespace: String
    /// This lab binary (for the loopback xenstored) and the daemon beside it.
    let binary: String
    let daemonBinary: String
    let bridge = "xenbr0"
    static let bridgeMAC = "02:00:0a:7b:ff:fe"
    static let bridgeIP: [UInt8] = [10, 123, 255, 254]
    private var xenstored: Process?
    private(set) var daemon: Process?
    private let daemonLog: String

    var controlSocket: String { root + "/control.sock" }
    var daemonPID: pid_t { daemon?.processIdentifier ?? 0 }
    var xenstoredPID: pid_t { xenstored?.processIdentifier ?? 0 }

    init(diskBase: String) throws {
        binary = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        daemonBinary = (binary as NSString).deletingLastPathComponent + "/xenbackd"
        guard access(daemonBinary, X_OK) == 0 else { throw ScaleError("no xenbackd beside \(binary): build both products") }
        let shm = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        root = try Self.temporaryDirectory(shm + "/xenbackd-scale-XXXXXX")
        diskDirectory = try Self.temporaryDirectory(diskBase + "/xenbackd-scale-disks-XXXXXX")
        layout = LoopbackLayout(root: root)
        daemonLog = diskDirectory + "/xenbackd.log"
        namespace = "xbs" + String(UInt32.random(in: 0...0xff_ffff), radix: 16) + "d"
        do {
            try sh(["ip", "netns", "add", namespace])
            for key in ["all", "default"] {
                try sh(["ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv6.conf.\(key).disable_ipv6=1"])
            }
            try sh(["ip", "-n", namespace, "link", "set", "lo", "up"])
            try sh(["ip", "-n", namespace, "link", "add", bridge, "address", Self.bridgeMAC, "type", "bridge",
                    "stp_state", "0", "forward_delay", "0"])
            try sh(["ip", "-n", namespace, "addr", "add", RawPing.dotted(Self.bridgeIP) + "/16", "dev", bridge])
            try sh(["ip", "-n", namespace, "link", "set", bridge, "up"])
            xenstored = try start([binary, "xenstored", "--root", root, "--log-level", "warning"], log: diskDirectory + "/xenstored.log")
            for _ in 0..<200 where access(layout.xenStoreSocket, F_OK) != 0 { usleep(25_000) }
            guard access(layout.xenStoreSocket, F_OK) == 0 else { throw ScaleError("the loopback xenstored did not start") }
            try startDaemon()
        } catch {
            tearDown()
            throw error
        }
    }

    static func guestIP(_ domid: Int) -> [UInt8] { [10, 123, UInt8(domid >> 8), UInt8(domid & 0xff)] }

    static func guestMAC(_ domid: Int) -> String {
        String(format: "00:16:3e:%02x:%02x:%02x", (domid >> 16) & 0xff, (domid >> 8) & 0xff, domid & 0xff)
    }

    /// Static neighbour entries for the guests on dom0's bridge (one `ip
    /// -batch`), so that dom0 answers a ping without an ARP broadcast to
    /// every guest.
    func addNeighbours(_ domids: [Int]) throws {
        let file = diskDirectory + "/neighbours"
        let lines = domids.map { "neigh replace \(RawPing.dotted(Self.guestIP($0))) lladdr \(Self.guestMAC($0)) dev \(bridge) nud permanent" }
        try (lines.joined(separator: "\n") + "\n").write(toFile: file, atomically: false, encoding: .utf8)
        try sh(["ip", "-n", namespace, "-batch", file])
    }

    /// `xenbackd run` on the loopback hypervisor, inside the dom0 namespace
    /// (`ip netns exec` execs it: the process is the daemon itself); returns
    /// once its control socket answers.
    func startDaemon() throws {
        unlink(controlSocket)
        daemon = try start(["/usr/sbin/ip", "netns", "exec", namespace, daemonBinary, "run", "--platform", "loopback", "--root", root,
                            "--control-socket", controlSocket, "--log-level", "warning"], log: daemonLog)
        for _ in 0..<400 {
            if (try? DaemonFootprint.daemonPID(socket: controlSocket)) == daemon!.processIdentifier { return }
            guard daemon!.isRunning else { break }
            usleep(25_000)
        }
        throw ScaleError("the daemon did not start (its log: \(daemonLog))")
    }

    /// kill -9, and wait for the process to be gone.
    func killDaemon() {
        guard let daemon, daemon.isRunning else { return }
        kill(daemon.processIdentifier, SIGKILL)
        daemon.waitUntilExit()
    }

    private func start(_ arguments: [String], log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: arguments[0])
        p.arguments = Array(arguments.dropFirst())
        if access(log, F_OK) != 0 { _ = FileManager.default.createFile(atPath: log, contents: nil) }   // a failure shows when it is opened
        let out = FileHandle(forWritingAtPath: log)
        out?.seekToEndOfFile()
        p.standardOutput = FileHandle.nullDevice
        p.standardError = out ?? FileHandle.nullDevice
        try p.run()
        return p
    }

    /// The vif interfaces in dom0's namespace.
    func vifInterfaces() -> [String] {
        let text = (try? sh(["ip", "-n", namespace, "-o", "link", "show"])) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let name = line.split(separator: ":").dropFirst().first?.trimmingCharacters(in: .whitespaces) ?? ""
            let bare = name.split(separator: "@").first.map(String.init) ?? name
            return bare.hasPrefix("vif") ? bare : nil
        }
    }

    /// Copies the daemon's log (both daemons', after a restart) out of the world, which teardown removes.
    func keepDaemonLog(at path: String) -> Bool {
        (try? FileManager.default.copyItem(atPath: daemonLog, toPath: path)) != nil
    }

    /// The last lines of the daemon's log (what it said about a failure).
    func daemonLogTail(_ lines: Int = 20) -> String {
        let text = (try? String(contentsOfFile: daemonLog, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    func tearDown() {
        for p in [daemon, xenstored].compactMap({ $0 }) where p.isRunning {
            p.terminate()
            let deadline = MonotonicClock.seconds() + 10
            while p.isRunning && MonotonicClock.seconds() < deadline { usleep(20_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        }
        _ = try? sh(["ip", "netns", "delete", namespace])
        removeTree(root)
        removeTree(diskDirectory)
    }

    private static func temporaryDirectory(_ template: String) throws -> String {
        var t = Array(template.utf8CString)
        guard let made = mkdtemp(&t) else { throw ScaleError("mkdtemp \(template): errno \(errno)") }
        return String(cString: made)
    }
}

struct ScaleError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Removes a folder and everything in it.
func removeTree(_ path: String) {
    _ = try? FileManager.default.removeItem(atPath: path)
}
