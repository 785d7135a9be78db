import BlockStorage
import CXenBackSupport
import Glibc
import Hypervisor
import SystemSupport
import XenABI
import XenRing

/// What drives a `VbdEngine` forward: the loop's translation of its wakeups.
public enum VbdEngineInput: Sendable {
    /// The event channel fired (or the loop just wants the ring looked at).
    case kicked
    /// The storage's completion descriptor was readable: reap (and reset it).
    case storageReady
    /// Stop taking requests; answer every one in flight.
    case stop
}

/// What the loop must do after a step.
public struct VbdEngineStep: Equatable, Sendable {
    public enum Wait: Equatable, Sendable {
        /// More work is ready now: step again (after notifying, if asked).
        case busy
        /// The ring is empty and req_event is not armed (the caller asked
        /// for that, to poll): poll `hasWork()`, then step again.
        case ringEmpty
        /// req_event is armed and the ring re-checked: sleep until the event
        /// channel or the storage's descriptor fires.
        case idle
        /// Taking is held (a barrier draining, every indirect area taken,
        /// stopping) until storage completions arrive: sleep on the
        /// storage's descriptor. Storage operations are always in flight then.
        case storage
        /// Stopped (or broken) with nothing in flight: the loop ends.
        case drained
    }
    /// Responses were pushed and the frontend asked to be notified.
    public var notify: Bool
    public var wait: Wait
    public init(notify: Bool, wait: Wait) { self.notify = notify; self.wait = wait }
}

/// blkback's request path for one ring, top to bottom, with no thread, fd,
/// clock or logger: take requests from the ring, validate private copies,
/// map or copy grants, submit to the storage, reap completions, order
/// barriers, answer. A loop (VbdDataPlane's thread, or a test or fuzzer
/// with in-memory doubles) drives it with `step`. Every buffer is allocated
/// in init; the hot path does not allocate, lock or log.
public final class VbdEngine {
    private let storage: any BlockStorage
    private let grants: any GrantTableHandle
    private var ring: BackRing
    private let frontendDomain: DomID
    public private(set) var limits: DiskLimits
    private let usePersistentGrants: Bool
    private var persistent: PersistentGrants

    // Per-request state: one slot per ring entry. A request's segments
    // occupy consecutive "places" (11 of a slot for a direct request, the N
    // of an indirect area for an indirect one); place p has bounce page p,
    // iovec p, private segment p and bounced flag p.
    private let slotCount: Int
    private let slots: UnsafeMutablePointer<RequestSlot>
    private let placeCount: Int
    private let pages: UnsafeMutableRawPointer
    private let iovecs: UnsafeMutablePointer<iovec>
    private let segments: UnsafeMutablePointer<BlkifSegment>
    /// Place p goes through its bounce page and a grant copy (not a persistent mapping).
    private let bounced: UnsafeMutablePointer<Bool>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeSlotCount: Int
    private var inFlight: InFlightIDs
    /// Requests holding a slot (taken, not yet answered).
    public private(set) var outstanding = 0
    private var barrierSlot: Int32 = -1
    private var barrierStarted = false

    // Indirect requests (feature-max-indirect-segments): a pool of areas,
    // each with `indirectSegments` places and a private copy of the
    // descriptor pages. Fewer areas than slots on a large ring: a bounce
    // page per possible segment of every slot would be 256 MiB for 512
    // slots of 128 segments. While no area is free, no request is taken
    // (backpressure, as Linux blkback does when its pending requests run out).
    private let indirectSegments: Int
    private let areaCount: Int
    private let descriptorPagesPerArea: Int
    private let descriptors: UnsafeMutableRawPointer
    /// Pages of `pages` this engine mapped itself (0: the page store's).
    private let mappedPageCount: Int
    private let freeAreas: UnsafeMutablePointer<Int32>
    private var freeAreaCount: Int
    /// Indirect requests of this pass whose descriptors are being read.
    private let pendingIndirect: UnsafeMutablePointer<Int32>
    private var pendingIndirectCount = 0

    // Batches built during one pass.
    private let copies: UnsafeMutableBufferPointer<GrantCopyOperation>
    private let copyOwners: UnsafeMutablePointer<Int32>
    private var copyCount = 0
    /// Reads whose data is being copied back to the guest in this pass.
    private let copyOutSlots: UnsafeMutablePointer<Int32>
    private var copyOutCount = 0
    private let submissions: UnsafeMutableBufferPointer<StorageOperation>
    private var submissionCount = 0
    /// Operations at the front of `submissions` the storage could not take yet.
    private var backlogCount = 0
    /// Storage operations submitted and not yet reaped.
    public private(set) var storageInFlight = 0
    /// iovecs of merged operations (several requests, one storage
    /// operation): `iovecsPerMerge` for each slot, used while that slot
    /// heads a merged operation. The storage owns an operation's iovecs
    /// until its completion is reaped (BlockStorage's contract; NBDStorage
    /// scatters a bounced read into them only then), so they must not be
    /// reused before: one area shared by every merge and reset at the next
    /// batch did exactly that, and on Xen (slow NBD reads of a sequential
    /// stream, a new batch merging while the last was in flight) the
    /// scatter followed another operation's iovecs, past its bounce buffer
    /// (memcpy segfault) and into the wrong guest pages. A slot's area is
    /// free again only when the slot is, after its completion.
    private let mergedIovecs: UnsafeMutablePointer<iovec>
    /// iovecs of a slot's merge area: room for two requests of the largest
    /// kind, so indirect requests merge too (at most 512, below IOV_MAX).
    private let iovecsPerMerge: Int
    /// iovecs a merged operation may reach: the area, or less when the
    /// storage says larger operations are slower (`maxIovecsPerOperation`).
    private let mergeIovecLimit: Int
    static let minimumIovecsPerMerge = 128
    private let scratch: UnsafeMutableRawPointer
    /// The ring's ABI (the frontend's `protocol`), and an x86_32 request's
    /// slot as copied out, before it is widened into `scratch`.
    public let ringProtocol: BlkifProtocol
    private let narrowScratch: UnsafeMutableRawPointer
    /// The segments of the request in `scratch`, decoded as validation checked them.
    private let stagedSegments: UnsafeMutablePointer<BlkifSegment>
    /// Where `pages` and `descriptors` come from when the caller keeps them.
    private let pageStore: VbdEnginePageStore?

    // The journal (nil: restart resumes at rsp_prod, as without one).
    private let journal: VbdRingJournal?
    private let freeRecords: UnsafeMutablePointer<Int32>
    private var freeRecordCount = 0
    /// Records answered in this pass, released once their responses are published.
    private let unpublished: UnsafeMutablePointer<Int32>
    private var unpublishedCount = 0
    /// Requests a killed predecessor took and never answered, oldest first:
    /// taken again (from the journal's copy) before the ring.
    private var replay: [Int32] = []
    private var replayNext = 0

    private var stopping = false
    /// The storage's completion descriptor was reported readable since the last reap.
    private var storageSignalled = false
    /// Completions were reaped by polling since the descriptor was last
    /// reset: it may be readable with nothing left to reap.
    private var reapedSinceReset = false
    /// Why the frontend was declared broken (the loop reports it once).
    public private(set) var breach: String?
    /// A pass answered or submitted something: look again before waiting.
    private var progressed = false

    /// The latest refused requests, for the loop to log (oldest dropped
    /// when it does not keep up; the counters see every one).
    public static let rejectionLogCapacity = 16
    private let rejectionLog: UnsafeMutablePointer<VbdRejectedRequest>
    private var rejectionLogCount = 0
    /// Refused requests the log had no room for since the loop last drained it.
    private var rejectionsUnlogged: UInt64 = 0

    /// Counters, updated as requests are taken and answered.
    public private(set) var statistics = VbdStatistics()
    /// Called before responses are pushed whenever the counters changed, so
    /// a frontend that sees a response sees it counted (the loop publishes).
    public var beforePush: ((VbdStatistics) -> Void)?
    private var lastPushedStatistics = VbdStatistics()
    /// Nanoseconds on a monotonic clock, read at most twice a pass (when it
    /// first takes a request, and before it pushes responses) to time the
    /// requests for `statistics.latency`. Nil: no timing (tests, fuzzers).
    public var clock: (() -> UInt64)?
    /// When this pass first took a request (0: not yet).
    private var intakeTime: UInt64 = 0
    /// When each request answered since the last push was taken.
    private let answeredTakenAt: UnsafeMutablePointer<UInt64>
    private var answeredCount = 0

    static let maxSegments = Blkif.maxSegmentsPerRequest
    /// The most segments an indirect request may have here (Linux blkback's
    /// MAX_INDIRECT_SEGMENTS): one request's iovecs stay well below IOV_MAX
    /// (1024) even when two merge, and one descriptor page holds them all.
    public static let indirectSegmentsLimit = 256
    /// Bounce pages of the indirect areas of one ring (16 MiB): the areas
    /// are as many as the ring's slots or as this allows, at least one.
    public static let indirectBouncePages = 4096

    /// Attaches to the ring at `ring` (`pages` mapped pages the frontend
    /// initialised) and allocates every buffer the ring will ever need.
    ///
    /// With a `journal`: `recover` reads what a killed predecessor left in
    /// it (requests to run again, answers to publish again) if it holds this
    /// ring (`identity`); otherwise, or without `recover`, it is formatted
    /// afresh. Recovery that finds the journal inconsistent with the ring
    /// falls back to resuming at rsp_prod (`recovered` says which happened).
    public init(ring base: UnsafeMutableRawPointer, pages ringPages: Int, frontendDomain: DomID, grants: any GrantTableHandle,
                storage: any BlockStorage, limits: DiskLimits, persistentGrants: Bool,
                indirectBouncePages: Int = VbdEngine.indirectBouncePages,
                journal: VbdRingJournal? = nil, identity: UInt64 = 0, recover: Bool = false,
                pageStore: VbdEnginePageStore? = nil, ringProtocol: BlkifProtocol = .x86_64) throws(SystemError) {
        precondition((0...Self.indirectSegmentsLimit).contains(limits.maxIndirectSegments),
                     "max indirect segments \(limits.maxIndirectSegments) is outside 0...\(Self.indirectSegmentsLimit)")
        self.storage = storage
        self.grants = grants
        self.frontendDomain = frontendDomain
        self.limits = limits
        self.usePersistentGrants = persistentGrants
        self.ringProtocol = ringProtocol
        let slotSize = ringProtocol.slotSize
        var plan: JournalRecovery?
        if let journal, recover, journal.holdsRing(identity: identity) {
            let probe = BackRing(attachingTo: base, pages: ringPages, entrySize: slotSize)
            plan = journal.recover(published: probe.publishedResponses, ringSize: probe.size)
        }
        if let plan {
            ring = BackRing(attachingTo: base, pages: ringPages, entrySize: slotSize, requestConsumer: plan.consumed)
        } else {
            ring = BackRing(attachingTo: base, pages: ringPages, entrySize: slotSize)
            journal?.format(identity: identity, consumed: ring.requestConsumer)
        }
        slotCount = Int(ring.size)
        indirectSegments = limits.maxIndirectSegments
        areaCount = indirectSegments == 0 ? 0 : min(slotCount, max(1, indirectBouncePages / indirectSegments))
        descriptorPagesPerArea = Blkif.indirectPages(segments: indirectSegments)
        placeCount = slotCount * Self.maxSegments + areaCount * indirectSegments
        let descriptorPages = max(1, areaCount * descriptorPagesPerArea)
        // Bounce and descriptor pages in one block: the page store's, or a
        // mapping of the engine's own, unmapped whole when it goes. Taken
        // first, so that a host out of memory fails this ring (thrown before
        // anything else is allocated), not the daemon.
        self.pageStore = pageStore
        if let pageStore {
            pages = pageStore.pages(placeCount + descriptorPages)
            mappedPageCount = 0
        } else {
            mappedPageCount = placeCount + descriptorPages
            guard let mapped = MappedPages.map(byteCount: mappedPageCount * XenPage.size) else {
                throw SystemError("mmap", errno: ENOMEM)
            }
            pages = mapped
        }
        self.journal = journal
        recovered = plan != nil
        let records = journal?.recordCount ?? 0
        freeRecords = .allocate(capacity: max(1, records))
        unpublished = .allocate(capacity: max(1, records))
        if let plan {
            for r in plan.free { freeRecords[freeRecordCount] = r; freeRecordCount += 1 }
            replay = plan.replay
        } else {
            for r in 0..<records { freeRecords[r] = Int32(records - 1 - r) }
            freeRecordCount = records
        }

        slots = .allocate(capacity: slotCount)
        slots.initialize(repeating: RequestSlot(), count: slotCount)
        // A place's segment, iovec and bounced flag are written when a
        // request takes it, before anything reads them: left uninitialised
        // (thousands of places on a large ring with indirect areas).
        iovecs = .allocate(capacity: placeCount)
        segments = .allocate(capacity: placeCount)
        bounced = .allocate(capacity: placeCount)
        freeSlots = .allocate(capacity: slotCount)
        answeredTakenAt = .allocate(capacity: slotCount)
        for i in 0..<slotCount { freeSlots[i] = Int32(slotCount - 1 - i) }
        freeSlotCount = slotCount
        descriptors = pages + placeCount * XenPage.size
        freeAreas = .allocate(capacity: max(1, areaCount))
        for i in 0..<areaCount { freeAreas[i] = Int32(areaCount - 1 - i) }
        freeAreaCount = areaCount
        pendingIndirect = .allocate(capacity: max(1, areaCount))
        inFlight = InFlightIDs(capacity: slotCount)
        // As many pages as the ring can have in flight (data and descriptor
        // pages): what a frontend reuses.
        let pagesInFlight = placeCount + areaCount * descriptorPagesPerArea
        persistent = PersistentGrants(capacity: persistentGrants ? pagesInFlight : 0)
        copies = .allocate(capacity: pagesInFlight)
        copyOwners = .allocate(capacity: pagesInFlight)
        copyOutSlots = .allocate(capacity: slotCount)
        submissions = .allocate(capacity: slotCount * 2)
        iovecsPerMerge = max(Self.minimumIovecsPerMerge, 2 * indirectSegments)
        mergeIovecLimit = min(iovecsPerMerge, storage.maxIovecsPerOperation ?? .max)
        mergedIovecs = .allocate(capacity: slotCount * iovecsPerMerge)
        scratch = .allocate(byteCount: Blkif.slotSize, alignment: 16)
        narrowScratch = .allocate(byteCount: BlkifX86_32.slotSize, alignment: 16)
        stagedSegments = .allocate(capacity: Blkif.maxSegmentsPerRequest)
        rejectionLog = .allocate(capacity: Self.rejectionLogCapacity)
        // Answers written but never published before the kill go out first,
        // in their order, with the statuses they had.
        if let journal, let plan {
            for r in plan.reanswer {
                let request = journal.request(Int(r))
                let id = request.load(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
                let (operation, status) = journal.response(Int(r))
                respond(id: id, operation: operation, status: status, record: r)
            }
        }
    }

    /// The journal held this ring and the engine resumed from it.
    public let recovered: Bool
    /// Requests of a killed predecessor still to be run again.
    public var requestsToReplay: Int { replay.count - replayNext }

    deinit {
        slots.deallocate()
        if mappedPageCount > 0 { MappedPages.unmap(pages, byteCount: mappedPageCount * XenPage.size) }
        iovecs.deallocate()
        segments.deallocate()
        bounced.deallocate()
        freeAreas.deallocate()
        pendingIndirect.deallocate()
        freeSlots.deallocate()
        answeredTakenAt.deallocate()
        copies.deallocate()
        copyOwners.deallocate()
        copyOutSlots.deallocate()
        submissions.deallocate()
        mergedIovecs.deallocate()
        scratch.deallocate()
        narrowScratch.deallocate()
        stagedSegments.deallocate()
        freeRecords.deallocate()
        unpublished.deallocate()
        rejectionLog.deallocate()
    }

    /// Refused requests wait to be taken by `takeRejections`.
    public var hasRejections: Bool { rejectionLogCount > 0 || rejectionsUnlogged > 0 }

    /// Hands the refused requests kept since the last call to `body`, and
    /// returns how many more were refused that there was no room to keep.
    public func takeRejections(_ body: (VbdRejectedRequest) -> Void) -> UInt64 {
        for i in 0..<rejectionLogCount { body(rejectionLog[i]) }
        rejectionLogCount = 0
        defer { rejectionsUnlogged = 0 }
        return rejectionsUnlogged
    }

    private func reject(_ reason: VbdRejectionReason, id: UInt64, operation: UInt8, sector: UInt64) {
        statistics.rejected[reason] &+= 1
        if rejectionLogCount < Self.rejectionLogCapacity {
            rejectionLog[rejectionLogCount] = VbdRejectedRequest(reason: reason, id: id, operation: operation, sector: sector)
            rejectionLogCount += 1
        } else {
            rejectionsUnlogged &+= 1
        }
    }

    /// Refuses a request holding a slot.
    private func reject(slot s: Int, _ reason: VbdRejectionReason) {
        reject(reason, id: slots[s].id, operation: slots[s].operation, sector: slots[s].sector)
        finish(slot: s, status: BlkifStatus.error)
    }

    public var ringSlots: Int { slotCount }
    /// Indirect requests that may be in flight at once (0: not offered).
    public var indirectAreas: Int { areaCount }
    /// Guest pages mapped for persistent grants.
    public var persistentlyMappedPages: Int { persistent.count }

    /// Unmaps the persistently mapped pages (the ring disconnects).
    public func releaseMappings() {
        persistent.unmapAll(grants)
    }

    // MARK: stepping

    /// Runs passes (reap, take, submit, answer) until nothing is left to do
    /// at once, pushing responses after each. Returns early after a push
    /// that asks for a notification while more work is ready, so the loop
    /// notifies without delay. `armIfIdle`: when the ring is empty, re-arm
    /// req_event and look once more (false: the loop polls first).
    public func step(_ input: VbdEngineInput, armIfIdle: Bool = true) -> VbdEngineStep {
        switch input {
        case .kicked: break
        case .storageReady: storageSignalled = true
        case .stop: stopping = true
        }
        while true {
            intakeTime = 0
            pass()
            recordLatencies()
            statistics.inFlight = UInt64(outstanding)
            statistics.persistentGrants = UInt64(persistent.count)
            if statistics != lastPushedStatistics {
                beforePush?(statistics)
                lastPushedStatistics = statistics
            }
            let notify = ring.pushResponses()
            releasePublishedRecords()
            if stopping || breach != nil {
                return VbdEngineStep(notify: notify, wait: outstanding == 0 ? .drained : .storage)
            }
            // Taking held for a barrier or for want of an indirect area: a
            // completion wakes us to go on (pass() left I/O in flight).
            if barrierSlot >= 0 || areasExhausted { return VbdEngineStep(notify: notify, wait: .storage) }
            do throws(RingOverflow) {
                if try ring.unconsumedRequests() > 0 {
                    if notify { return VbdEngineStep(notify: true, wait: .busy) }
                    continue
                }
                guard armIfIdle else { return VbdEngineStep(notify: notify, wait: .ringEmpty) }
                if try ring.finalCheckForRequests() {
                    if notify { return VbdEngineStep(notify: true, wait: .busy) }
                    continue
                }
                // What finished inside io_submit (tmpfs, a RAM disk) was
                // reaped, but its eventfd would wake the loop at once for
                // nothing: one read now saves that wakeup (an epoll_wait, a
                // read and a pass), per batch on such storage.
                if reapedSinceReset && storageInFlight == 0 {
                    storage.resetCompletionSignal()
                    reapedSinceReset = false
                }
                return VbdEngineStep(notify: notify, wait: .idle)
            } catch {
                declareBroken(error)
            }
        }
    }

    /// The cheap look a polling loop takes between steps: new requests on
    /// the ring, or storage completions (reaped and answered here, pushed
    /// by the next step). True: step again.
    public func hasWork() -> Bool {
        if breach == nil, !stopping, let n = try? ring.unconsumedRequests(), n > 0 { return true }
        return storageInFlight > 0 && reapCompletions(polling: true) > 0
    }

    /// One pass, repeated while it makes progress: a request answered at
    /// once (a failed grant copy, a refusal) can be what a barrier waits
    /// for, so a pass that answered anything is followed by another.
    private func pass() {
        repeat {
            progressed = false
            // Reset the storage's descriptor only after the loop saw it
            // readable; otherwise the cheap check suffices.
            reapCompletions(polling: !storageSignalled)
            storageSignalled = false
            if !stopping && breach == nil && barrierSlot < 0 { takeRequests() }
            startBarrierIfDrained()
            // Fast storage (page cache, tmpfs) often finishes inside
            // io_submit: answer at once rather than after another wakeup. A
            // completed barrier write queues its flush: submit that too.
            repeat {
                submitBatch()
                if storageInFlight > 0 { reapCompletions(polling: true) }
            } while submissionCount > backlogCount
        } while progressed
    }

    /// Every response written so far is published: forget their requests.
    @inline(__always)
    private func releasePublishedRecords() {
        guard let journal else { return }
        for i in 0..<unpublishedCount {
            journal.release(Int(unpublished[i]))
            freeRecords[freeRecordCount] = unpublished[i]
            freeRecordCount += 1
        }
        unpublishedCount = 0
    }

    private func declareBroken(_ overflow: RingOverflow) {
        guard breach == nil else { return }
        breach = "frontend dom\(frontendDomain) broke the ring protocol: \(overflow)"
    }

    // MARK: taking requests

    /// Every indirect area holds a request: the next request, which may be
    /// indirect, waits on the ring.
    @inline(__always)
    private var areasExhausted: Bool { areaCount > 0 && freeAreaCount == 0 }

    private func takeRequests() {
        // Indirect requests taken here (replayed ones too) start even when
        // the ring then turns out broken or taking stops early: else they
        // hold their slots with no I/O, and the ring never drains.
        defer { if pendingIndirectCount > 0 { startIndirectRequests() } }
        // What a killed predecessor took and never answered runs first, in
        // the order it was taken, from the journal's private copies; the
        // ring waits until it has all been taken (a barrier among it holds
        // the rest as it would have).
        if replayNext < replay.count, let journal {
            while replayNext < replay.count && barrierSlot < 0 && !areasExhausted {
                let r = replay[replayNext]
                replayNext += 1
                scratch.copyMemory(from: journal.request(Int(r)), byteCount: Blkif.slotSize)
                handleTaken(record: r)
            }
            if replayNext < replay.count { return }
            replay = []
        }
        let available: UInt32
        do { available = try ring.unconsumedRequests() } catch {
            declareBroken(error)
            return
        }
        var taken: UInt32 = 0
        // Two loops, so the journal is bound once a pass (a binding inside
        // the loop cost a retain and a release per request).
        if let journal {
            // Records come back when this pass's answers are published.
            while taken < available && barrierSlot < 0 && !areasExhausted && freeRecordCount > 0 {
                freeRecordCount -= 1
                let record = freeRecords[freeRecordCount]
                let index = ring.requestConsumer
                takeRequest()
                journal.recordTaken(Int(record), ringIndex: index, slot: UnsafeRawPointer(scratch))
                taken += 1
                handleTaken(record: record)
            }
        } else {
            while taken < available && barrierSlot < 0 && !areasExhausted {
                takeRequest()
                taken += 1
                handleTaken(record: -1)
            }
        }
    }

    /// The next request into `scratch`, in the x86_64 layout whatever the
    /// frontend's ABI (an x86_32 one is copied out, then widened).
    @inline(__always)
    private func takeRequest() {
        if ringProtocol == .x86_64 {
            ring.takeRequest(into: scratch)
        } else {
            ring.takeRequest(into: narrowScratch)
            BlkifX86_32.widen(UnsafeRawPointer(narrowScratch), into: scratch)
        }
    }

    /// The request in `scratch` (journal record `record`, or -1): refused at
    /// once, or accepted.
    @inline(__always)
    private func handleTaken(record: Int32) {
        statistics.requests &+= 1
        switch validateBlkifRequest(UnsafeRawPointer(scratch), limits: limits, segments: stagedSegments) {
        case .failure(let rejection):
            let id = scratch.load(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
            let operation = responseOperation(UnsafeRawPointer(scratch), limits: limits)
            reject(VbdRejectionReason(rejection), id: id, operation: operation,
                   sector: scratch.load(fromByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self))
            respond(id: id, operation: operation, status: rejection.status, record: record)
        case .success(let request):
            accept(request, record: record)
        }
    }

    private func accept(_ r: ValidatedRequest, record: Int32) {
        guard freeSlotCount > 0, inFlight.insert(r.id) else {
            // A second request with an id already in flight: refuse it alone.
            reject(.duplicateID, id: r.id, operation: r.operation, sector: r.sector)
            respond(id: r.id, operation: r.operation, status: BlkifStatus.error, record: record)
            return
        }
        freeSlotCount -= 1
        let s = Int(freeSlots[freeSlotCount])
        outstanding += 1
        slots[s] = RequestSlot(request: r)
        slots[s].record = record
        if let clock {
            if intakeTime == 0 { intakeTime = clock() }
            slots[s].takenAt = intakeTime
        }
        if r.indirectPageCount > 0 {
            // takeRequests took this request only because an area was free.
            freeAreaCount -= 1
            let a = Int(freeAreas[freeAreaCount])
            slots[s].area = Int32(a)
            slots[s].base = Int32(slotCount * Self.maxSegments + a * indirectSegments)
            readDescriptors(r, slot: s, area: a)
            pendingIndirect[pendingIndirectCount] = Int32(s)
            pendingIndirectCount += 1
            return
        }
        let base = s * Self.maxSegments
        slots[s].base = Int32(base)
        (segments + base).update(from: stagedSegments, count: r.segmentCount)
        switch r.kind {
        case .read:
            queueStorage(slot: s, kind: .read)
        case .write:
            queueStorage(slot: s, kind: .write)
        case .flush:
            queueStorage(slot: s, kind: .flush)
        case .discard(let sectors, let secure):
            submissions[submissionCount] = StorageOperation(
                tag: UInt64(s), kind: .discard, offset: r.sector * UInt64(Blkif.sectorSize),
                length: sectors * UInt64(Blkif.sectorSize), secure: secure)
            submissionCount += 1
        case .barrier:
            barrierSlot = Int32(s)
            barrierStarted = false
        }
    }

    /// Brings an indirect request's segment descriptors (the first
    /// nr_segments of them) into its area's private pages, which alone are
    /// checked and used from then on: copied from a persistently mapped page
    /// (Linux blkfront reuses its indirect pages' grants too), else by a
    /// grant copy that runs in `startIndirectRequests`.
    private func readDescriptors(_ r: ValidatedRequest, slot s: Int, area a: Int) {
        var left = r.segmentCount * BlkifSegment.size
        for p in 0..<r.indirectPageCount {
            let bytes = min(left, XenPage.size)
            left -= bytes
            let local = descriptors + (a * descriptorPagesPerArea + p) * XenPage.size
            let ref = r.indirectPages[p]
            if usePersistentGrants, let page = persistent.page(ref, domain: frontendDomain, grants: grants) {
                xb_copy_from_shared(local, page, bytes)
            } else {
                copies[copyCount] = GrantCopyOperation(direction: .fromGuest, domain: frontendDomain, ref: ref,
                                                       guestOffset: 0, length: UInt16(bytes), local: local)
                copyOwners[copyCount] = Int32(s)
                copyCount += 1
            }
        }
    }

    /// The indirect requests taken in this pass, once their descriptors are
    /// private: a descriptor page that could not be copied, a bad segment or
    /// a range past the end of the disk answers BLKIF_RSP_ERROR; the rest
    /// go on as direct requests do. The grant copies run now, with the
    /// pass's write copies queued so far.
    private func startIndirectRequests() {
        runCopies()
        for k in 0..<pendingIndirectCount {
            let s = Int(pendingIndirect[k])
            guard !slots[s].copyFailed else {
                reject(slot: s, .badGrant)
                continue
            }
            let area = descriptors + Int(slots[s].area) * descriptorPagesPerArea * XenPage.size
            switch validateIndirectSegments(area, count: slots[s].segmentCount, sector: slots[s].sector, limits: limits,
                                            into: segments + Int(slots[s].base)) {
            case .failure(let rejection):
                reject(slot: s, VbdRejectionReason(rejection))
            case .success(let bytes):
                slots[s].byteCount = bytes
                queueStorage(slot: s, kind: slots[s].phase == .read ? .read : .write)
            }
        }
        pendingIndirectCount = 0
    }

    /// Builds the iovecs of a slot. Segment i is the guest's page itself when
    /// it is persistently mapped, else the bounce page of its place (filled
    /// by a grant copy for a write, copied back after a read), at the
    /// segment's sector offset; adjacent ranges merge into one iovec.
    private func queueStorage(slot s: Int, kind: StorageOperationKind) {
        let slot = slots[s]
        var op = StorageOperation(tag: UInt64(s), kind: kind, offset: slot.sector * UInt64(Blkif.sectorSize),
                                  length: UInt64(slot.byteCount))
        if kind == .read || kind == .write {
            let base = Int(slot.base)
            var n = 0
            var anyBounced = false
            for i in 0..<slot.segmentCount {
                let seg = segments[base + i]
                var page = usePersistentGrants ? persistent.page(seg.gref, domain: frontendDomain, grants: grants) : nil
                bounced[base + i] = page == nil
                if page == nil {
                    page = bouncePage(base + i)
                    anyBounced = true
                    if kind == .write { queueCopy(place: base + i, owner: s, direction: .fromGuest) }
                }
                let start = page! + Int(seg.firstSect) * Blkif.sectorSize
                let length = Int(seg.lastSect - seg.firstSect + 1) * Blkif.sectorSize
                if n > 0, iovecs[base + n - 1].iov_base! + iovecs[base + n - 1].iov_len == start {
                    iovecs[base + n - 1].iov_len += length
                } else {
                    iovecs[base + n] = iovec(iov_base: start, iov_len: length)
                    n += 1
                }
            }
            op.iovecs = iovecs + base
            op.iovecCount = Int32(n)
            slots[s].anyBounced = anyBounced
        }
        submissions[submissionCount] = op
        submissionCount += 1
    }

    @inline(__always)
    private func bouncePage(_ place: Int) -> UnsafeMutableRawPointer {
        pages + place * XenPage.size
    }

    private func queueCopy(place p: Int, owner s: Int, direction: GrantCopyOperation.Direction) {
        let seg = segments[p]
        let offset = Int(seg.firstSect) * Blkif.sectorSize
        copies[copyCount] = GrantCopyOperation(
            direction: direction, domain: frontendDomain, ref: seg.gref, guestOffset: UInt16(offset),
            length: UInt16(Int(seg.lastSect - seg.firstSect + 1) * Blkif.sectorSize),
            local: bouncePage(p) + offset)
        copyOwners[copyCount] = Int32(s)
        copyCount += 1
    }

    /// Runs the queued grant copies; marks the slots whose copy failed.
    private func runCopies() {
        guard copyCount > 0 else { return }
        grants.copy(UnsafeMutableBufferPointer(rebasing: copies[0..<copyCount]))
        for i in 0..<copyCount where copies[i].status != GrantStatus.okay {
            slots[Int(copyOwners[i])].copyFailed = true
        }
        copyCount = 0
    }

    /// Copies write data in, drops requests whose grants failed, merges
    /// requests that continue each other on the disk, and hands the batch
    /// to the storage in one call.
    private func submitBatch() {
        runCopies()
        var kept = backlogCount
        for i in backlogCount..<submissionCount {
            let op = submissions[i]
            let s = Int(op.tag)
            if slots[s].copyFailed {
                reject(slot: s, .badGrant)
            } else if kept > backlogCount && merge(op, into: kept - 1) {
                continue
            } else {
                submissions[kept] = op
                kept += 1
            }
        }
        submissionCount = kept
        guard submissionCount > 0 else { return }
        let took = storage.submit(UnsafeMutableBufferPointer(rebasing: submissions[0..<submissionCount]))
        storageInFlight += took
        if took > 0 { progressed = true }
        // What the storage could not take now waits for the next pass.
        for i in took..<submissionCount { submissions[i - took] = submissions[i] }
        submissionCount -= took
        backlogCount = submissionCount
    }

    /// Appends `op` to the operation at `index` when it reads or writes the
    /// sectors right after it (a sequential stream split into blkif
    /// requests becomes one preadv/pwritev). The slots form a chain.
    private func merge(_ op: StorageOperation, into index: Int) -> Bool {
        let head = submissions[index]
        guard op.kind == head.kind, op.kind == .read || op.kind == .write,
              slots[Int(op.tag)].phase == slots[Int(head.tag)].phase,
              head.offset + head.length == op.offset,
              Int(head.iovecCount + op.iovecCount) <= mergeIovecLimit else { return false }
        var merged = head
        let area = mergedIovecs + Int(head.tag) * iovecsPerMerge
        if head.iovecs! != area {
            // First merge into this operation: move its iovecs to its head slot's merge area.
            area.update(from: head.iovecs!, count: Int(head.iovecCount))
            merged.iovecs = area
        }
        (area + Int(merged.iovecCount)).update(from: op.iovecs!, count: Int(op.iovecCount))
        merged.iovecCount += op.iovecCount
        merged.length += op.length
        submissions[index] = merged
        var last = Int(head.tag)
        while slots[last].nextInGroup >= 0 { last = Int(slots[last].nextInGroup) }
        slots[last].nextInGroup = Int32(op.tag)
        return true
    }

    // MARK: completions

    /// Reaps finished storage operations and answers them. `polling`: the
    /// cheap check used while spinning, which leaves the eventfd alone.
    @discardableResult
    private func reapCompletions(polling: Bool = false) -> Int {
        let reaped = polling ? storage.pollCompletions { completeOperation($0) }
                             : storage.reapCompletions { completeOperation($0) }
        if !polling { reapedSinceReset = false } else if reaped > 0 { reapedSinceReset = true }
        // Read data goes back to the guest in one batch of copies.
        guard copyCount > 0 else { return reaped }
        runCopies()
        for i in 0..<copyOutCount {
            let s = Int(copyOutSlots[i])
            if slots[s].copyFailed { reject(slot: s, .badGrant) } else { finish(slot: s, status: BlkifStatus.okay) }
        }
        copyOutCount = 0
        return reaped
    }

    /// One finished storage operation: a merged one completes every slot of its chain.
    private func completeOperation(_ c: StorageCompletion) {
        storageInFlight -= 1
        var groupBytes = 0
        var next = Int(c.tag)
        while next >= 0 {
            groupBytes += slots[next].byteCount
            next = Int(slots[next].nextInGroup)
        }
        next = Int(c.tag)
        while next >= 0 {
            let s = next
            next = Int(slots[s].nextInGroup)
            slots[s].nextInGroup = -1
            complete(slot: s, result: c.result, groupBytes: groupBytes)
        }
    }

    private func complete(slot s: Int, result: Int64, groupBytes: Int) {
        let slot = slots[s]
        let ok = result >= 0 && (slot.phase == .flush || slot.phase == .discard || result == Int64(groupBytes))
        switch slot.phase {
        case .read where ok && slot.anyBounced:
            statistics.bytesRead &+= UInt64(slot.byteCount)
            let base = Int(slot.base)
            for p in base..<base + slot.segmentCount where bounced[p] {
                queueCopy(place: p, owner: s, direction: .toGuest)
            }
            copyOutSlots[copyOutCount] = Int32(s)
            copyOutCount += 1
        case .barrierWrite where ok:
            statistics.bytesWritten &+= UInt64(slot.byteCount)
            slots[s].phase = .flush
            queueStorage(slot: s, kind: .flush)
        default:
            if ok && slot.phase == .write { statistics.bytesWritten &+= UInt64(slot.byteCount) }
            if ok && slot.phase == .read { statistics.bytesRead &+= UInt64(slot.byteCount) }
            finish(slot: s, status: ok ? BlkifStatus.okay : BlkifStatus.error)
        }
    }

    /// A barrier runs once everything before it has been answered.
    private func startBarrierIfDrained() {
        guard barrierSlot >= 0, !barrierStarted, outstanding == 1 else { return }
        barrierStarted = true
        let s = Int(barrierSlot)
        if slots[s].segmentCount > 0 {
            slots[s].phase = .barrierWrite
            queueStorage(slot: s, kind: .write)
        } else {
            slots[s].phase = .flush
            queueStorage(slot: s, kind: .flush)
        }
    }

    private func finish(slot s: Int, status: Int16) {
        progressed = true
        let slot = slots[s]
        switch slot.operation {
        case BlkifOperation.read: statistics.reads &+= 1
        case BlkifOperation.write, BlkifOperation.writeBarrier: statistics.writes &+= 1
        case BlkifOperation.flushDiskCache: statistics.flushes &+= 1
        default: statistics.discards &+= 1
        }
        respond(id: slot.id, operation: slot.operation, status: status, record: slot.record)
        if clock != nil {
            if answeredCount == slotCount { recordLatencies() }
            answeredTakenAt[answeredCount] = slot.takenAt
            answeredCount += 1
        }
        inFlight.remove(slot.id)
        if slot.area >= 0 {
            freeAreas[freeAreaCount] = slot.area
            freeAreaCount += 1
        }
        freeSlots[freeSlotCount] = Int32(s)
        freeSlotCount += 1
        outstanding -= 1
        if Int32(s) == barrierSlot { barrierSlot = -1 }
    }

    /// The requests answered since the last push, timed by one clock read.
    private func recordLatencies() {
        guard answeredCount > 0, let clock else { return }
        let now = clock()
        for i in 0..<answeredCount {
            let taken = answeredTakenAt[i]
            statistics.latency.record(nanoseconds: now >= taken ? now - taken : 0)
        }
        answeredCount = 0
    }

    @inline(__always)
    private func respond(id: UInt64, operation: UInt8, status: Int16, record: Int32) {
        if status != BlkifStatus.okay { statistics.errors &+= 1 }
        if record >= 0, let journal {
            journal.recordAnswered(Int(record), responseIndex: ring.responseProducerPrivate, operation: operation,
                                   status: status)
            unpublished[unpublishedCount] = record
            unpublishedCount += 1
        }
        BlkifResponse(id: id, operation: operation, status: status).encode(to: ring.nextResponseSlot())
        ring.commitResponse()
    }
}

/// Bounce and descriptor pages kept by a caller that creates engine after
/// engine on one thread (a fuzzer: one per run) and hands each the same
/// store: under AddressSanitizer, mapping, poisoning and faulting in a fresh
/// multi-megabyte block per engine took most of a run. The pages keep the
/// last engine's bytes (an engine writes a bounce page before reading it).
/// One engine at a time: the next may be created once the last is gone.
public final class VbdEnginePageStore {
    private var block: UnsafeMutableRawPointer?
    private var capacity = 0

    public init() {}

    deinit { free(block) }

    func pages(_ count: Int) -> UnsafeMutableRawPointer {
        if count > capacity {
            free(block)
            block = allocatePages(count, what: "bounce pages")
            capacity = count
        }
        return block!
    }
}

/// Page-aligned heap memory: the page store's, where AddressSanitizer
/// fences the block (a fuzzer's engines share it).
func allocatePages(_ count: Int, what: String) -> UnsafeMutableRawPointer {
    var raw: UnsafeMutableRawPointer?
    let bytes = count * XenPage.size
    precondition(posix_memalign(&raw, XenPage.size, bytes) == 0, "out of memory for \(bytes) bytes of \(what)")
    return raw!
}

/// The private state of one request between taking it and answering it.
struct RequestSlot {
    enum Phase: UInt8 { case read, write, flush, discard, barrierWrite, barrier }
    var id: UInt64 = 0
    var operation: UInt8 = 0
    var phase: Phase = .read
    var sector: UInt64 = 0
    var segmentCount = 0
    var byteCount = 0
    /// The place of segment 0 (its segments, bounce pages and iovecs follow).
    var base: Int32 = 0
    /// The indirect area held, or -1 (a direct request).
    var area: Int32 = -1
    var copyFailed = false
    /// Some segment goes through a bounce page and a grant copy.
    var anyBounced = false
    /// The next slot served by the same merged storage operation, or -1.
    var nextInGroup: Int32 = -1
    /// The request's journal record, or -1 (no journal).
    var record: Int32 = -1
    /// The engine's clock when the request was taken (0: no clock).
    var takenAt: UInt64 = 0

    init() {}

    init(request r: ValidatedRequest) {
        id = r.id
        operation = r.operation
        sector = r.sector
        segmentCount = r.segmentCount
        byteCount = r.byteCount
        switch r.kind {
        case .read: phase = .read
        case .write: phase = .write
        case .flush: phase = .flush
        case .discard: phase = .discard
        case .barrier: phase = .barrier
        }
    }
}

extension VbdEngine {
    /// Online resize: requests from now on are checked against `sectors`,
    /// and so is the storage's own range check. Requests already taken
    /// keep the answer they were validated for, as Linux's blkback, which
    /// checks each request against the device's size when it takes it.
    public func resizeDisk(sectors: UInt64) {
        limits.sectors = sectors
        storage.sizeChanged(to: sectors * UInt64(Blkif.sectorSize))
    }
}
