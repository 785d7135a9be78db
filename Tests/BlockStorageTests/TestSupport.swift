import Foundation
import Glibc
import Testing
@testable import BlockStorage

/// The kernel interfaces every FileStorage behaviour is checked with.
let kernelEngines: [IOEngineChoice] = [.ioUring, .libaio]

/// Small deterministic generator (SystemRandomNumberGenerator is slow in loops).
struct XorShift: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    mutating func next() -> UInt64 {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return state
    }
}

/// A temporary file of `size` bytes (sparse, or filled with random bytes).
final class TempFile {
    let path: String
    init(directory: String, size: Int, randomSeed: UInt64? = nil) throws {
        var template = Array("\(directory)/blockstorage-test-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw StorageError("mkstemp", errno: errno, path: directory) }
        defer { Glibc.close(fd) }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if var generator = randomSeed.map(XorShift.init(seed:)) {
            var bytes = [UInt8](repeating: 0, count: size)
            for index in stride(from: 0, to: size, by: 8) {
                withUnsafeBytes(of: generator.next()) { word in
                    for offset in 0..<min(8, size - index) { bytes[index + offset] = word[offset] }
                }
            }
            #expect(pwrite(fd, bytes, size, 0) == size)
            #expect(fsync(fd) == 0)
        } else {
            #expect(ftruncate(fd, off_t(size)) == 0)
        }
    }
    deinit { unlink(path) }

    var allocatedBlocks: Int {
        var status = stat()
        return stat(path, &status) == 0 ? Int(status.st_blocks) : -1
    }
}

/// The bytes at [offset, offset+length) of a file or device, read through
/// the page cache with pread, independently of the storage under test.
func preadBytes(_ path: String, offset: Int, length: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    precondition(fd >= 0, "open \(path)")
    defer { Glibc.close(fd) }
    var bytes = [UInt8](repeating: 0xEE, count: length)
    let count = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(offset)) }
    precondition(count == length, "pread \(path) returned \(count)")
    return bytes
}

/// Separate page-aligned pages from posix_memalign, the memory a backend
/// gets from grant mappings, so that an operation's iovecs span several buffers.
final class Pages {
    private var pages: [UnsafeMutableRawPointer] = []
    init(count: Int) {
        for _ in 0..<count {
            var memory: UnsafeMutableRawPointer?
            precondition(posix_memalign(&memory, 4096, 4096) == 0)
            memset(memory!, 0xA5, 4096)
            pages.append(memory!)
        }
    }
    deinit { pages.forEach { free($0) } }
    var count: Int { pages.count }
    func page(_ index: Int) -> UnsafeMutableRawPointer { pages[index] }
}

/// iovecs laid out the way blkif segments are: each within one page, from a
/// first to a last 512-byte sector of that page.
final class SegmentList {
    let iovecs: UnsafeMutablePointer<iovec>
    let capacity: Int
    private(set) var count = 0
    private(set) var totalBytes = 0
    /// The pages the iovecs point into, kept alive as long as the list.
    private var pageOwners: [Pages] = []
    init(capacity: Int) {
        self.capacity = capacity
        iovecs = .allocate(capacity: capacity)
        iovecs.initialize(repeating: iovec(), count: capacity)
    }
    deinit { iovecs.deallocate() }

    func append(_ base: UnsafeMutableRawPointer, _ length: Int) {
        precondition(count < capacity)
        iovecs[count] = iovec(iov_base: base, iov_len: length)
        count += 1
        totalBytes += length
    }

    /// Splits `sectors` sectors over pages starting at `firstPage`, beginning
    /// `firstSector` sectors into that page. Returns the pages used.
    @discardableResult
    func appendSectors(_ sectors: Int, pages: Pages, firstPage: Int, firstSector: Int) -> Int {
        pageOwners.append(pages)
        var remaining = sectors, page = firstPage, sector = firstSector
        while remaining > 0 {
            let inPage = min(remaining, 8 - sector)
            append(pages.page(page) + sector * 512, inPage * 512)
            remaining -= inPage
            page += 1
            sector = 0
        }
        return page - firstPage
    }

    /// The bytes the iovecs describe, in order.
    var bytes: [UInt8] {
        var result: [UInt8] = []
        for index in 0..<count {
            let vector = iovecs[index]
            result += UnsafeRawBufferPointer(start: vector.iov_base, count: vector.iov_len)
        }
        return result
    }

    /// Copies `bytes` into the iovecs' memory, in order.
    func load(_ bytes: [UInt8]) {
        var position = 0
        for index in 0..<count {
            let vector = iovecs[index]
            bytes.withUnsafeBytes { source in
                _ = memcpy(vector.iov_base!, source.baseAddress! + position, vector.iov_len)
            }
            position += vector.iov_len
        }
    }

    func fillRandom(_ generator: inout XorShift) {
        for index in 0..<count {
            let vector = iovecs[index]
            let bytes = vector.iov_base!.assumingMemoryBound(to: UInt8.self)
            for offset in 0..<vector.iov_len { bytes[offset] = UInt8(truncatingIfNeeded: generator.next()) }
        }
    }
}

/// Submits everything (as queue slots allow) and reaps until all complete;
/// returns each tag's result. Nothing else may be in flight.
@discardableResult
func runAll(_ storage: FileStorage, _ operations: [StorageOperation],
            timeoutMilliseconds: Int32 = 10_000) -> [UInt64: Int64] {
    let tags = Set(operations.map(\.tag))
    precondition(tags.count == operations.count, "tags must be distinct")
    var pending = operations
    var results: [UInt64: Int64] = [:]
    while results.count < operations.count {
        if !pending.isEmpty {
            let taken = pending.withUnsafeMutableBufferPointer { storage.submit($0) }
            pending.removeFirst(taken)
        }
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        let ready = poll(&poller, 1, timeoutMilliseconds)
        precondition(ready == 1, "no completion within \(timeoutMilliseconds) ms")
        _ = storage.reapCompletions { completion in
            precondition(tags.contains(completion.tag), "unexpected tag \(completion.tag)")
            precondition(results[completion.tag] == nil, "tag \(completion.tag) completed twice")
            results[completion.tag] = completion.result
        }
    }
    return results
}

/// Waits for and reaps exactly `count` completions of operations already submitted.
func reap(_ storage: FileStorage, count: Int) -> [UInt64: Int64] {
    var results: [UInt64: Int64] = [:]
    while results.count < count {
        var poller = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
        precondition(poll(&poller, 1, 10_000) == 1, "no completion within 10 s")
        _ = storage.reapCompletions { results[$0.tag] = $0.result }
    }
    return results
}

/// Reads [offset, offset+length) through the storage into fresh pages.
func readThroughStorage(_ storage: FileStorage, offset: Int, length: Int) -> (result: Int64, bytes: [UInt8]) {
    let pages = Pages(count: (length + 4095) / 4096)
    let segments = SegmentList(capacity: pages.count)
    segments.appendSectors(length / 512, pages: pages, firstPage: 0, firstSector: 0)
    let results = runAll(storage, [StorageOperation(tag: 1, kind: .read, offset: UInt64(offset),
                                                    iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    return (results[1]!, segments.bytes)
}

func writeThroughStorage(_ storage: FileStorage, offset: Int, bytes: [UInt8]) -> Int64 {
    let pages = Pages(count: (bytes.count + 4095) / 4096)
    let segments = SegmentList(capacity: pages.count)
    segments.appendSectors(bytes.count / 512, pages: pages, firstPage: 0, firstSector: 0)
    segments.load(bytes)
    let results = runAll(storage, [StorageOperation(tag: 1, kind: .write, offset: UInt64(offset),
                                                    iovecs: segments.iovecs, iovecCount: Int32(segments.count))])
    return results[1]!
}

func singleOperation(_ storage: FileStorage, _ kind: StorageOperationKind, offset: Int = 0, length: Int = 0) -> Int64 {
    runAll(storage, [StorageOperation(tag: 7, kind: kind, offset: UInt64(offset), length: UInt64(length))])[7]!
}

/// The open-file flags of the descriptor the process holds on `path`
/// (from /proc/self/fdinfo), to see O_RDONLY and O_DIRECT for real.
func openFlags(of path: String) -> Int32? {
    guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return nil }
    for entry in entries {
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(entry)"),
              target == path,
              let info = try? String(contentsOfFile: "/proc/self/fdinfo/\(entry)", encoding: .utf8)
        else { continue }
        for line in info.split(separator: "\n") where line.hasPrefix("flags:") {
            return Int32(line.dropFirst("flags:".count).trimmingCharacters(in: .whitespaces), radix: 8)
        }
    }
    return nil
}

let oDirectFlag: Int32 = 0o40000  // x86-64 and arm64 differ; this suite runs on x86-64
let accessModeMask: Int32 = 0o3

/// Runs a command; returns its standard output, or nil if it failed.
@discardableResult
func run(_ arguments: [String]) -> String? {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    let output = Pipe()
    process.standardOutput = output
    process.standardError = FileHandle.nullDevice
    do { try process.run() } catch { return nil }
    let data = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { return nil }
    return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

/// A loop device over a file, detached when released.
final class LoopDevice {
    let path: String
    init?(backing: String, directIO: Bool, sectorSize: Int = 512) {
        var arguments = ["losetup", "-f", "--show", "--sector-size", "\(sectorSize)"]
        if directIO { arguments.append("--direct-io=on") }
        guard let device = run(arguments + [backing]), device.hasPrefix("/dev/loop") else { return nil }
        path = device
    }
    func detach() { run(["losetup", "-d", path]) }
}

/// Skips the running test (with a message) unless loop devices can be set up.
func requireLoopDevices() throws {
    if getuid() != 0 { try Test.cancel("loop-device test skipped: not running as root") }
}

/// What the tests of an operation with more than IOV_MAX vectors start
/// from, on either engine: a 1 MiB file, a storage of depth 8 on it, two
/// page-sized iovecs over pages 0 and 1, and 1025 vectors of 512 bytes
/// over page 2.
final class OverLongVectorsBed {
    let file: TempFile
    let storage: FileStorage
    let pages = Pages(count: 3)
    let good = SegmentList(capacity: 2)
    let tooMany = SegmentList(capacity: 1025)

    init(engine: IOEngineChoice) throws {
        file = try TempFile(directory: "/tmp", size: mebibyte, randomSeed: 4)
        storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, engine: engine)
        good.append(pages.page(0), 4096)
        good.append(pages.page(1), 4096)
        for _ in 0..<1025 { tooMany.append(pages.page(2), 512) }
    }

    deinit { storage.close() }

    /// A page read at `offset` into page `index` (0 or 1).
    func goodRead(tag: UInt64, into index: Int, offset: UInt64 = 0) -> StorageOperation {
        StorageOperation(tag: tag, kind: .read, offset: offset, iovecs: good.iovecs + index, iovecCount: 1)
    }

    func tooManyRead(tag: UInt64) -> StorageOperation {
        StorageOperation(tag: tag, kind: .read, offset: 0, iovecs: tooMany.iovecs, iovecCount: 1025)
    }
}
