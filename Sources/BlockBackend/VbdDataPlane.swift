import BlockStorage
import CXenBackSupport
import Glibc
import Hypervisor
import Logging
import Metrics
import XenABI
import XenRing
import SystemSupport

/// Where one ring lives and what the disk behind it accepts.
public struct VbdRingConfiguration: Sendable {
    public var frontendDomain: DomID
    public var ringRefs: [GrantRef]
    /// The frontend's unbound port, from its `event-channel` key.
    public var remotePort: EventChannelPort
    public var limits: DiskLimits
    /// After the ring goes idle, keep looking for new requests this long
    /// before sleeping on the event channel (0: sleep at once). Saves the
    /// frontend's notification and our wakeup when requests come back to back.
    public var pollMicroseconds: Int
    /// Both ends agreed on feature-persistent: keep data pages mapped.
    public var persistentGrants: Bool
    public init(frontendDomain: DomID, ringRefs: [GrantRef], remotePort: EventChannelPort, limits: DiskLimits,
                pollMicroseconds: Int = 0, persistentGrants: Bool = false) {
        self.frontendDomain = frontendDomain; self.ringRefs = ringRefs
        self.remotePort = remotePort; self.limits = limits; self.pollMicroseconds = pollMicroseconds
        self.persistentGrants = persistentGrants
    }
}

/// The data plane of one blkif ring: one OS thread with an epoll loop over
/// the ring's event channel and the storage's completion fd. It takes
/// requests, validates private copies, copies write data out of granted
/// pages, submits one storage batch per pass, copies read data back and
/// answers. After start, everything below runs on that thread only; the
/// hot path does not allocate, lock or log.
public final class VbdDataPlane: @unchecked Sendable {   // thread-confined after start(); control touches only stop flag + stats box
    // Resources, set up on the control thread.
    private let name: String
    private let logger: Logger
    private let storage: any BlockStorage
    private let grants: any GrantTableHandle
    private let events: any EventChannelHandle
    private let mapping: GrantMapping
    private var ring: BackRing
    private let localPort: EventChannelPort
    private let frontendDomain: DomID
    private let limits: DiskLimits
    private let pollNanoseconds: Int
    private let usePersistentGrants: Bool
    private var persistent: PersistentGrants
    private let epoll: Int32
    private let wakeup: Wakeup
    private let onFatal: @Sendable (String) -> Void

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
    private var outstanding = 0
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
    static let minimumIovecsPerMerge = 128
    private let scratch: UnsafeMutableRawPointer

    // Life cycle.
    private let stopFlag = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    private var stopping = false
    /// epoll saw the storage's completion fd readable since the last reap.
    private var storageSignalled = false
    private var broken = false
    private var thread: NativeThread?

    // Statistics.
    private var stats = VbdStatistics()
    private var publishedStats = VbdStatistics()
    private let statsBox = StatisticsBox()
    private var lastPublish = timespec()
    private let requestCounter: Counter
    private let errorCounter: Counter
    private let readBytesCounter: Counter
    private let writeBytesCounter: Counter

    static let maxSegments = Blkif.maxSegmentsPerRequest
    /// The most segments an indirect request may have here (Linux blkback's
    /// MAX_INDIRECT_SEGMENTS): one request's iovecs stay well below IOV_MAX
    /// (1024) even when two merge, and one descriptor page holds them all.
    public static let indirectSegmentsLimit = 256
    /// Bounce pages of the indirect areas of one ring (16 MiB): the areas
    /// are as many as the ring's slots or as this allows, at least one.
    static let indirectBouncePages = 4096
    private enum Token: UInt64 { case eventChannel = 1, storage = 2, wakeup = 3 }

    /// Maps the ring, binds the event channel and allocates every buffer the
    /// ring will ever need. Throws (releasing what it took) if any step fails.
    public init(name: String, platform: any HypervisorPlatform, storage: any BlockStorage,
                configuration c: VbdRingConfiguration, logger: Logger,
                onFatal: @escaping @Sendable (String) -> Void) throws(HypervisorError) {
        self.name = name
        self.logger = logger
        self.storage = storage
        self.frontendDomain = c.frontendDomain
        self.limits = c.limits
        self.pollNanoseconds = c.pollMicroseconds * 1000
        self.usePersistentGrants = c.persistentGrants
        self.onFatal = onFatal
        let pageCount = c.ringRefs.count
        guard [1, 2, 4, 8, 16].contains(pageCount) else {
            throw HypervisorError("map ring", errno: EINVAL, detail: "\(pageCount) ring pages")
        }
        grants = try platform.openGrantTable()
        mapping = try grants.map(domain: c.frontendDomain, refs: c.ringRefs, writable: true)
        do {
            events = try platform.openEventChannels()
        } catch {
            grants.unmap(mapping)
            throw error
        }
        do {
            localPort = try events.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: c.remotePort)
        } catch {
            events.close()
            grants.unmap(mapping)
            throw error
        }
        do {
            wakeup = try Wakeup()
        } catch {
            try? events.unbind(localPort)
            events.close()
            grants.unmap(mapping)
            throw HypervisorError("eventfd", errno: error.errno)
        }
        ring = BackRing(attachingTo: mapping.address, pages: pageCount, entrySize: Blkif.slotSize)
        slotCount = Int(ring.size)
        precondition((0...Self.indirectSegmentsLimit).contains(c.limits.maxIndirectSegments),
                     "max indirect segments \(c.limits.maxIndirectSegments) is outside 0...\(Self.indirectSegmentsLimit)")
        indirectSegments = c.limits.maxIndirectSegments
        areaCount = indirectSegments == 0 ? 0 : min(slotCount, max(1, Self.indirectBouncePages / indirectSegments))
        descriptorPagesPerArea = Blkif.indirectPages(segments: indirectSegments)
        placeCount = slotCount * Self.maxSegments + areaCount * indirectSegments

        slots = .allocate(capacity: slotCount)
        slots.initialize(repeating: RequestSlot(), count: slotCount)
        pages = Self.allocatePages(placeCount, what: "bounce pages")
        iovecs = .allocate(capacity: placeCount)
        iovecs.initialize(repeating: iovec(), count: placeCount)
        segments = .allocate(capacity: placeCount)
        segments.initialize(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0), count: placeCount)
        bounced = .allocate(capacity: placeCount)
        bounced.initialize(repeating: false, count: placeCount)
        freeSlots = .allocate(capacity: slotCount)
        for i in 0..<slotCount { freeSlots[i] = Int32(slotCount - 1 - i) }
        freeSlotCount = slotCount
        descriptors = Self.allocatePages(max(1, areaCount * descriptorPagesPerArea), what: "indirect descriptor pages")
        freeAreas = .allocate(capacity: max(1, areaCount))
        for i in 0..<areaCount { freeAreas[i] = Int32(areaCount - 1 - i) }
        freeAreaCount = areaCount
        pendingIndirect = .allocate(capacity: max(1, areaCount))
        inFlight = InFlightIDs(capacity: slotCount)
        // As many pages as the ring can have in flight (data and descriptor
        // pages): what a frontend reuses.
        let pagesInFlight = placeCount + areaCount * descriptorPagesPerArea
        persistent = PersistentGrants(capacity: c.persistentGrants ? pagesInFlight : 0)
        copies = .allocate(capacity: pagesInFlight)
        copyOwners = .allocate(capacity: pagesInFlight)
        copyOutSlots = .allocate(capacity: slotCount)
        submissions = .allocate(capacity: slotCount * 2)
        iovecsPerMerge = max(Self.minimumIovecsPerMerge, 2 * indirectSegments)
        mergedIovecs = .allocate(capacity: slotCount * iovecsPerMerge)
        scratch = .allocate(byteCount: Blkif.slotSize, alignment: 16)
        stopFlag.initialize(to: 0)

        epoll = xb_epoll_create()
        precondition(epoll >= 0, "epoll_create failed: \(errno)")
        _ = xb_epoll_add(epoll, events.fileDescriptor, xb_EPOLLIN, Token.eventChannel.rawValue)
        _ = xb_epoll_add(epoll, storage.completionFileDescriptor, xb_EPOLLIN, Token.storage.rawValue)
        _ = xb_epoll_add(epoll, wakeup.fd, xb_EPOLLIN, Token.wakeup.rawValue)

        let dims: [(String, String)] = [("device", name)]
        requestCounter = Counter(label: "xenbackd_vbd_requests_total", dimensions: dims)
        errorCounter = Counter(label: "xenbackd_vbd_errors_total", dimensions: dims)
        readBytesCounter = Counter(label: "xenbackd_vbd_read_bytes_total", dimensions: dims)
        writeBytesCounter = Counter(label: "xenbackd_vbd_written_bytes_total", dimensions: dims)
    }

    /// Page-aligned memory (grant copy targets, O_DIRECT buffers); pages
    /// never touched cost address space only.
    private static func allocatePages(_ count: Int, what: String) -> UnsafeMutableRawPointer {
        var raw: UnsafeMutableRawPointer?
        let bytes = count * XenPage.size
        precondition(posix_memalign(&raw, XenPage.size, bytes) == 0, "out of memory for \(bytes) bytes of \(what)")
        return raw!
    }

    deinit {
        if thread == nil { releaseResources() }
        slots.deallocate()
        free(pages)
        iovecs.deallocate()
        segments.deallocate()
        bounced.deallocate()
        free(descriptors)
        freeAreas.deallocate()
        pendingIndirect.deallocate()
        freeSlots.deallocate()
        copies.deallocate()
        copyOwners.deallocate()
        copyOutSlots.deallocate()
        submissions.deallocate()
        mergedIovecs.deallocate()
        scratch.deallocate()
        stopFlag.deallocate()
    }

    public var ringSlots: Int { slotCount }
    /// Indirect requests that may be in flight at once (0: not offered).
    public var indirectAreas: Int { areaCount }
    public var ringPages: Int { mapping.pageCount }
    public var statistics: VbdStatistics { statsBox.read() }

    public func start() throws(HypervisorError) {
        do {
            thread = try NativeThread(name: "vbd-\(name)") { [self] in self.run() }
        } catch {
            throw HypervisorError("start data plane thread", errno: error.errno)
        }
    }

    /// Stops taking requests, completes and answers every one in flight,
    /// unbinds and unmaps. Blocks until the thread is gone. Idempotent.
    public func stop() {
        xb_store_release_u32(stopFlag, 1)
        wakeup.signal()
        if let t = thread {
            t.join()
            thread = nil
            releaseResources()
        }
    }

    private var released = false
    private func releaseResources() {
        guard !released else { return }
        released = true
        try? events.unbind(localPort)
        events.close()
        persistent.unmapAll(grants)
        grants.unmap(mapping)
        Glibc.close(epoll)
        wakeup.close()
    }

    // MARK: the loop

    private func run() {
        let tokens = UnsafeMutablePointer<UInt64>.allocate(capacity: 4)
        let evs = UnsafeMutablePointer<UInt32>.allocate(capacity: 4)
        defer { tokens.deallocate(); evs.deallocate() }
        // Requests may already be waiting (a reconnect, or a fast frontend).
        service()
        while true {
            let n = xb_epoll_wait(epoll, tokens, evs, 4, -1)
            for i in 0..<Int(max(n, 0)) {
                switch tokens[i] {
                case Token.eventChannel.rawValue: drainEventChannel()
                case Token.wakeup.rawValue: wakeup.drain()
                default: storageSignalled = true   // reaped (and reset) in service()
                }
            }
            if !stopping && xb_load_acquire_u32(stopFlag) != 0 { stopping = true }
            service()
            if (stopping || broken) && outstanding == 0 { break }
        }
        if ring.pushResponses() { notifyFrontend() }
        publishStatistics(force: true)
    }

    private func drainEventChannel() {
        while let port = try? events.nextPending() {
            try? events.unmask(port)
        }
    }

    @inline(__always)
    private func notifyFrontend() { try? events.notify(localPort) }

    /// One pass: reap, take, submit, answer; repeat until the ring is idle.
    private func service() {
        while true {
            // Reset the eventfd only after epoll reported it; while the loop
            // spins, the cheap check suffices.
            reapCompletions(polling: !storageSignalled)
            storageSignalled = false
            if !stopping && !broken && barrierSlot < 0 { takeRequests() }
            startBarrierIfDrained()
            // Fast storage (page cache, tmpfs) often finishes inside io_submit:
            // answer at once rather than after another wakeup. A completed
            // barrier write queues its flush: submit that too.
            repeat {
                submitBatch()
                if outstanding > 0 { reapCompletions(polling: true) }
            } while submissionCount > backlogCount
            // Counters first, so a frontend that sees a response sees it counted.
            publishStatistics(force: false)
            if ring.pushResponses() { notifyFrontend() }
            // Taking stopped for a barrier or for want of an indirect area:
            // a completion wakes us to go on.
            if stopping || broken || barrierSlot >= 0 || areasExhausted { return }
            do throws(RingOverflow) {
                if try ring.unconsumedRequests() > 0 { continue }
                if pollNanoseconds > 0, try pollForWork() { continue }
                if try !ring.finalCheckForRequests() { return }
            } catch {
                declareBroken(error)
                return
            }
        }
    }

    /// Busy-polls the ring for new requests, and the storage for
    /// completions, for up to the poll window. With requests in flight it
    /// yields the CPU on every turn: the storage may need it (a loop
    /// device's worker thread, an interrupt's bottom half).
    private func pollForWork() throws(RingOverflow) -> Bool {
        let deadline = MonotonicClock.nanoseconds() + pollNanoseconds
        var spins = 0
        while true {
            if try ring.unconsumedRequests() > 0 { return true }
            if outstanding > 0 && reapCompletions(polling: true) > 0 { return true }
            spins += 1
            if spins & 15 == 0 {
                if outstanding > 0 { sched_yield() }
                if xb_load_acquire_u32(stopFlag) != 0 || MonotonicClock.nanoseconds() >= deadline { return false }
            }
        }
    }

    private func declareBroken(_ overflow: RingOverflow) {
        guard !broken else { return }
        broken = true
        onFatal("frontend dom\(frontendDomain) broke the ring protocol: \(overflow)")
    }

    // MARK: taking requests

    /// Every indirect area holds a request: the next request, which may be
    /// indirect, waits on the ring.
    @inline(__always)
    private var areasExhausted: Bool { areaCount > 0 && freeAreaCount == 0 }

    private func takeRequests() {
        let available: UInt32
        do { available = try ring.unconsumedRequests() } catch {
            declareBroken(error)
            return
        }
        var taken: UInt32 = 0
        while taken < available && barrierSlot < 0 && !areasExhausted {
            ring.takeRequest(into: scratch)
            taken += 1
            stats.requests &+= 1
            switch validateBlkifRequest(UnsafeRawPointer(scratch), limits: limits) {
            case .failure(let rejection):
                let id = scratch.load(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
                respond(id: id, operation: responseOperation(UnsafeRawPointer(scratch), limits: limits),
                        status: rejection.status)
            case .success(let request):
                accept(request)
            }
        }
        if pendingIndirectCount > 0 { startIndirectRequests() }
    }

    private func accept(_ r: ValidatedRequest) {
        guard inFlight.insert(r.id) else {
            // A second request with an id already in flight: refuse it alone.
            respond(id: r.id, operation: r.operation, status: BlkifStatus.error)
            return
        }
        freeSlotCount -= 1
        let s = Int(freeSlots[freeSlotCount])
        outstanding += 1
        slots[s] = RequestSlot(request: r)
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
        for i in 0..<r.segmentCount { segments[base + i] = r.segments[i] }
        switch r.kind {
        case .read:
            queueStorage(slot: s, kind: .read)
        case .write:
            queueStorage(slot: s, kind: .write)
        case .flush:
            queueStorage(slot: s, kind: .flush)
        case .discard(let sectors):
            submissions[submissionCount] = StorageOperation(
                tag: UInt64(s), kind: .discard, offset: r.sector * UInt64(Blkif.sectorSize),
                length: sectors * UInt64(Blkif.sectorSize))
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
                finish(slot: s, status: BlkifStatus.error)
                continue
            }
            let area = descriptors + Int(slots[s].area) * descriptorPagesPerArea * XenPage.size
            switch validateIndirectSegments(area, count: slots[s].segmentCount, sector: slots[s].sector, limits: limits,
                                            into: segments + Int(slots[s].base)) {
            case .failure:
                finish(slot: s, status: BlkifStatus.error)
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
                finish(slot: s, status: BlkifStatus.error)
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
              Int(head.iovecCount + op.iovecCount) <= iovecsPerMerge else { return false }
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
        // Read data goes back to the guest in one batch of copies.
        guard copyCount > 0 else { return reaped }
        runCopies()
        for i in 0..<copyOutCount {
            let s = Int(copyOutSlots[i])
            finish(slot: s, status: slots[s].copyFailed ? BlkifStatus.error : BlkifStatus.okay)
        }
        copyOutCount = 0
        return reaped
    }

    /// One finished storage operation: a merged one completes every slot of its chain.
    private func completeOperation(_ c: StorageCompletion) {
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
            stats.bytesRead &+= UInt64(slot.byteCount)
            let base = Int(slot.base)
            for p in base..<base + slot.segmentCount where bounced[p] {
                queueCopy(place: p, owner: s, direction: .toGuest)
            }
            copyOutSlots[copyOutCount] = Int32(s)
            copyOutCount += 1
        case .barrierWrite where ok:
            stats.bytesWritten &+= UInt64(slot.byteCount)
            slots[s].phase = .flush
            queueStorage(slot: s, kind: .flush)
        default:
            if ok && slot.phase == .write { stats.bytesWritten &+= UInt64(slot.byteCount) }
            if ok && slot.phase == .read { stats.bytesRead &+= UInt64(slot.byteCount) }
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
        let slot = slots[s]
        switch slot.operation {
        case BlkifOperation.read: stats.reads &+= 1
        case BlkifOperation.write, BlkifOperation.writeBarrier: stats.writes &+= 1
        case BlkifOperation.flushDiskCache: stats.flushes &+= 1
        default: stats.discards &+= 1
        }
        respond(id: slot.id, operation: slot.operation, status: status)
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

    @inline(__always)
    private func respond(id: UInt64, operation: UInt8, status: Int16) {
        if status != BlkifStatus.okay { stats.errors &+= 1 }
        BlkifResponse(id: id, operation: operation, status: status).encode(to: ring.nextResponseSlot())
        ring.commitResponse()
    }

    // MARK: statistics

    /// Status sees every pass's counters (atomic stores, no lock); the
    /// metrics backend, which may lock, gets the deltas every 50 ms.
    private func publishStatistics(force: Bool) {
        guard stats != publishedStats else { return }
        statsBox.publish(stats)
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
        let elapsedMs = (now.tv_sec - lastPublish.tv_sec) * 1000 + (now.tv_nsec - lastPublish.tv_nsec) / 1_000_000
        guard force || elapsedMs >= 50 else { return }
        lastPublish = now
        requestCounter.increment(by: Int64(stats.requests &- publishedStats.requests))
        errorCounter.increment(by: Int64(stats.errors &- publishedStats.errors))
        readBytesCounter.increment(by: Int64(stats.bytesRead &- publishedStats.bytesRead))
        writeBytesCounter.increment(by: Int64(stats.bytesWritten &- publishedStats.bytesWritten))
        publishedStats = stats
    }
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
