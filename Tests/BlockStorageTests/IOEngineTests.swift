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

    /// libaio's completions are read from the context's ring in user space,
    /// not through io_getevents: every event arrives once, with its slot and
    /// result, across several wraps of the ring, with one to four per reap.
    @Test func libaioReadsItsCompletionRingAcrossWraps() throws {
        let file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 43)
        let fd = open(file.path, O_RDONLY)
        #expect(fd >= 0)
        defer { Glibc.close(fd) }
        let depth = 4
        let queue = try LibAIOQueue.make(depth: depth)
        defer { queue.close() }
        #expect(queue.reapsInUserSpace)
        let entries = queue.ringEntries
        #expect(entries >= depth)
        let pages = Pages(count: depth)
        var vectors = (0..<depth).map { iovec(iov_base: pages.page($0), iov_len: 512) }
        var rng = XorShift(seed: 5)
        var done = 0
        // Batches of 1...4 reads at random sectors, until the ring has wrapped three times.
        while done < 3 * entries + 1 {
            let batch = Int(rng.next() % UInt64(depth)) + 1
            var sectors: [Int] = []
            for slot in 0..<batch {
                let sector = Int(rng.next() % UInt64(mebibyte / 512))
                sectors.append(sector)
                memset(pages.page(slot), 0, 512)
                vectors.withUnsafeMutableBufferPointer {
                    queue.queueRead(slot: slot, fd: fd, iovecs: $0.baseAddress! + slot, count: 1, offset: UInt64(sector * 512))
                }
            }
            let submitted = queue.submitQueued()
            #expect(submitted.accepted == batch && submitted.refusal == 0)
            var seen = [Int64](repeating: -1, count: batch)
            var reaped = 0
            for _ in 0..<1000 where reaped < batch {
                reaped += queue.reap { slot, result in
                    #expect(slot < batch && seen[slot] == -1, "slot \(slot) reaped once")
                    if slot < batch { seen[slot] = result }
                }
                if reaped < batch { usleep(100) }
            }
            #expect(seen == [Int64](repeating: 512, count: batch))
            for slot in 0..<batch {
                let read = [UInt8](UnsafeRawBufferPointer(start: pages.page(slot), count: 512))
                #expect(read == preadBytes(file.path, offset: sectors[slot] * 512, length: 512))
            }
            #expect(queue.reap { slot, _ in Issue.record("slot \(slot) reaped twice") } == 0)
            queue.clearSignal()
            done += batch
        }
    }
}
