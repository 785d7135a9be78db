import Glibc
import Testing
@testable import BlockStorage

/// 4 KiB random reads at queue depth 32 over BLOCKSTORAGE_BENCH_FILE for
/// BLOCKSTORAGE_BENCH_SECONDS (default 10): the counterpart of
/// `fio --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=32`.
/// Skipped unless the variable is set. The loop is what a data-plane thread
/// does: poll the completion descriptor, reap, resubmit the freed requests.
@Test(.enabled(if: getenv("BLOCKSTORAGE_BENCH_FILE") != nil, "set BLOCKSTORAGE_BENCH_FILE to run"))
func randomReadBenchmark() throws {
    let path = String(cString: getenv("BLOCKSTORAGE_BENCH_FILE"))
    let seconds = getenv("BLOCKSTORAGE_BENCH_SECONDS").flatMap { Double(String(cString: $0)) } ?? 10
    let depth = 32
    // Operations per submit call when refilling (default: all that completed).
    let batchLimit = getenv("BLOCKSTORAGE_BENCH_BATCH").flatMap { Int(String(cString: $0)) } ?? depth
    let storage = try FileStorage.open(path: path, readOnly: true, queueDepth: depth, direct: .always)
    defer { storage.close() }
    let blocks = Int(storage.geometry.sizeBytes / 4096)

    let pages = Pages(count: depth)
    let segments = SegmentList(capacity: depth)
    var operations: [StorageOperation] = []
    for index in 0..<depth {
        segments.append(pages.page(index), 4096)
        operations.append(StorageOperation(tag: UInt64(index), kind: .read, iovecs: segments.iovecs + index,
                                           iovecCount: 1))
    }
    var generator = XorShift(seed: 42)
    var ready = [UInt64](repeating: 0, count: depth)  // tags free to resubmit
    var errors = 0
    var completed = 0
    var wakeups = 0
    var start = timespec(), now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &start)
    let deadline = Double(start.tv_sec) + Double(start.tv_nsec) / 1e9 + seconds

    operations.withUnsafeMutableBufferPointer { operations in
        for index in 0..<depth { operations[index].offset = UInt64(Int.random(in: 0..<blocks, using: &generator) * 4096) }
        precondition(storage.submit(operations) == depth)
        var inFlight = depth
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        let batch = UnsafeMutableBufferPointer<StorageOperation>.allocate(capacity: depth)
        defer { batch.deallocate() }
        while true {
            _ = poll(&poller, 1, 1000)
            var readyCount = 0
            _ = storage.reapCompletions { completion in
                if completion.result != 4096 { errors += 1 }
                ready[readyCount] = completion.tag
                readyCount += 1
            }
            completed += readyCount
            wakeups += 1
            inFlight -= readyCount
            clock_gettime(CLOCK_MONOTONIC, &now)
            if Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 >= deadline { break }
            for index in 0..<readyCount {
                var operation = operations[Int(ready[index])]
                operation.offset = UInt64(Int.random(in: 0..<blocks, using: &generator) * 4096)
                batch[index] = operation
            }
            var submitted = 0
            while submitted < readyCount {
                let end = min(readyCount, submitted + batchLimit)
                let range = UnsafeMutableBufferPointer(rebasing: batch[submitted..<end])
                precondition(storage.submit(range) == end - submitted)
                submitted = end
            }
            inFlight += readyCount
        }
        // Close only with nothing in flight.
        while inFlight > 0 {
            _ = poll(&poller, 1, 1000)
            inFlight -= storage.reapCompletions { _ in }
        }
    }
    let elapsed = Double(now.tv_sec - start.tv_sec) + Double(now.tv_nsec - start.tv_nsec) / 1e9
    print("FileStorage randread 4k QD\(depth) batch \(batchLimit) \(path): \(completed) reads in \(elapsed) s = "
          + "\(Int(Double(completed) / elapsed)) IOPS, \(completed / max(wakeups, 1)) completions per wakeup, errors \(errors)")
    #expect(errors == 0)
    withExtendedLifetime((pages, segments)) {}
}
