import Foundation
import Hypervisor
import LoopbackHypervisor
import LoopbackXenStore
import Testing
import XenStoreClient

/// The simulated toolstack against a store whose transaction ends fail
/// with EAGAIN: it retries as libxl does, and gives up only after its time,
/// saying so.
@Suite("toolstack transactions")
struct ToolstackRetryTests {
    @Test("a device whose transaction ends in EAGAIN 20 times is added on the 21st attempt")
    func retriesUntilCommitted() throws {
        try withContendedStore(failures: 20) { store, logged in
            let toolstack = LoopbackToolstack(store: store, log: { m in logged.withLock { $0.append(m) } })
            try toolstack.createDomain(3, name: "g3")
            try toolstack.addDisk(domain: 3, .init(params: "/tmp/none"))
            #expect(store.commits == 2)
            #expect(store.endCalls == 22)
            #expect(try store.read(toolstack.backendPath(domain: 3, devid: 51712) + "/params") == "/tmp/none")
            #expect(logged.withLock { $0 }.isEmpty)
        }
    }

    @Test("a transaction that never gets through is given up after retrySeconds, with a log naming it")
    func givesUpWithALog() throws {
        try withContendedStore(failures: Int.max) { (store, logged) throws in
            var toolstack = LoopbackToolstack(store: store, log: { m in logged.withLock { $0.append(m) } })
            toolstack.retrySeconds = 0.3
            let started = Date()
            #expect(throws: XenStoreError.self) { try toolstack.addNic(domain: 4, .init()) }
            #expect(Date().timeIntervalSince(started) < 5)
            #expect(store.endCalls > 3)
            let lines = logged.withLock { $0 }
            #expect(lines.count == 1)
            #expect(lines.first?.contains("gave up on add device /local/domain/0/backend/vif/4/0") == true, "\(lines)")
            #expect(try store.read(toolstack.nicBackendPath(domain: 4, devid: 0)) == nil)
        }
    }

    private func withContendedStore(failures: Int, _ body: (ContendedStore, LockedLines) throws -> Void) throws {
        var template = Array("/tmp/xenbackd-toolstack-XXXXXX".utf8CString)
        let directory = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = try LoopbackXenStoreServer(socketPath: directory + "/xs.sock", domainSocketDirectory: directory + "/domains")
        try server.start()
        defer { server.stop() }
        let client = try XenStoreSocketClient(socketPath: directory + "/xs.sock")
        defer { client.close() }
        try body(ContendedStore(client, failures: failures), LockedLines([]))
    }
}

typealias LockedLines = LockedValue<[String]>

/// A value shared between threads behind a lock.
final class LockedValue<Value>: @unchecked Sendable {   // `value` only under `lock`
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) -> T) -> T { lock.withLock { body(&value) } }
}

/// A real store whose first `failures` commits end in EAGAIN (aborted),
/// as when other toolstack threads keep changing what a transaction read.
final class ContendedStore: XenStore, @unchecked Sendable {   // counters under `lock`
    private let inner: any XenStore
    private let lock = NSLock()
    private var failuresLeft: Int
    private(set) var endCalls = 0
    private(set) var commits = 0

    init(_ inner: any XenStore, failures: Int) {
        self.inner = inner
        failuresLeft = failures
    }

    func endTransaction(_ t: XenStoreTransaction, commit: Bool) throws(XenStoreError) {
        let fail = lock.withLock { () -> Bool in
            endCalls += 1
            guard commit, failuresLeft > 0 else { return false }
            failuresLeft -= 1
            return true
        }
        if fail {
            try inner.endTransaction(t, commit: false)
            throw XenStoreError(errno: XenStoreError.again, context: "transaction end")
        }
        try inner.endTransaction(t, commit: commit)
        if commit { lock.withLock { commits += 1 } }
    }

    func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> String? {
        try inner.read(path, transaction: transaction)
    }
    func write(_ path: String, _ value: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        try inner.write(path, value, transaction: transaction)
    }
    func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) { try inner.mkdir(path, transaction: transaction) }
    func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) { try inner.remove(path, transaction: transaction) }
    func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]? {
        try inner.directory(path, transaction: transaction)
    }
    func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission] {
        try inner.permissions(path, transaction: transaction)
    }
    func setPermissions(_ path: String, _ perms: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError) {
        try inner.setPermissions(path, perms, transaction: transaction)
    }
    func startTransaction() throws(XenStoreError) -> XenStoreTransaction { try inner.startTransaction() }
    func watch(_ path: String, token: String) throws(XenStoreError) { try inner.watch(path, token: token) }
    func unwatch(_ path: String, token: String) throws(XenStoreError) { try inner.unwatch(path, token: token) }
    var watchFileDescriptor: Int32 { inner.watchFileDescriptor }
    func nextWatchEvent() throws(XenStoreError) -> XenStoreWatchEvent? { try inner.nextWatchEvent() }
    func close() { inner.close() }
}
