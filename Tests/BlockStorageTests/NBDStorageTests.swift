import Foundation
import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

private let nbdMiB = 1 << 20

@Suite(.serialized) struct NBDStorageTests {
    @Test func geometryFromTheHandshake() throws {
        let server = try NBDTestServer.nbdkit(["memory", "16M"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 8)
        defer { storage.close() }
        #expect(storage.features.sizeBytes == UInt64(16 * nbdMiB))
        #expect(storage.features.readOnly == false)
        #expect(storage.features.canTrim)
        #expect(storage.features.canZero)
        #expect(storage.queueDepth == 8)
        #expect(storage.connectionCount == 1)
        #expect(storage.geometry.sizeBytes == UInt64(16 * nbdMiB))
        #expect(storage.geometry.logicalSectorSize == 512)
        #expect(storage.geometry.readOnly == false)
        #expect(storage.geometry.supportsFlush == storage.features.canFlush)
        #expect(storage.geometry.discard?.zeroesData == false)
        #expect((storage.geometry.discard?.granularity ?? 0) >= 512)
    }

    @Test func readOnlyExportRefusesWrites() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"], readOnly: true)
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4)
        defer { storage.close() }
        #expect(storage.features.readOnly)
        #expect(storage.geometry.readOnly)
        #expect(storage.geometry.discard == nil)
        #expect(storage.geometry.supportsFlush == false)
        #expect(nbdWrite(storage, offset: 4096, bytes: [UInt8](repeating: 1, count: 4096)) == -Int64(EROFS))
        #expect(nbdSingle(storage, .discard, offset: 0, length: 4096) == -Int64(EROFS))
        let read = nbdRead(storage, offset: 0, length: 8192)
        #expect(read.result == 8192)
        #expect(read.bytes == [UInt8](repeating: 0, count: 8192))
    }

    @Test func readOnlyOpenOfWritableExport() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: true, queueDepth: 4)
        defer { storage.close() }
        #expect(storage.geometry.readOnly)
        #expect(nbdWrite(storage, offset: 0, bytes: [UInt8](repeating: 1, count: 512)) == -Int64(EROFS))
    }

    @Test(arguments: [(false, 1), (true, 1), (false, 4)])
    func randomVerifiedIO(tcp: Bool, connections: Int) throws {
        let server = try NBDTestServer.nbdkit(["memory", "8M"], transport: tcp ? .tcp : .unixSocket)
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 16, connections: connections)
        defer { storage.close() }
        // nbdkit's memory plugin allows multi-conn.
        #expect(storage.features.canMultiConn)
        #expect(storage.connectionCount == connections)
        let verifier = try NBDStorage.open(uri: server.uri, readOnly: true, queueDepth: 1)
        defer { verifier.close() }
        nbdExerciseRandomIO(storage, verifier: verifier, seed: 0xBEEF &+ UInt64(connections))
        // Round-robin: every connection carried commands.
        #expect(storage.commandsIssued.allSatisfy { $0 > 0 }, "\(storage.commandsIssued)")
    }

    @Test func oldXenFormAgainstTCP() throws {
        let server = try NBDTestServer.nbdkit(["memory", "2M"], transport: .tcp)
        defer { server.stop() }
        for params in ["nbd:127.0.0.1:\(server.port!)", "nbd:127.0.0.1 \(server.port!)"] {
            let storage = try NBDStorage.open(uri: params, readOnly: false, queueDepth: 4)
            #expect(storage.geometry.sizeBytes == UInt64(2 * nbdMiB))
            #expect(nbdWrite(storage, offset: 512, bytes: [UInt8](repeating: 9, count: 1024)) == 1024)
            #expect(nbdRead(storage, offset: 512, length: 1024).bytes == [UInt8](repeating: 9, count: 1024))
            storage.close()
        }
    }

    /// One command straight into one iovec, into adjacent iovecs, through the
    /// bounce buffer (separate pages), and one command per page (too large to bounce).
    @Test(arguments: [
        (64 * 1024, false), (3 * nbdMiB, true), (3 * nbdMiB, false), (5 * nbdMiB, false),
    ])
    func transferShapes(bytes: Int, contiguous: Bool) throws {
        let server = try NBDTestServer.nbdkit(["memory", "16M"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4)
        defer { storage.close() }
        var generator = XorShift(seed: UInt64(bytes))
        let data = (0..<bytes).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        let offset = 3 * 512
        let result: Int64
        if contiguous {
            var memory: UnsafeMutableRawPointer?
            precondition(posix_memalign(&memory, 4096, bytes) == 0)
            defer { free(memory) }
            data.withUnsafeBytes { _ = memcpy(memory!, $0.baseAddress!, bytes) }
            let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: bytes / 4096)
            defer { vectors.deallocate() }
            for page in 0..<bytes / 4096 { vectors[page] = iovec(iov_base: memory! + page * 4096, iov_len: 4096) }
            result = nbdRunAll(storage, [StorageOperation(tag: 1, kind: .write, offset: UInt64(offset),
                                                          iovecs: vectors, iovecCount: Int32(bytes / 4096))])[1]!
        } else {
            result = nbdWrite(storage, offset: offset, bytes: data)
        }
        #expect(result == Int64(bytes))
        let read = nbdRead(storage, offset: offset, length: bytes)
        #expect(read.result == Int64(bytes))
        #expect(read.bytes == data)
    }

    @Test func flushAndDiscard() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4, connections: 2)
        defer { storage.close() }
        let data = [UInt8](repeating: 0x5A, count: 256 * 1024)
        #expect(nbdWrite(storage, offset: 0, bytes: data) == Int64(data.count))
        #expect(nbdSingle(storage, .flush) == 0)
        #expect(nbdSingle(storage, .discard, offset: 64 * 1024, length: 64 * 1024) == 0)
        var expected = data
        expected.replaceSubrange(64 * 1024..<128 * 1024, with: [UInt8](repeating: 0, count: 64 * 1024))
        #expect(nbdRead(storage, offset: 0, length: data.count).bytes == expected)
        #expect(nbdSingle(storage, .discard, offset: 0, length: 0) == 0)
    }

    @Test func discardWithoutTrimIsNotSupported() throws {
        // The eval plugin has no trim unless given a trim script.
        let server = try NBDTestServer.nbdkit(["eval", "get_size=echo 1048576",
                                            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                                            "pwrite=cat >/dev/null"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 2)
        defer { storage.close() }
        #expect(storage.features.canTrim == false)
        #expect(storage.geometry.discard == nil)
        #expect(nbdSingle(storage, .discard, offset: 0, length: 4096) == -Int64(EOPNOTSUPP))
        #expect(nbdRead(storage, offset: 4096, length: 4096).result == 4096)
    }

    @Test func outOfRangeIsInvalid() throws {
        let server = try NBDTestServer.nbdkit(["memory", "1M"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 2)
        defer { storage.close() }
        #expect(nbdRead(storage, offset: nbdMiB - 512, length: 1024).result == -Int64(EINVAL))
        #expect(nbdSingle(storage, .discard, offset: nbdMiB, length: 512) == -Int64(EINVAL))
        #expect(nbdRead(storage, offset: nbdMiB - 512, length: 512).result == 512)
    }

    @Test func queueDepthLimitsSubmissions() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "1M", "delay-read=200ms"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4)
        defer { storage.close() }
        var keep: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        for index in 0..<10 {
            let (pages, segments) = nbdSegments(bytes: 4096)
            keep.append((pages, segments))
            operations.append(StorageOperation(tag: UInt64(index), kind: .read, offset: UInt64(index * 4096),
                                               iovecs: segments.iovecs, iovecCount: 1))
        }
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit($0) } == 4)
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit(UnsafeMutableBufferPointer(rebasing: $0[4...])) } == 0)
        var results: [UInt64: Int64] = [:]
        while results.count < 4 {
            var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
            #expect(poll(&poller, 1, 5_000) == 1)
            _ = storage.reapCompletions { results[$0.tag] = $0.result }
        }
        #expect(results == [0: 4096, 1: 4096, 2: 4096, 3: 4096])
        let rest = nbdRunAll(storage, Array(operations[4...]))
        #expect(rest.count == 6 && rest.values.allSatisfy { $0 == 4096 })
    }

    /// A server that dies with commands in flight: every one completes with
    /// an error quickly, and later operations fail at once.
    @Test func serverKilledMidIO() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "8M", "delay-read=2", "delay-write=2"])
        defer { server.stop() }
        // No reconnection window: what was in flight fails with the connection
        // (NBDReconnectTests covers the retry on a new connection).
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 16, connections: 2,
                                          reconnectTimeoutMilliseconds: 0)
        defer { storage.close() }
        var keep: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        for index in 0..<16 {
            let (pages, segments) = nbdSegments(bytes: 64 * 1024, firstSector: index % 8)
            keep.append((pages, segments))
            operations.append(StorageOperation(tag: UInt64(index), kind: index % 2 == 0 ? .read : .write,
                                               offset: UInt64(index * 64 * 1024),
                                               iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
        }
        #expect(operations.withUnsafeMutableBufferPointer { storage.submit($0) } == 16)
        // Let libnbd send everything.
        for _ in 0..<20 {
            #expect(storage.pollCompletions { _ in Issue.record("completed before the server answered") } == 0)
            usleep(5_000)
        }
        let killedAt = Date()
        server.stop()
        var collected: [UInt64: Int64] = [:]
        while collected.count < 16 && Date().timeIntervalSince(killedAt) < 5 {
            var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&poller, 1, 100)
            _ = storage.reapCompletions { collected[$0.tag] = $0.result }
        }
        #expect(collected.count == 16)
        #expect(collected.values.allSatisfy { $0 < 0 }, "\(collected)")
        #expect(Date().timeIntervalSince(killedAt) < 1.5)
        #expect(storage.liveConnectionCount == 0)
        // Nothing left to talk to: refused at once.
        #expect(nbdRead(storage, offset: 0, length: 4096).result == -Int64(EIO))
        #expect(nbdSingle(storage, .flush) == -Int64(EIO))
    }

    /// A server that stops answering: the command times out, its connection
    /// is dropped and everything on it fails.
    @Test func hungServerTimesOut() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "1M", "delay-read=30"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 4,
                                          commandTimeoutMilliseconds: 300)
        defer { storage.close() }
        let started = Date()
        #expect(nbdRead(storage, offset: 0, length: 4096).result == -Int64(ETIMEDOUT))
        let elapsed = Date().timeIntervalSince(started)
        #expect(elapsed >= 0.3 && elapsed < 2, "\(elapsed) s")
    }

    /// A slow server and large writes: libnbd cannot send everything at once
    /// and needs EPOLLOUT; all data must still arrive intact.
    @Test func slowServerLargeWrites() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "32M", "delay-write=20ms", "delay-read=20ms"])
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.uri, readOnly: false, queueDepth: 8)
        defer { storage.close() }
        var generator = XorShift(seed: 77)
        var keep: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        var expected: [[UInt8]] = []
        for index in 0..<8 {
            let (pages, segments) = nbdSegments(bytes: 2 * nbdMiB)
            segments.fillRandom(&generator)
            keep.append((pages, segments))
            expected.append(segments.bytes)
            operations.append(StorageOperation(tag: UInt64(index), kind: .write, offset: UInt64(index * 4 * nbdMiB),
                                               iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
        }
        let results = nbdRunAll(storage, operations)
        #expect(results.count == 8 && results.values.allSatisfy { $0 == Int64(2 * nbdMiB) })
        #expect(storage.outputWaits > 0, "16 MiB of writes fit in the socket at once?")
        for index in 0..<8 {
            #expect(nbdRead(storage, offset: index * 4 * nbdMiB, length: 2 * nbdMiB).bytes == expected[index])
        }
    }

    /// nbd-server as Xen users run it (`nbd-server 127.0.0.1:PORT FILE`,
    /// named by `nbd:127.0.0.1 PORT`: no flush, FUA or trim), and from a
    /// configuration file on a unix socket with flush, FUA and trim.
    @Test(arguments: [(NBDTransport.tcp, NBDServerOptions()), (.unixSocket, .all)])
    func nbdServerExport(transport: NBDTransport, options: NBDServerOptions) throws {
        let file = try TempFile(directory: "/tmp", size: 4 * nbdMiB, randomSeed: 3)
        let server = try NBDTestServer.nbdServer(exporting: file.path, transport: transport, options: options)
        defer { server.stop() }
        let storage = try NBDStorage.open(uri: server.params, readOnly: false, queueDepth: 8)
        defer { storage.close() }
        #expect(storage.geometry.sizeBytes == UInt64(4 * nbdMiB))
        #expect(storage.features.canFlush == options.contains(.flush))
        #expect(storage.features.canTrim == options.contains(.trim))
        let verifier = try NBDStorage.open(uri: server.uri, readOnly: true, queueDepth: 1)
        defer { verifier.close() }
        nbdExerciseRandomIO(storage, verifier: verifier, seed: 0xF00D, rounds: 2)
        #expect(nbdSingle(storage, .flush) == 0)
        if options.contains(.trim) {
            #expect(nbdSingle(storage, .discard, offset: 64 * 1024, length: 64 * 1024) == 0)
        }
    }

    @Test func connectionRefused() throws {
        let port = try freeTCPPort()
        #expect(throws: StorageError.self) {
            try NBDStorage.open(uri: "nbd:127.0.0.1:\(port)", readOnly: false, queueDepth: 4)
        }
        #expect(throws: StorageError.self) {
            try NBDStorage.open(uri: "nbd+unix:///?socket=/tmp/no-such-nbd.sock", readOnly: false, queueDepth: 4)
        }
    }
}
