import BlockBackend
import BlockStorage
import Glibc
import Hypervisor
import Logging
import LoopbackHost
import SystemSupport
import Testing
import XenABI
import XenBus

/// A file disk with one fault of a real host: a close that takes
/// `closeSeconds` (a slow NBD server, a large cache drained at unplug), or a
/// completion descriptor epoll refuses (`badDescriptor`, as on a host out of
/// memory). Everything else is the file's.
final class FaultyStorage: BlockStorage {
    let inner: any BlockStorage
    let closeSeconds: UInt32
    let badDescriptor: Bool
    init(_ inner: any BlockStorage, closeSeconds: UInt32 = 0, badDescriptor: Bool = false) {
        self.inner = inner; self.closeSeconds = closeSeconds; self.badDescriptor = badDescriptor
    }
    var geometry: StorageGeometry { inner.geometry }
    var completionFileDescriptor: Int32 { badDescriptor ? 1 << 20 : inner.completionFileDescriptor }
    var queueDepth: Int { inner.queueDepth }
    func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int { inner.submit(operations) }
    func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int { inner.reapCompletions(body) }
    func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int { inner.pollCompletions(body) }
    func close() {
        sleep(closeSeconds)
        inner.close()
    }
    func setEventHandler(_ handler: @escaping StorageEventHandler) { inner.setEventHandler(handler) }
}

/// One device's blocking steps run off the control thread: while one disk
/// takes seconds to open or to close, another guest's whole handshake
/// completes (it would wait behind it on a single control thread).
@Suite("xenbus: a slow disk delays only its own device")
struct SlowDiskTests {
    static let slowSeconds: UInt32 = 4

    /// `slow-open:PATH` sleeps before opening; `slow-close:PATH` closes slowly.
    static let opener: StorageOpener = { params, readOnly, depth in
        if params.hasPrefix("slow-open:") {
            sleep(slowSeconds)
            return try FileStorage.open(path: String(params.dropFirst("slow-open:".count)), readOnly: readOnly, queueDepth: depth)
        }
        if params.hasPrefix("bad-fd:") {
            let inner = try FileStorage.open(path: String(params.dropFirst("bad-fd:".count)), readOnly: readOnly, queueDepth: depth)
            return FaultyStorage(inner, badDescriptor: true)
        }
        if params.hasPrefix("slow-close:") {
            let inner = try FileStorage.open(path: String(params.dropFirst("slow-close:".count)), readOnly: readOnly, queueDepth: depth)
            return FaultyStorage(inner, closeSeconds: slowSeconds)
        }
        return try FileStorage.open(path: params, readOnly: readOnly, queueDepth: depth)
    }

    func withHost(_ body: (LoopbackHost, [TempDisk]) throws -> Void) throws {
        var logger = Logger(label: "test")
        logger.logLevel = .error
        let host = try LoopbackHost(logger: logger, openStorage: Self.opener)
        let disks = [TempDisk(megabytes: 4), TempDisk(megabytes: 4)]
        defer {
            host.shutdown()
            for d in disks { d.remove() }
        }
        try body(host, disks)
    }

    /// A second guest (domain 2) on `disk` connects in less than half the
    /// slow step's time and reads.
    func expectConnectsMeanwhile(_ host: LoopbackHost, _ disk: TempDisk) throws {
        let started = monotonicSeconds()
        let quick = try host.attachDisk(to: try host.createGuest(2), .init(params: disk.path))
        try quick.connect(timeout: 10)
        let took = monotonicSeconds() - started
        #expect(took < Double(Self.slowSeconds) / 2, "the second guest waited \(took) s")
        #expect(try quick.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }

    @Test("a disk that takes seconds to open: another guest connects meanwhile")
    func slowOpen() throws {
        try withHost { host, disks in
            let slow = try host.attachDisk(to: try host.createGuest(1), .init(params: "slow-open:" + disks[0].path))
            usleep(200_000)   // the slow open has started
            try expectConnectsMeanwhile(host, disks[1])
            try slow.connect(timeout: 15)
            #expect(try slow.read(sector: 0, count: 8).status == BlkifStatus.okay)
        }
    }

    @Test("a data plane that cannot be set up (epoll refuses its descriptor) fails that device with the reason; the daemon serves the next")
    func setupFailureStaysWithTheDevice() throws {
        try withHost { host, disks in
            let bad = try host.attachDisk(to: try host.createGuest(1), .init(params: "bad-fd:" + disks[0].path))
            #expect(throws: (any Error).self) { try bad.connect(timeout: 10) }
            let error = try host.toolstack.store.read(bad.backendPath + "/error") ?? ""
            #expect(error.contains("epoll_ctl"), "error: \(error)")
            #expect(host.toolstack.store.readState(bad.backendPath) == .closing)
            let good = try host.attachDisk(to: try host.createGuest(2), .init(params: disks[1].path))
            try good.connect(timeout: 10)
            #expect(try good.read(sector: 0, count: 8).status == BlkifStatus.okay)
        }
    }

    @Test("a disk that takes seconds to close at unplug: another guest connects meanwhile, the first then reaches Closed")
    func slowClose() throws {
        try withHost { host, disks in
            let slow = try host.attachDisk(to: try host.createGuest(1), .init(params: "slow-close:" + disks[0].path))
            try slow.connect(timeout: 10)
            let store = host.toolstack.store
            try store.writeState(slow.frontendPath, .closing)   // unplug: flush and close the disk
            usleep(200_000)
            #expect(store.readState(slow.backendPath) == .connected, "Closing is written only once the disk is let go")
            try expectConnectsMeanwhile(host, disks[1])
            try waitUntil("the slow disk's Closing", seconds: 15) { store.readState(slow.backendPath) == .closing }
            try store.writeState(slow.frontendPath, .closed)
            try waitUntil("Closed") { store.readState(slow.backendPath) == .closed }
        }
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
