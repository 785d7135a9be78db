import Foundation
import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

/// Reaps (waiting on the completion descriptor) until `count` operations
/// completed or `timeout` seconds passed.
private func reap(_ storage: NBDStorage, into results: inout [UInt64: Int64], until count: Int, timeout: Double) {
    let deadline = Date().addingTimeInterval(timeout)
    while results.count < count && Date() < deadline {
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        _ = poll(&poller, 1, 50)
        _ = storage.reapCompletions { completion in
            #expect(results[completion.tag] == nil, "tag \(completion.tag) completed twice")
            results[completion.tag] = completion.result
        }
    }
}

/// Drives the storage (as the data plane does on its descriptor) until it
/// saw that the server is gone.
private func waitUntilDisconnected(_ storage: NBDStorage) {
    var results: [UInt64: Int64] = [:]
    let deadline = Date().addingTimeInterval(3)
    while storage.liveConnectionCount > 0 && Date() < deadline {
        reap(storage, into: &results, until: 1, timeout: 0.05)
    }
    #expect(storage.liveConnectionCount == 0)
    #expect(results.isEmpty)
}

private let reconnectMiB = 1 << 20

@Suite(.serialized) struct NBDReconnectTests {
    /// Killed and restarted on the same socket (nbdkit) or port (nbd-server,
    /// its daemon and connection children killed): operations submitted
    /// while it was down are held, then succeed; acknowledged data survives.
    @Test(arguments: NBDServerKind.allCases)
    func restartedServerResumesHeldIO(kind: NBDServerKind) throws {
        let file = try TempFile(directory: "/tmp", size: 4 * reconnectMiB, randomSeed: 11)
        let server = switch kind {
        case .nbdkit: try NBDTestServer.nbdkit(["file", file.path])
        case .nbdServer: try NBDTestServer.nbdServer(exporting: file.path)
        }
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.params, readOnly: false, queueDepth: 8,
                                          reconnectTimeoutMilliseconds: 10_000)
        defer { storage.close() }
        let before = [UInt8](repeating: 0xA5, count: 64 * 1024)
        #expect(nbdWrite(storage, offset: 0, bytes: before) == Int64(before.count))

        server.stop()
        waitUntilDisconnected(storage)
        #expect(storage.isReconnecting)

        let (readPages, readSegments) = nbdSegments(bytes: 64 * 1024)
        let (writePages, writeSegments) = nbdSegments(bytes: 128 * 1024, firstSector: 3)
        let after = (0..<128 * 1024).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        writeSegments.load(after)
        var operations = [
            StorageOperation(tag: 1, kind: .read, offset: 0, iovecs: readSegments.iovecs,
                             iovecCount: Int32(readSegments.count)),
            StorageOperation(tag: 2, kind: .write, offset: UInt64(reconnectMiB), iovecs: writeSegments.iovecs,
                             iovecCount: Int32(writeSegments.count)),
            StorageOperation(tag: 3, kind: .flush, offset: 0, length: 0),
        ]
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit($0) } == 3)
        var results: [UInt64: Int64] = [:]
        // Held, not failed, while the server is away (across several attempts).
        reap(storage, into: &results, until: 3, timeout: 0.5)
        #expect(results.isEmpty, "\(results)")

        let restartedAt = Date()
        try server.restart()
        reap(storage, into: &results, until: 3, timeout: 5)
        #expect(results == [1: 64 * 1024, 2: 128 * 1024, 3: 0])
        // Back-off capped at 2 s (plus the handshake).
        #expect(Date().timeIntervalSince(restartedAt) < 3)
        #expect(readSegments.bytes == before)
        #expect(storage.reconnections == 1)
        #expect(storage.liveConnectionCount == 1)
        #expect(!storage.isReconnecting)
        withExtendedLifetime((readPages, writePages)) {}

        #expect(nbdRead(storage, offset: reconnectMiB, length: after.count).bytes == after)
        #expect(nbdRead(storage, offset: 0, length: before.count).bytes == before)
    }

    /// Killed with reads and writes in flight (the server holds each for
    /// a second) and started again: nothing fails; every operation is
    /// issued again on the new connection, the writes land in the file and
    /// the reads return what the file holds. nbdkit only: the test needs a
    /// server that holds requests (its delay filter); nbd-server answers at
    /// once, so nothing would be in flight when it is killed.
    @Test func operationsInFlightAreRetriedOnTheNewConnection() throws {
        let file = try TempFile(directory: "/tmp", size: 4 * reconnectMiB, randomSeed: 23)
        let server = try NBDTestServer.nbdkit(["--filter=delay", "file", file.path, "delay-read=1", "delay-write=1"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 8,
                                          reconnectTimeoutMilliseconds: 10_000)
        defer { storage.close() }
        let expectedRead = preadBytes(file.path, offset: 2 * reconnectMiB, length: 64 * 1024)
        let (readPages, readSegments) = nbdSegments(bytes: 64 * 1024)
        let (writePages, writeSegments) = nbdSegments(bytes: 128 * 1024, firstSector: 5)
        let written = (0..<128 * 1024).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        writeSegments.load(written)
        var operations = [
            StorageOperation(tag: 1, kind: .read, offset: UInt64(2 * reconnectMiB), iovecs: readSegments.iovecs,
                             iovecCount: Int32(readSegments.count)),
            StorageOperation(tag: 2, kind: .write, offset: UInt64(reconnectMiB), iovecs: writeSegments.iovecs,
                             iovecCount: Int32(writeSegments.count)),
        ]
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit($0) } == 2)
        var results: [UInt64: Int64] = [:]
        reap(storage, into: &results, until: 2, timeout: 0.2)   // sent, and waiting in the server's delay
        #expect(results.isEmpty, "\(results)")
        server.stop()
        waitUntilDisconnected(storage)
        try server.restart()
        reap(storage, into: &results, until: 2, timeout: 5)
        #expect(results == [1: 64 * 1024, 2: 128 * 1024])
        #expect(storage.retriedOperations == 2)
        #expect(readSegments.bytes == expectedRead)
        #expect(preadBytes(file.path, offset: reconnectMiB, length: written.count) == written)
        withExtendedLifetime((readPages, writePages)) {}
    }

    /// A server that never comes back: held operations fail with -EIO by the
    /// deadline, later ones at once; a server started later is found in the
    /// background.
    @Test func serverThatStaysAwayFailsHeldIO() throws {
        let file = try TempFile(directory: "/tmp", size: 2 * reconnectMiB)
        let server = try NBDTestServer.nbdkit(["file", file.path])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4, connections: 2,
                                          reconnectTimeoutMilliseconds: 1_000)
        defer { storage.close() }
        #expect(nbdWrite(storage, offset: 4096, bytes: [UInt8](repeating: 3, count: 4096)) == 4096)
        server.stop()
        waitUntilDisconnected(storage)

        let started = Date()
        #expect(nbdRead(storage, offset: 0, length: 4096).result == -Int64(EIO))
        let elapsed = Date().timeIntervalSince(started)
        #expect(elapsed >= 0.5 && elapsed < 2, "\(elapsed) s")

        // Past the deadline: refused at once, while attempts go on.
        let again = Date()
        #expect(nbdSingle(storage, .flush) == -Int64(EIO))
        #expect(nbdWrite(storage, offset: 0, bytes: [UInt8](repeating: 1, count: 512)) == -Int64(EIO))
        #expect(Date().timeIntervalSince(again) < 0.5)
        #expect(storage.isReconnecting)

        // Back later: found by the background attempts (at most 2 s apart).
        try server.restart()
        let deadline = Date().addingTimeInterval(5)
        var results: [UInt64: Int64] = [:]
        while storage.liveConnectionCount < storage.connectionCount && Date() < deadline {
            reap(storage, into: &results, until: 1, timeout: 0.05)
        }
        // Every connection the disk had is back, not just the first.
        #expect(storage.liveConnectionCount == storage.connectionCount)
        #expect(nbdRead(storage, offset: 4096, length: 4096).bytes == [UInt8](repeating: 3, count: 4096))
    }

    /// The export has another size after the restart: refused for good.
    @Test func sizeChangeOnReconnectIsRefused() throws {
        let file = try TempFile(directory: "/tmp", size: 2 * reconnectMiB)
        let larger = try TempFile(directory: "/tmp", size: 3 * reconnectMiB)
        let server = try NBDTestServer.nbdkit(["file", file.path])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4,
                                          reconnectTimeoutMilliseconds: 10_000)
        defer { storage.close() }
        #expect(nbdRead(storage, offset: 0, length: 4096).result == 4096)
        server.stop()
        waitUntilDisconnected(storage)

        let (pages, segments) = nbdSegments(bytes: 4096)
        var operations = [StorageOperation(tag: 1, kind: .read, offset: 0, iovecs: segments.iovecs,
                                           iovecCount: Int32(segments.count))]
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit($0) } == 1)
        var results: [UInt64: Int64] = [:]
        reap(storage, into: &results, until: 1, timeout: 0.2)
        #expect(results.isEmpty)
        let restartedAt = Date()
        try server.restart(arguments: ["file", larger.path])
        reap(storage, into: &results, until: 1, timeout: 5)
        #expect(results == [1: -Int64(EIO)])
        #expect(Date().timeIntervalSince(restartedAt) < 3)
        withExtendedLifetime(pages) {}
        #expect(storage.reconnectRefused)
        #expect(!storage.isReconnecting)
        #expect(storage.liveConnectionCount == 0)
        #expect(nbdRead(storage, offset: 0, length: 4096).result == -Int64(EIO))
    }
}
