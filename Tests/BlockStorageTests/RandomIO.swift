import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

/// Writes random data at random sector ranges through `storage` (rounds of
/// `queueDepth` non-overlapping writes, each starting at a random sector of
/// its first page like a blkif segment), checks with pread of `inspectPath`
/// that the disk holds exactly what was written, then reads random ranges
/// back through the storage and compares them with pread of the same range.
func exerciseRandomIO(_ storage: FileStorage, inspectPath: String, seed: UInt64, rounds: Int = 4) {
    var generator = XorShift(seed: seed)
    let size = Int(storage.geometry.sizeBytes)
    let sectors = size / 512
    var model = preadBytes(inspectPath, offset: 0, length: size)
    let batch = storage.queueDepth

    for _ in 0..<rounds {
        let ranges = randomDisjointRanges(count: batch, sectors: sectors, using: &generator)
        var keepAlive: [(Pages, SegmentList)] = []
        var operations: [StorageOperation] = []
        for (index, range) in ranges.enumerated() {
            let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
            segments.fillRandom(&generator)
            model.replaceSubrange(range.start * 512..<(range.start + range.count) * 512, with: segments.bytes)
            operations.append(StorageOperation(tag: UInt64(index), kind: .write, offset: UInt64(range.start * 512),
                                               iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
        }
        let results = runAll(storage, operations)
        #expect(results.count == ranges.count)
        for (index, range) in ranges.enumerated() {
            #expect(results[UInt64(index)] == Int64(range.count * 512), "write \(index) of \(range.count) sectors")
        }
    }
    let onDisk = preadBytes(inspectPath, offset: 0, length: size)
    #expect(onDisk.withUnsafeBytes(fnv1a64) == model.withUnsafeBytes(fnv1a64), "disk content after random writes")

    let ranges = randomDisjointRanges(count: batch, sectors: sectors, using: &generator)
    var keepAlive: [(Pages, SegmentList)] = []
    var readSegments: [SegmentList] = []
    var operations: [StorageOperation] = []
    for (index, range) in ranges.enumerated() {
        let segments = randomSegments(sectors: range.count, using: &generator, keepAlive: &keepAlive)
        readSegments.append(segments)
        operations.append(StorageOperation(tag: UInt64(index), kind: .read, offset: UInt64(range.start * 512),
                                           iovecs: segments.iovecs, iovecCount: Int32(segments.count)))
    }
    let results = runAll(storage, operations)
    for (index, range) in ranges.enumerated() {
        #expect(results[UInt64(index)] == Int64(range.count * 512))
        let expected = preadBytes(inspectPath, offset: range.start * 512, length: range.count * 512)
        #expect(readSegments[index].bytes.withUnsafeBytes(fnv1a64) == expected.withUnsafeBytes(fnv1a64),
                "read \(index): \(range.count) sectors at sector \(range.start)")
    }
}

/// `count` non-overlapping runs of 1...40 sectors.
func randomDisjointRanges(count: Int, sectors: Int,
                          using generator: inout XorShift) -> [(start: Int, count: Int)] {
    var ranges: [(start: Int, count: Int)] = []
    while ranges.count < count {
        let length = Int.random(in: 1...40, using: &generator)
        let start = Int.random(in: 0...(sectors - length), using: &generator)
        if ranges.allSatisfy({ start + length <= $0.start || $0.start + $0.count <= start }) {
            ranges.append((start, length))
        }
    }
    return ranges
}

/// iovecs for `sectors` sectors, starting at a random sector of the first page.
func randomSegments(sectors: Int, using generator: inout XorShift,
                    keepAlive: inout [(Pages, SegmentList)]) -> SegmentList {
    let firstSector = Int.random(in: 0..<8, using: &generator)
    let pages = Pages(count: (firstSector + sectors + 7) / 8)
    let segments = SegmentList(capacity: pages.count)
    segments.appendSectors(sectors, pages: pages, firstPage: 0, firstSector: firstSector)
    keepAlive.append((pages, segments))
    return segments
}
