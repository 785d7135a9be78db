import Foundation
import Glibc
import NetworkPlumbing
import SystemSupport
import Testing

// Every test that touches interfaces gets its own network namespace
// (`ip netns add xbnp-<random>`) and one dedicated thread inside it: the
// thread setns()es into the namespace (and mounts that namespace's sysfs on
// a private /sys) and then runs the closures the test hands it. TapDevice
// and NetworkInterface act on the namespace of the calling thread, so every
// interface call goes through `run`; reads and writes on TAP descriptors
// already open may happen on any thread. No other thread ever changes
// namespace, so tests running in parallel do not disturb one another, and
// `#expect` stays on the test's own task where Swift Testing attributes it.
//
// Why not `ip netns exec helper`: a helper executable would need a protocol
// to report back; a thread keeps the test in one process and lets it use the
// module's Swift values directly.

/// Cancels the test (not a failure) without root.
func requireRoot() throws {
    if geteuid() != 0 { try Test.cancel("network namespace tests need root (TUN/TAP, bridges, setns)") }
}

/// Runs `ip` with `arguments`; its stdout, or an error with its stderr.
@discardableResult
func ip(_ arguments: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let output = out.fileHandleForReading.readDataToEndOfFile()
    let errors = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw CommandFailed(description: "ip \(arguments.joined(separator: " ")): exit \(process.terminationStatus): "
            + String(decoding: errors, as: UTF8.self))
    }
    return String(decoding: output, as: UTF8.self)
}

struct CommandFailed: Error, CustomStringConvertible { var description: String }

/// A thread living in one network namespace, running closures for the test.
final class NamespaceThread: @unchecked Sendable {  // `jobs` and `stopping` guarded by `condition`
    let namespace: String
    private let condition = Condition()
    private var jobs: [@Sendable () -> Void] = []
    private var stopping = false
    private var thread: NativeThread?

    init(namespace: String) throws {
        self.namespace = namespace
        let ready = Handoff<Result<Void, NetworkError>>()
        thread = try NativeThread(name: "netns-test") { [self] in
            do throws(NetworkError) {
                try NetworkNamespace.enter(named: namespace)
                ready.put(.success(()))
            } catch {
                ready.put(.failure(error))
                return
            }
            serve()
        }
        try ready.take().get()
    }

    private func serve() {
        while true {
            let job: (@Sendable () -> Void)? = condition.withLock {
                while jobs.isEmpty && !stopping { condition.wait() }
                return jobs.isEmpty ? nil : jobs.removeFirst()
            }
            guard let job else { return }
            job()
        }
    }

    /// Runs `body` on the namespace's thread and returns what it returned or threw.
    func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Handoff<Result<T, any Error>>()
        condition.withLock {
            jobs.append { result.put(Result { try body() }) }
            condition.broadcast()
        }
        return try result.take().get()
    }

    func stop() {
        condition.withLock {
            stopping = true
            condition.broadcast()
        }
        thread?.join()
    }
}

/// Creates a namespace with a unique name, runs `body` with a thread inside
/// it, and deletes the namespace afterwards, also when `body` throws.
func withNetworkNamespace(_ body: (NamespaceThread) throws -> Void) throws {
    try requireRoot()
    let name = "xbnp-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
    try ip(["netns", "add", name])
    defer { _ = try? ip(["netns", "delete", name]) }
    let thread = try NamespaceThread(namespace: name)
    defer { thread.stop() }
    try body(thread)
}

/// A small text file's contents without its trailing newline (sysfs).
func readSmallFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard n >= 0 else { throw SystemError("read \(path)", errno: errno) }
    var text = String(decoding: buffer[0..<n], as: UTF8.self)
    while text.hasSuffix("\n") { text.removeLast() }
    return text
}

/// The target of a symbolic link (sysfs's master link), nil if there is none.
func readLink(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buffer, buffer.count - 1)
    guard n >= 0 else { return nil }
    return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Waits up to `timeout` seconds for a frame on any of `queues` that
/// `accept` takes (frames it refuses, e.g. IPv6 chatter of the bridge, are
/// skipped). Returns the frame (virtio header included) and the queue's index.
func receiveFrame(on queues: [TapQueue], timeout: Double = 5,
                  where accept: ([UInt8]) -> Bool) throws -> (frame: [UInt8], queue: Int)? {
    let deadline = MonotonicClock.seconds() + timeout
    var buffer = [UInt8](repeating: 0, count: 65550)
    while MonotonicClock.seconds() < deadline {
        var fds = queues.map { pollfd(fd: $0.fileDescriptor, events: Int16(POLLIN), revents: 0) }
        let remaining = Int32(max(1, (deadline - MonotonicClock.seconds()) * 1000))
        let ready = poll(&fds, nfds_t(fds.count), remaining)
        if ready < 0 && errno == EINTR { continue }
        guard ready >= 0 else { throw SystemError("poll", errno: errno) }
        for (index, queue) in queues.enumerated() where fds[index].revents & Int16(POLLIN) != 0 {
            while let n = try buffer.withUnsafeMutableBytes({ try queue.read(into: $0) }) {
                let frame = Array(buffer[0..<n])
                if accept(frame) { return (frame, index) }
            }
        }
    }
    return nil
}

/// A broadcast Ethernet frame of the local experimental ethertype 0x88B5
/// carrying `payload`.
func broadcastFrame(source: [UInt8], payload: [UInt8]) -> [UInt8] {
    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + source + [0x88, 0xb5] + payload
}

/// True if `frame` (after a header of `headerSize` bytes) has ethertype 0x88B5.
func isTestFrame(_ frame: [UInt8], headerSize: Int = VirtioNetHeader.size) -> Bool {
    frame.count >= headerSize + 14 && frame[headerSize + 12] == 0x88 && frame[headerSize + 13] == 0xb5
}
