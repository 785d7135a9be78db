import Foundation
import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

/// Submits everything (as the queue allows) and reaps until all complete,
/// waiting on the completion descriptor with poll() as the data plane's epoll
/// does; returns each tag's result. Fails the test after `timeout` seconds.
@discardableResult
func nbdRunAll(_ storage: BlockStorage, _ operations: [StorageOperation],
               timeout: Double = 20) -> [UInt64: Int64] {
    var pending = operations[...]
    var results: [UInt64: Int64] = [:]
    let deadline = Date().addingTimeInterval(timeout)
    while results.count < operations.count {
        if !pending.isEmpty {
            var batch = Array(pending)
            let taken = batch.withUnsafeMutableBufferPointer { storage.submit($0) }
            pending = pending.dropFirst(taken)
        }
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        _ = poll(&poller, 1, 100)
        _ = storage.reapCompletions { completion in
            #expect(results[completion.tag] == nil, "tag \(completion.tag) completed twice")
            results[completion.tag] = completion.result
        }
        if Date() > deadline {
            Issue.record("only \(results.count) of \(operations.count) operations completed within \(timeout) s")
            break
        }
    }
    return results
}

/// A buffer of `pages` separate page-aligned pages as one operation's iovecs.
func nbdSegments(bytes: Int, firstSector: Int = 0) -> (Pages, SegmentList) {
    let pages = Pages(count: (firstSector * 512 + bytes + 4095) / 4096)
    let segments = SegmentList(capacity: pages.count)
    segments.appendSectors(bytes / 512, pages: pages, firstPage: 0, firstSector: firstSector)
    return (pages, segments)
}

func nbdRead(_ storage: BlockStorage, offset: Int, length: Int) -> (result: Int64, bytes: [UInt8]) {
    let (pages, segments) = nbdSegments(bytes: length)
    let results = nbdRunAll(storage, [StorageOperation(tag: 1, kind: .read, offset: UInt64(offset),
                                                       iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    withExtendedLifetime(pages) {}
    return (results[1] ?? Int64.min, segments.bytes)
}

func nbdWrite(_ storage: BlockStorage, offset: Int, bytes: [UInt8]) -> Int64 {
    let (pages, segments) = nbdSegments(bytes: bytes.count)
    segments.load(bytes)
    let results = nbdRunAll(storage, [StorageOperation(tag: 1, kind: .write, offset: UInt64(offset),
                                                       iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    withExtendedLifetime(pages) {}
    return results[1] ?? Int64.min
}

func nbdSingle(_ storage: BlockStorage, _ kind: StorageOperationKind, offset: Int = 0, length: Int = 0) -> Int64 {
    nbdRunAll(storage, [StorageOperation(tag: 7, kind: kind, offset: UInt64(offset), length: UInt64(length))])[7]
        ?? Int64.min
}

/// Rounds of `queueDepth` random non-overlapping writes (random segment
/// layouts: separate pages, starting at a random sector), each round read
/// back in full through `verifier` and compared with a model of the disk.
func nbdExerciseRandomIO(_ storage: BlockStorage, verifier: BlockStorage, seed: UInt64, rounds: Int = 4) {
    var generator = XorShift(seed: seed)
    let size = Int(storage.geometry.sizeBytes)
    let sectors = size / 512
    let initial = nbdRead(verifier, offset: 0, length: size)
    #expect(initial.result == Int64(size))
    var model = initial.bytes
    for _ in 0..<rounds {
        let ranges = randomDisjointRanges(count: storage.queueDepth, sectors: sectors, using: &generator)
        var keepAlive: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        for (index, range) in ranges.enumerated() {
            let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
            segments.fillRandom(&generator)
            model.replaceSubrange(range.start * 512..<(range.start + range.count) * 512, with: segments.bytes)
            operations.append(StorageOperation(tag: UInt64(index), kind: .write, offset: UInt64(range.start * 512),
                                               iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
        }
        let results = nbdRunAll(storage, operations)
        for (index, range) in ranges.enumerated() {
            #expect(results[UInt64(index)] == Int64(range.count * 512), "write \(index) of \(range.count) sectors")
        }
    }
    let final = nbdRead(verifier, offset: 0, length: size)
    #expect(final.bytes.withUnsafeBytes(fnv1a64) == model.withUnsafeBytes(fnv1a64), "export content after random writes")

    // Random reads through the storage under test, compared with the model.
    let ranges = randomDisjointRanges(count: storage.queueDepth, sectors: sectors, using: &generator)
    var keepAlive: [(Pages, SegmentList)] = []
    var reads: [SegmentList] = []
    var operations: [StorageOperation] = []
    for (index, range) in ranges.enumerated() {
        let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
        reads.append(segments)
        operations.append(StorageOperation(tag: UInt64(index), kind: .read, offset: UInt64(range.start * 512),
                                           iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
    }
    let results = nbdRunAll(storage, operations)
    for (index, range) in ranges.enumerated() {
        #expect(results[UInt64(index)] == Int64(range.count * 512))
        let expected = Array(model[range.start * 512..<(range.start + range.count) * 512])
        #expect(reads[index].bytes == expected, "read \(index): \(range.count) sectors at sector \(range.start)")
    }
}
