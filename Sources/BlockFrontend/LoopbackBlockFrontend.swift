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

    private var rings: RingHolder?
    private var ringFrames: [UInt32] = []
    private var ringGrants: [GrantRef] = []
    public private(set) var ringPageOrder = 0
    private var events: LoopbackEventChannels?
    private var port: EventChannelPort = 0

    /// Each request slot owns `segmentsPerRequest` data pages and, for
    /// indirect requests, the pages of their segment descriptors, all
    /// granted to the backend once (as Linux blkfront with persistent grants).
    private var slotFrames: [[UInt32]] = []
    private var slotGrants: [[GrantRef]] = []
    private var indirectFrames: [[UInt32]] = []
    private var indirectGrants: [[GrantRef]] = []
    private var freeSlots: [Int] = []
    /// The id of the request holding each slot (nil when free).
    private var slotOwner: [UInt64?] = []
    private var generation: UInt64 = 0
    private let responseScratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)

    public init(guest: LoopbackGuestDomain, store: any XenStore, devid: UInt32 = 51712) {
        self.guest = guest
        self.store = store
        self.devid = devid
        frontendPath = "/local/domain/\(guest.domain)/device/vbd/\(devid)"
    }

    deinit { responseScratch.deallocate() }

    public var isConnected: Bool { rings != nil }
    /// Before sleeping for responses, look for them up to this long (a guest
    /// that polls; the benchmark uses it to take our own wakeups out of the
    /// figures). The window actually spun adapts to what spinning wins and
    /// stops while the CPU is contended (`AdaptivePollWindow`).
    public var spinMicroseconds = 0 {
        didSet { spinWindow = AdaptivePollWindow(maximumNanoseconds: spinMicroseconds * 1000) }
    }
    private var spinWindow = AdaptivePollWindow(maximumNanoseconds: 0)
    /// When the last spin for responses began (0: none since the last response).
    private var idleSince = 0
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
    public var ringSlots: Int { Int(rings?.ring.size ?? 0) }
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
    public private(set) var indirectRequestsSent = 0

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
        try setUpRing()
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
        try setUpSlots()
        try store.writeState(frontendPath, .connected)
    }

    /// The backend closed the device: remembers its reason (see `refusal`).
    private func refused() -> FrontendError {
        let why = (try? store.read(backendPath + "/error")) ?? nil
        refusal = why
        return FrontendError("backend closed the device: \(why ?? "no error given")")
    }

    private func setUpRing() throws {
        let pages = 1 << ringPageOrder
        let events = try guest.openEventChannels()
        self.events = events
        ringFrames = try allocateContiguous(pages, replacing: (0..<pages).map { _ in try guest.allocatePage() })
        ringGrants = try ringFrames.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) }
        rings = RingHolder(FrontRing(initializing: guest.page(ringFrames[0]), pages: pages, entrySize: Blkif.slotSize))
        port = try events.allocateUnbound(remoteDomain: backendDomain)
    }

    /// The slots' pages, once the backend's features are known (Linux
    /// blkfront sizes its requests at connect too).
    private func setUpSlots() throws {
        let slots = Int(rings!.ring.size)
        let pagesPerSlot = segmentsPerRequest
        let indirectPerSlot = segmentsPerRequest > Blkif.maxSegmentsPerRequest
            ? Blkif.indirectPages(segments: segmentsPerRequest) : 0
        slotFrames = try (0..<slots).map { _ in try (0..<pagesPerSlot).map { _ in try guest.allocatePage() } }
        slotGrants = try slotFrames.map { try $0.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) } }
        // Writable, as Linux grants them: the backend may map them persistently.
        indirectFrames = try (0..<slots).map { _ in try (0..<indirectPerSlot).map { _ in try guest.allocatePage() } }
        indirectGrants = try indirectFrames.map { try $0.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) } }
        freeSlots = Array((0..<slots).reversed())
        freeSlots.reserveCapacity(slots)
        slotOwner = Array(repeating: nil, count: slots)
        indirectRequestsSent = 0
    }

    /// Frames whose pages are adjacent in the guest's memory file, so that
    /// the frontend sees a multi-page ring as one range, as a guest's
    /// virtual mapping would.
    private func allocateContiguous(_ n: Int, replacing: [UInt32]) throws -> [UInt32] {
        if n == 1 { return replacing }
        var held = replacing
        while true {
            let sorted = held.sorted()
            for start in 0...(sorted.count - n) {
                let run = Array(sorted[start..<start + n])
                if run.last! - run.first! == UInt32(n - 1) {
                    for f in held where !run.contains(f) { guest.freePage(f) }
                    return run
                }
            }
            held.append(try guest.allocatePage())
        }
    }

    private func publishRing() throws {
        let fe = frontendPath
        try store.withTransaction { t throws(XenStoreError) in
            // The other layout's key, left by an earlier connection, goes: a
            // backend reads ring-page-order first and would map stale refs.
            if ringPageOrder == 0 && !ringPageOrderAlways {
                try store.remove(fe + "/ring-page-order", transaction: t)
                try store.write(fe + "/ring-ref", String(ringGrants[0]), transaction: t)
            } else {
                try store.remove(fe + "/ring-ref", transaction: t)
                try store.write(fe + "/ring-page-order", String(ringPageOrder), transaction: t)
                for (i, g) in ringGrants.enumerated() { try store.write(fe + "/ring-ref\(i)", String(g), transaction: t) }
            }
            try store.write(fe + "/event-channel", String(port), transaction: t)
            try store.write(fe + "/protocol", "x86_64-abi", transaction: t)
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

    /// Closes the device as blkfront does on unplug: Closing; wait for the
    /// backend's Closing (or Closed, or gone), by which time it has
    /// answered every request and unmapped the ring; Closed; wait for the
    /// backend's Closed (or gone); then revokes every grant.
    public func disconnect(timeout: Double = 10) throws {
        guard rings != nil else { return }
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
        for g in ringGrants { guest.endAccess(g) }
        for f in ringFrames { guest.freePage(f) }
        for gs in slotGrants + indirectGrants { for g in gs { guest.endAccess(g) } }
        for fs in slotFrames + indirectFrames { for f in fs { guest.freePage(f) } }
        ringGrants = []; ringFrames = []; slotGrants = []; slotFrames = []; freeSlots = []; slotOwner = []
        indirectGrants = []; indirectFrames = []
        events?.close()
        events = nil
        rings = nil
    }

    // MARK: requests

    public enum Operation: Sendable {
        case read(sector: UInt64, count: Int, firstSectorInPage: Int = 0)
        case write(sector: UInt64, count: Int, firstSectorInPage: Int = 0)
        case barrier(sector: UInt64, count: Int)
        case flush
        case discard(sector: UInt64, count: UInt64, secure: Bool = false)
    }

    /// A submitted request, to find its data and match its response.
    public struct Ticket: Hashable, Sendable {
        public let slot: Int
        public let id: UInt64
    }

    public var freeSlotCount: Int { freeSlots.count }
    /// The slot the next `submit` will use (fill its pages first).
    public var nextFreeSlot: Int? { freeSlots.last }

    /// The page of a slot that carries sectors [8k, 8k+8) of the request's
    /// first page offset; write data before `submit`, read it after completion.
    public func dataPage(slot: Int, segment: Int) -> UnsafeMutableRawPointer {
        guest.page(slotFrames[slot][segment])
    }

    public func grantRef(slot: Int, segment: Int) -> GrantRef { slotGrants[slot][segment] }

    /// Indirect descriptor page `page` of a slot (none unless indirect
    /// requests were agreed): hostile-frontend tests write raw descriptors.
    public func indirectPage(slot: Int, page: Int) -> UnsafeMutableRawPointer {
        guest.page(indirectFrames[slot][page])
    }

    public func indirectGrantRef(slot: Int, page: Int) -> GrantRef { indirectGrants[slot][page] }

    /// Places a request on the ring (not yet published: call `kick()`).
    /// Sectors are laid out in the slot's pages from `firstSectorInPage`.
    public func submit(_ op: Operation) throws -> Ticket {
        guard let r = rings else { throw FrontendError("not connected") }
        guard let slot = freeSlots.popLast() else { throw FrontendError("ring full") }
        generation &+= 1
        let id = generation << 16 | UInt64(slot)
        slotOwner[slot] = id
        let p = r.ring.nextRequestSlot()
        switch op {
        case .read(let sector, let count, let first):
            encodeSegmented(BlkifOperation.read, id: id, sector: sector, count: count, first: first, slot: slot, to: p)
        case .write(let sector, let count, let first):
            encodeSegmented(BlkifOperation.write, id: id, sector: sector, count: count, first: first, slot: slot, to: p)
        case .barrier(let sector, let count):
            encodeSegmented(BlkifOperation.writeBarrier, id: id, sector: sector, count: count, first: 0, slot: slot, to: p)
        case .flush:
            BlkifRequest(operation: BlkifOperation.flushDiskCache, id: id).encode(to: p)
        case .discard(let sector, let count, let secure):
            BlkifDiscardRequest(flag: secure ? Blkif.discardSecure : 0, id: id, sectorNumber: sector, nrSectors: count).encode(to: p)
        }
        r.ring.commitRequest()
        return Ticket(slot: slot, id: id)
    }

    /// Sectors laid out in the slot's pages from `first`: up to 11 segments
    /// in the request itself, more (READ and WRITE only) in the slot's
    /// indirect pages with a BLKIF_OP_INDIRECT request.
    private func encodeSegmented(_ op: UInt8, id: UInt64, sector: UInt64, count: Int, first: Int, slot: Int,
                                 to p: UnsafeMutableRawPointer) {
        let n = count == 0 ? 0 : (first + count + Blkif.sectorsPerPage - 1) / Blkif.sectorsPerPage
        precondition(count >= 0 && first >= 0 && first < Blkif.sectorsPerPage && n <= segmentsPerRequest,
                     "\(count) sectors from offset \(first) do not fit in one request")
        func segment(_ i: Int) -> BlkifSegment {
            let start = i == 0 ? first : 0
            let end = min(first + count - i * Blkif.sectorsPerPage, Blkif.sectorsPerPage)
            return BlkifSegment(gref: slotGrants[slot][i], firstSect: UInt8(start), lastSect: UInt8(end - 1))
        }
        if n <= Blkif.maxSegmentsPerRequest {
            let segments = InlineArray<11, BlkifSegment> { i in
                i < n ? segment(i) : BlkifSegment(gref: 0, firstSect: 0, lastSect: 0)
            }
            BlkifRequest(operation: op, nrSegments: UInt8(n), id: id, sectorNumber: sector, segments: segments).encode(to: p)
            return
        }
        precondition(op == BlkifOperation.read || op == BlkifOperation.write, "only reads and writes go indirect")
        for i in 0..<n {
            segment(i).encode(to: indirectPage(slot: slot, page: i / Blkif.segmentsPerIndirectPage)
                              + i % Blkif.segmentsPerIndirectPage * BlkifSegment.size)
        }
        let pages = Blkif.indirectPages(segments: n)
        let grefs = InlineArray<8, UInt32> { i in i < pages ? indirectGrants[slot][i] : 0 }
        BlkifIndirectRequest(indirectOp: op, nrSegments: UInt16(n), id: id, sectorNumber: sector,
                             indirectGrefs: grefs).encode(to: p)
        indirectRequestsSent += 1
    }

    /// Writes a raw ring slot (hostile-frontend tests) and publishes nothing yet.
    public func submitRaw(_ encode: (UnsafeMutableRawPointer) -> Void) throws {
        guard let r = rings else { throw FrontendError("not connected") }
        encode(r.ring.nextRequestSlot())
        r.ring.commitRequest()
    }

    /// The slot the next request goes into (a hostile frontend keeps a copy
    /// of a request it placed, to place it again).
    public var nextRequestSlot: UnsafeRawPointer? { rings.map { UnsafeRawPointer($0.ring.nextRequestSlot()) } }

    /// req_prod as this frontend has written it (published or not).
    public var requestProducer: UInt32 { rings?.ring.requestProducerPrivate ?? 0 }

    /// Publishes queued requests and notifies the backend if it asked.
    public func kick() {
        guard let r = rings else { return }
        if r.ring.pushRequests() { try? events?.notify(port) }
    }

    /// Sets req_prod to any value (a broken frontend) and notifies.
    public func publishRawRequestProducer(_ value: UInt32) {
        rings?.ring.publishRawRequestProducer(value)
        try? events?.notify(port)
    }

    /// Consumes every response available, waiting up to `timeout` seconds for
    /// the first; each response's slot returns to the free list after `body`.
    @discardableResult
    public func collect(timeout: Double = 10, _ body: (BlkifResponse) -> Void) throws -> Int {
        try collectRaw(timeout: timeout) { response, _ in body(response) }
    }

    /// `collect`, with each response's whole 16 bytes as the ring held
    /// them (a hostile-frontend check looks at the padding too).
    @discardableResult
    public func collectRaw(timeout: Double = 10, _ body: (BlkifResponse, UnsafeRawPointer) -> Void) throws -> Int {
        guard let r = rings, let events else { throw FrontendError("not connected") }
        let deadline = MonotonicClock.seconds() + timeout
        var got = 0
        while true {
            while r.ring.unconsumedResponses() > 0 {
                r.ring.takeResponse(into: responseScratch)
                let rsp = BlkifResponse(decoding: responseScratch)
                body(rsp, responseScratch)
                let slot = Int(rsp.id & 0xffff)
                if slot < slotOwner.count, slotOwner[slot] == rsp.id {
                    slotOwner[slot] = nil
                    freeSlots.append(slot)
                }
                got += 1
            }
            if got > 0 { return got }
            if spinMicroseconds > 0 && spinForResponses(r) { continue }
            if r.ring.finalCheckForResponses() {
                idleSince = 0
                continue
            }
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 { return 0 }
            var pfd = pollfd(fd: events.fileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, Int32(min(left, 1) * 1000) + 1)
            if idleSince != 0 {
                spinWindow.woke(afterNanoseconds: MonotonicClock.nanoseconds() - idleSince)
                idleSince = 0
            }
            while let p = try events.nextPending() { try events.unmask(p) }
        }
    }

    /// Looks for responses for up to the window `spinWindow` gives: a few
    /// microseconds of pure spinning (fast storage answers within them), then
    /// spinning that yields the CPU, which a storage worker may need. A jump
    /// of the clock between two looks (the thread was descheduled: the CPU
    /// is contended) ends it at once.
    private func spinForResponses(_ r: RingHolder) -> Bool {
        let start = MonotonicClock.nanoseconds()
        idleSince = start
        let window = spinWindow.beginIdle()
        guard window > 0 else { return false }
        var last = start
        var spins = 0
        while true {
            if r.ring.unconsumedResponses() > 0 {
                spinWindow.found(afterNanoseconds: last - start)
                idleSince = 0
                return true
            }
            spins += 1
            if spins & 15 == 0 {
                let now = MonotonicClock.nanoseconds()
                if AdaptivePollWindow.isPreemption(gapNanoseconds: now - last) {
                    spinWindow.preempted()
                    return false
                }
                last = now
                if now - start >= window {
                    spinWindow.expired()
                    return false
                }
                if now - start >= 5_000 { sched_yield() }
            }
        }
    }

    /// Waits for the response to one ticket (others are answered to `other`).
    public func wait(for ticket: Ticket, timeout: Double = 10, other: (BlkifResponse) -> Void = { _ in }) throws -> BlkifResponse {
        var found: BlkifResponse?
        let deadline = MonotonicClock.seconds() + timeout
        while found == nil {
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 { throw FrontendTimeout(what: "response to request \(ticket.id)") }
            try collect(timeout: left) { r in if r.id == ticket.id { found = r } else { other(r) } }
        }
        return found!
    }

    // MARK: synchronous helpers (tests and demo)

    /// Reads `count` sectors (at most `maxSectorsPerRequest` - first) into a new array.
    public func read(sector: UInt64, count: Int, firstSectorInPage: Int = 0) throws -> (status: Int16, data: [UInt8]) {
        let t = try submit(.read(sector: sector, count: count, firstSectorInPage: firstSectorInPage))
        kick()
        let r = try wait(for: t)
        var out = [UInt8](repeating: 0, count: count * Blkif.sectorSize)
        if r.status == BlkifStatus.okay { copyOut(slot: t.slot, first: firstSectorInPage, into: &out) }
        return (r.status, out)
    }

    /// Writes `data` (a whole number of sectors) at `sector`.
    public func write(sector: UInt64, data: [UInt8], firstSectorInPage: Int = 0) throws -> Int16 {
        precondition(data.count % Blkif.sectorSize == 0)
        guard let slot = freeSlots.last else { throw FrontendError("ring full") }
        copyIn(slot: slot, first: firstSectorInPage, from: data)
        let t = try submit(.write(sector: sector, count: data.count / Blkif.sectorSize, firstSectorInPage: firstSectorInPage))
        kick()
        return try wait(for: t).status
    }

    public func run(_ op: Operation) throws -> Int16 {
        let t = try submit(op)
        kick()
        return try wait(for: t).status
    }

    /// Copies request data laid out from sector `first` of page 0 into the slot's pages.
    public func copyIn(slot: Int, first: Int, from data: [UInt8]) {
        data.withUnsafeBytes { src in
            var offset = 0
            var page = 0
            var start = first * Blkif.sectorSize
            while offset < src.count {
                let n = min(src.count - offset, XenPage.size - start)
                memcpy(dataPage(slot: slot, segment: page) + start, src.baseAddress! + offset, n)
                offset += n; start = 0; page += 1
            }
        }
    }

    public func copyOut(slot: Int, first: Int, into data: inout [UInt8]) {
        data.withUnsafeMutableBytes { dst in
            var offset = 0
            var page = 0
            var start = first * Blkif.sectorSize
            while offset < dst.count {
                let n = min(dst.count - offset, XenPage.size - start)
                memcpy(dst.baseAddress! + offset, dataPage(slot: slot, segment: page) + start, n)
                offset += n; start = 0; page += 1
            }
        }
    }
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
