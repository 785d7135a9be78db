import CXenBackSupport
import Glibc
import Hypervisor
import LoopbackHypervisor
import XenABI
import XenRing
import SystemSupport

/// One ring of our blkfront (a queue, with multi-queue blkif): the shared
/// ring, its event channel, and each slot's data and indirect pages, all
/// granted to the backend once. Requests go in and responses come out
/// here. Not thread-safe: one thread drives one ring, and different
/// threads may drive different rings of one disk.
public final class BlockFrontendRing: @unchecked Sendable {   // driven by one thread at a time
    public let guest: LoopbackGuestDomain
    public let backendDomain: DomID
    /// Which ring of the disk this is (0 with a single ring).
    public let index: Int

    private var holder: RingHolder?
    private(set) var ringGrants: [GrantRef] = []
    private var ringFrames: [UInt32] = []
    private var events: LoopbackEventChannels?
    public private(set) var port: EventChannelPort = 0

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
    /// The ring's ABI; an x86_32 request is encoded here, then narrowed
    /// into its 108-byte slot (encoders write x86_64's 112 bytes).
    public let ringProtocol: BlkifProtocol
    private let wideScratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)

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
    /// The most segments one request carries on this connection (see
    /// `LoopbackBlockFrontend.segmentsPerRequest`).
    public private(set) var segmentsPerRequest = Blkif.maxSegmentsPerRequest
    /// The largest read or write one request carries, in sectors.
    public var maxSectorsPerRequest: Int { segmentsPerRequest * Blkif.sectorsPerPage }
    /// BLKIF_OP_INDIRECT requests submitted on this ring.
    public private(set) var indirectRequestsSent = 0
    public var ringSlots: Int { Int(holder?.ring.size ?? 0) }

    /// Allocates and grants the ring's pages (adjacent in the guest's
    /// memory, as a guest's virtual mapping of a multi-page ring would see
    /// them) and an unbound port for the backend.
    init(guest: LoopbackGuestDomain, backendDomain: DomID, index: Int, pageOrder: Int,
         ringProtocol: BlkifProtocol = .x86_64) throws {
        self.guest = guest
        self.ringProtocol = ringProtocol
        self.backendDomain = backendDomain
        self.index = index
        let pages = 1 << pageOrder
        do {
            let events = try guest.openEventChannels()
            self.events = events
            ringFrames = try Self.allocateContiguous(pages, in: guest, replacing: (0..<pages).map { _ in try guest.allocatePage() })
            ringGrants = try ringFrames.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) }
            holder = RingHolder(FrontRing(initializing: guest.page(ringFrames[0]), pages: pages, entrySize: ringProtocol.slotSize))
            port = try events.allocateUnbound(remoteDomain: backendDomain)
        } catch {
            release()
            throw error
        }
    }

    deinit {
        responseScratch.deallocate()
        wideScratch.deallocate()
    }

    /// Frames whose pages are adjacent in the guest's memory file.
    private static func allocateContiguous(_ n: Int, in guest: LoopbackGuestDomain, replacing: [UInt32]) throws -> [UInt32] {
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

    /// The slots' pages, once the backend's features are known (Linux
    /// blkfront sizes its requests at connect too).
    func setUpSlots(segmentsPerRequest: Int) throws {
        self.segmentsPerRequest = segmentsPerRequest
        let slots = ringSlots
        let indirectPerSlot = segmentsPerRequest > Blkif.maxSegmentsPerRequest
            ? Blkif.indirectPages(segments: segmentsPerRequest) : 0
        slotFrames = try (0..<slots).map { _ in try (0..<segmentsPerRequest).map { _ in try guest.allocatePage() } }
        slotGrants = try slotFrames.map { try $0.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) } }
        // Writable, as Linux grants them: the backend may map them persistently.
        indirectFrames = try (0..<slots).map { _ in try (0..<indirectPerSlot).map { _ in try guest.allocatePage() } }
        indirectGrants = try indirectFrames.map { try $0.map { try guest.grantAccess(frame: $0, to: backendDomain, readOnly: false) } }
        freeSlots = Array((0..<slots).reversed())
        freeSlots.reserveCapacity(slots)
        slotOwner = Array(repeating: nil, count: slots)
        indirectRequestsSent = 0
    }

    /// Revokes every grant and frees every page (after the backend let the
    /// ring go, or for a crashed guest).
    func release() {
        for g in ringGrants { guest.endAccess(g) }
        for f in ringFrames { guest.freePage(f) }
        for gs in slotGrants + indirectGrants { for g in gs { guest.endAccess(g) } }
        for fs in slotFrames + indirectFrames { for f in fs { guest.freePage(f) } }
        ringGrants = []; ringFrames = []; slotGrants = []; slotFrames = []; freeSlots = []; slotOwner = []
        indirectGrants = []; indirectFrames = []
        events?.close()
        events = nil
        holder = nil
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
        guard let r = holder else { throw FrontendError("not connected") }
        guard let slot = freeSlots.popLast() else { throw FrontendError("ring full") }
        generation &+= 1
        let id = generation << 16 | UInt64(slot)
        slotOwner[slot] = id
        let slotAddress = r.ring.nextRequestSlot()
        let p = ringProtocol == .x86_64 ? slotAddress : wideScratch
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
        if ringProtocol == .x86_32 { BlkifX86_32.narrow(UnsafeRawPointer(wideScratch), into: slotAddress) }
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
        guard let r = holder else { throw FrontendError("not connected") }
        encode(r.ring.nextRequestSlot())
        r.ring.commitRequest()
    }

    /// The slot the next request goes into (a hostile frontend keeps a copy
    /// of a request it placed, to place it again).
    public var nextRequestSlot: UnsafeRawPointer? { holder.map { UnsafeRawPointer($0.ring.nextRequestSlot()) } }

    /// req_prod as this frontend has written it (published or not).
    public var requestProducer: UInt32 { holder?.ring.requestProducerPrivate ?? 0 }

    /// Publishes queued requests and notifies the backend if it asked.
    public func kick() {
        guard let r = holder else { return }
        if r.ring.pushRequests() { try? events?.notify(port) }
    }

    /// Sets req_prod to any value (a broken frontend) and notifies.
    public func publishRawRequestProducer(_ value: UInt32) {
        holder?.ring.publishRawRequestProducer(value)
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
        guard let r = holder, let events else { throw FrontendError("not connected") }
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
            // One port on this handle, masked until unmasked: one read finds it.
            if let p = try events.nextPending() { try events.unmask(p) }
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
            forEachRun(slot: slot, first: first, count: src.count) { page, offset, n in
                memcpy(page, src.baseAddress! + offset, n)
            }
        }
    }

    public func copyOut(slot: Int, first: Int, into data: inout [UInt8]) {
        data.withUnsafeMutableBytes { dst in
            forEachRun(slot: slot, first: first, count: dst.count) { page, offset, n in
                memcpy(dst.baseAddress! + offset, page, n)
            }
        }
    }

    /// The slot's pages as runs of `count` bytes laid out from sector
    /// `first` of page 0: each run's address, its offset in the data, its length.
    private func forEachRun(slot: Int, first: Int, count: Int, _ body: (UnsafeMutableRawPointer, Int, Int) -> Void) {
        var offset = 0
        var page = 0
        var start = first * Blkif.sectorSize
        while offset < count {
            let n = min(count - offset, XenPage.size - start)
            body(dataPage(slot: slot, segment: page) + start, offset, n)
            offset += n; start = 0; page += 1
        }
    }
}
