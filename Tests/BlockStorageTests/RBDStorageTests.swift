import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing
@testable import BlockStorage

/// RBDStorage against a one-node Ceph cluster of the test's own: verified
/// random I/O (checked through the storage and through `rbd export`, which
/// shares no code with it), flush, discard, the exclusive lock that keeps a
/// second writer out, and a snapshot served read-only.
@Suite(.serialized) struct RBDStorageTests {
    static let imageBytes = 64 << 20

    /// Runs `operations` to completion (all submitted, every completion
    /// reaped); each tag's result.
    static func run(_ storage: RBDStorage, _ operations: [StorageOperation]) -> [UInt64: Int64] {
        var results: [UInt64: Int64] = [:]
        var pending = operations[...]
        var buffer = Array(operations)
        while results.count < operations.count {
            if !pending.isEmpty {
                buffer = Array(pending)
                let taken = buffer.withUnsafeMutableBufferPointer { storage.submit($0) }
                pending = pending.dropFirst(taken)
            }
            var pfd = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 1000)
            _ = storage.reapCompletions { results[$0.tag] = $0.result }
        }
        return results
    }

    /// One read or write of `bytes` at `offset` through a heap buffer.
    static func transfer(_ storage: RBDStorage, _ kind: StorageOperationKind, offset: Int, bytes: inout [UInt8]) -> Int64 {
        bytes.withUnsafeMutableBytes { b in
            var v = iovec(iov_base: b.baseAddress, iov_len: b.count)
            return withUnsafeMutablePointer(to: &v) {
                run(storage, [StorageOperation(tag: 1, kind: kind, offset: UInt64(offset), iovecs: $0, iovecCount: 1)])[1]!
            }
        }
    }

    @Test func verifiedIOFlushDiscardTheLockAndASnapshot() throws {
        guard getuid() == 0 else { throw CephClusterError("the Ceph tests need root") }
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: Self.imageBytes >> 20)
        let address = RBDImageAddress(pool: cluster.pool, image: "guest", configPath: cluster.configPath)
        let storage = try RBDStorage.open(address, readOnly: false, queueDepth: 32)
        defer { storage.close() }
        #expect(try storage.lockOwners().isEmpty)
        let owner = try #require(try storage.takeWriterLock(waitingUpTo: 5, breakingPreviousOwner: nil))
        #expect(try storage.lockOwners() == [owner] && storage.lockOwnerName == owner)
        #expect(storage.geometry == StorageGeometry(
            sizeBytes: UInt64(Self.imageBytes), logicalSectorSize: 512, physicalSectorSize: 512, readOnly: false,
            supportsFlush: true, discard: DiscardSupport(granularity: 4 << 20, alignment: 0, zeroesData: true)))
        #expect(storage.ioEngineName == "librbd" && storage.currentSizeBytes() == UInt64(Self.imageBytes))

        // 300 writes of 512 B to 256 KiB at sector offsets, 32 at a time, each with bytes of its own.
        var model = [UInt8](repeating: 0, count: Self.imageBytes)
        var rng = SplitMix64(seed: 16)
        var buffers: [UnsafeMutableRawBufferPointer] = []
        let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: 32)
        defer { vectors.deallocate(); for b in buffers { b.deallocate() } }
        for batch in 0..<10 {
            var ops: [StorageOperation] = []
            for i in 0..<30 {
                let sectors = 1 + Int(rng.next() % 512)
                let offset = Int(rng.next() % UInt64(Self.imageBytes / 512 - sectors)) * 512
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: sectors * 512, alignment: 4096)
                for k in 0..<b.count { b[k] = UInt8(truncatingIfNeeded: rng.next()) }
                buffers.append(b)
                model.replaceSubrange(offset..<(offset + b.count), with: b)
                vectors[i] = iovec(iov_base: b.baseAddress, iov_len: b.count)
                ops.append(StorageOperation(tag: UInt64(batch * 100 + i), kind: .write, offset: UInt64(offset),
                                            iovecs: vectors + i, iovecCount: 1))
            }
            // Writes of one batch may overlap: the model holds the last one, so they go one batch at a time in order.
            for op in ops {
                let r = Self.run(storage, [op])
                #expect(r[op.tag] == Int64(op.iovecs!.pointee.iov_len), "write \(op.tag)")
            }
        }
        #expect(Self.run(storage, [StorageOperation(tag: 7, kind: .flush)])[7] == 0)

        // Read back through the storage, 16 MiB at a time.
        for chunk in stride(from: 0, to: Self.imageBytes, by: 16 << 20) {
            var bytes = [UInt8](repeating: 0xee, count: 16 << 20)
            #expect(Self.transfer(storage, .read, offset: chunk, bytes: &bytes) == Int64(16 << 20))
            #expect(bytes == Array(model[chunk..<(chunk + (16 << 20))]), "bytes at \(chunk)")
        }
        // And through `rbd export`, which shares no code with the storage.
        let exported = cluster.directory + "/export.bin"
        try cluster.rbd(["export", "\(cluster.pool)/guest", exported])
        #expect(FileManager.default.contents(atPath: exported).map { [UInt8]($0) == model } == true)

        // Discard two objects: they read back as zeros.
        #expect(Self.run(storage, [StorageOperation(tag: 8, kind: .discard, offset: 8 << 20, length: 8 << 20)])[8] == 0)
        model.replaceSubrange((8 << 20)..<(16 << 20), with: [UInt8](repeating: 0, count: 8 << 20))
        var zeros = [UInt8](repeating: 0xee, count: 8 << 20)
        #expect(Self.transfer(storage, .read, offset: 8 << 20, bytes: &zeros) == Int64(8 << 20))
        #expect(zeros.allSatisfy { $0 == 0 })
        // Past the end: refused before librbd sees it.
        var tail = [UInt8](repeating: 0, count: 4096)
        #expect(Self.transfer(storage, .read, offset: Self.imageBytes - 512, bytes: &tail) == -Int64(EINVAL))

        // The exclusive lock: a second read-write handle cannot take it while
        // this one holds it (it waits its second, then names the holder), and
        // its writes fail (EROFS: librbd asked the holder, which refused); a
        // read-only handle reads.
        let second = try RBDStorage.open(address, readOnly: false, queueDepth: 4)
        #expect {
            try second.takeWriterLock(waitingUpTo: 1, breakingPreviousOwner: nil)
        } throws: { error in
            (error as? StorageError).map {
                $0.operation == "rbd_lock_acquire" && $0.errno == EBUSY && $0.description.contains("held by \(owner)")
            } ?? false
        }
        var intruder = [UInt8](repeating: 9, count: 512)
        #expect(Self.transfer(second, .write, offset: 0, bytes: &intruder) == -Int64(EROFS))
        second.close()
        let reader = try RBDStorage.open(address, readOnly: true, queueDepth: 4)
        var first = [UInt8](repeating: 0, count: 1 << 20)
        #expect(Self.transfer(reader, .read, offset: 0, bytes: &first) == Int64(1 << 20))
        #expect(first == Array(model[0..<(1 << 20)]))
        var write = [UInt8](repeating: 1, count: 512)
        #expect(Self.transfer(reader, .write, offset: 0, bytes: &write) == -Int64(EROFS))
        reader.close()

        // A snapshot: read-only, and the bytes of the moment it was taken.
        try cluster.rbd(["snap", "create", "\(cluster.pool)/guest@before"])
        var later = [UInt8](repeating: 0x42, count: 1 << 20)
        #expect(Self.transfer(storage, .write, offset: 0, bytes: &later) == Int64(1 << 20))
        var snapshotAddress = address
        snapshotAddress.snapshot = "before"
        let snapshot = try RBDStorage.open(snapshotAddress, readOnly: false, queueDepth: 4)
        #expect(snapshot.geometry.readOnly && snapshot.geometry.discard == nil)
        var old = [UInt8](repeating: 0, count: 1 << 20)
        #expect(Self.transfer(snapshot, .read, offset: 0, bytes: &old) == Int64(1 << 20))
        #expect(old == Array(model[0..<(1 << 20)]))
        snapshot.close()

        // Closed, the lock goes: another daemon takes it at once.
        storage.close()
        let next = try RBDStorage.open(address, readOnly: false, queueDepth: 4)
        let nextOwner = try next.takeWriterLock(waitingUpTo: 1, breakingPreviousOwner: nil)
        #expect(nextOwner != nil && nextOwner != owner)
        var check = [UInt8](repeating: 0, count: 1 << 20)
        #expect(Self.transfer(next, .read, offset: 0, bytes: &check) == Int64(1 << 20))
        #expect(check == [UInt8](repeating: 0x42, count: 1 << 20))
        next.close()

        // An image without the exclusive-lock feature cannot keep a second
        // writer out: refused read-write with the way out named, served read-only.
        try cluster.rbd(["create", "--size", "4M", "--image-feature", "layering", "\(cluster.pool)/plain"])
        var plain = address
        plain.image = "plain"
        let unlockable = try RBDStorage.open(plain, readOnly: false, queueDepth: 4)
        #expect(unlockable.featureNames == ["layering"])
        #expect {
            try unlockable.takeWriterLock(waitingUpTo: 1, breakingPreviousOwner: nil)
        } throws: { error in
            (error as? StorageError).map { $0.errno == EINVAL && $0.description.contains("rbd feature enable") } ?? false
        }
        unlockable.close()
        let plainReader = try RBDStorage.open(plain, readOnly: true, queueDepth: 4)
        #expect(try plainReader.takeWriterLock(waitingUpTo: 1, breakingPreviousOwner: nil) == nil)
        plainReader.close()
    }
}
