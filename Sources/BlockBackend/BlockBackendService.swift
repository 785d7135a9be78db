import Glibc
import SystemSupport
import Hypervisor
import Logging
import XenABI
import XenBus

/// Tunables of the block backend.
public struct BlockBackendOptions: Sendable {
    /// See VbdRingConfiguration.pollMicroseconds.
    public var pollMicroseconds: Int
    /// Offer feature-persistent (keep a frontend's reused pages mapped).
    public var persistentGrants: Bool
    /// Offer BLKIF_OP_INDIRECT with up to this many segments per request
    /// (feature-max-indirect-segments; 0: not offered, the key is not
    /// written). At most `VbdDataPlane.indirectSegmentsLimit`.
    public var maxIndirectSegments: Int
    /// 128 segments: a 512 KiB request, so a 1 MiB I/O is two requests
    /// instead of 24 of 11 pages (one ring slot, one response and one
    /// notification for each) and merges into one preadv/pwritev of up to
    /// 256 iovecs. A ring's indirect areas then take 32 × 512 KiB of bounce
    /// pages (address space; touched only by grant copies). Linux blkfront
    /// uses min(this, its max_indirect_segments, 32 by default).
    public static let defaultMaxIndirectSegments = 128
    /// Where each ring's journal lives (`VbdRingJournal`: what a restarted
    /// daemon needs to answer every request exactly once after a kill -9).
    /// A tmpfs, such as /run: it must outlive the process, not the host.
    /// Nil: no journal, a restart resumes at rsp_prod.
    public var ringJournalDirectory: String?
    /// Storage operations one disk may have in flight (a ring may hold
    /// more requests: the engine submits the rest as earlier ones finish).
    /// With libaio, each file or block device's io_setup charges this
    /// against the host's fs.aio-max-nr (65536 by default): 128 lets 512
    /// disks open, where the largest ring's 512 let 127 (`bench scale` at
    /// N = 200); an io_uring is charged nothing there.
    /// 128 operations in flight saturate a file or a block device as 512 do.
    public static let storageQueueDepth = 128
    /// Rings one vbd may use (`multi-queue-max-queues`, offered when above
    /// 1 and the disk can take a handle per ring: files and block devices,
    /// not NBD exports). Each ring has its own data-plane thread and its
    /// own storage handle, as Linux blkback gives each ring a thread.
    public var maxQueues: Int
    /// Linux blkback's default (xenblk_max_queues): the host's online CPUs.
    public static var defaultMaxQueues: Int { min(max(Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 1), maxQueuesLimit) }
    public static let maxQueuesLimit = 16
    /// How long a connecting vbd waits for another client to release a
    /// disk's writer lock (an RBD image's exclusive lock: a migration's
    /// source lets go once its guest has left) before it fails.
    public var writerLockWaitSeconds: Double
    public static let defaultWriterLockWaitSeconds: Double = 60
    public init(pollMicroseconds: Int = 50, persistentGrants: Bool = true,
                maxIndirectSegments: Int = BlockBackendOptions.defaultMaxIndirectSegments,
                ringJournalDirectory: String? = nil, maxQueues: Int = BlockBackendOptions.defaultMaxQueues,
                writerLockWaitSeconds: Double = BlockBackendOptions.defaultWriterLockWaitSeconds) {
        precondition((0...VbdDataPlane.indirectSegmentsLimit).contains(maxIndirectSegments),
                     "max indirect segments \(maxIndirectSegments) is outside 0...\(VbdDataPlane.indirectSegmentsLimit)")
        precondition((1...Self.maxQueuesLimit).contains(maxQueues), "max queues \(maxQueues) is outside 1...\(Self.maxQueuesLimit)")
        self.pollMicroseconds = pollMicroseconds
        self.persistentGrants = persistentGrants
        self.maxIndirectSegments = maxIndirectSegments
        self.ringJournalDirectory = ringJournalDirectory
        self.maxQueues = maxQueues
        self.writerLockWaitSeconds = writerLockWaitSeconds
    }
}

/// The vbd backend: a `XenbusDeviceTable` of `VbdDriver`s under
/// /local/domain/<own>/backend/vbd. Everything here runs on the control
/// loop's thread.
public final class BlockBackendService: @unchecked Sendable {   // confined to the control loop thread
    public static let deviceType = "vbd"
    private let devices: XenbusDeviceTable<VbdDriver>
    private let loop: XenbusControlLoop
    private let logger: Logger
    /// How often every connected disk's size is compared with what its
    /// frontend was told (online resize): one fstat or BLKGETSIZE64 each.
    public static let sizeCheckMilliseconds: UInt32 = 1000

    public init(platform: any HypervisorPlatform, loop: XenbusControlLoop, openStorage: @escaping StorageOpener,
                options: BlockBackendOptions = .init(), logger: Logger) {
        self.loop = loop
        self.logger = logger
        devices = XenbusDeviceTable(loop: loop, backendDomain: platform.ownDomain, type: Self.deviceType,
                                    logger: logger) { [platform, openStorage, options] address, _ in
            VbdDriver(address: address, platform: platform, openStorage: openStorage, options: options)
        }
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist. Call on the control loop thread or before it runs.
    public func start() throws(XenStoreError) {
        try devices.start()
        do {
            let timer = try IntervalTimer(milliseconds: Self.sizeCheckMilliseconds)
            // The loop holds the timer (closed with the loop) and not the
            // service, which holds the loop.
            loop.whenReadable(timer.fileDescriptor) { [weak self] in
                timer.acknowledge()
                self?.checkDiskSizes()
            }
        } catch {
            logger.warning("no periodic disk size check (online resize needs `xenbackd rescan`)", metadata: ["error": "\(error)"])
        }
    }

    /// Passes every connected disk's new size, if any, to its rings and
    /// its frontend.
    public func checkDiskSizes() {
        for device in devices.all { rescan(device) }
    }

    /// `xenbackd rescan DEVICE`: the disk's size checked now. Nil: no such
    /// vbd. Otherwise the sectors the frontend has now, and before if that
    /// changed.
    public func rescan(device name: String) -> (sectors: UInt64?, previous: UInt64?)? {
        guard let device = devices.all.first(where: { $0.address.description == name }) else { return nil }
        let before = device.connection?.negotiated?.sectors
        let changed = rescan(device) != nil
        return (device.connection?.negotiated?.sectors, changed ? before : nil)
    }

    /// The new size, once the frontend has been told it.
    @discardableResult
    private func rescan(_ device: XenbusDevice<VbdDriver>) -> UInt64? {
        var sectors: UInt64?
        let written = device.republishIfChanged({ storage, queues in
            var deviceLogger = logger
            deviceLogger[metadataKey: "device"] = "\(device.address)"
            sectors = device.driver.resizeRings(storage: storage, queues: queues, logger: deviceLogger)
            return sectors.map { [("sectors", String($0))] }
        }, published: { queues in device.driver.told(queues, sectors: sectors!) })
        return written == nil ? nil : sectors
    }

    /// Answers every request in flight on every ring and stops the data
    /// planes, leaving xenstore as it is (a restarted daemon resumes).
    public func quiesce() { devices.quiesceAll() }

    public var status: [VbdStatus] { devices.all.map { $0.driver.status(of: $0) } }
}
