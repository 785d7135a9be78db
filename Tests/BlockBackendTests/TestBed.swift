import BlockBackend
import EngineDoubles
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import Logging
import Hypervisor
import LoopbackHost
import LoopbackHypervisor
import Testing
import XenABI
import XenBus
import SystemSupport

/// A disk image in a temp folder, removed with the folder.
struct TempDisk {
    let directory: String
    let path: String
    init(megabytes: Int, in base: String = "/tmp") {
        var template = Array("\(base)/xenbackd-test-XXXXXX".utf8CString)
        directory = String(cString: mkdtemp(&template)!)
        path = directory + "/disk.img"
        let fd = open(path, O_CREAT | O_RDWR, 0o600)
        ftruncate(fd, off_t(megabytes) << 20)
        close(fd)
    }
    func remove() {
        unlink(path)
        rmdir(directory)
    }

    /// The file's own view of a sector (a third party to the ring).
    func sector(_ s: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Blkif.sectorSize)
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        _ = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, Blkif.sectorSize, off_t(s) * 512) }
        return b
    }

    /// Expects every `stride`-th of the first `sectors` sectors that the
    /// workload's model knows to hold, in the file itself, what the model
    /// says; returns how many were checked.
    func expectHolds(_ w: VerifiedWorkload, sectors: UInt64, every stride: Int) -> Int {
        let expected = UnsafeMutableRawPointer.allocate(byteCount: Blkif.sectorSize, alignment: 16)
        defer { expected.deallocate() }
        var checked = 0
        for sector in Swift.stride(from: UInt64(0), to: sectors, by: stride) where w.expectedSector(sector, into: expected) {
            #expect(self.sector(sector).withUnsafeBytes { memcmp($0.baseAddress!, expected, Blkif.sectorSize) } == 0, "sector \(sector)")
            checked += 1
        }
        return checked
    }
}

/// A loopback host with guests and disks, torn down by `close()`.
final class TestBed {
    let host: LoopbackHost
    private var disks: [TempDisk] = []

    /// `log`: keep the backend's log lines (info and above) there.
    init(options: BlockBackendOptions = .init(), log: CapturedLog? = nil, ioEngine: IOEngineChoice = .auto) throws {
        var logger = log.map { log in Logger(label: "test") { _ in LineLogHandler { log.append($0, $1) } } } ?? Logger(label: "test")
        logger.logLevel = log == nil ? .error : .info
        host = try LoopbackHost(logger: logger, openStorage: DiskParameters.storageOpener(ioEngine: ioEngine),
                                options: options)
    }

    /// A guest with one connected disk. `indirectSegments`: the frontend's
    /// max_indirect_segments (0: direct requests only).
    func guestWithDisk(_ domid: DomID, megabytes: Int = 16, readOnly: Bool = false, ringPageOrder: Int = 0,
                       indirectSegments: Int = 0, persistentGrants: Bool = true, queues: Int = 1) throws
        -> (LoopbackBlockFrontend, TempDisk) {
        let (fe, disk) = try guestWithAttachedDisk(domid, megabytes: megabytes, largeRequests: indirectSegments > 0 || queues > 1) {
            $0.readOnly = readOnly
        }
        fe.requestedQueues = queues
        fe.maxIndirectSegments = indirectSegments
        fe.offerPersistentGrants = persistentGrants
        try fe.connect(ringPageOrder: ringPageOrder)
        return (fe, disk)
    }

    /// A guest whose vbd the toolstack has written, its frontend not yet
    /// connected. `configure` adjusts the toolstack's disk (params, script, keys).
    /// `largeRequests`: memory and grants for indirect requests on every slot.
    func guestWithAttachedDisk(_ domid: DomID, megabytes: Int = 4, largeRequests: Bool = false,
                               configure: (inout LoopbackToolstack.Disk) -> Void = { _ in }) throws
        -> (LoopbackBlockFrontend, TempDisk) {
        let disk = TempDisk(megabytes: megabytes)
        disks.append(disk)
        let guest = largeRequests ? try host.createGuest(domid, memoryPages: 40960, grantEntries: 40960)
                                  : try host.createGuest(domid)
        var spec = LoopbackToolstack.Disk(params: disk.path)
        configure(&spec)
        return (try host.attachDisk(to: guest, spec), disk)
    }

    /// The backend's status of its first vbd once its control thread has
    /// taken the connection in. A frontend sees Connected as soon as the
    /// connecting worker publishes it, a moment before that: reading the
    /// status right after `connect` could find no ring yet.
    func connectedBlockStatus() throws -> VbdStatus {
        var found: VbdStatus?
        try waitUntil("the backend to record the connection") {
            found = host.blockStatus.first { $0.state == .connected }
            return found != nil
        }
        return found!
    }

    func backendState(_ fe: LoopbackBlockFrontend) -> XenbusState? {
        host.toolstack.store.readState(fe.backendPath)
    }

    func close() {
        host.shutdown()
        for d in disks { d.remove() }
    }
}

/// Runs `body` while `good` does verified I/O beside it, then expects that
/// guest to have seen no error, no mismatch, and some I/O done.
func alongsideVerifiedGuest(_ good: LoopbackBlockFrontend, _ body: () throws -> Void) throws {
    let bystander = BystanderGuest(frontend: good)
    var finished = false
    defer { if !finished { _ = bystander.finish() } }
    usleep(50_000)
    try body()
    usleep(50_000)
    finished = true
    let (summary, failure) = bystander.finish()
    #expect(failure == nil)
    #expect(summary.errors == 0)
    #expect(summary.mismatches == 0)
    #expect(summary.reads + summary.writes > 0)
}

extension LoopbackBlockFrontend {
    /// Up to `count` responses, each waited for at most `timeout` seconds:
    /// fewer only when the backend stopped answering.
    func collectResponses(_ count: Int, timeout: Double = 5) throws -> [BlkifResponse] {
        var got: [BlkifResponse] = []
        while got.count < count {
            if try collect(timeout: timeout, { got.append($0) }) == 0 { break }
        }
        return got
    }
}

/// Places one raw request and returns the single response to it.
func raw(_ fe: LoopbackBlockFrontend, _ encode: (UnsafeMutableRawPointer) -> Void) throws -> BlkifResponse {
    try fe.submitRaw(encode)
    fe.kick()
    guard let response = try fe.collectResponses(1).first else { throw FrontendError("no response") }
    return response
}

/// Runs a program to its end: its exit status and standard output.
@discardableResult
func runProgram(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Polls `condition` every 50 ms for up to `seconds`.
func waitUntil(_ what: String, seconds: Int = 5, _ condition: () -> Bool) throws {
    for _ in 0..<(seconds * 20) {
        if condition() { return }
        usleep(50_000)
    }
    throw FrontendError("\(what) never happened")
}

/// The log lines a backend wrote: the message and its metadata, as text.
final class CapturedLog: @unchecked Sendable {   // lines guarded by `lock`
    private let lock = NSLock()
    private var stored: [(message: String, metadata: [String: String])] = []
    var lines: [(message: String, metadata: [String: String])] { lock.withLock { stored } }
    func append(_ message: String, _ metadata: [String: String]) { lock.withLock { stored.append((message, metadata)) } }
}

