import Foundation
import Glibc
import Testing
@testable import BlockStorage

/// An NBD server (nbdkit or nbd-server) run for one test, on a unix socket
/// or 127.0.0.1, killed by its PID when released.
final class NBDServer {
    let process: Process
    let uri: String
    let socketPath: String?
    let port: Int?
    private let pidFile: String
    private static let counter = NBDCounter()

    /// `nbdkit [-r] [filters…] PLUGIN ARGS…` on a fresh unix socket (or a TCP port).
    init(nbdkit arguments: [String], readOnly: Bool = false, tcp: Bool = false) throws {
        try Self.requireExecutable("/usr/bin/nbdkit")
        let unique = "\(getpid())-\(Self.counter.next())"
        pidFile = "/tmp/nbd-test-\(unique).pid"
        unlink(pidFile)
        var command = ["-f", "--exit-with-parent", "-P", pidFile]
        if readOnly { command.append("-r") }
        if tcp {
            let port = try freeTCPPort()
            self.port = port
            socketPath = nil
            command += ["-i", "127.0.0.1", "-p", "\(port)"]
            uri = "nbd://127.0.0.1:\(port)/"
        } else {
            let socket = "/tmp/nbd-test-\(unique).sock"
            unlink(socket)
            socketPath = socket
            port = nil
            command += ["-U", socket]
            uri = "nbd+unix:///?socket=\(socket)"
        }
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        process.arguments = command + arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        try waitUntilListening()
    }

    /// `nbd-server 127.0.0.1:PORT FILE` (old Xen form of address).
    init(nbdServerExporting file: String) throws {
        try Self.requireExecutable("/usr/bin/nbd-server")
        let unique = "\(getpid())-\(Self.counter.next())"
        pidFile = "/tmp/nbd-test-\(unique).pid"
        unlink(pidFile)
        let port = try freeTCPPort()
        self.port = port
        socketPath = nil
        uri = "nbd:127.0.0.1:\(port)"
        // It daemonizes (its -d mode serves one connection only): the PID
        // to kill is the one in its PID file. -C /dev/null: no config file.
        // Spawned and reaped by hand: Foundation's Process did not notice
        // this parent's quick exit.
        process = Process()
        let arguments = ["/usr/bin/nbd-server", "127.0.0.1:\(port)", file, "-C", "/dev/null", "-p", pidFile]
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        var child: pid_t = 0
        guard posix_spawn(&child, "/usr/bin/nbd-server", &actions, nil, &argv, environ) == 0 else {
            throw StorageError("posix_spawn", errno: errno, path: "/usr/bin/nbd-server")
        }
        var status: Int32 = 0
        _ = waitpid(child, &status, 0)
        for _ in 0..<500 where daemonPID == nil {
            if let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
               let value = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                daemonPID = value
            } else {
                usleep(10_000)
            }
        }
        guard daemonPID != nil else { throw StorageError("nbd-server did not start", errno: ETIMEDOUT, path: uri) }
        try waitForPort(port)
    }

    deinit { stop() }

    /// nbd-server's daemon (not our child).
    private var daemonPID: pid_t?

    var pid: pid_t { daemonPID ?? process.processIdentifier }

    func stop() {
        if let daemonPID {
            kill(daemonPID, SIGKILL)
            // Not our child: wait until it is gone (or a zombie: this
            // container's init may never reap it).
            for _ in 0..<300 where isRunning(daemonPID) { usleep(10_000) }
            self.daemonPID = nil
            cleanFiles()
            return
        }
        guard process.processIdentifier != 0, process.isRunning else { cleanFiles(); return }
        kill(pid, SIGKILL)
        process.waitUntilExit()
        cleanFiles()
    }

    func signal(_ number: Int32) { kill(pid, number) }

    private func isRunning(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return !stat[stat.index(after: close)...].hasPrefix(" Z")
    }

    private func cleanFiles() {
        unlink(pidFile)
        if let socketPath { unlink(socketPath) }
    }

    private static func requireExecutable(_ path: String) throws {
        if access(path, X_OK) != 0 {
            try Test.cancel("\(path) is not installed (scripts/setup installs nbdkit and nbd-server)")
        }
    }

    /// nbdkit writes its PID file once it listens.
    private func waitUntilListening() throws {
        for _ in 0..<500 {
            if access(pidFile, F_OK) == 0 { return }
            guard process.isRunning else { throw StorageError("nbdkit exited", errno: EIO, path: uri) }
            usleep(10_000)
        }
        stop()
        throw StorageError("nbdkit did not start", errno: ETIMEDOUT, path: uri)
    }

    private func waitForPort(_ port: Int) throws {
        for _ in 0..<500 {
            guard daemonPID != nil || process.isRunning else { throw StorageError("server exited", errno: EIO, path: uri) }
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            Glibc.close(fd)
            if connected == 0 { return }
            usleep(10_000)
        }
        stop()
        throw StorageError("server did not listen", errno: ETIMEDOUT, path: uri)
    }
}

/// A port of 127.0.0.1 nobody listens on now (the kernel's choice for port 0).
func freeTCPPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { Glibc.close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
        }
    }
    guard ok else { throw StorageError("bind", errno: errno, path: "127.0.0.1:0") }
    return Int(UInt16(bigEndian: address.sin_port))
}

final class NBDCounter: @unchecked Sendable {
    private var value = 0
    private let lock = NSLock()
    func next() -> Int { lock.lock(); defer { lock.unlock() }; value += 1; return value }
}

/// Submits everything (as the queue allows) and reaps until all complete,
/// waiting on the completion descriptor with poll() as the data plane's epoll
/// does; returns each tag's result. Fails the test after `timeout` seconds.
@discardableResult
func nbdRunAll(_ storage: BlockStorage, _ operations: [StorageOperation],
               timeout: Double = 20) -> [UInt64: Int64] {
    var pending = operations[...]
    var results: [UInt64: Int64] = [:]
    let deadline = Date().addingTimeInterval(timeout)
    while results.count < operations.count {
        if !pending.isEmpty {
            var batch = Array(pending)
            let taken = batch.withUnsafeMutableBufferPointer { storage.submit($0) }
            pending = pending.dropFirst(taken)
        }
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        _ = poll(&poller, 1, 100)
        _ = storage.reapCompletions { completion in
            #expect(results[completion.tag] == nil, "tag \(completion.tag) completed twice")
            results[completion.tag] = completion.result
        }
        if Date() > deadline {
            Issue.record("only \(results.count) of \(operations.count) operations completed within \(timeout) s")
            break
        }
    }
    return results
}

/// A buffer of `pages` separate page-aligned pages as one operation's iovecs.
func nbdSegments(bytes: Int, firstSector: Int = 0) -> (Pages, SegmentList) {
    let pages = Pages(count: (firstSector * 512 + bytes + 4095) / 4096)
    let segments = SegmentList(capacity: pages.count)
    segments.appendSectors(bytes / 512, pages: pages, firstPage: 0, firstSector: firstSector)
    return (pages, segments)
}

func nbdRead(_ storage: BlockStorage, offset: Int, length: Int) -> (result: Int64, bytes: [UInt8]) {
    let (pages, segments) = nbdSegments(bytes: length)
    let results = nbdRunAll(storage, [StorageOperation(tag: 1, kind: .read, offset: UInt64(offset),
                                                       iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    withExtendedLifetime(pages) {}
    return (results[1] ?? Int64.min, segments.bytes)
}

func nbdWrite(_ storage: BlockStorage, offset: Int, bytes: [UInt8]) -> Int64 {
    let (pages, segments) = nbdSegments(bytes: bytes.count)
    segments.load(bytes)
    let results = nbdRunAll(storage, [StorageOperation(tag: 1, kind: .write, offset: UInt64(offset),
                                                       iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    withExtendedLifetime(pages) {}
    return results[1] ?? Int64.min
}

func nbdSingle(_ storage: BlockStorage, _ kind: StorageOperationKind, offset: Int = 0, length: Int = 0) -> Int64 {
    nbdRunAll(storage, [StorageOperation(tag: 7, kind: kind, offset: UInt64(offset), length: UInt64(length))])[7]
        ?? Int64.min
}

/// Rounds of `queueDepth` random non-overlapping writes (random segment
/// layouts: separate pages, starting at a random sector), each round read
/// back in full through `verifier` and compared with a model of the disk.
func nbdExerciseRandomIO(_ storage: BlockStorage, verifier: BlockStorage, seed: UInt64, rounds: Int = 4) {
    var generator = XorShift(seed: seed)
    let size = Int(storage.geometry.sizeBytes)
    let sectors = size / 512
    let initial = nbdRead(verifier, offset: 0, length: size)
    #expect(initial.result == Int64(size))
    var model = initial.bytes
    for _ in 0..<rounds {
        let ranges = randomDisjointRanges(count: storage.queueDepth, sectors: sectors, using: &generator)
        var keepAlive: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        for (index, range) in ranges.enumerated() {
            let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
            segments.fillRandom(&generator)
            model.replaceSubrange(range.start * 512..<(range.start + range.count) * 512, with: segments.bytes)
            operations.append(StorageOperation(tag: UInt64(index), kind: .write, offset: UInt64(range.start * 512),
                                               iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
        }
        let results = nbdRunAll(storage, operations)
        for (index, range) in ranges.enumerated() {
            #expect(results[UInt64(index)] == Int64(range.count * 512), "write \(index) of \(range.count) sectors")
        }
    }
    let final = nbdRead(verifier, offset: 0, length: size)
    #expect(final.bytes.withUnsafeBytes(fnv1a) == model.withUnsafeBytes(fnv1a), "export content after random writes")

    // Random reads through the storage under test, compared with the model.
    let ranges = randomDisjointRanges(count: storage.queueDepth, sectors: sectors, using: &generator)
    var keepAlive: [(Pages, SegmentList)] = []
    var reads: [SegmentList] = []
    var operations: [StorageOperation] = []
    for (index, range) in ranges.enumerated() {
        let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
        reads.append(segments)
        operations.append(StorageOperation(tag: UInt64(index), kind: .read, offset: UInt64(range.start * 512),
                                           iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
    }
    let results = nbdRunAll(storage, operations)
    for (index, range) in ranges.enumerated() {
        #expect(results[UInt64(index)] == Int64(range.count * 512))
        let expected = Array(model[range.start * 512..<(range.start + range.count) * 512])
        #expect(reads[index].bytes == expected, "read \(index): \(range.count) sectors at sector \(range.start)")
    }
}
