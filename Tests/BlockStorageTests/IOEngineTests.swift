import CXenBackSupport
import Foundation
import Glibc
import Testing
@testable import BlockStorage

/// io_uring and libaio behind FileStorage: the choice, the fallback when
/// io_uring is refused, and errors that must read the same with both.
/// (FileStorageTests and BlockDeviceTests run every other behaviour with both.)
@Suite struct IOEngineTests {
    @Test func autoChoosesIOUringWhereTheKernelAllowsIt() throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8)
        defer { storage.close() }
        #expect(storage.ioEngine == .ioUring)
        #expect(storage.ioUringRefusal == nil)
        // A file on tmpfs: libaio (io_uring would punt each operation to a worker).
        let shm = try TempFile(directory: "/dev/shm", size: mebibyte)
        let onTmpfs = try FileStorage.open(path: shm.path, readOnly: false, queueDepth: 8)
        defer { onTmpfs.close() }
        #expect(onTmpfs.ioEngine == .libaio)
        #expect(onTmpfs.ioUringRefusal == nil)
        let forced = try FileStorage.open(path: shm.path, readOnly: false, queueDepth: 8, engine: .ioUring)
        defer { forced.close() }
        #expect(forced.ioEngine == .ioUring)
        let libaio = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, engine: .libaio)
        defer { libaio.close() }
        #expect(libaio.ioEngine == .libaio)
        #expect(libaio.ioUringRefusal == nil)
    }

    /// A seccomp filter on one thread (as a container's profile) makes
    /// io_uring_setup fail with EPERM there: `auto` opens with libaio and
    /// says why, `io_uring` fails naming the call; the storage opened there
    /// works from another thread, and other threads still get io_uring.
    @Test func refusedIOUringFallsBackToLibaio() throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 41)
        final class Outcome: @unchecked Sendable {
            var filterInstalled = false
            var automatic: Result<FileStorage, StorageError>?
            var forced: Result<FileStorage, StorageError>?
        }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        let path = file.path
        let thread = Thread {
            outcome.filterInstalled = xb_thread_refuse_io_uring_setup(EPERM) == 0
            outcome.automatic = Result { () throws(StorageError) in
                try FileStorage.open(path: path, readOnly: false, queueDepth: 8)
            }
            outcome.forced = Result { () throws(StorageError) in
                try FileStorage.open(path: path, readOnly: false, queueDepth: 8, engine: .ioUring)
            }
            done.signal()
        }
        thread.start()
        done.wait()
        #expect(outcome.filterInstalled)

        let storage = try #require(try? outcome.automatic?.get())
        defer { storage.close() }
        #expect(storage.ioEngine == .libaio)
        #expect(storage.ioUringRefusal == "io_uring_queue_init(8): Operation not permitted")
        let written = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        #expect(writeThroughStorage(storage, offset: 65536, bytes: written) == 8192)
        #expect(preadBytes(file.path, offset: 65536, length: 8192) == written)
        #expect(readThroughStorage(storage, offset: 65536, length: 8192).bytes == written)

        switch outcome.forced {
        case .failure(let error):
            #expect(error == StorageError("io_uring_queue_init(8)", errno: EPERM, path: file.path))
        case .success(let unexpected):
            unexpected.close()
            Issue.record("io_uring opened under a filter refusing io_uring_setup")
        case nil:
            Issue.record("no outcome")
        }

        let here = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, engine: .ioUring)
        defer { here.close() }
        #expect(here.ioEngine == .ioUring)
    }

    /// An O_DIRECT transfer that is not sector-sized is the kernel's to
    /// refuse; both engines complete it with -EINVAL (libaio at io_submit,
    /// io_uring in its completion), and the next operation is unaffected.
    @Test(arguments: kernelEngines)
    func kernelErrorCompletesWithTheSameErrno(engine: IOEngineChoice) throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 42)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 4, engine: engine)
        defer { storage.close() }
        #expect(storage.directIO)
        let pages = Pages(count: 1)
        let segments = SegmentList(capacity: 1)
        segments.append(pages.page(0), 100)
        let results = runAll(storage, [StorageOperation(tag: 9, kind: .read, offset: 4096,
                                                        iovecs: segments.iovecs, iovecCount: 1)])
        #expect(results == [9: -Int64(EINVAL)])
        let read = readThroughStorage(storage, offset: 4096, length: 4096)
        #expect(read.result == 4096)
        #expect(read.bytes == preadBytes(file.path, offset: 4096, length: 4096))
        withExtendedLifetime((pages, segments)) {}
    }

    /// More than IOV_MAX vectors: libaio refuses the iocb at io_submit (the
    /// batch stops there, FileStorageTests.operationRefusedAtSubmit); io_uring
    /// takes the whole batch and completes that entry alone with -EINVAL.
    @Test func ioUringCompletesAnEntryItRefusesAndTakesTheRest() throws {
        let bed = try OverLongVectorsBed(engine: .ioUring)
        var batch = [bed.goodRead(tag: 1, into: 0), bed.tooManyRead(tag: 2), bed.goodRead(tag: 3, into: 1, offset: 8192)]
        #expect(batch.withUnsafeMutableBufferPointer { bed.storage.submit($0) } == 3)
        #expect(reap(bed.storage, count: 3) == [1: 4096, 2: -Int64(EINVAL), 3: 4096])
        #expect(Array(UnsafeRawBufferPointer(start: bed.pages.page(1), count: 4096))
                == preadBytes(bed.file.path, offset: 8192, length: 4096))
    }

    /// 256 disks of the daemon's depth open at once with io_uring (rings
    /// are not charged against RLIMIT_MEMLOCK or fs.aio-max-nr), each able to read.
    @Test func manyDisksOpenWithIOUring() throws {
        let file = try TempFile(directory: "/dev/shm", size: mebibyte, randomSeed: 43)
        var storages: [FileStorage] = []
        defer { storages.forEach { $0.close() } }
        for _ in 0..<256 {
            storages.append(try FileStorage.open(path: file.path, readOnly: true, queueDepth: 128, engine: .ioUring))
        }
        #expect(storages.allSatisfy { $0.ioEngine == .ioUring })
        let expected = preadBytes(file.path, offset: 512 * 1024, length: 4096)
        for storage in [storages.first!, storages.last!] {
            #expect(readThroughStorage(storage, offset: 512 * 1024, length: 4096).bytes == expected)
        }
    }
}
