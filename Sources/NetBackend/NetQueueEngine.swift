import Hypervisor
import NetworkPlumbing
import XenABI
import XenRing

/// The request path of one vif queue, top to bottom, with no thread, file,
/// clock, atomic or logger: tx chains from the guest become frames on the
/// TAP, frames from the TAP are copied into the buffers the guest posted on
/// its rx ring. The loop that owns the thread (`NetDataPlane`), or a test,
/// drives it with `step(_:now:)` and does what the result says.
///
/// `Tap` is a type parameter, not an existential, so the real loop's
/// per-frame read and write are direct calls. The grant table is called
/// once per batch and stays an existential.
public final class NetQueueEngine<Tap: TapPort> {
    let tap: Tap
    let grants: any GrantTableHandle
    let buffers: NetEngineBuffers
    var txRing: BackRing
    var rxRing: BackRing
    let frontendDomain: DomID
    let features: FrontendNetFeatures
    let multicastFilter: VifMulticastFilter
    let hashSettings: VifHashSettings?
    /// This pass's copy of `hashSettings`.
    var hashPolicy = RxHashPolicy()
    let queueIndex: Int
    let rxHeadroom: VifRxHeadroom
    /// This pass's headroom (read once a pass).
    var passHeadroom = 0
    /// Hands frames to the queue the guest's hash table names (nil: one
    /// queue, or no control ring).
    let steering: (any RxSteering)?
    var credit: CreditScheduler?
    let rxStallNanoseconds: Int

    // Tx batch state.
    var txCount = 0
    /// Packets of the batch before this one are written and answered.
    var txNext = 0
    var txCopyCount = 0
    var malformedInARow = 0
    /// Waiting for the credit scheduler's next refill (in `now`'s clock), or 0.
    var txBlockedUntil = 0

    // Rx pass state.
    var rxCount = 0
    var rxCopyCount = 0
    var rxTakenCount = 0
    /// A frame (in the spare rx buffer) waiting for the guest to post buffers.
    var rxHeldLength = 0
    /// The rx requests the held frame needs.
    var rxHeldSlots = 0
    /// The held frame came from another queue (it is not steered again).
    var rxHeldForwarded = false
    /// When rx started waiting for buffers (nil: not stalled).
    var rxStalledSince: Int?
    /// Stalled past the limit: drop frames until the guest posts buffers.
    var rxDropping = false
    var tapPolled = true
    /// A pass's first read of the TAP found nothing, and no wakeup has said
    /// otherwise since: passes run for tx alone (`.tick`) skip the read that would
    /// only say EAGAIN (a system call each, through Xen in a PV dom0), but
    /// for one in every `tapLookEvery`, so that frames arriving in a long
    /// tx burst (TCP's acknowledgements) wait a few passes at most.
    var tapFoundEmpty = false
    var passesWithoutTapLook = 0
    public static var tapLookEvery: Int { 4 }

    /// The pass being run: what the step will report.
    var result = NetEngineStep()
    var brokenReason: String?
    var drained = false

    /// Counters since the engine started; the loop publishes them.
    public internal(set) var statistics = NetStatistics()

    /// Attaches to the tx and rx rings the frontend initialised (one page
    /// each, already mapped), resuming at the responses they hold.
    /// `now` starts the credit scheduler's first period.
    public init(txRing: UnsafeMutableRawPointer, rxRing: UnsafeMutableRawPointer, grants: any GrantTableHandle, tap: Tap,
                configuration c: NetQueueConfiguration, buffers: NetEngineBuffers, now: Int,
                steering: (any RxSteering)? = nil) {
        self.tap = tap
        self.grants = grants
        self.buffers = buffers
        self.txRing = BackRing(attachingTo: txRing, pages: 1, entrySize: RingEntrySize.netifTx)
        self.rxRing = BackRing(attachingTo: rxRing, pages: 1, entrySize: RingEntrySize.netifRx)
        frontendDomain = c.frontendDomain
        features = c.frontend
        multicastFilter = c.multicastFilter
        hashSettings = c.hashSettings
        queueIndex = c.queueIndex
        rxHeadroom = c.rxHeadroom
        self.steering = steering
        rxStallNanoseconds = c.rxStallMilliseconds * 1_000_000
        if let r = c.rate {
            credit = CreditScheduler(bytesPerPeriod: r.bytes, periodMicroseconds: r.microseconds, now: now)
        }
    }

    /// Tx requests taken and not yet answered (waiting for credit).
    public var txRequestsInFlight: UInt32 { txRing.requestsInFlight }
    /// Rx requests taken and not yet answered (always 0 between steps).
    public var rxRequestsInFlight: UInt32 { rxRing.requestsInFlight }
    /// A frame from the TAP is waiting for rx buffers.
    public var holdsFrame: Bool { rxHeldLength > 0 }

    /// Runs one pass over both rings (or, for `.stop`, drains) at time `now`
    /// (nanoseconds, any monotonic origin, never going back).
    public func step(_ input: NetEngineInput, now: Int) -> NetEngineStep {
        result = NetEngineStep()
        if let brokenReason {
            result.outcome = .broken(brokenReason)
            result.pollTap = false
            return result
        }
        if input == .stop || drained {
            finishOnStop()
            drained = true
            result.outcome = .drained
            result.pollTap = false
            return result
        }
        if input != .tick { tapFoundEmpty = false }
        servicePass(now: now)
        result.pollTap = tapPolled
        result.deadline = deadline
        if let brokenReason {
            result.outcome = .broken(brokenReason)
            result.pollTap = false
            result.idle = true
            result.deadline = nil
        }
        return result
    }

    /// Moves frames both ways once; if neither ring nor the TAP had more to
    /// do, arms tx's req_event (rx's is armed while a frame is held).
    private func servicePass(now: Int) {
        let txMore = serviceTx(now: now)
        if brokenReason != nil { return }
        let rxMore = serviceRx(now: now)
        if brokenReason != nil { return }
        if txMore || rxMore {
            result.idle = false
            return
        }
        do throws(RingOverflow) {
            // Tx waiting on credit sleeps on the deadline, not on the guest.
            if txBlockedUntil == 0, try txRing.finalCheckForRequests() { result.idle = false }
        } catch {
            declareBroken("tx ring: \(error)")
        }
    }

    /// The earliest of the credit refill and the rx stall limit.
    private var deadline: Int? {
        var d: Int?
        if txBlockedUntil != 0 { d = txBlockedUntil }
        if rxHeldLength > 0, !rxDropping, let since = rxStalledSince {
            let stall = since &+ rxStallNanoseconds
            d = min(d ?? stall, stall)
        }
        return d
    }

    func declareBroken(_ reason: String) {
        guard brokenReason == nil else { return }
        brokenReason = "frontend dom\(frontendDomain) broke the netif protocol: \(reason)"
    }

    /// On stop: packets taken but not written (waiting for credit) are
    /// answered DROPPED, so the frontend gets every slot back. A held rx
    /// frame took no slot; it is dropped.
    private func finishOnStop() {
        while txNext < txCount {
            let p = buffers.txPackets[txNext]
            respondTx(p, status: p.status == NetifStatus.okay ? NetifStatus.dropped : p.status)
            txNext += 1
        }
        pushTxResponses()
        if rxHeldLength > 0 {
            rxHeldLength = 0
            statistics.rxDropped &+= 1
        }
    }

    func pushTxResponses() {
        if txRing.pushResponses() { result.notifyTx = true }
    }

    func pushRxResponses() {
        if rxRing.pushResponses() { result.notifyRx = true }
    }
}
