import BlockBackend
import Glibc
import BlockStorage
import EngineDoubles
import Hypervisor
import XenABI

/// One blkif ring in a fuzz program: a guest (its memory, grants and the
/// frontend's half of the ring, played by the checker), a disk, the engine
/// under test, and what the checker knows (the requests written, a model
/// of the disk, the pages the backend may touch). Ring A is driven by the
/// hostile program; ring B, the bystander, only by a correct frontend.
/// Guest, disk and buffers live across runs; `begin` resets them and
/// builds a fresh engine.
final class BlkifFuzzRing {
    let name: String
    let guest: InMemoryGuest
    let grants: InMemoryGrantTable
    let disk: InMemoryStorage
    let findings: FuzzFindings
    static let diskSectors = 256
    static let requestCapacity = 768
    static let segmentCapacity = 8192
    static let offerCapacity = 256

    private(set) var configuration: BlkifFuzzConfiguration
    private(set) var limits: DiskLimits
    private(set) var engine: VbdEngine!
    let model = SectorModel(sectors: diskSectors)
    /// The engines' bounce pages, kept across runs (one engine at a time).
    private let pageStore = VbdEnginePageStore()
    /// The ring journal's memory: what survives a kill -9 of the daemon
    /// (on a host, a file in a tmpfs), sized for the largest ring.
    private let journalBytes = VbdRingJournal.byteCount(ringSlots: 128)
    private let journalMemory: UnsafeMutableRawPointer
    private var journal: VbdRingJournal?
    private var journalIdentity: UInt64 { 0xB1C0_0000 | UInt64(guest.domain) }

    // The frontend's indices (requests it wrote, responses it took).
    private(set) var size: UInt32 = 32
    private(set) var startIndex: UInt32 = 0
    var requestProducerPrivate: UInt32 = 0
    var responseConsumer: UInt32 = 0
    var epoch: UInt32 = 1

    let requests: UnsafeMutablePointer<FuzzRequest>
    var requestCount = 0
    let segments: UnsafeMutablePointer<FuzzSegment>
    var segmentCount = 0
    let offers: UnsafeMutablePointer<FuzzOffer>
    var offerCount = 0
    /// The well-formed request occupying each ring index (mod size), or -1.
    let requestAtSlot: UnsafeMutablePointer<Int32>

    /// Per frame: used by a request in flight; may be written by a hostile
    /// request in flight (its users' data is not vouched for); ever granted
    /// writable (else it must keep the checker's bytes); hash of those bytes.
    let busy: UnsafeMutablePointer<Bool>
    let tainted: UnsafeMutablePointer<Bool>
    let everWritable: UnsafeMutablePointer<Bool>
    /// What the checker last wrote into the read-only frames, and the sentinel pattern.
    private let keptPages: UnsafeMutableRawPointer
    let sentinelPage: UnsafeMutableRawPointer
    let zeroPage: UnsafeMutableRawPointer
    /// Pages of rewritten requests are held until a quiet point.
    var heldByRewritten = false
    /// Wildcard writes of hostile requests, open until a quiet point.
    var hostileSerials: [UInt32] = []

    /// The frontend never moved req_prod other than to req_prod_pvt, so
    /// "every published request is answered" can be checked exactly.
    var lawful = true
    var stopped = false
    var drained = false
    /// Response slots the guest itself overwrote while the engine held
    /// answers it had written and not pushed (during a step, or after a
    /// restart before the next step: answers sent again from the journal):
    /// those answers are lost to the checker, so exactly-once cannot be
    /// settled at the end.
    var clobbered: [UInt32] = []
    /// A new engine wrote answers from the journal that the next step pushes.
    var engineHoldsUnpushed = false
    var lostResponse = false
    /// Stopped right after a restart, before the journal's requests ran:
    /// they stay in the journal for the next engine, unanswered by this one.
    var leftInJournal = false
    var lastWait: VbdEngineStep.Wait = .idle
    /// Resets of the completion signal with I/O in flight already reported.
    var reportedResetsInFlight = 0
    /// The engine is inside `step` (a rewrite now races it).
    var inStep = false
    /// Print responses as they are taken (BLKIF_FUZZ_TRACE).
    var trace = false
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
    /// An x86_32 ring's request in the x86_64 layout: what the frontend
    /// encodes before narrowing it into its slot, and what the checker
    /// reads after widening a raw slot (as the engine does).
    let wideSlot = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
    /// Bytes per ring slot for this run's ABI.
    var slotStride: Int { configuration.ringProtocol.slotSize }
    /// Guest memory and journal as a kill inside a step found them.
    private let frozenGuest: UnsafeMutableRawPointer
    private let frozenJournal: UnsafeMutableRawPointer

    init(name: String, domain: DomID, grants: InMemoryGrantTable, guest: InMemoryGuest, queueDepth: Int,
         findings: FuzzFindings) {
        self.name = name
        self.guest = guest
        self.grants = grants
        self.findings = findings
        disk = InMemoryStorage(sizeBytes: Self.diskSectors * Blkif.sectorSize, queueDepth: queueDepth)
        configuration = BlkifFuzzConfiguration(ringPages: 1, persistentGrants: false, maxIndirectSegments: 0,
                                                secureDiscard: false, queueDepth: queueDepth, startIndex: 0)
        limits = DiskLimits(sectors: UInt64(Self.diskSectors), readOnly: false, flush: true, barrier: true, discard: true)
        requests = .allocate(capacity: Self.requestCapacity)
        segments = .allocate(capacity: Self.segmentCapacity)
        offers = .allocate(capacity: Self.offerCapacity)
        requestAtSlot = .allocate(capacity: 128)
        journalMemory = .allocate(byteCount: journalBytes, alignment: XenPage.size)
        frozenGuest = .allocate(byteCount: FuzzGuestLayout.pages * XenPage.size, alignment: XenPage.size)
        frozenJournal = .allocate(byteCount: journalBytes, alignment: XenPage.size)
        memset(journalMemory, 0, journalBytes)
        busy = .allocate(capacity: FuzzGuestLayout.pages)
        tainted = .allocate(capacity: FuzzGuestLayout.pages)
        everWritable = .allocate(capacity: FuzzGuestLayout.pages)
        keptPages = .allocate(byteCount: FuzzGuestLayout.readOnlyFrames.count * XenPage.size, alignment: XenPage.size)
        sentinelPage = .allocate(byteCount: XenPage.size, alignment: XenPage.size)
        memset(sentinelPage, Int32(FuzzGuestLayout.sentinelByte), XenPage.size)
        zeroPage = .allocate(byteCount: XenPage.size, alignment: XenPage.size)
        memset(zeroPage, 0, XenPage.size)
        hostileSerials.reserveCapacity(SectorModel.writeCapacity)
        clobbered.reserveCapacity(256)
        model.oldestOpenEpoch = { [unowned self] in self.oldestOpenCheck() }
    }

    deinit {
        journalMemory.deallocate()
        requests.deallocate(); segments.deallocate(); offers.deallocate(); requestAtSlot.deallocate()
        busy.deallocate(); tainted.deallocate(); everWritable.deallocate(); keptPages.deallocate()
        sentinelPage.deallocate(); zeroPage.deallocate(); scratch.deallocate(); wideSlot.deallocate()
        frozenGuest.deallocate(); frozenJournal.deallocate()
    }

    var ringBase: UnsafeMutableRawPointer { guest.page(0) }

    @inline(__always)
    func header(_ offset: Int) -> UInt32 { ringBase.load(fromByteOffset: offset, as: UInt32.self) }

    @inline(__always)
    func setHeader(_ offset: Int, _ value: UInt32) { ringBase.storeBytes(of: value, toByteOffset: offset, as: UInt32.self) }

    @inline(__always)
    func slot(_ index: UInt32) -> UnsafeMutableRawPointer {
        ringBase + SharedRingLayout.Offset.ring + Int(index & (size - 1)) * slotStride
    }

    // MARK: a run

    /// Resets guest, disk and checker and attaches a new engine.
    func begin(_ c: BlkifFuzzConfiguration) {
        configuration = c
        limits = DiskLimits(sectors: UInt64(Self.diskSectors), readOnly: false, flush: true, barrier: true, discard: true,
                            secureDiscard: c.secureDiscard, maxIndirectSegments: c.maxIndirectSegments)
        // Data pages are not cleared: the checker fills each before a
        // well-formed request uses it, and what else reads them (raw and
        // rewritten requests) only moves bytes the checker never judges.
        // Ring frames past the ring's size are never granted: not cleared either.
        guest.reset(zeroing: 0..<c.ringPages)
        for f in FuzzGuestLayout.indirectFrames { memset(guest.page(f), 0, XenPage.size) }
        disk.reset()
        model.reset()
        let front = InMemoryBlkfront(guest: guest, ringPages: c.ringPages, backendDomain: grants.ownDomain,
                                     startIndex: c.startIndex, slotSize: c.ringProtocol.slotSize)
        size = front.ring.size
        for p in 0..<c.ringPages { guest.revoke(GrantRef(p)) }
        startIndex = c.startIndex
        requestProducerPrivate = c.startIndex
        responseConsumer = c.startIndex
        epoch = 1
        requestCount = 0
        segmentCount = 0
        offerCount = 0
        requestAtSlot.update(repeating: -1, count: 128)
        busy.update(repeating: false, count: FuzzGuestLayout.pages)
        tainted.update(repeating: false, count: FuzzGuestLayout.pages)
        everWritable.update(repeating: false, count: FuzzGuestLayout.pages)
        hostileSerials.removeAll(keepingCapacity: true)
        for f in FuzzGuestLayout.requestFrames {
            let readOnly = FuzzGuestLayout.readOnlyFrames.contains(f)
            guest.grant(GrantRef(FuzzGuestLayout.ref(f)), frame: f, to: grants.ownDomain, readOnly: readOnly)
            everWritable[f] = !readOnly
        }
        for f in FuzzGuestLayout.sentinelFrames {
            memset(guest.page(f), Int32(FuzzGuestLayout.sentinelByte), XenPage.size)
        }
        for f in FuzzGuestLayout.readOnlyFrames { keep(f) }
        lawful = true
        stopped = false
        drained = false
        clobbered.removeAll(keepingCapacity: true)
        engineHoldsUnpushed = false
        lostResponse = false
        leftInJournal = false
        heldByRewritten = false
        lastWait = .idle
        reportedResetsInFlight = 0
        engine = makeEngine(recover: false)
    }

    /// A new engine with the ring's journal: formatted afresh (a new ring),
    /// or, after a kill, recovered from what the killed engine left in it.
    private func makeEngine(recover: Bool) -> VbdEngine {
        let slots = SharedRingLayout.slots(pages: configuration.ringPages, entrySize: slotStride)
        journal = VbdRingJournal(memory: journalMemory, byteCount: journalBytes, ringSlots: slots)
        // Pages from the page store: nothing here can fail for want of memory.
        disk.maxIovecsPerOperation = configuration.storageMaxIovecs
        return try! VbdEngine(ring: ringBase, pages: configuration.ringPages, frontendDomain: guest.domain, grants: grants,
                         storage: disk, limits: limits, persistentGrants: configuration.persistentGrants,
                         indirectBouncePages: 64, journal: journal, identity: journalIdentity, recover: recover,
                         pageStore: pageStore, ringProtocol: configuration.ringProtocol)
    }

    /// Ends the run: the engine goes (its persistent mappings with it).
    func end() {
        engine?.releaseMappings()
        engine = nil
    }

    /// kill -9 of the daemon and a restart over the same ring memory: the
    /// storage finishes what the kernel had (`completing` pending operations,
    /// chosen by the program), the rest is dropped; the process's mappings
    /// go with it; a new engine recovers from the ring journal the killed
    /// one left (only its memory survives, as the file does on a host).
    func restartEngine(completing: (InMemoryStorage) -> Void) {
        completing(disk)
        disk.dropPending()
        engine.releaseMappings()
        engine = nil
        journal = nil
        engine = makeEngine(recover: true)
        engineHoldsUnpushed = true
        stopped = false
        drained = false
    }

    /// Where inside a step a kill -9 lands.
    enum KillPoint {
        /// At the step's `n`th storage submission (after the grant copies
        /// of its batch; answers written and journaled then may not be
        /// published yet).
        case submission(Int)
        /// Just before the step's `n`th journal store: between two stores
        /// of one record, or between the ring's push and a record's release.
        case journalStore(Int)
    }

    /// kill -9 inside a step, at `point`. Guest memory (ring pages and data
    /// pages), the journal and the storage's queues go back to that
    /// instant, as if the step had gone no further, and a new engine
    /// recovers. The checker saw nothing of the step. A step that never
    /// reaches the point is an ordinary step.
    func stepKilled(at point: KillPoint, _ input: VbdEngineInput, completing: (InMemoryStorage) -> Void) {
        var reached = 0
        var mark: InMemoryStorage.QueueMark?
        let freeze = { [unowned self] (n: Int) in
            reached += 1
            guard reached == n, mark == nil else { return }
            frozenGuest.copyMemory(from: guest.memory, byteCount: FuzzGuestLayout.pages * XenPage.size)
            frozenJournal.copyMemory(from: journalMemory, byteCount: journalBytes)
            mark = disk.markQueues()
        }
        switch point {
        case .submission(let n): disk.beforeSubmit = { freeze(n) }
        case .journalStore(let n): journal?.beforeStore = { freeze(n) }
        }
        let journalNow = journal
        defer {
            disk.beforeSubmit = nil
            journalNow?.beforeStore = nil
        }
        guard engine.breach == nil, !stopped else {
            step(input, armIfIdle: true)
            return
        }
        inStep = true
        let s = engine.step(input, armIfIdle: true)
        inStep = false
        guard let mark else {
            if trace { print("  \(name): no kill, the step reached \(reached) of \(point)") }
            afterStep(s)
            return
        }
        if trace { print("  \(name): killed at \(point) (\(reached) reached)") }
        guest.memory.copyMemory(from: frozenGuest, byteCount: FuzzGuestLayout.pages * XenPage.size)
        journalMemory.copyMemory(from: frozenJournal, byteCount: journalBytes)
        disk.rollBack(to: mark)
        // What the step published before the kill is what the guest sees:
        // taken now, while the slots the guest wrote over before the step
        // (answers sent again after an earlier restart, not yet pushed) are
        // still known. Dropping those marks first made the guest's own
        // request bytes read as responses (a kill between the push and the
        // records' release).
        collectResponses()
        clobbered.removeAll(keepingCapacity: true)
        if trace { print("  \(name): rolled back: req_prod \(header(0)) rsp_prod \(header(8)) pending \(disk.pending.count)") }
        restartEngine(completing: completing)
        if trace { print("  \(name): recovered \(engine.recovered), to replay \(engine.requestsToReplay), rsp_prod \(header(8))") }
    }

    /// Where the checker's own bytes of read-only frame `f` are kept.
    func keptCopy(_ f: Int) -> UnsafeMutableRawPointer {
        keptPages + (f - FuzzGuestLayout.readOnlyFrames.lowerBound) * XenPage.size
    }

    /// Remembers what the checker wrote into `f`, if it is a frame that must keep it.
    func keep(_ f: Int) {
        guard FuzzGuestLayout.readOnlyFrames.contains(f), !everWritable[f] else { return }
        memcpy(keptCopy(f), guest.page(f), XenPage.size)
    }

    // MARK: bookkeeping

    func tick() -> UInt32 {
        epoch &+= 1
        return epoch
    }

    /// The oldest epoch a read or flush in flight may ask the model about.
    func oldestOpenCheck() -> UInt32 {
        var oldest = epoch
        for i in 0..<requestCount where !requests[i].answered && !requests[i].tampered {
            oldest = min(oldest, requests[i].published)
        }
        return oldest
    }

    func addOffer(id: UInt64, operation: UInt8) {
        guard offerCount < Self.offerCapacity else { return }
        offers[offerCount] = FuzzOffer(id: id, operation: operation)
        offerCount += 1
    }

    /// The request's data can no longer be vouched for; a write of it may
    /// have put anything anywhere in its conservative range.
    func makeUnreliable(_ r: Int, descriptorsChanged: Bool) {
        requests[r].unreliable = true
        if requests[r].serial != 0 { model.markWildcard(requests[r].serial) }
        if descriptorsChanged {
            requests[r].tampered = true
            heldByRewritten = true
            if requests[r].kind == .indirectWrite {
                hostileWrite(sector: requests[r].sector, count: UInt64(configuration.maxIndirectSegments) * 8, zeros: false)
            }
            if requests[r].kind == .indirectRead { taintAllFrames() }
        }
    }

    /// A hostile request may write guest frame `f` (a read into it).
    func taint(frame f: Int) {
        tainted[f] = true
        for r in 0..<requestCount where !requests[r].answered && !requests[r].unreliable && uses(r, frame: f) {
            makeUnreliable(r, descriptorsChanged: Int(requests[r].indirectFrame) == f)
        }
    }

    func taintAllFrames() {
        for f in FuzzGuestLayout.requestFrames where !tainted[f] {
            taint(frame: f)
        }
    }

    func uses(_ r: Int, frame f: Int) -> Bool {
        if Int(requests[r].indirectFrame) == f { return true }
        let start = Int(requests[r].segmentStart)
        for i in start..<start + Int(requests[r].segmentCount) where Int(segments[i].frame) == f { return true }
        return false
    }

    /// A hostile write (raw bytes, a rewritten slot or descriptor page) may
    /// land anywhere in its range until the next quiet point.
    func hostileWrite(sector: UInt64, count: UInt64, zeros: Bool) {
        guard sector < UInt64(Self.diskSectors), let serial = model.newWrite(at: tick(), wildcard: !zeros, zeros: zeros) else {
            return
        }
        model.mayLand(serial, sector: sector, count: count)
        hostileSerials.append(serial)
    }

    /// What bytes in a slot may do when the engine takes them: answer
    /// their id once, write guest frames (a read) or disk sectors (a write).
    func offerRaw(_ slot: UnsafeRawPointer) {
        var p = slot
        if configuration.ringProtocol == .x86_32 {
            BlkifX86_32.widen(slot, into: wideSlot)
            p = UnsafeRawPointer(wideSlot)
        }
        let operation = p.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
        let id = p.loadUnaligned(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
        addOffer(id: id, operation: responseOperation(p, limits: limits))
        // The id of a well-formed request in flight: which of the two an answer is for cannot be told.
        if id & ~0xFFFF_FFFF == Self.idPrefix, Int(id & 0xFFFF_FFFF) < requestCount, !requests[Int(id & 0xFFFF_FFFF)].answered {
            makeUnreliable(Int(id & 0xFFFF_FFFF), descriptorsChanged: true)
        }
        let sector = p.loadUnaligned(fromByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self)
        switch operation {
        case BlkifOperation.read:
            for i in 0..<Blkif.maxSegmentsPerRequest {
                let ref = p.loadUnaligned(fromByteOffset: BlkifRequest.Offset.seg + i * BlkifSegment.size, as: UInt32.self)
                if let f = FuzzGuestLayout.frame(ref) { taint(frame: f) }
            }
        case BlkifOperation.write, BlkifOperation.writeBarrier:
            hostileWrite(sector: sector, count: UInt64(Blkif.maxSegmentsPerRequest * Blkif.sectorsPerPage), zeros: false)
        case BlkifOperation.discard:
            let count = p.loadUnaligned(fromByteOffset: BlkifDiscardRequest.Offset.nrSectors, as: UInt64.self)
            hostileWrite(sector: sector, count: count, zeros: true)
        case BlkifOperation.indirect where configuration.maxIndirectSegments > 0:
            let indirectOp = p.load(fromByteOffset: BlkifIndirectRequest.Offset.indirectOp, as: UInt8.self)
            if indirectOp == BlkifOperation.read { taintAllFrames() }
            if indirectOp == BlkifOperation.write {
                hostileWrite(sector: sector, count: UInt64(configuration.maxIndirectSegments) * 8, zeros: false)
            }
        default:
            break
        }
    }

    /// Everything written has been published and answered and the engine
    /// holds nothing: hostile requests are over, their effects settled.
    func settleIfQuiet() {
        guard lawful, !hostileSerials.isEmpty || anyTainted() || heldByRewritten,
              header(SharedRingLayout.Offset.reqProd) == requestProducerPrivate,
              responseConsumer == requestProducerPrivate, engine.outstanding == 0, disk.pending.isEmpty else { return }
        let now = tick()
        for s in hostileSerials { model.answered(s, at: now) }
        hostileSerials.removeAll(keepingCapacity: true)
        tainted.update(repeating: false, count: FuzzGuestLayout.pages)
        // Nothing is in flight: every page is free again, rewritten requests' too.
        busy.update(repeating: false, count: FuzzGuestLayout.pages)
        heldByRewritten = false
        for r in 0..<requestCount where !requests[r].answered {
            requests[r].answered = true   // a tampered version was answered instead
        }
    }

    private func anyTainted() -> Bool {
        for f in FuzzGuestLayout.requestFrames where tainted[f] {
            return true
        }
        return false
    }

    func release(_ r: Int) {
        let start = Int(requests[r].segmentStart)
        for i in start..<start + Int(requests[r].segmentCount) { busy[Int(segments[i].frame)] = false }
        if requests[r].indirectFrame >= 0 { busy[Int(requests[r].indirectFrame)] = false }
    }
}
