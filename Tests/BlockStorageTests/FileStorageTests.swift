import Glibc
import Testing
@testable import BlockStorage

/// /tmp is ext4 on this machine, /dev/shm tmpfs (which takes O_DIRECT on 6.18).
let fileDirectories = ["/tmp", "/dev/shm"]
let mebibyte = 1 << 20

@Suite struct FileStorageTests {
    @Test(arguments: fileDirectories, kernelEngines)
    func randomWritesReadBackLikePread(directory: String, engine: IOEngineChoice) throws {
        let file = try TempFile(directory: directory, size: 8 * mebibyte, randomSeed: 11)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 16, engine: engine)
        defer { storage.close() }
        #expect(storage.directIO == true)
        #expect(storage.isBlockDevice == false)
        #expect(storage.ioEngine.rawValue == engine.rawValue)
        exerciseRandomIO(storage, inspectPath: file.path, seed: 0xC0FFEE)
    }

    @Test(arguments: fileDirectories)
    func fileGeometry(directory: String) throws {
        let file = try TempFile(directory: directory, size: 3 * mebibyte + 512)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8)
        defer { storage.close() }
        #expect(storage.path == file.path)
        #expect(storage.queueDepth == 8)
        #expect(storage.geometry == StorageGeometry(
            sizeBytes: UInt64(3 * mebibyte + 512), logicalSectorSize: 512, physicalSectorSize: 4096,
            readOnly: false, supportsFlush: true,
            discard: DiscardSupport(granularity: 4096, alignment: 0, zeroesData: true)))
    }

    @Test(arguments: fileDirectories, kernelEngines)
    func flushCompletesWithZero(directory: String, engine: IOEngineChoice) throws {
        let file = try TempFile(directory: directory, size: mebibyte)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        #expect(writeThroughStorage(storage, offset: 4096, bytes: [UInt8](repeating: 7, count: 4096)) == 4096)
        #expect(singleOperation(storage, .flush) == 0)
        #expect(storage.synchronousFlush == false)
        // The path taken when the kernel refuses asynchronous fsync.
        storage.synchronousFlush = true
        #expect(singleOperation(storage, .flush) == 0)
    }

    @Test(arguments: fileDirectories, kernelEngines)
    func discardZeroesAndFreesBlocks(directory: String, engine: IOEngineChoice) throws {
        let file = try TempFile(directory: directory, size: mebibyte, randomSeed: 5)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        let blocksBefore = file.allocatedBlocks
        #expect(blocksBefore == mebibyte / 512)

        // A page-aligned 256 KiB range: zeros and 512 fewer 512-byte blocks.
        #expect(singleOperation(storage, .discard, offset: 256 * 1024, length: 256 * 1024) == 0)
        #expect(file.allocatedBlocks == blocksBefore - 512)
        let zeros = [UInt8](repeating: 0, count: 256 * 1024)
        #expect(preadBytes(file.path, offset: 256 * 1024, length: 256 * 1024) == zeros)
        let read = readThroughStorage(storage, offset: 256 * 1024, length: 256 * 1024)
        #expect(read.result == Int64(256 * 1024))
        #expect(read.bytes == zeros)

        // One sector inside a page: zeroed in place, nothing freed.
        let neighbours = preadBytes(file.path, offset: 4096, length: 4096)
        #expect(singleOperation(storage, .discard, offset: 4096 + 1024, length: 512) == 0)
        #expect(file.allocatedBlocks == blocksBefore - 512)
        var expected = neighbours
        expected.replaceSubrange(1024..<1536, with: [UInt8](repeating: 0, count: 512))
        #expect(readThroughStorage(storage, offset: 4096, length: 4096).bytes == expected)
    }

    @Test(arguments: kernelEngines)
    func readOnlyRejectsWritesAndDiscards(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 9)
        let storage = try FileStorage.open(path: file.path, readOnly: true, queueDepth: 4, engine: engine)
        defer { storage.close() }
        #expect(storage.geometry == StorageGeometry(
            sizeBytes: UInt64(mebibyte), logicalSectorSize: 512, physicalSectorSize: 4096,
            readOnly: true, supportsFlush: false, discard: nil))
        #expect(openFlags(of: file.path).map { $0 & accessModeMask } == O_RDONLY)

        // Taken by submit, then completed with -EROFS; the file is untouched.
        let before = preadBytes(file.path, offset: 0, length: 8192)
        #expect(writeThroughStorage(storage, offset: 0, bytes: [UInt8](repeating: 1, count: 8192)) == -Int64(EROFS))
        #expect(singleOperation(storage, .discard, offset: 0, length: 8192) == -Int64(EROFS))
        #expect(preadBytes(file.path, offset: 0, length: 8192) == before)
        let read = readThroughStorage(storage, offset: 0, length: 8192)
        #expect(read.result == 8192)
        #expect(read.bytes == before)
    }

    @Test(arguments: kernelEngines)
    func queueDepthLimitsWhatSubmitTakes(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 3)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        let pages = Pages(count: 10)
        let segments = SegmentList(capacity: 10)
        var operations: [StorageOperation] = []
        for index in 0..<10 {
            segments.append(pages.page(index), 4096)
            operations.append(StorageOperation(tag: UInt64(index), kind: .read, offset: UInt64(index * 8192),
                                               iovecs: segments.iovecs + index, iovecCount: 1))
        }
        func submit(from start: Int) -> Int {
            operations.withUnsafeMutableBufferPointer { storage.submit(UnsafeMutableBufferPointer(rebasing: $0[start...])) }
        }
        #expect(submit(from: 0) == 4)
        #expect(submit(from: 4) == 0)
        #expect(reap(storage, count: 4) == [0: 4096, 1: 4096, 2: 4096, 3: 4096])
        #expect(submit(from: 4) == 4)
        #expect(submit(from: 8) == 0)
        #expect(reap(storage, count: 4) == [4: 4096, 5: 4096, 6: 4096, 7: 4096])
        #expect(submit(from: 8) == 2)
        #expect(reap(storage, count: 2) == [8: 4096, 9: 4096])
        for index in 0..<10 {
            let expected = preadBytes(file.path, offset: index * 8192, length: 4096)
            #expect(Array(UnsafeRawBufferPointer(start: pages.page(index), count: 4096)) == expected)
        }

        // Operations done at submit time (discard) count against the depth too.
        var discards = (0..<6).map {
            StorageOperation(tag: UInt64(100 + $0), kind: .discard, offset: UInt64($0 * 4096), length: 4096)
        }
        #expect(discards.withUnsafeMutableBufferPointer { storage.submit($0) } == 4)
        #expect(reap(storage, count: 4) == [100: 0, 101: 0, 102: 0, 103: 0])
        withExtendedLifetime(segments) {}
    }

    @Test(arguments: kernelEngines)
    func mixedBatchInOneSubmit(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 21)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, engine: engine)
        defer { storage.close() }
        let pages = Pages(count: 2)
        let segments = SegmentList(capacity: 2)
        segments.append(pages.page(0), 4096)
        segments.append(pages.page(1), 4096)
        memset(pages.page(0), 0x5A, 4096)
        let operations = [
            StorageOperation(tag: 1, kind: .write, offset: 0, iovecs: segments.iovecs, iovecCount: 1),
            StorageOperation(tag: 2, kind: .flush),
            StorageOperation(tag: 3, kind: .discard, offset: 65536, length: 65536),
            StorageOperation(tag: 4, kind: .read, offset: 131072, iovecs: segments.iovecs + 1, iovecCount: 1),
        ]
        var batch = operations
        #expect(batch.withUnsafeMutableBufferPointer { storage.submit($0) } == 4)
        #expect(reap(storage, count: 4) == [1: 4096, 2: 0, 3: 0, 4: 4096])
        #expect(preadBytes(file.path, offset: 0, length: 4096) == [UInt8](repeating: 0x5A, count: 4096))
        #expect(preadBytes(file.path, offset: 65536, length: 65536) == [UInt8](repeating: 0, count: 65536))
        #expect(Array(UnsafeRawBufferPointer(start: pages.page(1), count: 4096))
                == preadBytes(file.path, offset: 131072, length: 4096))
        withExtendedLifetime(segments) {}
    }

    /// A reap drains the descriptor; a poll (the engine's look while it
    /// spins) leaves it signalled until `resetCompletionSignal`, which the
    /// engine calls before it sleeps, or its loop would wake for nothing.
    @Test(arguments: kernelEngines)
    func completionDescriptorSignalsAndDrains(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&poller, 1, 0) == 0)
        for polled in [false, true] {
            // A discard runs inside submit: finished, and signalled, at once.
            var discard = [StorageOperation(tag: polled ? 2 : 1, kind: .discard, offset: 0, length: 4096)]
            #expect(discard.withUnsafeMutableBufferPointer { storage.submit($0) } == 1)
            #expect(poll(&poller, 1, 0) == 1)
            var completions: [StorageCompletion] = []
            let reaped = polled ? storage.pollCompletions { completions.append($0) }
                                : storage.reapCompletions { completions.append($0) }
            #expect(reaped == 1)
            #expect(completions == [StorageCompletion(tag: polled ? 2 : 1, result: 0)])
            if polled {
                #expect(poll(&poller, 1, 0) == 1, "a poll leaves the descriptor alone")
                storage.resetCompletionSignal()
            }
            #expect(poll(&poller, 1, 0) == 0)
            #expect(storage.reapCompletions { _ in Issue.record("nothing should be left") } == 0)
        }
    }

    /// Completions from the kernel: the descriptor turns readable; with
    /// io_uring, reaping them is what quiets it again (no read of an
    /// eventfd before sleeping), while libaio's eventfd stays signalled
    /// until it is reset.
    @Test(arguments: kernelEngines)
    func kernelCompletionsQuietTheDescriptorOnIOUring(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 17)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        let pages = Pages(count: 2)
        var vectors = [iovec(iov_base: pages.page(0), iov_len: 4096), iovec(iov_base: pages.page(1), iov_len: 4096)]
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        for round in 0..<3 {
            let submitted = vectors.withUnsafeMutableBufferPointer { v in
                var ops = [StorageOperation(tag: 10, kind: .read, offset: UInt64(round * 8192), iovecs: v.baseAddress, iovecCount: 1),
                           StorageOperation(tag: 11, kind: .read, offset: UInt64(round * 8192 + 4096),
                                            iovecs: v.baseAddress! + 1, iovecCount: 1)]
                return ops.withUnsafeMutableBufferPointer { storage.submit($0) }
            }
            #expect(submitted == 2)
            var completions: [StorageCompletion] = []
            for _ in 0..<100 where completions.count < 2 {
                #expect(poll(&poller, 1, 1000) == 1, "completions make the descriptor readable")
                _ = storage.pollCompletions { completions.append($0) }
            }
            #expect(completions.sorted { $0.tag < $1.tag } == [StorageCompletion(tag: 10, result: 4096),
                                                               StorageCompletion(tag: 11, result: 4096)])
            #expect([UInt8](UnsafeRawBufferPointer(start: pages.page(1), count: 4096))
                == preadBytes(file.path, offset: round * 8192 + 4096, length: 4096))
            switch storage.ioEngine {
            case .ioUring:
                #expect(poll(&poller, 1, 0) == 0, "reaped: quiet without a reset")
            case .libaio:
                #expect(poll(&poller, 1, 0) == 1, "the eventfd counts every completion")
                storage.resetCompletionSignal()
                #expect(poll(&poller, 1, 0) == 0)
            }
        }
    }

    @Test(arguments: kernelEngines)
    func operationsPastTheEndFailWithEINVAL(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        let einval = -Int64(EINVAL)
        #expect(readThroughStorage(storage, offset: mebibyte, length: 4096).result == einval)
        #expect(readThroughStorage(storage, offset: mebibyte - 2048, length: 4096).result == einval)
        #expect(writeThroughStorage(storage, offset: mebibyte - 512, bytes: [UInt8](repeating: 1, count: 1024)) == einval)
        #expect(singleOperation(storage, .discard, offset: mebibyte - 4096, length: 8192) == einval)
        #expect(readThroughStorage(storage, offset: mebibyte - 4096, length: 4096).result == 4096)
        var status = stat()
        #expect(stat(file.path, &status) == 0 && status.st_size == off_t(mebibyte))
    }

    /// A read the file's end cuts short (the file shrank after open) reads
    /// zeros past the end and counts as complete.
    @Test(arguments: fileDirectories, kernelEngines)
    func readPastEndOfShrunkFileReadsZeros(directory: String, engine: IOEngineChoice) throws {
        let file = try TempFile(directory: directory, size: mebibyte, randomSeed: 33)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        let kept = preadBytes(file.path, offset: mebibyte - 8192, length: 2048)
        #expect(truncate(file.path, off_t(mebibyte - 8192 + 2048)) == 0)
        let straddling = readThroughStorage(storage, offset: mebibyte - 8192, length: 4096)
        #expect(straddling.result == 4096)
        #expect(straddling.bytes == kept + [UInt8](repeating: 0, count: 2048))
        let beyond = readThroughStorage(storage, offset: mebibyte - 4096, length: 4096)
        #expect(beyond.result == 4096)
        #expect(beyond.bytes == [UInt8](repeating: 0, count: 4096))
    }

    /// libaio refuses an iocb with more than IOV_MAX vectors at io_submit.
    /// Behind a good one, the batch stops there; at the head of a batch it is
    /// taken and completes with the refusal.
    @Test func operationRefusedAtSubmit() throws {
        let bed = try OverLongVectorsBed(engine: .libaio)
        let storage = bed.storage
        var first = [bed.goodRead(tag: 1, into: 0), bed.tooManyRead(tag: 2), bed.goodRead(tag: 3, into: 1)]
        #expect(first.withUnsafeMutableBufferPointer { storage.submit($0) } == 1)
        var second = [bed.tooManyRead(tag: 2), bed.goodRead(tag: 3, into: 1)]
        #expect(second.withUnsafeMutableBufferPointer { storage.submit($0) } == 1)
        var third = [bed.goodRead(tag: 3, into: 1)]
        #expect(third.withUnsafeMutableBufferPointer { storage.submit($0) } == 1)
        #expect(reap(storage, count: 3) == [1: 4096, 2: -Int64(EINVAL), 3: 4096])
    }

    @Test func openFailures() throws {
        #expect(throws: StorageError("open(O_DIRECT)", errno: ENOENT, path: "/tmp/no-such-disk")) {
            try FileStorage.open(path: "/tmp/no-such-disk", readOnly: false, queueDepth: 4)
        }
        #expect(throws: StorageError("open", errno: ENOENT, path: "/tmp/no-such-disk")) {
            try FileStorage.open(path: "/tmp/no-such-disk", readOnly: true, queueDepth: 4, direct: .never)
        }
        #expect(throws: StorageError("open (neither a regular file nor a block device)", errno: ENODEV,
                                     path: "/dev/null")) {
            try FileStorage.open(path: "/dev/null", readOnly: true, queueDepth: 4, direct: .never)
        }
        let file = try TempFile(directory: "/tmp", size: mebibyte)
        #expect(throws: StorageError("open (queue depth 0)", errno: EINVAL, path: file.path)) {
            try FileStorage.open(path: file.path, readOnly: false, queueDepth: 0)
        }
    }
}

@Suite struct DirectIOChoiceTests {
    @Test func directIOIsUsedOnExt4() throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte)
        for mode in [DirectIOMode.auto, .always] {
            let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, direct: mode)
            #expect(storage.directIO == true)
            #expect(openFlags(of: file.path).map { $0 & oDirectFlag } == oDirectFlag)
            storage.close()
        }
    }

    @Test(arguments: fileDirectories, kernelEngines)
    func neverMeansBuffered(directory: String, engine: IOEngineChoice) throws {
        let file = try TempFile(directory: directory, size: 4 * mebibyte, randomSeed: 8)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, direct: .never, engine: engine)
        defer { storage.close() }
        #expect(storage.directIO == false)
        #expect(openFlags(of: file.path).map { $0 & oDirectFlag } == 0)
        exerciseRandomIO(storage, inspectPath: file.path, seed: 77, rounds: 2)
        #expect(singleOperation(storage, .flush) == 0)
    }
}
