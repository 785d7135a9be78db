import CXenBackSupport
import Glibc
import Hypervisor
import Logging
import NetworkPlumbing
import SystemSupport
import XenABI

/// The loop of one vif queue: one OS thread with an epoll loop over the
/// queue's event channel(s), its TAP queue and a wakeup, driving a
/// `NetQueueEngine` (which holds the whole request path) and doing what
/// each step asks: notify the guest, stop or resume polling the TAP, sleep
/// until a deadline. It owns the mappings, ports, clock, stop flag and
/// the statistics published to `status` and swift-metrics. Nothing here
/// allocates, locks or logs per frame. After start everything below runs
/// on that thread only.
public final class NetDataPlane: @unchecked Sendable {   // thread-confined after start(); control touches only stop flag + stats box
    private let name: String
    private let logger: Logger
    private let tap: TapQueue
    private let grants: any GrantTableHandle
    private let events: any EventChannelHandle
    private let txMapping: GrantMapping
    private let rxMapping: GrantMapping
    private let txPort: EventChannelPort
    private let rxPort: EventChannelPort
    private let engine: NetQueueEngine<BatchingTapQueue>
    /// Queue 0 of a vif whose guest gave a control ring also serves it.
    private let control: NetControlEngine?
    private let controlMapping: GrantMapping?
    private let controlPort: EventChannelPort?
    /// Frames other queues steer to this one (a vif with a control ring
    /// and several queues).
    private let steering: QueueSteering?
    /// The credit scheduler needs a fine clock; otherwise the coarse one
    /// (a few ns, where CLOCK_MONOTONIC cost 8% of a busy queue's time in
    /// profiles on this VM's clocksource) is plenty for the rx stall limit.
    private let preciseClock: Bool
    private let epoll: Int32
    private let wakeup: Wakeup
    private let onFatal: @Sendable (String) -> Void

    // Life cycle.
    /// Allocated last in init: a throwing init runs no deinit (see VbdDataPlane).
    private let stopFlag: UnsafeMutablePointer<UInt32>
    private var thread: NativeThread?
    private var tapPolled = true

    private var publishedStats = NetStatistics()
    private var notificationsSent: UInt64 = 0
    private var controlRequests: UInt64 = 0
    private var eventsReceived: UInt64 = 0
    private var waits: UInt64 = 0
    private let statsBox = NetStatisticsBox()

    private enum Token: UInt64 { case eventChannel = 1, tap = 2, wakeup = 3, inbox = 4 }

    /// A vif's control ring (netif.h's ctrl-ring-ref, event-channel-ctrl).
    public struct ControlRing: Sendable {
        public var ringRef: GrantRef
        public var remotePort: EventChannelPort
        public var settings: VifHashSettings
        public init(ringRef: GrantRef, remotePort: EventChannelPort, settings: VifHashSettings) {
            self.ringRef = ringRef; self.remotePort = remotePort; self.settings = settings
        }
    }

    /// Maps both rings, binds the event channel(s) and allocates every
    /// buffer. Throws (releasing what it took) if any step fails.
    public init(name: String, platform: any HypervisorPlatform, tap: TapQueue, configuration c: NetQueueConfiguration,
                control controlRing: ControlRing? = nil, steering: QueueSteering? = nil,
                logger: Logger, onFatal: @escaping @Sendable (String) -> Void) throws(HypervisorError) {
        self.name = name
        self.logger = logger
        self.tap = tap
        self.onFatal = onFatal
        self.steering = steering
        grants = try platform.openGrantTable()
        var mapped: [GrantMapping] = []
        do {
            mapped.append(try grants.map(domain: c.frontendDomain, refs: [c.txRingRef], writable: true))
            mapped.append(try grants.map(domain: c.frontendDomain, refs: [c.rxRingRef], writable: true))
            if let controlRing {
                mapped.append(try grants.map(domain: c.frontendDomain, refs: [controlRing.ringRef], writable: true))
            }
        } catch {
            for m in mapped { grants.unmap(m) }
            throw error
        }
        txMapping = mapped[0]
        rxMapping = mapped[1]
        controlMapping = mapped.count > 2 ? mapped[2] : nil
        var bound: [EventChannelPort] = []
        let channels: any EventChannelHandle
        do {
            channels = try platform.openEventChannels()
        } catch {
            for m in mapped { grants.unmap(m) }
            throw error
        }
        do {
            bound.append(try channels.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: c.txRemotePort))
            if c.splitEventChannels {
                bound.append(try channels.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: c.rxRemotePort))
            }
            if let controlRing {
                bound.append(try channels.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: controlRing.remotePort))
            }
            wakeup = try Self.makeWakeup()
        } catch {
            for p in bound { try? channels.unbind(p) }
            channels.close()
            for m in mapped { grants.unmap(m) }
            throw error
        }
        events = channels
        txPort = bound[0]
        rxPort = c.splitEventChannels ? bound[1] : bound[0]
        controlPort = controlRing == nil ? nil : bound.last
        control = controlRing.map { [grants] r in
            NetControlEngine(ring: mapped[2].address, grants: grants, frontendDomain: c.frontendDomain, settings: r.settings)
        }
        preciseClock = c.rate != nil
        // Everything taken so far, given back when a later step fails.
        let releaseTaken = { [wakeup, grants] in
            wakeup.close()
            for p in bound { try? channels.unbind(p) }
            channels.close()
            for m in mapped { grants.unmap(m) }
        }
        let buffers: NetEngineBuffers
        do { buffers = try NetEngineBuffers() } catch {
            releaseTaken()
            throw HypervisorError("mmap", errno: error.code, detail: "no memory for the queue's frame buffers")
        }
        do {
            epoll = try Syscall.epollCreate()
        } catch {
            releaseTaken()
            throw HypervisorError(error.call, errno: error.code)
        }
        for (fd, token) in [(channels.fileDescriptor, Token.eventChannel), (tap.fileDescriptor, .tap), (wakeup.fd, .wakeup),
                            (steering?.inboxDescriptor ?? -1, .inbox)]
            where fd >= 0 {   // no descriptor (-1): a test double that signals otherwise
            do {
                try Syscall.epollAdd(epoll, fd, events: xb_EPOLLIN, token: token.rawValue)
            } catch {
                Glibc.close(epoll)
                releaseTaken()
                throw HypervisorError(error.call, errno: error.code, detail: "cannot watch the \(token) descriptor")
            }
        }
        // Each pass's frames for the TAP go in one io_uring submission (one by one if io_uring is refused).
        let batching = BatchingTapQueue(tap)
        if let refusal = batching.uringRefusal {
            logger.notice("io_uring refused, frames to the TAP are written one by one", metadata: ["device": "\(name)", "reason": "\(refusal)"])
        }
        engine = NetQueueEngine(txRing: txMapping.address, rxRing: rxMapping.address, grants: grants, tap: batching,
                                configuration: c, buffers: buffers,
                                now: preciseClock ? MonotonicClock.nanoseconds() : Self.coarseNanoseconds(),
                                steering: steering)
        stopFlag = .allocate(capacity: 1)
        stopFlag.initialize(to: 0)
    }

    private static func makeWakeup() throws(HypervisorError) -> Wakeup {
        do { return try Wakeup() } catch { throw HypervisorError("eventfd", errno: error.code) }
    }

    deinit {
        if thread == nil { releaseResources() }
        stopFlag.deallocate()
    }

    public var statistics: NetStatistics { statsBox.read() }

    public func start() throws(HypervisorError) {
        do {
            thread = try NativeThread(name: "vif-\(name)") { [self] in self.run() }
        } catch {
            throw HypervisorError("start data plane thread", errno: error.code)
        }
    }

    /// Answers what was taken, unbinds and unmaps. Blocks until the thread
    /// is gone. Idempotent.
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
        try? events.unbind(txPort)
        if rxPort != txPort { try? events.unbind(rxPort) }
        if let controlPort { try? events.unbind(controlPort) }
        events.close()
        grants.unmap(rxMapping)
        grants.unmap(txMapping)
        if let controlMapping { grants.unmap(controlMapping) }
        Glibc.close(epoll)
        wakeup.close()
    }

    // MARK: the loop

    private func run() {
        let tokens = UnsafeMutablePointer<UInt64>.allocate(capacity: 4)
        let evs = UnsafeMutablePointer<UInt32>.allocate(capacity: 4)
        defer { tokens.deallocate(); evs.deallocate() }
        var now = clock()
        // Requests posted before this loop began (or before a restart) are answered first.
        serveControl()
        var step = engine.step(.kicked, now: now)
        while true {
            apply(step)
            if case .broken(let reason) = step.outcome {
                onFatal(reason)
                break
            }
            var input = NetEngineInput.tick
            // More work at once: step again without a system call, as long as
            // nobody asked to stop; epoll collects the kicks meanwhile.
            if step.idle {
                waits &+= 1
                let n = xb_epoll_wait(epoll, tokens, evs, 4, sleepMilliseconds(until: step.deadline))
                for i in 0..<Int(max(n, 0)) {
                    switch tokens[i] {
                    case Token.eventChannel.rawValue:
                        if drainEventChannel() { serveControl() }
                        if input == .tick { input = .kicked }
                    case Token.tap.rawValue, Token.inbox.rawValue:
                        // A pass serves both rings whatever woke it; this tells the engine the TAP has frames.
                        input = .tapReadable
                    default:
                        wakeup.drain()
                    }
                }
            }
            if xb_load_acquire_u32(stopFlag) != 0 {
                now = clock()
                apply(engine.step(.stop, now: now))
                break
            }
            now = clock()
            step = engine.step(input, now: now)
        }
        publishStatistics()
    }

    /// Counters first, so a frontend woken by the notification sees its
    /// responses counted.
    @inline(__always)
    private func apply(_ step: NetEngineStep) {
        publishStatistics()
        if step.notifyTx {
            try? events.notify(txPort)
            notificationsSent &+= 1
        }
        if step.notifyRx && (rxPort != txPort || !step.notifyTx) {
            try? events.notify(rxPort)
            notificationsSent &+= 1
        }
        if step.pollTap != tapPolled {
            tapPolled = step.pollTap
            _ = xb_epoll_mod(epoll, tap.fileDescriptor, tapPolled ? xb_EPOLLIN : 0, Token.tap.rawValue)
            if let steering {
                _ = xb_epoll_mod(epoll, steering.inboxDescriptor, tapPolled ? xb_EPOLLIN : 0, Token.inbox.rawValue)
            }
        }
    }

    /// Takes the delivered ports, then unmasks them. A delivered port stays
    /// masked, so it is not delivered again until its unmask: once every
    /// bound port has been read, one more read could only say "nothing"
    /// (a system call per wake-up, here and on Xen): it is not made. A
    /// port delivered again after its unmask keeps the descriptor readable
    /// for the next `epoll_wait`.
    /// True when the control port was among them.
    private func drainEventChannel() -> Bool {
        let bound = (rxPort == txPort ? 1 : 2) + (controlPort == nil ? 0 : 1)
        var taken = 0
        var controlFired = false
        while taken < bound, let port = try? events.nextPending() {
            taken += 1
            eventsReceived &+= 1
            if port == controlPort { controlFired = true }
            try? events.unmask(port)
        }
        return controlFired
    }

    /// Answers the control ring's requests; a broken control ring fails the vif.
    private func serveControl() {
        guard let control, let controlPort else { return }
        switch control.step() {
        case .idle(let notify):
            if notify {
                try? events.notify(controlPort)
                notificationsSent &+= 1
            }
            controlRequests = control.requestsAnswered
        case .broken(let reason):
            onFatal(reason)
        }
    }

    @inline(__always)
    private func clock() -> Int { preciseClock ? MonotonicClock.nanoseconds() : Self.coarseNanoseconds() }

    @inline(__always)
    private static func coarseNanoseconds() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
        return ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    }

    /// How long epoll may sleep: until the engine's deadline, or forever.
    private func sleepMilliseconds(until deadline: Int?) -> Int32 {
        guard let deadline else { return -1 }
        let remaining = deadline - clock()
        return remaining <= 0 ? 0 : Int32(min((remaining + 999_999) / 1_000_000, 60_000))
    }

    /// For `xenbackd status` and /metrics, which read the box (atomic
    /// stores, no lock).
    private func publishStatistics() {
        var stats = engine.statistics
        stats.notificationsSent = notificationsSent
        stats.eventsReceived = eventsReceived
        stats.waits = waits
        stats.controlRequests = controlRequests
        guard stats != publishedStats else { return }
        statsBox.publish(stats)
        publishedStats = stats
    }
}
