import BlockStorage
import CXenBackSupport
import Glibc
import Hypervisor
import Logging
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
    /// After the ring goes idle, keep looking for new requests up to this long
    /// before sleeping on the event channel (0: sleep at once). Saves the
    /// frontend's notification and our wakeup when requests come back to
    /// back; the window actually polled is `AdaptivePollWindow`'s.
    public var pollMicroseconds: Int
    /// Both ends agreed on feature-persistent: keep data pages mapped.
    public var persistentGrants: Bool
    /// The ring's journal file (nil: none).
    public var journalPath: String?
    /// A restarted daemon takes over a connected ring: recover from the
    /// journal. Otherwise the journal starts empty.
    public var resuming = false
    /// The frontend's ABI (`protocol`): the ring's slot layout.
    public var ringProtocol: BlkifProtocol = .x86_64
    public init(frontendDomain: DomID, ringRefs: [GrantRef], remotePort: EventChannelPort, limits: DiskLimits,
                pollMicroseconds: Int = 0, persistentGrants: Bool = false) {
        self.frontendDomain = frontendDomain; self.ringRefs = ringRefs
        self.remotePort = remotePort; self.limits = limits; self.pollMicroseconds = pollMicroseconds
        self.persistentGrants = persistentGrants
    }
}

/// The data plane of one blkif ring: one OS thread with an epoll loop over
/// the ring's event channel, the storage's completion fd and a wakeup,
/// driving the ring's `VbdEngine` (which holds the whole request path). It
/// owns what the engine must not: the ring mapping and the event channel,
/// the thread, the poll window, stopping, and publishing the counters.
public final class VbdDataPlane: @unchecked Sendable {   // thread-confined after start(); control touches only stop flag + stats box
    private let name: String
    private let logger: Logger
    private let storage: any BlockStorage
    private let grants: any GrantTableHandle
    private let events: any EventChannelHandle
    private let mapping: GrantMapping
    private let engine: VbdEngine
    private let localPort: EventChannelPort
    private let pollNanoseconds: Int
    /// The idle-poll window, adapted to what polling wins (thread-confined).
    private var pollWindow: AdaptivePollWindow
    /// When the ring last went idle before a poll (0: not idle).
    private var idleSince = 0
    private let epoll: Int32
    private let wakeup: Wakeup
    private let onFatal: @Sendable (String) -> Void

    // Refused requests: the first few logged one by one, then a count at
    // most every `rejectionSummarySeconds` (a hostile guest must not flood
    // the log); every one is counted by reason in the statistics.
    static let rejectionsLoggedInFull = 10
    static let rejectionSummarySeconds = 10
    private var rejectionsLogged = 0
    private var rejectionsNotLogged: UInt64 = 0
    private var lastRejectionSummary = 0

    /// Allocated last in init: a throwing init runs no deinit, and memory
    /// taken before a refusal leaked once per failed connect (found by the
    /// xenbus fuzz target).
    private let stopFlag: UnsafeMutablePointer<UInt32>
    /// The disk's size in sectors as the control thread last set it
    /// (online resize); the loop applies it to the engine before a pass.
    private let diskSectors: UnsafeMutablePointer<UInt64>
    private var thread: NativeThread?

    // Statistics: status and /metrics see every pass's counters (atomic
    // stores, no lock, nothing else on this thread).
    private var publishedStats = VbdStatistics()
    private let statsBox = StatisticsBox()

    /// The most segments an indirect request may have here.
    public static let indirectSegmentsLimit = VbdEngine.indirectSegmentsLimit
    private enum Token: UInt64 { case eventChannel = 1, storage = 2, wakeup = 3 }

    /// Maps the ring, binds the event channel and creates the engine (which
    /// allocates every buffer the ring will ever need). Throws, releasing
    /// what it took, if any step fails.
    public init(name: String, platform: any HypervisorPlatform, storage: any BlockStorage,
                configuration c: VbdRingConfiguration, logger: Logger,
                onFatal: @escaping @Sendable (String) -> Void) throws(HypervisorError) {
        self.name = name
        self.logger = logger
        self.storage = storage
        self.pollNanoseconds = c.pollMicroseconds * 1000
        self.pollWindow = AdaptivePollWindow(maximumNanoseconds: c.pollMicroseconds * 1000)
        self.onFatal = onFatal
        let pageCount = c.ringRefs.count
        guard [1, 2, 4, 8, 16].contains(pageCount) else {
            throw HypervisorError("map ring", errno: EINVAL, detail: "\(pageCount) ring pages")
        }
        guard (0...VbdEngine.indirectSegmentsLimit).contains(c.limits.maxIndirectSegments) else {
            throw HypervisorError("map ring", errno: EINVAL, detail: "\(c.limits.maxIndirectSegments) indirect segments")
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
            throw HypervisorError("eventfd", errno: error.code)
        }
        do {
            epoll = try Syscall.epollCreate()
        } catch {
            wakeup.close()
            try? events.unbind(localPort)
            events.close()
            grants.unmap(mapping)
            throw HypervisorError(error.call, errno: error.code)
        }
        // Everything taken so far, given back when a later step fails.
        let releaseTaken = { [epoll, wakeup, events, localPort, grants, mapping] in
            Glibc.close(epoll)
            wakeup.close()
            try? events.unbind(localPort)
            events.close()
            grants.unmap(mapping)
        }
        for (fd, token) in [(events.fileDescriptor, Token.eventChannel), (storage.completionFileDescriptor, .storage),
                            (wakeup.fd, .wakeup)]
            where fd >= 0 {   // no descriptor (-1): a test double that completes or signals at once
            do {
                try Syscall.epollAdd(epoll, fd, events: xb_EPOLLIN, token: token.rawValue)
            } catch {
                releaseTaken()
                throw HypervisorError(error.call, errno: error.code, detail: "cannot watch the \(token) descriptor")
            }
        }
        var journal: VbdRingJournal?
        if let path = c.journalPath {
            do {
                try makeDirectories(String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)]), mode: 0o700)
                journal = try VbdRingJournal.open(file: path, ringSlots: SharedRingLayout.slots(pages: pageCount,
                                                                                                entrySize: Blkif.slotSize))
            } catch {
                // Served without: only a kill -9 of this daemon could then
                // repeat or lose an answer.
                logger.error("no ring journal: a restart after a kill may repeat or miss answers",
                             metadata: ["reason": "\(error)"])
            }
        }
        do {
            engine = try VbdEngine(ring: mapping.address, pages: pageCount, frontendDomain: c.frontendDomain, grants: grants,
                                   storage: storage, limits: c.limits, persistentGrants: c.persistentGrants,
                                   journal: journal, identity: Self.identity(c), recover: c.resuming,
                                   ringProtocol: c.ringProtocol)
        } catch {
            releaseTaken()
            throw HypervisorError("mmap", errno: error.code, detail: "no memory for the ring's bounce pages")
        }
        if c.resuming, journal != nil {
            if engine.recovered {
                logger.notice("ring resumed from its journal", metadata: ["requestsToRunAgain": "\(engine.requestsToReplay)"])
            } else {
                logger.warning("ring journal missing or not this ring's: resuming at rsp_prod")
            }
        }
        stopFlag = .allocate(capacity: 1)
        stopFlag.initialize(to: 0)
        diskSectors = .allocate(capacity: 1)
        diskSectors.initialize(to: c.limits.sectors)

        engine.beforePush = { [unowned self] in self.publishStatistics($0) }
        engine.clock = { UInt64(MonotonicClock.nanoseconds()) }
    }

    /// Names this ring (domain, grant references, port): a journal written
    /// for another ring is never replayed on this one.
    static func identity(_ c: VbdRingConfiguration) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ v: UInt64) { h = (h ^ v) &* 0x0000_0100_0000_01b3 }
        mix(UInt64(c.frontendDomain))
        mix(UInt64(c.remotePort))
        for r in c.ringRefs { mix(UInt64(r)) }
        return h
    }

    deinit {
        if thread == nil { releaseResources() }
        stopFlag.deallocate()
        diskSectors.deallocate()
    }

    public var ringSlots: Int { engine.ringSlots }
    /// Indirect requests that may be in flight at once (0: not offered).
    public var indirectAreas: Int { engine.indirectAreas }
    public var ringPages: Int { mapping.pageCount }
    public var statistics: VbdStatistics { statsBox.read() }

    public func start() throws(HypervisorError) {
        do {
            thread = try NativeThread(name: "vbd-\(name)") { [self] in self.run() }
        } catch {
            throw HypervisorError("start data plane thread", errno: error.code)
        }
    }

    /// Online resize, from the control thread: requests the ring takes
    /// from the next pass on are checked against `sectors`. Call before
    /// the frontend is told, so that it never sends a request the ring
    /// would still refuse.
    public func resizeDisk(sectors: UInt64) {
        xb_store_release_u64(diskSectors, sectors)
        wakeup.signal()
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
        engine.releaseMappings()
        grants.unmap(mapping)
        Glibc.close(epoll)
        wakeup.close()
    }

    // MARK: the loop

    private func run() {
        let tokens = UnsafeMutablePointer<UInt64>.allocate(capacity: 4)
        let evs = UnsafeMutablePointer<UInt32>.allocate(capacity: 4)
        defer { tokens.deallocate(); evs.deallocate() }
        var reported = false
        var stopSent = false
        // Requests may already be waiting (a reconnect, or a fast frontend).
        var input = VbdEngineInput.kicked
        while true {
            if !stopSent && xb_load_acquire_u32(stopFlag) != 0 {
                // A readiness of the storage seen with the stop is not lost:
                // the stop step reaps as any step does.
                stopSent = true
                input = .stop
            }
            let sectors = xb_load_acquire_u64(diskSectors)
            if sectors != engine.limits.sectors { engine.resizeDisk(sectors: sectors) }
            let s = engine.step(input, armIfIdle: pollNanoseconds == 0)
            if s.notify { notifyFrontend() }
            if engine.hasRejections { logRejections() }
            if !reported, let breach = engine.breach {
                reported = true
                onFatal(breach)
            }
            input = .kicked
            switch s.wait {
            case .drained:
                publishStatistics(engine.statistics)
                logRejections(final: true)
                return
            case .busy:
                continue
            case .ringEmpty:
                if pollForWork() { continue }
                let armed = engine.step(.kicked, armIfIdle: true)
                if armed.notify { notifyFrontend() }
                if armed.wait != .idle {
                    idleSince = 0
                    continue
                }
            case .idle, .storage:
                break
            }
            // Nothing to do until a wakeup.
            let n = xb_epoll_wait(epoll, tokens, evs, 4, -1)
            wokeAfterIdle()
            for i in 0..<Int(max(n, 0)) {
                switch tokens[i] {
                case Token.eventChannel.rawValue: drainEventChannel()
                case Token.wakeup.rawValue: wakeup.drain()
                default: input = .storageReady
                }
            }
        }
    }

    private func logRejections(final: Bool = false) {
        let unkept = engine.takeRejections { r in
            guard rejectionsLogged < Self.rejectionsLoggedInFull else {
                rejectionsNotLogged &+= 1
                return
            }
            rejectionsLogged += 1
            logger.warning("refused a request", metadata: [
                "reason": "\(r.reason)", "id": "\(r.id)", "operation": "\(r.operation)", "sector": "\(r.sector)",
            ])
        }
        rejectionsNotLogged &+= unkept
        guard rejectionsNotLogged > 0 else { return }
        let now = Int(MonotonicClock.nanoseconds() / 1_000_000_000)
        guard final || now - lastRejectionSummary >= Self.rejectionSummarySeconds else { return }
        lastRejectionSummary = now
        logger.warning("refused more requests", metadata: [
            "count": "\(rejectionsNotLogged)",
            "byReasonSinceStart": "\(engine.statistics.rejected.named.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))",
        ])
        rejectionsNotLogged = 0
    }

    /// This handle binds one port, which stays masked from its delivery
    /// to its unmask: one pending read per wakeup finds it, and a second
    /// read would only say "nothing" (a system call per wakeup for
    /// nothing). Anything left keeps the level-triggered epoll readable.
    private func drainEventChannel() {
        if let port = try? events.nextPending() { try? events.unmask(port) }
    }

    @inline(__always)
    private func notifyFrontend() { try? events.notify(localPort) }

    /// Busy-polls the engine for new requests or completions for up to the
    /// window `pollWindow` gives this idle period, and tells it what came of
    /// it. After the first microseconds it yields the CPU every few turns:
    /// a thread waiting for this CPU gets it (the guest's, whose next request
    /// we wait for; a loop device's worker), and a busy process there takes
    /// it for its whole slice, which shows as a jump of the clock between two
    /// looks: the CPU is contended, stop at once.
    private func pollForWork() -> Bool {
        idleSince = MonotonicClock.nanoseconds()
        let window = pollWindow.beginIdle()
        guard window > 0 else { return false }
        let start = idleSince
        var last = start
        var spins = 0
        while true {
            if engine.hasWork() {
                pollWindow.found(afterNanoseconds: last - start)
                idleSince = 0
                return true
            }
            spins += 1
            if spins & 15 == 0 {
                if last - start >= Self.pureSpinNanoseconds { sched_yield() }
                if xb_load_acquire_u32(stopFlag) != 0 { return false }
                let now = MonotonicClock.nanoseconds()
                if AdaptivePollWindow.isPreemption(gapNanoseconds: now - last) {
                    pollWindow.preempted()
                    return false
                }
                last = now
                if now - start >= window {
                    pollWindow.expired()
                    return false
                }
            }
        }
    }

    /// How long a poll spins before it starts yielding: what fast storage
    /// and a polling frontend answer within.
    static let pureSpinNanoseconds = 5_000

    /// After a sleep that followed an idle poll: how soon work came back.
    private func wokeAfterIdle() {
        guard idleSince != 0 else { return }
        pollWindow.woke(afterNanoseconds: MonotonicClock.nanoseconds() - idleSince)
        idleSince = 0
    }

    // MARK: statistics

    /// For `xenbackd status` and /metrics, which read the box (the
    /// metrics exporter turns its totals into counters at each scrape).
    private func publishStatistics(_ stats: VbdStatistics) {
        guard stats != publishedStats else { return }
        statsBox.publish(stats)
        publishedStats = stats
    }
}
