import SystemSupport
import Foundation
import Glibc
import Hypervisor
import LibXenStore
import LoopbackXenStore
import Testing
import XenStoreClient
import XenStoreWire

/// Which client library a test talks through.
enum ClientKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case socketClient, libxenstore
    var testDescription: String { rawValue }
}

/// A loopback xenstored started in a fresh temporary directory.
final class LoopbackFixture {
    let directory: String
    let server: LoopbackXenStoreServer
    var socketPath: String { directory + "/xenstored.sock" }
    private var clients: [any XenStore] = []

    init() throws {
        directory = "/tmp/xst-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        do {
            server = try LoopbackXenStoreServer(socketPath: directory + "/xenstored.sock",
                                                domainSocketDirectory: directory + "/domains")
            try server.start()
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    /// A privileged client of the chosen kind (closed by `tearDown`).
    func dom0(_ kind: ClientKind = .socketClient) throws -> any XenStore {
        let client: any XenStore = switch kind {
        case .socketClient: try XenStoreSocketClient(socketPath: socketPath)
        case .libxenstore: try LibXenStoreConnection(socketPath: socketPath)
        }
        clients.append(client)
        return client
    }

    func dom0SocketClient() throws -> XenStoreSocketClient {
        let client = try XenStoreSocketClient(socketPath: socketPath)
        clients.append(client)
        return client
    }

    /// Introduces `domid` and connects to its socket as that guest.
    func guest(_ domid: DomID) throws -> XenStoreSocketClient {
        try server.introduceDomain(domid)
        let client = try XenStoreSocketClient(socketPath: server.domainSocketPath(for: domid))
        clients.append(client)
        return client
    }

    /// What a toolstack does for a new guest: its home directory, owned by it.
    func createDomainHome(_ domid: DomID, using dom0: any XenStore) throws {
        let home = "/local/domain/\(domid)"
        try dom0.mkdir(home)
        try dom0.setPermissions(home, [XenStorePermission(domain: UInt32(domid), access: .none)])
    }

    func tearDown() {
        for client in clients { client.close() }
        server.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Runs `body` against a fresh server, stopped and cleaned up afterwards.
func withLoopbackXenStore(_ body: (LoopbackFixture) throws -> Void) throws {
    let fixture = try LoopbackFixture()
    defer { fixture.tearDown() }
    try body(fixture)
}

/// Expects `body` to throw a XenStoreError carrying `errno`.
func expectErrno(_ errno: Int32, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected errno \(errno), but the call succeeded", sourceLocation: sourceLocation)
    } catch let error as XenStoreError {
        #expect(error.errno == errno, "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected XenStoreError errno \(errno), got \(error)", sourceLocation: sourceLocation)
    }
}

/// Waits up to `timeout` seconds for the client's watch descriptor to become readable.
func waitReadable(_ fd: Int32, timeout: Double) -> Bool {
    var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&entry, 1, Int32(timeout * 1000)) == 1
}

/// Waits for the next watch event (up to `timeout` seconds).
func nextEvent(_ client: any XenStore, timeout: Double = 5) throws -> XenStoreWatchEvent? {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        if let event = try client.nextWatchEvent() { return event }
        let left = deadline.timeIntervalSinceNow
        if left <= 0 || !waitReadable(client.watchFileDescriptor, timeout: left) { return try client.nextWatchEvent() }
    }
}

/// The events queued once `barrier` (a request on the watching connection)
/// has returned. xenstored answers requests in order, so every event caused
/// by earlier requests precedes the barrier's reply.
func queuedEvents(_ client: any XenStore, after barrier: () throws -> Void) throws -> [XenStoreWatchEvent] {
    try barrier()
    var events: [XenStoreWatchEvent] = []
    while let event = try client.nextWatchEvent() { events.append(event) }
    return events
}

/// A request every connection may make, used as a barrier.
func ping(_ client: any XenStore) throws {
    _ = try? client.read("/")
}

/// Runs a program with XENSTORED_PATH set; returns its exit status, stdout and stderr.
@discardableResult
func runTool(_ arguments: [String], socketPath: String, timeout: Double = 10) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["timeout", String(Int(timeout))] + arguments
    var environment = ProcessInfo.processInfo.environment
    environment["XENSTORED_PATH"] = socketPath
    process.environment = environment
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

extension XenStorePermission {
    static func n(_ d: UInt32) -> Self { Self(domain: d, access: .none) }
    static func r(_ d: UInt32) -> Self { Self(domain: d, access: .read) }
    static func w(_ d: UInt32) -> Self { Self(domain: d, access: .write) }
    static func b(_ d: UInt32) -> Self { Self(domain: d, access: .both) }
}

/// A value shared between test threads, behind a pthread mutex (visible to ThreadSanitizer).
final class Locked<Value>: @unchecked Sendable {  // `value` is used only inside `lock`
    private let lock = PThreadMutex()
    private var value: Value

    init(_ value: Value) { self.value = value }

    func withLock<T>(_ body: (inout Value) -> T) -> T {
        lock.withLock { body(&value) }
    }
}

/// A joinable thread for tests that need real concurrency.
final class TestThread: Sendable {
    private let thread: NativeThread

    init(_ body: @escaping @Sendable () -> Void) {
        thread = try! NativeThread(body)
    }

    func join() { thread.join() }
}
