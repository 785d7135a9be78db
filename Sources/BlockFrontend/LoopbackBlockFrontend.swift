import CXenBackSupport
import Glibc
import Hypervisor
import LoopbackHypervisor
import XenABI
import XenBus
import XenRing
import SystemSupport

/// What the backend published at Connected.
public struct BlockDiskInfo: Equatable, Sendable {
    public var sectors: UInt64
    public var sectorSize: UInt32
    public var physicalSectorSize: UInt32
    public var readOnly: Bool
    public var flush: Bool
    public var barrier: Bool
    public var discard: Bool
}

/// A blkfront of our own for the loopback hypervisor: a simulated guest's
/// block driver. It does the frontend half of the xenbus handshake, grants
/// its ring and data pages to the backend, and issues requests. Tests, the
/// demo and the benchmark drive disks through it. Not thread-safe: one
/// thread drives one frontend.
public final class LoopbackBlockFrontend: @unchecked Sendable {   // driven by one thread at a time
    public let guest: LoopbackGuestDomain
    public let store: any XenStore
    public let devid: UInt32
    public let frontendPath: String
    public private(set) var backendPath = ""
    public private(set) var backendDomain: DomID = 0
    public private(set) var info = BlockDiskInfo(sectors: 0, sectorSize: 512, physicalSectorSize: 512,
                                                 readOnly: false, flush: false, barrier: false, discard: false)

    /// The rings of this connection: one, or with multi-queue blkif as
    /// many as `requestedQueues` asked and the backend allowed. The
    /// request methods of this class use ring 0; a thread of its own may
    /// drive each ring.
    public private(set) var queues: [BlockFrontendRing] = []
    public private(set) var ringPageOrder = 0

    public init(guest: LoopbackGuestDomain, store: any XenStore, devid: UInt32 = 51712) {
        self.guest = guest
        self.store = store
        self.devid = devid
        frontendPath = "/local/domain/\(guest.domain)/device/vbd/\(devid)"
    }

    public var isConnected: Bool { !queues.isEmpty }
    /// Before sleeping for responses, each ring looks for them this long (a
    /// guest that polls; the benchmark uses it to take our own wakeups out
    /// of the figures). Set after `connect`.
    public var spinMicroseconds: Int {
        get { queues.first?.spinMicroseconds ?? 0 }
        set { for q in queues { q.spinMicroseconds = newValue } }
    }
    /// Rings to ask for (`multi-queue-num-queues`), up to the backend's
    /// `multi-queue-max-queues` (one ring when it offers none). Set before `connect`.
    public var requestedQueues = 1
    /// The backend's `multi-queue-max-queues` (1 when absent).
    public private(set) var backendMaxQueues = 1
    /// The ring ABI to speak (`protocol`): x86_64, or x86_32 as a 32-bit
    /// PV guest's blkfront. Set before `connect`.
    public var ringProtocol: BlkifProtocol = .x86_64
    /// Offer persistent grants (our data pages are granted once and reused,
    /// as Linux blkfront does); used when the backend offers them too.
    public var offerPersistentGrants = true
    /// Keys to publish instead of ours at Initialised (nil removes the key):
    /// how tests play a frontend with bad values.
    public var publishOverrides: [String: String?] = [:]
    /// Publish `ring-page-order` and `ring-ref0..` even for a one-page ring
    /// (order 0), as some frontends do, instead of `ring-ref` alone.
    public var ringPageOrderAlways = false
    /// The backend's `error` when it last refused this frontend: still
    /// there when `connect` starts over, it is stale (the backend removes
    /// it when it offers the device again), not a new refusal.
    private var refusal: String?
    public private(set) var persistentGrants = false
    public var ringSlots: Int { queues.first?.ringSlots ?? 0 }
    /// The most segments this frontend puts in an indirect request, as
    /// Linux blkfront's max_indirect_segments module parameter (whose
    /// default is 32): used up to the backend's
    /// feature-max-indirect-segments. 0 (ours by default): direct requests
    /// only, 11 segments at most. Set before `connect`.
    public var maxIndirectSegments = 0
    /// What the backend offered (0: no feature-max-indirect-segments key).
    public private(set) var backendMaxIndirectSegments = 0
    /// The most segments one request carries on this connection: 11, or
    /// more when both ends agreed on indirect requests (those with more
    /// than 11 segments are then sent as BLKIF_OP_INDIRECT).
    public private(set) var segmentsPerRequest = Blkif.maxSegmentsPerRequest
    /// The largest read or write one request carries, in sectors.
    public var maxSectorsPerRequest: Int { segmentsPerRequest * Blkif.sectorsPerPage }
    /// BLKIF_OP_INDIRECT requests submitted on this connection.
    public var indirectRequestsSent: Int { queues.reduce(0) { $0 + $1.indirectRequestsSent } }

    // MARK: handshake

    /// The frontend half of the handshake: wait for InitWait, publish the
    /// ring and event channel (Initialised), wait for Connected, read the
    /// disk's properties, go Connected.
    /// `waitForInitWait: false` plays a frontend that publishes its ring at
    /// once, before the backend has even seen the device (order 0 then).
    public func connect(ringPageOrder requested: Int = 0, timeout: Double = 10, waitForInitWait: Bool = true) throws {
        guard let be = try store.read(frontendPath + "/backend") else {
            throw FrontendError("no backend key at \(frontendPath)")
        }
        backendPath = be
        backendDomain = DomID((try store.read(frontendPath + "/backend-id")) ?? "0") ?? 0
        try store.writeState(frontendPath, .initialising)
        let offered = !waitForInitWait ? true : try store.waitFor(backendPath + "/state", seconds: timeout, what: "backend InitWait") { () -> Bool? in
            switch store.readState(backendPath) {
            case .initWait, .connected: return true
            // Closing or Closed with a (new) reason: the backend gave up on this device.
            case .closing, .closed:
                let why = (try? store.read(backendPath + "/error")) ?? nil
                return why != nil && why != refusal ? false : nil
            default: return nil
            }
        }
        guard offered else { throw refused() }
        let maxOrder = Int((try? store.read(backendPath + "/max-ring-page-order")) ?? nil ?? "0") ?? 0
        ringPageOrder = min(requested, maxOrder)
        backendMaxQueues = max(Int((try? store.read(backendPath + "/multi-queue-max-queues")) ?? nil ?? "1") ?? 1, 1)
        try setUpRings(count: max(1, min(requestedQueues, backendMaxQueues)))
        try publishRing()
        let connected = try store.waitFor(backendPath + "/state", seconds: timeout, what: "backend Connected") { () -> Bool? in
            switch store.readState(backendPath) {
            case .connected: true
            case .closing, .closed: false
            default: nil
            }
        }
        guard connected else { throw refused() }
        refusal = nil
        try readDiskInfo()
        for q in queues { try q.setUpSlots(segmentsPerRequest: segmentsPerRequest) }
        try store.writeState(frontendPath, .connected)
    }

    /// The backend closed the device: remembers its reason (see `refusal`).
    private func refused() -> FrontendError {
        let why = (try? store.read(backendPath + "/error")) ?? nil
        refusal = why
        return FrontendError("backend closed the device: \(why ?? "no error given")")
    }

    private func setUpRings(count: Int) throws {
        releaseResources()
        for index in 0..<count {
            queues.append(try BlockFrontendRing(guest: guest, backendDomain: backendDomain, index: index,
                                                pageOrder: ringPageOrder, ringProtocol: ringProtocol))
        }
    }

    private func publishRing() throws {
        let fe = frontendPath
        try store.withTransaction { t throws(XenStoreError) in
            // The other layout's key, left by an earlier connection, goes: a
            // backend reads ring-page-order first and would map stale refs.
            let flat = queues.count == 1
            if flat {
                try store.remove(fe + "/multi-queue-num-queues", transaction: t)
            } else {
                // As Linux blkfront: the count, each ring's keys under queue-N/.
                try store.write(fe + "/multi-queue-num-queues", String(queues.count), transaction: t)
            }
            if ringPageOrder == 0 && !ringPageOrderAlways {
                try store.remove(fe + "/ring-page-order", transaction: t)
            } else {
                try store.write(fe + "/ring-page-order", String(ringPageOrder), transaction: t)
            }
            for q in queues {
                let dir = flat ? fe : fe + "/queue-\(q.index)"
                if ringPageOrder == 0 && !ringPageOrderAlways {
                    try store.write(dir + "/ring-ref", String(q.ringGrants[0]), transaction: t)
                } else {
                    try store.remove(dir + "/ring-ref", transaction: t)
                    for (i, g) in q.ringGrants.enumerated() { try store.write(dir + "/ring-ref\(i)", String(g), transaction: t) }
                }
                try store.write(dir + "/event-channel", String(q.port), transaction: t)
            }
            try store.write(fe + "/protocol", ringProtocol.name, transaction: t)
            try store.write(fe + "/feature-persistent", offerPersistentGrants ? "1" : "0", transaction: t)
            for (key, value) in publishOverrides {
                if let value { try store.write(fe + "/" + key, value, transaction: t) } else {
                    try store.remove(fe + "/" + key, transaction: t)
                }
            }
            try store.writeState(fe, .initialised, transaction: t)
        }
    }

    private func readDiskInfo() throws {
        func key(_ k: String) -> String? { (try? store.read(backendPath + "/" + k)) ?? nil }
        guard let sectors = key("sectors").flatMap(UInt64.init) else { throw FrontendError("backend gave no sectors") }
        let infoBits = key("info").flatMap(UInt32.init) ?? 0
        info = BlockDiskInfo(sectors: sectors,
                             sectorSize: key("sector-size").flatMap(UInt32.init) ?? 512,
                             physicalSectorSize: key("physical-sector-size").flatMap(UInt32.init) ?? 512,
                             readOnly: infoBits & Blkif.vdiskReadOnly != 0,
                             flush: key("feature-flush-cache") == "1",
                             barrier: key("feature-barrier") == "1",
                             discard: key("feature-discard") == "1")
        // Used when both ends offer them (blkfront offers before knowing).
        persistentGrants = offerPersistentGrants && key("feature-persistent") == "1"
        backendMaxIndirectSegments = key("feature-max-indirect-segments").flatMap(Int.init) ?? 0
        let indirect = min(maxIndirectSegments, backendMaxIndirectSegments,
                           Blkif.maxIndirectPagesPerRequest * Blkif.segmentsPerIndirectPage)
        segmentsPerRequest = max(Blkif.maxSegmentsPerRequest, indirect)
    }

    /// What Linux's blkfront does when the backend writes state=Connected
    /// again while connected (online resize): reads `sectors` and takes it
    /// as the disk's new capacity. Returns the new size when it changed.
    @discardableResult
    public func refreshCapacity() throws -> UInt64? {
        guard let text = try store.read(backendPath + "/sectors"), let sectors = UInt64(text) else {
            throw FrontendError("backend gave no sectors")
        }
        guard sectors != info.sectors else { return nil }
        info.sectors = sectors
        return sectors
    }

    /// Closes the device as blkfront does on unplug: Closing; wait for the
    /// backend's Closing (or Closed, or gone), by which time it has
    /// answered every request and unmapped the ring; Closed; wait for the
    /// backend's Closed (or gone); then revokes every grant.
    public func disconnect(timeout: Double = 10) throws {
        guard isConnected else { return }
        try store.writeState(frontendPath, .closing)
        _ = try store.waitFor(backendPath + "/state", seconds: timeout, what: "backend Closing") { () -> Bool? in
            let s = store.readState(backendPath)
            return s == .closing || s == .closed || s == nil ? true : nil
        }
        try store.writeState(frontendPath, .closed)
        _ = try store.waitFor(backendPath + "/state", seconds: timeout, what: "backend Closed") { () -> Bool? in
            let s = store.readState(backendPath)
            return s == .closed || s == nil ? true : nil
        }
        releaseResources()
    }

    /// Drops the connection without the handshake (a crashed guest).
    public func releaseResources() {
        for q in queues { q.release() }
        queues = []
    }
}

/// Requests on ring 0, the only ring unless `requestedQueues` asked for
/// more (see `BlockFrontendRing` for each).
public extension LoopbackBlockFrontend {
    typealias Operation = BlockFrontendRing.Operation
    typealias Ticket = BlockFrontendRing.Ticket

    private var ring0: BlockFrontendRing {
        get throws {
            guard let q = queues.first else { throw FrontendError("not connected") }
            return q
        }
    }

    var freeSlotCount: Int { queues.first?.freeSlotCount ?? 0 }
    var nextFreeSlot: Int? { queues.first?.nextFreeSlot }
    func dataPage(slot: Int, segment: Int) -> UnsafeMutableRawPointer { queues[0].dataPage(slot: slot, segment: segment) }
    func grantRef(slot: Int, segment: Int) -> GrantRef { queues[0].grantRef(slot: slot, segment: segment) }
    func indirectPage(slot: Int, page: Int) -> UnsafeMutableRawPointer { queues[0].indirectPage(slot: slot, page: page) }
    func indirectGrantRef(slot: Int, page: Int) -> GrantRef { queues[0].indirectGrantRef(slot: slot, page: page) }
    func submit(_ op: Operation) throws -> Ticket { try ring0.submit(op) }
    func submitRaw(_ encode: (UnsafeMutableRawPointer) -> Void) throws { try ring0.submitRaw(encode) }
    var nextRequestSlot: UnsafeRawPointer? { queues.first?.nextRequestSlot }
    var requestProducer: UInt32 { queues.first?.requestProducer ?? 0 }
    func kick() { queues.first?.kick() }
    func publishRawRequestProducer(_ value: UInt32) { queues.first?.publishRawRequestProducer(value) }
    @discardableResult
    func collect(timeout: Double = 10, _ body: (BlkifResponse) -> Void) throws -> Int {
        try ring0.collect(timeout: timeout, body)
    }
    @discardableResult
    func collectRaw(timeout: Double = 10, _ body: (BlkifResponse, UnsafeRawPointer) -> Void) throws -> Int {
        try ring0.collectRaw(timeout: timeout, body)
    }
    func wait(for ticket: Ticket, timeout: Double = 10, other: (BlkifResponse) -> Void = { _ in }) throws -> BlkifResponse {
        try ring0.wait(for: ticket, timeout: timeout, other: other)
    }
    func read(sector: UInt64, count: Int, firstSectorInPage: Int = 0) throws -> (status: Int16, data: [UInt8]) {
        try ring0.read(sector: sector, count: count, firstSectorInPage: firstSectorInPage)
    }
    func write(sector: UInt64, data: [UInt8], firstSectorInPage: Int = 0) throws -> Int16 {
        try ring0.write(sector: sector, data: data, firstSectorInPage: firstSectorInPage)
    }
    func run(_ op: Operation) throws -> Int16 { try ring0.run(op) }
    func copyIn(slot: Int, first: Int, from data: [UInt8]) { queues[0].copyIn(slot: slot, first: first, from: data) }
    func copyOut(slot: Int, first: Int, into data: inout [UInt8]) { queues[0].copyOut(slot: slot, first: first, into: &data) }
}

/// Holds the (non-copyable) ring so it can be optional and mutated in place.
final class RingHolder {
    var ring: FrontRing
    init(_ r: consuming FrontRing) { ring = r }
}

public struct FrontendError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ d: String) { description = d }
}
