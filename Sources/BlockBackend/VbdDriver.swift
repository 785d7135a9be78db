import BlockStorage
import Glibc
import Hypervisor
import Logging
import XenABI
import XenBus

/// Opens the disk a vbd's `params` names. The backend injects it so that
/// files, block devices and (later) NBD exports share one handshake.
public typealias StorageOpener = @Sendable (_ params: String, _ readOnly: Bool, _ queueDepth: Int) throws -> any BlockStorage

/// A snapshot of one device for `xenbackd status`, tests and the demo.
public struct VbdStatus: Sendable {
    public var address: BackendDeviceAddress
    public var state: XenbusState
    public var params: String
    public var diskOpen: Bool
    public var ringPages: Int
    /// Rings in use (multi-queue blkif; 0 when not connected).
    public var queues: Int
    public var statistics: VbdStatistics
    public var lastError: String?
    /// The storage's last report (an NBD connection lost or regained).
    public var lastStorageEvent: String?
    /// The storage's connections lost and regained (NBD exports; nil for others).
    public var storageConnectionsLost: UInt64?
    public var storageReconnects: UInt64?
    /// The open disk's kernel interface ("io_uring", "libaio"; nil: NBD or closed).
    public var ioEngine: String?
    /// When `lastError` was set (seconds since the Unix epoch).
    public var lastErrorTime: Double?
    /// What the frontend and this backend agreed on (nil: not connected).
    public var negotiated: VbdNegotiation?
    /// The connection was taken over from a previous daemon.
    public var resumed = false
    /// Seconds from InitWait to Connected, the last handshake this daemon made.
    public var handshakeSeconds: Double?
}

/// A connected vbd's terms: the disk as the frontend was told it, and the
/// ring's features.
public struct VbdNegotiation: Sendable, Equatable {
    public var sectors: UInt64
    public var sectorSize: Int
    public var physicalSectorSize: Int
    public var readOnly: Bool
    public var flush: Bool
    public var barrier: Bool
    public var discard: Bool
    /// discard-secure as offered (the device erases securely).
    public var secureDiscard = false
    /// feature-max-indirect-segments as offered (0: none).
    public var maxIndirectSegments: Int
    /// Both ends use feature-persistent.
    public var persistentGrants: Bool
    public var ringPages: Int
    public var queues: Int
    /// The frontend's `protocol` (x86_64-abi, the only one served).
    public var protocolName: String
}

/// The vbd type for the xenbus framework (`XenbusDevice`): its toolstack
/// keys (params, mode, type, discard-enable), the disk it opens once
/// hotplug is done, and the ring it serves (xen/io/blkif.h). The state
/// machine, watches and errors are the framework's.
final class VbdDriver: XenbusDriver {
    typealias Resource = any BlockStorage
    typealias Connection = VbdQueues

    static let queueDepth = BlockBackendOptions.storageQueueDepth

    let connectsAtInitialised = true
    let opensBeforeInitWait = false
    let releasesOnClose = true

    private let address: BackendDeviceAddress
    private let platform: any HypervisorPlatform
    private let openStorage: StorageOpener
    private let options: BlockBackendOptions

    // Read at probe (control thread), before any job: workers only read them.
    private(set) var params = ""
    private var readOnly = false
    /// The toolstack's `discard-enable` (libxl writes 0 for `discard=off`).
    private var discardEnabled = true
    /// `multi-queue-max-queues` as offered: 1 (no key) for an NBD export,
    /// whose one handle already spreads over every connection the server
    /// allows, and whose server may not make a flush on one connection
    /// cover writes acknowledged on another.
    private var offeredQueues = 1

    // Control thread only.
    private var retiredStatistics = VbdStatistics()
    private(set) var lastStorageEvent: String?
    /// The storage's connections lost and regained (NBD), for as long as the device exists.
    private(set) var storageConnectionsLost: UInt64 = 0
    private(set) var storageReconnects: UInt64 = 0

    init(address: BackendDeviceAddress, platform: any HypervisorPlatform, openStorage: @escaping StorageOpener,
         options: BlockBackendOptions) {
        self.address = address
        self.platform = platform
        self.openStorage = openStorage
        self.options = options
    }

    func status(of device: XenbusDevice<VbdDriver>) -> VbdStatus {
        var s = retiredStatistics
        if let live = device.connection?.statistics { s = s.adding(live) }
        var status = VbdStatus(address: address, state: device.state, params: DiskTarget.redacted(params), diskOpen: device.resource != nil,
                               ringPages: device.connection?.ringPages ?? 0, queues: device.connection?.planes.count ?? 0,
                               statistics: s, lastError: device.lastError,
                               lastStorageEvent: lastStorageEvent, ioEngine: device.resource?.ioEngineName,
                               lastErrorTime: device.lastErrorTime, negotiated: device.connection?.negotiated)
        status.resumed = device.resumed
        status.handshakeSeconds = device.handshakeSeconds
        if NBDAddress.isNBD(params) {
            status.storageConnectionsLost = storageConnectionsLost
            status.storageReconnects = storageReconnects
        }
        return status
    }

    // MARK: toolstack keys, InitWait

    func readToolstackKeys(_ d: XenbusDeviceContext) throws {
        let store = d.store
        guard let p = try store.read(d.backendPath + "/params"), !p.isEmpty else {
            throw DeviceFailure("missing params key")
        }
        params = p
        let mode = (try store.read(d.backendPath + "/mode")) ?? "w"
        switch mode {
        case "r", "ro": readOnly = true
        case "w", "rw", "w!": readOnly = false
        default: throw DeviceFailure("mode \(GuestText.quoted(mode)) is neither r nor w")
        }
        // libxl writes type=phy for every disk on a blkback-style backend.
        let type = (try store.read(d.backendPath + "/type")) ?? "phy"
        guard type == "phy" || type == "file" else {
            throw DeviceFailure("type \(GuestText.quoted(type)) is not served here (phy or file)")
        }
        discardEnabled = try store.readFlag(d.backendPath, "discard-enable", default: true)
        // One handle per disk for NBD and RBD: see offeredQueues.
        switch (try? DiskTarget.parse(p))?.location {
        case .nbd?, .rbd?: offeredQueues = 1
        default: offeredQueues = options.maxQueues
        }
    }

    /// max-ring-page-order, multi-queue-max-queues, and
    /// feature-max-indirect-segments before InitWait as Linux blkback
    /// writes it since 4.6 (some frontends read it before Connected):
    /// absent, not 0, when not offered (blkif.h); a key an earlier run wrote goes.
    func offerKeys(_ d: XenbusDeviceContext) -> [(key: String, value: String?)] {
        [("max-ring-page-order", String(SharedRingLayout.maxPageOrder)),
         ("multi-queue-max-queues", offeredQueues > 1 ? String(offeredQueues) : nil),
         ("feature-max-indirect-segments", options.maxIndirectSegments > 0 ? String(options.maxIndirectSegments) : nil)]
    }

    /// `params` in a message or log line: the toolstack's bytes, escaped
    /// (a path may be long: more of it is shown than of a guest's value).
    private var shownParams: String { GuestText.escaped(DiskTarget.redacted(params), limit: 256) }

    // MARK: the disk

    func open(_ d: XenbusDeviceContext, resuming: Bool) throws -> any BlockStorage {
        let storage: any BlockStorage
        do {
            storage = try openStorage(params, readOnly, Self.queueDepth)
        } catch {
            throw DeviceFailure("cannot open disk \(shownParams): \(GuestText.escaped("\(error)", limit: 256))")
        }
        // Connection trouble (an NBD server) is logged and shown by status.
        let me = WeakDevice(self)
        storage.setEventHandler { [post = d.post] event in post { me.value?.storageEvent(event, logger: d.logger) } }
        d.logger.info("disk open", metadata: ["params": "\(shownParams)", "readOnly": "\(readOnly)"])
        return storage
    }

    func close(_ d: XenbusDeviceContext, resource storage: any BlockStorage, flush: Bool) {
        // The rings are gone for good (not a daemon restart): so are their journals.
        for queue in 0..<BlockBackendOptions.maxQueuesLimit { if let path = journalPath(queue: queue) { unlink(path) } }
        if flush && storage.geometry.supportsFlush {
            let result = storage.flushAndWait()
            if result < 0 { d.logger.error("flush before close failed", metadata: ["errno": "\(-result)"]) }
        }
        storage.close()
        d.logger.info("disk closed")
    }

    /// A storage's report (on the control thread).
    private func storageEvent(_ event: StorageEvent, logger: Logger) {
        lastStorageEvent = event.message
        switch event.kind {
        case .connectionLost: storageConnectionsLost &+= 1
        case .reconnected: storageReconnects &+= 1
        case .unreachable, .refused: break
        }
        logger.warning("storage", metadata: ["params": "\(shownParams)", "event": "\(GuestText.escaped(event.message, limit: 256))"])
    }

    // MARK: the ring

    func connect(_ d: XenbusDeviceContext, resource storage: any BlockStorage, resuming: Bool) throws
        -> (connection: VbdQueues, keys: [(key: String, value: String)]) {
        let rings = try readRingKeys(d, resuming: resuming)
        let g = storage.geometry
        if !(readOnly || g.readOnly) { try takeWriterLock(d, storage, resuming: resuming) }
        let limits = DiskLimits(sectors: g.sizeBytes / UInt64(Blkif.sectorSize), readOnly: readOnly || g.readOnly,
                                flush: g.supportsFlush, barrier: g.supportsFlush,
                                discard: discardEnabled && g.discard != nil && !(readOnly || g.readOnly),
                                secureDiscard: discardEnabled && g.discard?.secure == true && !(readOnly || g.readOnly),
                                maxIndirectSegments: resuming ? publishedIndirectSegments(d) : options.maxIndirectSegments)
        let queues = VbdQueues()
        do {
            for (index, ring) in rings.enumerated() {
                let queueStorage: any BlockStorage
                if index == 0 {
                    queueStorage = storage
                } else {
                    do {
                        guard let another = try storage.openAnotherQueue() else {
                            throw DeviceFailure("the disk serves one ring, not \(rings.count)")
                        }
                        queueStorage = another
                    } catch let failure as DeviceFailure {
                        throw failure
                    } catch {
                        throw DeviceFailure("cannot open the disk for ring \(index): \(GuestText.escaped("\(error)", limit: 256))")
                    }
                    queues.ownedStorages.append(queueStorage)
                }
                var config = VbdRingConfiguration(frontendDomain: address.frontendDomain, ringRefs: ring.refs,
                                                  remotePort: ring.port, limits: limits,
                                                  pollMicroseconds: options.pollMicroseconds,
                                                  persistentGrants: ring.persistent)
                config.journalPath = journalPath(queue: index)
                config.ringProtocol = ring.ringProtocol
                config.resuming = resuming
                let name = "\(address.frontendDomain).\(address.devid)" + (rings.count > 1 ? "q\(index)" : "")
                let plane: VbdDataPlane
                do {
                    plane = try VbdDataPlane(name: name, platform: platform, storage: queueStorage,
                                             configuration: config, logger: d.logger, onFatal: d.fail)
                } catch {
                    throw DeviceFailure("cannot map ring \(index) or bind its event channel: \(error)")
                }
                queues.planes.append(plane)
            }
            for (index, plane) in queues.planes.enumerated() {
                do { try plane.start() } catch {
                    throw DeviceFailure("cannot start the data plane of ring \(index): \(error)")
                }
            }
        } catch {
            queues.stop()
            throw error
        }
        // What the frontend was told: on a resumed ring, the `sectors` the
        // previous daemon wrote, so a disk resized while no daemon ran is
        // passed on by the next size check.
        let told = resuming ? ((try? d.store.readNumber(d.backendPath, "sectors", as: UInt64.self)) ?? nil) : nil
        queues.negotiated = VbdNegotiation(sectors: told ?? limits.sectors, sectorSize: Int(g.logicalSectorSize),
                                           physicalSectorSize: Int(g.physicalSectorSize), readOnly: limits.readOnly,
                                           flush: limits.flush, barrier: limits.barrier, discard: limits.discard,
                                           maxIndirectSegments: limits.maxIndirectSegments,
                                           persistentGrants: rings[0].persistent, ringPages: rings[0].refs.count,
                                           queues: rings.count, protocolName: rings[0].ringProtocol.name)
        queues.negotiated?.secureDiscard = limits.secureDiscard
        d.logger.info("connected", metadata: ["queues": "\(rings.count)", "ringPages": "\(rings[0].refs.count)",
                                              "ports": "\(rings.map { "\($0.port)" }.joined(separator: ","))",
                                              "persistentGrants": "\(rings[0].persistent)"])
        return (queues, connectedKeys(geometry: g, limits: limits))
    }

    /// Where the name this daemon holds a disk's writer lock under is kept
    /// (an RBD image's exclusive lock), so that the daemon restarted after a
    /// kill can tell its predecessor's lock from another host's.
    static let lockOwnerKey = "xenbackd-lock-owner"

    /// Takes the disk's single-writer lock before any request is served
    /// (`BlockStorage.takeWriterLock`): waits `writerLockWaitSeconds` for a
    /// migration's source to let go; breaks only the lock this disk's own
    /// previous daemon held (resuming: the name it kept in the backend directory).
    private func takeWriterLock(_ d: XenbusDeviceContext, _ storage: any BlockStorage, resuming: Bool) throws {
        let key = d.backendPath + "/" + Self.lockOwnerKey
        let previous = resuming ? ((try? d.store.read(key)) ?? nil) : nil
        let name: String?
        do {
            name = try storage.takeWriterLock(waitingUpTo: options.writerLockWaitSeconds, breakingPreviousOwner: previous,
                                              giveUp: d.isAbandoned)
        } catch {
            throw DeviceFailure("cannot take the disk's writer lock: \(GuestText.escaped("\(error)", limit: 400))")
        }
        guard let name else { return }
        // Written now, also when resuming (which writes nothing else): the next restart reads it.
        do { try d.store.write(key, name) } catch {
            throw DeviceFailure("cannot record the writer lock's owner: \(error)")
        }
        d.logger.info("writer lock taken", metadata: ["owner": "\(name)", "previous": "\(previous ?? "none")"])
    }

    /// Online resize (control thread): the disk's size in sectors now, if
    /// it is not what the frontend was told, after every ring has been
    /// given it (they check requests against it from their next pass). The
    /// caller then writes `sectors` and state=Connected again, which makes
    /// Linux's blkfront read it and set its capacity, and records it with
    /// `told`. Growing and shrinking are both passed on, as Linux's blkback
    /// does: a disk shrunk under a guest is the operator's doing, and
    /// requests past the new end are refused from then on.
    func resizeRings(storage: any BlockStorage, queues: VbdQueues, logger: Logger) -> UInt64? {
        guard let told = queues.negotiated, let bytes = storage.currentSizeBytes() else { return nil }
        let sectors = bytes / UInt64(Blkif.sectorSize)
        guard sectors != told.sectors else { return nil }
        for plane in queues.planes { plane.resizeDisk(sectors: sectors) }
        logger.notice("disk resized: telling the frontend",
                      metadata: ["sectors": "\(sectors)", "previousSectors": "\(told.sectors)"])
        return sectors
    }

    /// The frontend has been told `sectors`.
    func told(_ queues: VbdQueues, sectors: UInt64) { queues.negotiated?.sectors = sectors }

    func disconnect(_ d: XenbusDeviceContext, resource: any BlockStorage, connection queues: VbdQueues) {
        queues.stop()
    }

    func retired(_ queues: VbdQueues) {
        // Counters carry on across connections; a retired ring's gauges do not.
        var retired = queues.statistics
        retired.inFlight = 0
        retired.persistentGrants = 0
        retiredStatistics = retiredStatistics.adding(retired)
    }

    /// What the previous daemon offered this frontend, which may still send
    /// requests that large: a resumed ring keeps that promise, whatever this
    /// daemon's option (within what the data plane can take).
    private func publishedIndirectSegments(_ d: XenbusDeviceContext) -> Int {
        guard let v = (try? d.store.readNumber(d.backendPath, "feature-max-indirect-segments", as: UInt32.self)) ?? nil else {
            return 0
        }
        return min(Int(v), VbdDataPlane.indirectSegmentsLimit)
    }

    struct RingKeys {
        var refs: [GrantRef]
        var port: EventChannelPort
        var persistent: Bool
        /// The frontend's `protocol`: the ring's slot layout.
        var ringProtocol: BlkifProtocol
    }

    /// The frontend's rings, as Linux blkback reads them: one, with its
    /// keys in the frontend's directory, unless `multi-queue-num-queues`
    /// (at most what we offered) asks for more, whose keys are then under
    /// `queue-0/`, `queue-1/`...; `ring-page-order` (shared by every ring)
    /// stays at the top. Without it, one page named by `ring-ref`; with it
    /// (0 included), 2^order pages named by `ring-ref0`... (`ring-ref` is
    /// then ignored). A resumed device accepts up to the most rings any
    /// daemon offers: a previous one may have offered more than we do.
    private func readRingKeys(_ d: XenbusDeviceContext, resuming: Bool) throws -> [RingKeys] {
        let store = d.store, fe = d.frontendPath
        let protocolName = try store.read(fe + "/protocol")
        guard let ringProtocol = BlkifProtocol(name: protocolName) else {
            throw DeviceFailure("unsupported protocol \(GuestText.quoted(protocolName ?? ""))")
        }
        let ceiling = resuming ? BlockBackendOptions.maxQueuesLimit : offeredQueues
        let count: Int
        if let n = try store.readNumber(fe, "multi-queue-num-queues", as: UInt32.self) {
            guard n >= 1, n <= ceiling else {
                throw DeviceFailure("multi-queue-num-queues \(n) is not within 1...\(ceiling)")
            }
            count = Int(n)
        } else {
            count = 1
        }
        let order = try store.readNumber(fe, "ring-page-order", as: UInt32.self)
        if let order, order > SharedRingLayout.maxPageOrder {
            throw DeviceFailure("ring-page-order \(order) is above max-ring-page-order \(SharedRingLayout.maxPageOrder)")
        }
        let persistent = try store.readFlag(fe, "feature-persistent", default: false) && options.persistentGrants
        return try (0..<count).map { queue in
            let dir = count == 1 ? fe : fe + "/queue-\(queue)"
            let shown = count == 1 ? "" : "queue-\(queue)/"
            var refs: [GrantRef] = []
            if let order {
                for i in 0..<(1 << order) {
                    guard let r = try store.readNumber(dir, "ring-ref\(i)", as: GrantRef.self) else {
                        throw DeviceFailure("missing \(shown)ring-ref\(i) (ring-page-order is \(order))")
                    }
                    refs.append(r)
                }
            } else {
                guard let r = try store.readNumber(dir, "ring-ref", as: GrantRef.self) else {
                    throw DeviceFailure("missing \(shown)ring-ref (no ring-page-order)")
                }
                refs = [r]
            }
            guard let port = try store.readNumber(dir, "event-channel", as: EventChannelPort.self) else {
                throw DeviceFailure("missing \(shown)event-channel")
            }
            return RingKeys(refs: refs, port: port, persistent: persistent, ringProtocol: ringProtocol)
        }
    }

    /// Everything the frontend reads at connect; the framework writes them
    /// with state=Connected in one transaction.
    private func connectedKeys(geometry g: StorageGeometry, limits: DiskLimits) -> [(key: String, value: String)] {
        var keys: [(key: String, value: String)] = [
            ("sectors", String(g.sizeBytes / UInt64(Blkif.sectorSize))),
            ("info", String(limits.readOnly ? Blkif.vdiskReadOnly : 0)),
            ("sector-size", String(g.logicalSectorSize)),
            ("physical-sector-size", String(g.physicalSectorSize)),
            ("feature-flush-cache", limits.flush ? "1" : "0"),
            ("feature-barrier", limits.barrier ? "1" : "0"),
            ("feature-discard", limits.discard ? "1" : "0"),
            ("feature-persistent", options.persistentGrants ? "1" : "0"),
        ]
        if limits.discard, let d = g.discard {
            keys += [("discard-granularity", String(d.granularity)), ("discard-alignment", String(d.alignment)),
                     ("discard-secure", limits.secureDiscard ? "1" : "0")]
        }
        return keys
    }

    /// The journal of this vbd's ring `queue` (see VbdRingJournal), if the
    /// daemon keeps them; ring 0's name is the one a single ring always had.
    private func journalPath(queue: Int) -> String? {
        options.ringJournalDirectory.map {
            "\($0)/vbd-\(address.frontendDomain)-\(address.devid)" + (queue == 0 ? "" : ".q\(queue)") + ".journal"
        }
    }
}

/// A connected vbd's rings: one data plane per ring, and the storage
/// handles of rings 1... (ring 0 serves the device's own disk handle).
final class VbdQueues: @unchecked Sendable {   // built and stopped on one worker at a time; status reads planes' boxes
    var planes: [VbdDataPlane] = []
    var ownedStorages: [any BlockStorage] = []
    /// Set once every ring is running.
    var negotiated: VbdNegotiation?

    var ringPages: Int { planes.first?.ringPages ?? 0 }
    var statistics: VbdStatistics { planes.reduce(VbdStatistics()) { $0.adding($1.statistics) } }

    /// Every ring's requests answered and its thread gone, then the extra
    /// handles closed (nothing is in flight on them any more).
    func stop() {
        for plane in planes { plane.stop() }
        for storage in ownedStorages { storage.close() }
        ownedStorages = []
    }
}

extension VbdStatistics {
    func adding(_ o: VbdStatistics) -> VbdStatistics {
        var s = self
        s.requests &+= o.requests; s.reads &+= o.reads; s.writes &+= o.writes
        s.flushes &+= o.flushes; s.discards &+= o.discards
        s.bytesRead &+= o.bytesRead; s.bytesWritten &+= o.bytesWritten; s.errors &+= o.errors
        s.rejected = s.rejected.adding(o.rejected)
        s.latency = s.latency.adding(o.latency)
        s.inFlight &+= o.inFlight
        s.persistentGrants &+= o.persistentGrants
        return s
    }
}
