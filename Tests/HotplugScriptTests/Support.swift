import Foundation
import Glibc
import Hypervisor
import LoopbackXenStore
import SystemSupport
import Testing
import XenStoreClient

/// The package's root, found from this file's path.
let repoRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()

func scriptPath(_ name: String) -> String { repoRoot + "/scripts/" + name }

/// The xenbackd built with these tests (beside the test bundle), whose
/// check-disk the block script runs.
let xenbackdBinary: String = {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("xenbackd").path
}()

/// The PATH the scripts get: libxl and udev give a short one.
let basePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/// Runs a command for its effect; its standard output (trimmed) or nil on failure.
@discardableResult
func sh(_ arguments: [String]) -> String? {
    guard let result = try? runProcess(arguments, environment: ["PATH": basePath], timeout: 30),
          result.status == 0 else { return nil }
    return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}

func commandExists(_ name: String) -> Bool {
    sh(["sh", "-c", "command -v \(name)"]) != nil
}

func isRoot() -> Bool { getuid() == 0 }

/// A loopback xenstored in a fresh temporary folder, with the files the
/// hotplug scripts use (log, lock) in the same folder, and a dom0 client
/// that plays libxl.
final class HotplugFixture {
    let directory: String
    let server: LoopbackXenStoreServer
    let store: XenStoreSocketClient
    var socketPath: String { directory + "/xenstored.sock" }
    var logPath: String { directory + "/hotplug.log" }
    var lockPath: String { directory + "/run/hotplug.lock" }

    init() throws {
        directory = "/tmp/xbhp-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        do {
            server = try LoopbackXenStoreServer(socketPath: directory + "/xenstored.sock",
                                                domainSocketDirectory: directory + "/domains")
            try server.start()
            store = try XenStoreSocketClient(socketPath: directory + "/xenstored.sock")
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    func tearDown() {
        store.close()
        server.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The environment libxl gives a hotplug script (plus the test's xenstored
    /// and private log/lock paths).
    func environment(xenbusPath: String, type: String, extra: [String: String] = [:]) -> [String: String] {
        var env = [
            "PATH": basePath,
            "XENBUS_PATH": xenbusPath,
            "XENBUS_TYPE": type,
            "XENBUS_BASE_PATH": "backend",
            "XENSTORED_PATH": socketPath,
            "XENBACKD_HOTPLUG_LOG": logPath,
            "XENBACKD_HOTPLUG_LOCK": lockPath,
            "XENBACKD_BIN": xenbackdBinary,
        ]
        env.merge(extra) { $1 }
        return env
    }

    /// Runs the block script as libxl does: `xenbackd-block add` for domain
    /// `domid`'s disk `devid`.
    func runBlockScript(_ command: String, domid: Int, devid: Int = 51712,
                        extra: [String: String] = [:]) throws -> ProcessResult {
        try runProcess([scriptPath("xenbackd-block"), command],
                       environment: environment(xenbusPath: "backend/vbd/\(domid)/\(devid)", type: "vbd", extra: extra))
    }

    /// A running guest's home, as libxl creates it.
    func createDomain(_ domid: Int) throws {
        let home = "/local/domain/\(domid)"
        try store.withTransaction { t throws(XenStoreError) in
            try store.mkdir(home, transaction: t)
            try store.setPermissions(home, [.init(domain: 0, access: .none), .init(domain: UInt32(domid), access: .read)], transaction: t)
            try store.write(home + "/name", "guest\(domid)", transaction: t)
            try store.write(home + "/domid", String(domid), transaction: t)
        }
    }

    func backendPath(type: String = "vbd", domid: Int, devid: Int) -> String {
        "/local/domain/0/backend/\(type)/\(domid)/\(devid)"
    }

    /// A vbd as libxl 4.17 writes it for `disk = ['...,backendtype=phy,
    /// script=xenbackd-block,target=PARAMS']` (keys recorded in
    /// shared/xenlab): backend and frontend directory in state 1, the backend
    /// owned by dom0 and readable by the guest.
    func addVbd(domid: Int, devid: Int = 51712, params: String, mode: String = "w", deviceType: String = "disk") throws {
        try createDomainIfMissing(domid)
        let be = backendPath(domid: domid, devid: devid)
        let fe = "/local/domain/\(domid)/device/vbd/\(devid)"
        let bePerms: [XenStorePermission] = [.init(domain: 0, access: .none), .init(domain: UInt32(domid), access: .read)]
        let fePerms: [XenStorePermission] = [.init(domain: UInt32(domid), access: .none), .init(domain: 0, access: .read)]
        let backendKeys: [(String, String)] = [
            ("bootable", "1"), ("dev", "xvda"), ("device-type", deviceType), ("discard-enable", "1"),
            ("frontend", fe), ("frontend-id", String(domid)), ("mode", mode), ("online", "1"),
            ("params", params), ("removable", "0"), ("script", scriptPath("xenbackd-block")),
            ("specification", "xen"), ("state", "1"), ("type", "phy"),
        ]
        let frontendKeys: [(String, String)] = [
            ("backend", be), ("backend-id", "0"), ("device-type", deviceType),
            ("virtual-device", String(devid)), ("state", "1"), ("trusted", "1"),
        ]
        try store.withTransaction { t throws(XenStoreError) in
            try store.mkdir(fe, transaction: t)
            try store.setPermissions(fe, fePerms, transaction: t)
            for (k, v) in frontendKeys { try store.write(fe + "/" + k, v, transaction: t) }
            try store.mkdir(be, transaction: t)
            try store.setPermissions(be, bePerms, transaction: t)
            for (k, v) in backendKeys { try store.write(be + "/" + k, v, transaction: t) }
        }
    }

    /// A vif as libxl writes it for `vif = ['mac=...,bridge=BRIDGE,script=xenbackd-vif-bridge']`.
    func addVif(domid: Int, devid: Int = 0, bridge: String?) throws {
        try createDomainIfMissing(domid)
        let be = backendPath(type: "vif", domid: domid, devid: devid)
        var keys: [(String, String)] = [
            ("frontend", "/local/domain/\(domid)/device/vif/\(devid)"), ("frontend-id", String(domid)),
            ("handle", String(devid)), ("hotplug-status", ""), ("mac", "00:16:3e:00:00:05"), ("online", "1"),
            ("script", scriptPath("xenbackd-vif-bridge")), ("state", "1"), ("type", "vif"),
        ]
        if let bridge { keys.append(("bridge", bridge)) }
        try store.withTransaction { t throws(XenStoreError) in
            try store.mkdir(be, transaction: t)
            try store.setPermissions(be, [.init(domain: 0, access: .none), .init(domain: UInt32(domid), access: .read)], transaction: t)
            for (k, v) in keys { try store.write(be + "/" + k, v, transaction: t) }
        }
    }

    private func createDomainIfMissing(_ domid: Int) throws {
        if try store.read("/local/domain/\(domid)/domid") == nil { try createDomain(domid) }
    }

    func read(_ path: String) throws -> String? { try store.read(path) }

    /// The keys a hotplug script adds, read back from the backend directory.
    func hotplugKeys(type: String = "vbd", domid: Int, devid: Int = 51712) throws -> [String: String] {
        let be = backendPath(type: type, domid: domid, devid: devid)
        var keys: [String: String] = [:]
        for key in ["hotplug-status", "hotplug-error", "physical-device", "physical-device-path"] {
            if let value = try store.read(be + "/" + key) { keys[key] = value }
        }
        return keys
    }

    /// Polls `path` until it has a non-empty value (at most `timeout` seconds).
    func waitForValue(_ path: String, timeout: Double = 10) throws -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            if let value = try store.read(path), !value.isEmpty { return value }
            usleep(50_000)
        } while Date() < deadline
        return nil
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
}

/// Runs `body` against a fresh fixture, cleaned up afterwards.
func withFixture(_ body: (HotplugFixture) throws -> Void) throws {
    let fixture = try HotplugFixture()
    defer { fixture.tearDown() }
    try body(fixture)
}

/// A file of `size` bytes (sparse) in `directory`.
@discardableResult
func makeFile(_ path: String, size: Int) throws -> String {
    guard FileManager.default.createFile(atPath: path, contents: nil) else { throw SystemError("create \(path)", errno: errno) }
    guard truncate(path, off_t(size)) == 0 else { throw SystemError("truncate \(path)", errno: errno) }
    return path
}

/// A loop device over a file; `detach()` always (defer).
final class LoopDevice {
    let path: String
    init?(backing: String) {
        guard let device = sh(["losetup", "-f", "--show", backing]), device.hasPrefix("/dev/loop") else { return nil }
        path = device
    }
    func detach() { sh(["losetup", "-d", path]) }
}

/// A TCP socket on 127.0.0.1 with a kernel-chosen port: `listening` accepts
/// connections (they wait in the backlog), otherwise it is only bound, so
/// connecting to the port is refused while no one else can take it.
final class TCPPort {
    let fd: Int32
    let port: UInt16

    init(listening: Bool) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(fd, sa, len) == 0 && getsockname(fd, sa, &len) == 0
            }
        }
        guard bound, !listening || listen(fd, 16) == 0 else {
            let saved = errno
            Glibc.close(fd)
            throw SystemError("bind/listen 127.0.0.1", errno: saved)
        }
        self.fd = fd
        port = UInt16(bigEndian: addr.sin_port)
    }

    func close() { _ = Glibc.close(fd) }
}

/// A value shared between test threads, behind a mutex.
final class Locked<Value>: @unchecked Sendable {  // `value` is used only inside `lock`
    private let lock = PThreadMutex()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) -> T) -> T { lock.withLock { body(&value) } }
}

/// A joinable thread.
final class TestThread: Sendable {
    private let thread: NativeThread
    init(_ body: @escaping @Sendable () -> Void) { thread = try! NativeThread(body) }
    func join() { thread.join() }
}

/// The major:minor (hex, as `stat -c %t:%T`) of a block device.
func hexDeviceNumbers(_ path: String) -> String? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return String(major(st.st_rdev), radix: 16) + ":" + String(minor(st.st_rdev), radix: 16)
}

// glibc's gnu_dev_major/gnu_dev_minor.
private func major(_ dev: dev_t) -> UInt32 { UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000)) }
private func minor(_ dev: dev_t) -> UInt32 { UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)) }
