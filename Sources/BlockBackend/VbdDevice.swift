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
    public var statistics: VbdStatistics
    public var lastError: String?
    /// The storage's last report (an NBD connection lost or regained).
    public var lastStorageEvent: String?
}

/// The control plane of one vbd: the backend half of the xenbus handshake
/// (xen/io/blkif.h's state diagram) and the owner of the disk and the data
/// plane. Lives on the control loop's thread only.
final class VbdDevice: BackendDevice, @unchecked Sendable {   // confined to the control loop thread; only posted back to it
    static let queueDepth = SharedRingLayout.slots(pages: 1 << SharedRingLayout.maxPageOrder, entrySize: Blkif.slotSize)

    let address: BackendDeviceAddress
    let backendPath: String
    private let platform: any HypervisorPlatform
    private let store: any XenStore
    private let loop: XenbusControlLoop
    private let openStorage: StorageOpener
    private let options: BlockBackendOptions
    private var logger: Logger

    private var frontendPath = ""
    private var params = ""
    private var readOnly = false
    /// The toolstack's `discard-enable` (libxl writes 0 for `discard=off`).
    private var discardEnabled = true
    private var storage: (any BlockStorage)?
    private var dataPlane: VbdDataPlane?
    private(set) var state: XenbusState = .initialising
    private var lastError: String?
    /// False once the device failed for a reason a frontend cannot fix (the
    /// toolstack's keys, a disk that cannot be opened at probe, the hotplug
    /// script): it stays Closed.
    private var mayOfferAgain = true
    /// The toolstack gave a hotplug `script`: the disk is opened once it
    /// reports `hotplug-status` = connected.
    private var hasScript = false
    private var watches: [(path: String, token: String)] = []
    private var retiredStatistics = VbdStatistics()

    init(address: BackendDeviceAddress, platform: any HypervisorPlatform, loop: XenbusControlLoop,
         openStorage: @escaping StorageOpener, options: BlockBackendOptions, logger: Logger) {
        self.options = options
        self.address = address
        self.platform = platform
        self.loop = loop
        self.store = loop.store
        self.openStorage = openStorage
        self.backendPath = address.backendPath(backendDomain: platform.ownDomain)
        var l = logger
        l[metadataKey: "device"] = "\(address)"
        self.logger = l
    }

    var status: VbdStatus {
        var s = retiredStatistics
        if let live = dataPlane?.statistics { s = s.adding(live) }
        return VbdStatus(address: address, state: state, params: params, diskOpen: storage != nil,
                         ringPages: dataPlane?.ringPages ?? 0, statistics: s, lastError: lastError,
                         lastStorageEvent: lastStorageEvent)
    }

    // MARK: probe -> InitWait

    /// Reads the toolstack's keys, publishes our limits and goes to InitWait.
    func probe() {
        // What fails here is the toolstack's or the host's: final.
        failing("probe", permanent: true) {
            try readToolstackKeys()
            if isRunningConnection() {
                try resume()
                return
            }
            try store.write(backendPath + "/max-ring-page-order", String(SharedRingLayout.maxPageOrder))
            try publishIndirectSegments()
            try store.removeIfPresent(backendPath + "/error")   // a predecessor's: Closed no more
            try setState(.initWait)
            if hasScript {
                // The hotplug script prepares the disk; open it once it says so.
                try watchNode(backendPath + "/hotplug-status") { [weak self] _ in self?.hotplugStatusChanged() }
            } else {
                try openDisk()
            }
            try watchNode(frontendPath + "/state") { [weak self] _ in self?.frontendStateChanged() }
        }
    }

    /// Both ends Connected when we find the device: a restarted daemon
    /// (an upgrade) finding a guest that kept running on this ring.
    private func isRunningConnection() -> Bool {
        guard store.readState(backendPath) == .connected else { return false }
        let fe = store.readState(frontendPath)
        return fe == .connected || fe == .initialised
    }

    /// Takes the ring over where the previous daemon left it: opens the
    /// disk, maps the ring and binds the frontend's port again, and goes on
    /// from the indices in the shared page. Nothing is written to xenstore,
    /// so the guest sees a pause, not a reconnect.
    private func resume() throws {
        try openDisk()
        state = .connected
        try watchNode(frontendPath + "/state") { [weak self] _ in self?.frontendStateChanged() }
        connect(resuming: true)
        logger.notice("resumed a connected ring")
    }

    private func readToolstackKeys() throws {
        frontendPath = try store.readFrontendPath(backendPath: backendPath, address: address)
        guard let p = try store.read(backendPath + "/params"), !p.isEmpty else {
            throw DeviceFailure("missing params key")
        }
        params = p
        let mode = (try store.read(backendPath + "/mode")) ?? "w"
        switch mode {
        case "r", "ro": readOnly = true
        case "w", "rw", "w!": readOnly = false
        default: throw DeviceFailure("mode \(GuestText.quoted(mode)) is neither r nor w")
        }
        // libxl writes type=phy for every disk on a blkback-style backend.
        let type = (try store.read(backendPath + "/type")) ?? "phy"
        guard type == "phy" || type == "file" else {
            throw DeviceFailure("type \(GuestText.quoted(type)) is not served here (phy or file)")
        }
        discardEnabled = try store.readFlag(backendPath, "discard-enable", default: true)
        hasScript = !(((try store.read(backendPath + "/script")) ?? "").isEmpty)
    }

    /// `params` in a message or log line: the toolstack's bytes, escaped
    /// (a path may be long: more of it is shown than of a guest's value).
    private var shownParams: String { GuestText.escaped(params, limit: 256) }

    private func hotplugStatusChanged() {
        guard storage == nil, let s = try? store.read(backendPath + "/hotplug-status") else { return }
        if s == "connected" {
            failing("opening the disk", permanent: true) {
                try openDisk()
                frontendStateChanged()
            }
        } else if s == "error" {
            let why = (try? store.read(backendPath + "/hotplug-error")) ?? nil
            fail("hotplug script failed: \(why.map { GuestText.escaped($0, limit: 256) } ?? "no hotplug-error given")",
                 permanent: true)
        }
    }

    private func openDisk() throws {
        guard storage == nil else { return }
        do {
            storage = try openStorage(params, readOnly, Self.queueDepth)
        } catch {
            throw DeviceFailure("cannot open disk \(shownParams): \(GuestText.escaped("\(error)", limit: 256))")
        }
        // Connection trouble (an NBD server) is logged and shown by status.
        let device = WeakDevice(self)
        storage?.setEventHandler { [loop] message in loop.post { device.value?.storageEvent(message) } }
        logger.info("disk open", metadata: ["params": "\(shownParams)", "readOnly": "\(readOnly)"])
    }

    // MARK: frontend transitions

    func frontendStateChanged() {
        let fe = store.readFrontendState(frontendPath, logger: logger)   // nil counts as Closed
        switch FrontendStateReaction(frontend: fe, backend: state, mayOfferAgain: mayOfferAgain) {
        case .none:
            break
        case .connect:
            if storage != nil { connect() }   // else once the hotplug script is done
        case .close(let next):
            disconnect()
            // What the guest wrote reaches the disk, and the disk is let go,
            // before Closing: a migrating guest's destination opens it next.
            releaseDisk(flushing: true)
            try? setState(next)
        case .offerAgain:
            offerAgain()
        }
    }

    /// A frontend starting over (reconnect, kexec, after an error it
    /// caused): open the disk again and go InitWait. The `error` node goes:
    /// it says why the device is Closed, and it no longer is.
    private func offerAgain() {
        failing("offering the device again") {
            let hotplugDone = try !hasScript || store.read(backendPath + "/hotplug-status") == "connected"
            if hotplugDone { try openDisk() }   // else once the script says so
            // What this daemon offers, which a predecessor's key may not say.
            try publishIndirectSegments()
            try store.removeIfPresent(backendPath + "/error")
            try setState(.initWait)
            logger.info("offered again")
        }
    }

    private func connect(resuming: Bool = false) {
        guard let storage else { return }
        do {
            let ring = try readRingKeys()
            let g = storage.geometry
            let limits = DiskLimits(sectors: g.sizeBytes / UInt64(Blkif.sectorSize), readOnly: readOnly || g.readOnly,
                                    flush: g.supportsFlush, barrier: g.supportsFlush,
                                    discard: discardEnabled && g.discard != nil && !(readOnly || g.readOnly),
                                    maxIndirectSegments: resuming ? publishedIndirectSegments() : options.maxIndirectSegments)
            var config = VbdRingConfiguration(frontendDomain: address.frontendDomain, ringRefs: ring.refs,
                                              remotePort: ring.port, limits: limits,
                                              pollMicroseconds: options.pollMicroseconds,
                                              persistentGrants: ring.persistent)
            config.journalPath = journalPath
            config.resuming = resuming
            let name = "\(address.frontendDomain).\(address.devid)"
            let plane: VbdDataPlane
            do {
                let device = WeakDevice(self)
                plane = try VbdDataPlane(name: name, platform: platform, storage: storage, configuration: config,
                                         logger: logger) { [loop] reason in
                    loop.post { device.value?.fail(reason) }
                }
            } catch {
                throw DeviceFailure("cannot map ring or bind event channel: \(error)")
            }
            do { try plane.start() } catch { throw DeviceFailure("cannot start the data plane: \(error)") }
            dataPlane = plane
            if !resuming { try publishConnected(geometry: g, limits: limits) }
            logger.info("connected", metadata: ["ringPages": "\(ring.refs.count)", "port": "\(ring.port)",
                                                "persistentGrants": "\(ring.persistent)"])
        } catch let e as DeviceFailure {
            fail(e.message)
        } catch {
            fail("connect failed: \(error)")
        }
    }

    /// feature-max-indirect-segments, before InitWait as Linux blkback
    /// writes it since 4.6 (some frontends read it before Connected):
    /// absent, not 0, when not offered (blkif.h); a key an earlier run
    /// wrote goes.
    private func publishIndirectSegments() throws {
        let key = backendPath + "/feature-max-indirect-segments"
        if options.maxIndirectSegments > 0 {
            try store.write(key, String(options.maxIndirectSegments))
        } else {
            try store.removeIfPresent(key)
        }
    }

    /// What the previous daemon offered this frontend, which may still send
    /// requests that large: a resumed ring keeps that promise, whatever this
    /// daemon's option (within what the data plane can take).
    private func publishedIndirectSegments() -> Int {
        guard let v = (try? store.readNumber(backendPath, "feature-max-indirect-segments", as: UInt32.self)) ?? nil else {
            return 0
        }
        return min(Int(v), VbdDataPlane.indirectSegmentsLimit)
    }

    /// The frontend's ring keys, as Linux blkback reads them: without
    /// `ring-page-order`, one page named by `ring-ref`; with it (0
    /// included), 2^order pages named by `ring-ref0`... (`ring-ref` is
    /// then ignored).
    private func readRingKeys() throws -> (refs: [GrantRef], port: EventChannelPort, persistent: Bool) {
        let fe = frontendPath
        let protocolName = (try store.read(fe + "/protocol")) ?? "x86_64-abi"
        guard protocolName == "x86_64-abi" else {
            throw DeviceFailure("unsupported protocol \(GuestText.quoted(protocolName))")
        }
        var refs: [GrantRef] = []
        if let order = try store.readNumber(fe, "ring-page-order", as: UInt32.self) {
            guard order <= SharedRingLayout.maxPageOrder else {
                throw DeviceFailure("ring-page-order \(order) is above max-ring-page-order \(SharedRingLayout.maxPageOrder)")
            }
            for i in 0..<(1 << order) {
                guard let r = try store.readNumber(fe, "ring-ref\(i)", as: GrantRef.self) else {
                    throw DeviceFailure("missing ring-ref\(i) (ring-page-order is \(order))")
                }
                refs.append(r)
            }
        } else {
            guard let r = try store.readNumber(fe, "ring-ref", as: GrantRef.self) else {
                throw DeviceFailure("missing ring-ref (no ring-page-order)")
            }
            refs = [r]
        }
        guard let port = try store.readNumber(fe, "event-channel", as: EventChannelPort.self) else {
            throw DeviceFailure("missing event-channel")
        }
        let persistent = try store.readFlag(fe, "feature-persistent", default: false) && options.persistentGrants
        return (refs, port, persistent)
    }

    /// Everything the frontend reads at connect, and state=Connected, in one transaction.
    private func publishConnected(geometry g: StorageGeometry, limits: DiskLimits) throws {
        let path = backendPath
        try store.withTransaction { t throws(XenStoreError) in
            try store.write(path + "/sectors", String(g.sizeBytes / UInt64(Blkif.sectorSize)), transaction: t)
            try store.write(path + "/info", String(limits.readOnly ? Blkif.vdiskReadOnly : 0), transaction: t)
            try store.write(path + "/sector-size", String(g.logicalSectorSize), transaction: t)
            try store.write(path + "/physical-sector-size", String(g.physicalSectorSize), transaction: t)
            try store.write(path + "/feature-flush-cache", limits.flush ? "1" : "0", transaction: t)
            try store.write(path + "/feature-barrier", limits.barrier ? "1" : "0", transaction: t)
            try store.write(path + "/feature-discard", limits.discard ? "1" : "0", transaction: t)
            try store.write(path + "/feature-persistent", options.persistentGrants ? "1" : "0", transaction: t)
            if limits.discard, let d = g.discard {
                try store.write(path + "/discard-granularity", String(d.granularity), transaction: t)
                try store.write(path + "/discard-alignment", String(d.alignment), transaction: t)
                try store.write(path + "/discard-secure", "0", transaction: t)
            }
            try store.writeState(path, .connected, transaction: t)
        }
        state = .connected
    }

    // MARK: teardown

    /// Stops the data plane after answering every request in flight.
    private func disconnect() {
        guard let plane = dataPlane else { return }
        plane.stop()
        retiredStatistics = retiredStatistics.adding(plane.statistics)
        dataPlane = nil
        logger.info("disconnected")
    }

    /// Frees everything: the backend directory is gone or the daemon stops.
    func teardown() {
        disconnect()
        for w in watches { loop.unwatch(w.path, token: w.token) }
        watches.removeAll()
        releaseDisk()
    }

    /// This vbd's ring journal (see VbdRingJournal), if the daemon keeps them.
    private var journalPath: String? {
        options.ringJournalDirectory.map { "\($0)/vbd-\(address.frontendDomain)-\(address.devid).journal" }
    }

    private func releaseDisk(flushing: Bool = false) {
        // The ring is gone for good (not a daemon restart): so is its journal.
        if let journalPath { unlink(journalPath) }
        guard let s = storage else { return }
        if flushing && s.geometry.supportsFlush {
            let result = s.flushAndWait()
            if result < 0 { logger.error("flush before close failed", metadata: ["errno": "\(-result)"]) }
        }
        s.close()
        storage = nil
        logger.info("disk closed")
    }

    /// Stops serving but leaves xenstore as it is (daemon shutdown).
    func quiesce() {
        disconnect()
    }

    private(set) var lastStorageEvent: String?

    /// A storage's report (on the control thread, posted by the data plane).
    func storageEvent(_ message: String) {
        lastStorageEvent = message
        logger.warning("storage", metadata: ["params": "\(shownParams)", "event": "\(GuestText.escaped(message, limit: 256))"])
    }

    /// Records why the device cannot work, for the operator and the
    /// toolstack, and closes it (the disk flushed and let go). `message`
    /// holds guest bytes only escaped (`GuestText`). A frontend starting
    /// over gets the device again unless the failure is `permanent`.
    func fail(_ message: String, permanent: Bool = false) {
        logger.error("device failed", metadata: ["reason": "\(message)", "final": "\(permanent)"])
        lastError = message
        if permanent { mayOfferAgain = false }
        disconnect()
        releaseDisk(flushing: true)
        try? store.write(backendPath + "/error", message)
        try? setState(.closed)
    }

    private func setState(_ s: XenbusState) throws {
        try store.writeState(backendPath, s)
        state = s
        logger.debug("state", metadata: ["state": "\(s)"])
    }

    private func watchNode(_ path: String, _ handler: @escaping XenbusControlLoop.WatchHandler) throws {
        let token = try loop.watch(path, handler: handler)
        watches.append((path, token))
    }
}

extension VbdStatistics {
    func adding(_ o: VbdStatistics) -> VbdStatistics {
        var s = self
        s.requests &+= o.requests; s.reads &+= o.reads; s.writes &+= o.writes
        s.flushes &+= o.flushes; s.discards &+= o.discards
        s.bytesRead &+= o.bytesRead; s.bytesWritten &+= o.bytesWritten; s.errors &+= o.errors
        s.rejected = s.rejected.adding(o.rejected)
        return s
    }
}
