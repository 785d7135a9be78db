import CXenBackSupport
import SystemSupport
import XenABI

/// What our netfront offers and does; each field is also what it publishes.
public struct NetFrontendOptions: Sendable {
    /// Use `event-channel-tx` + `event-channel-rx` when the backend offers
    /// `feature-split-event-channels`; else one `event-channel`.
    public var splitEventChannels = false
    /// Publish `feature-sg=1` (the backend may split a received frame over
    /// several rx buffers), and send frames over several tx requests when the
    /// backend offers `feature-sg` too.
    public var scatterGather = true
    /// Publish `feature-gso-tcpv4/6=1` (receive GSO super-frames), and send
    /// GSO (the TAP's TSO) when the backend offers it (and sg on both ends).
    public var gso = true
    /// False: never post rx buffers on our own (the pump, `connect`, and
    /// `receiveRaw` leave the rx ring empty; `postRxBuffers(_:)` still
    /// posts): tests that the backend drops without growing.
    public var postRxBuffers = true
    /// Queues (ring pairs) asked for: the frontend uses min(queues, the
    /// backend's `multi-queue-max-queues`, 1 when absent). With a TAP, the
    /// TAP must have at least that many queues; one pump thread serves each
    /// ring pair from TAP queue i, and TAP queues beyond the negotiated count
    /// are detached (TUNSETQUEUE) while connected.
    public var queues = 1
    /// Give the backend a control ring (`ctrl-ring-ref`, `event-channel-ctrl`)
    /// when it offers `feature-ctrl-ring`: receive-side hashing and the
    /// hash-to-queue table, set with `LoopbackNetFrontend.controlRequest`
    /// and its helpers.
    public var controlRing = false

    public init(splitEventChannels: Bool = false, scatterGather: Bool = true, gso: Bool = true, postRxBuffers: Bool = true,
                queues: Int = 1, controlRing: Bool = false) {
        self.splitEventChannels = splitEventChannels
        self.scatterGather = scatterGather
        self.gso = gso
        self.postRxBuffers = postRxBuffers
        self.queues = queues
        self.controlRing = controlRing
    }
}

/// The `feature-*` keys the backend published (read at its InitWait).
public struct BackendNetFeatures: Equatable, Sendable {
    public var rxCopy = false
    public var scatterGather = false
    public var gsoTCPv4 = false
    public var gsoTCPv6 = false
    public var ipv6ChecksumOffload = false
    public var splitEventChannels = false
    /// `multi-queue-max-queues` (1 when absent, malformed or 0).
    public var maxQueues = 1
    /// Whether the backend published `multi-queue-max-queues` at all: Linux
    /// netfront then writes `multi-queue-num-queues` even when it is 1.
    public var multiQueue = false
    /// `feature-ctrl-ring`: the backend takes a control ring.
    public var controlRing = false
    /// `feature-xdp-headroom`: the backend leaves room before received frames.
    public var xdpHeadroom = false
    public init() {}
}

/// What both ends agreed on for this connection.
public struct NetFrontendNegotiated: Equatable, Sendable {
    /// Two event channels (`event-channel-tx`/`-rx`) instead of one.
    public var splitEventChannels = false
    /// Frames we send may span several tx requests.
    public var txScatterGather = false
    /// We send TCPv4 / TCPv6 GSO (the TAP's TSO4 / TSO6 are on).
    public var txGSOTCPv4 = false
    public var txGSOTCPv6 = false
    /// IPv6 frames with a partial checksum go to the backend as
    /// NETTXF_csum_blank; without it we complete their checksum ourselves.
    public var txIPv6ChecksumOffload = false
    /// Queues (ring pairs) in use: min(options.queues, backend max), at least 1.
    public var queues = 1
    /// We gave the backend a control ring (asked for, and offered).
    public var controlRing = false
    public init() {}
}

/// Counters of one frontend since its last `connect`, as of the end of the
/// pump's last pass (or the last raw call). Raw tx slots are not frames:
/// the tx frame counters count what the pump sent. With several queues,
/// `LoopbackNetFrontend.statistics` is the sum over them and
/// `queueStatistics` has each queue's own.
public struct NetFrontendStatistics: Equatable, Sendable {
    /// Frames put on the tx ring, and their bytes (no virtio header).
    public var txFrames: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Of those, GSO super-frames (with a GSO extra slot).
    public var txGSOFrames: UInt64 = 0
    /// Tx responses other than OKAY and NULL (one per request of a failed frame).
    public var txErrors: UInt64 = 0
    /// Frames read from the TAP we could not send: too long (> 65535 bytes,
    /// or more than a page without scatter-gather), a GSO type the backend
    /// does not take, a bad virtio header.
    public var txDropped: UInt64 = 0
    /// IPv6 (or unparsable) frames whose partial checksum we completed
    /// because the backend cannot take it blank.
    public var txChecksumsCompleted: UInt64 = 0
    /// Well-formed frames received from the backend, and their bytes.
    public var rxFrames: UInt64 = 0
    public var rxBytes: UInt64 = 0
    public var rxGSOFrames: UInt64 = 0
    /// Received packets with an error status, a bad offset/length, a
    /// response id that is not the one we posted at that slot, too many
    /// slots, or a bad extra slot (each packet counted once).
    public var rxErrors: UInt64 = 0
    /// Well-formed frames we could not hand to the TAP: it refused them, or
    /// a partial-checksum or GSO frame whose headers we cannot parse (or
    /// whose GSO type does not match them).
    public var rxDropped: UInt64 = 0
    /// GSO frames that came without NETRXF_csum_blank: their TCP checksum
    /// field was reset to the pseudo-header sum, as Linux netfront does.
    public var rxGSOChecksumFixups: UInt64 = 0
    /// Well-formed frames that came with a hash extra (XEN_NETIF_EXTRA_TYPE_HASH).
    public var rxHashedFrames: UInt64 = 0
    /// Of those, frames whose hash is not what the settings we gave on the
    /// control ring give for their bytes: another hash type, another
    /// algorithm, another value, or a hash where none applies.
    public var rxHashMismatches: UInt64 = 0
    /// Well-formed frames that came with an XDP extra (the headroom we asked
    /// for with `xdp-headroom`), and frames whose first buffer's offset is
    /// not the headroom their extra names (0 without one).
    public var rxHeadroomFrames: UInt64 = 0
    public var rxHeadroomMismatches: UInt64 = 0
    /// Rx buffers posted since connect, and those posted and not answered yet.
    public var rxBuffersPosted: UInt64 = 0
    public var rxBuffersOutstanding: UInt64 = 0
    /// Responses that do not belong to anything in flight (a tx id we did
    /// not send; responses beyond what we posted).
    public var protocolErrors: UInt64 = 0
    /// Event channel notifications we sent, and event deliveries we took.
    public var notificationsSent: UInt64 = 0
    public var eventsReceived: UInt64 = 0
    /// Times the pump slept in poll (or found something at once).
    public var waits: UInt64 = 0
    public init() {}

    /// Field by field sum (for the totals over queues).
    public static func + (a: Self, b: Self) -> Self {
        var s = Self()
        s.txFrames = a.txFrames &+ b.txFrames
        s.txBytes = a.txBytes &+ b.txBytes
        s.txGSOFrames = a.txGSOFrames &+ b.txGSOFrames
        s.txErrors = a.txErrors &+ b.txErrors
        s.txDropped = a.txDropped &+ b.txDropped
        s.txChecksumsCompleted = a.txChecksumsCompleted &+ b.txChecksumsCompleted
        s.rxFrames = a.rxFrames &+ b.rxFrames
        s.rxBytes = a.rxBytes &+ b.rxBytes
        s.rxGSOFrames = a.rxGSOFrames &+ b.rxGSOFrames
        s.rxErrors = a.rxErrors &+ b.rxErrors
        s.rxDropped = a.rxDropped &+ b.rxDropped
        s.rxGSOChecksumFixups = a.rxGSOChecksumFixups &+ b.rxGSOChecksumFixups
        s.rxHashedFrames = a.rxHashedFrames &+ b.rxHashedFrames
        s.rxHashMismatches = a.rxHashMismatches &+ b.rxHashMismatches
        s.rxHeadroomFrames = a.rxHeadroomFrames &+ b.rxHeadroomFrames
        s.rxHeadroomMismatches = a.rxHeadroomMismatches &+ b.rxHeadroomMismatches
        s.rxBuffersPosted = a.rxBuffersPosted &+ b.rxBuffersPosted
        s.rxBuffersOutstanding = a.rxBuffersOutstanding &+ b.rxBuffersOutstanding
        s.protocolErrors = a.protocolErrors &+ b.protocolErrors
        s.notificationsSent = a.notificationsSent &+ b.notificationsSent
        s.eventsReceived = a.eventsReceived &+ b.eventsReceived
        s.waits = a.waits &+ b.waits
        return s
    }
}

/// One slot written verbatim by `pushTxSlots` (hostile-frontend tests).
public enum TxSlot: Sendable {
    case request(NetifTxRequest)
    case extra(NetifExtraInfo)
}

public enum NetFrontendError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The frontend directory has no `backend` key.
    case noBackend(frontendPath: String)
    /// The backend closed the device (its `error` key, or its state).
    case backendClosed(reason: String)
    /// The backend lacks a feature we cannot do without.
    case backendLacks(feature: String)
    case timeout(String)
    case notConnected
    case alreadyConnected
    /// A raw test hook was used on a frontend whose pump owns the rings.
    case pumpOwnsRings
    /// Out of rx buffers, ring slots, pages or grants.
    case noRoom(String)
    /// The TAP has fewer queues than the queues negotiated with the backend.
    case tapHasTooFewQueues(tap: String, has: Int, needs: Int)
    /// A control request on a connection without a control ring (not asked
    /// for in the options, or the backend lacks `feature-ctrl-ring`).
    case noControlRing
    /// A control response that does not answer the request (another id or type).
    case badControlResponse(String)

    public var description: String {
        switch self {
        case .noBackend(let p): "no backend key at \(p)"
        case .backendClosed(let r): "backend closed the device: \(r)"
        case .backendLacks(let f): "backend does not offer \(f)=1"
        case .timeout(let w): "timed out waiting for \(w)"
        case .notConnected: "not connected"
        case .alreadyConnected: "already connected"
        case .pumpOwnsRings: "raw hooks need a frontend without a TAP (the pump thread owns the rings)"
        case .noRoom(let w): "no room: \(w)"
        case .tapHasTooFewQueues(let t, let has, let needs):
            "TAP \(t) has \(has) queue(s) but \(needs) were negotiated with the backend (create it with queues: \(needs))"
        case .noControlRing: "no control ring (options.controlRing off, or the backend lacks feature-ctrl-ring)"
        case .badControlResponse(let w): "control response does not answer the request: \(w)"
        }
    }
}

/// The statistics, handed from the threads that own the rings (one per
/// queue) to readers.
final class StatisticsBox: @unchecked Sendable {  // `values` guarded by `lock`
    private let lock = PThreadMutex()
    private var values = [NetFrontendStatistics()]

    /// Zeroes the counters, for a connection of `queues` queues.
    func reset(queues: Int) { lock.withLock { values = Array(repeating: NetFrontendStatistics(), count: max(queues, 1)) } }
    func publish(_ s: NetFrontendStatistics, queue: Int = 0) {
        lock.withLock { if queue < values.count { values[queue] = s } }
    }
    /// The sum over queues.
    var snapshot: NetFrontendStatistics { lock.withLock { values.dropFirst().reduce(values[0], +) } }
    var perQueue: [NetFrontendStatistics] { lock.withLock { values } }
}

/// A flag one thread raises and another polls, without a lock.
final class StopFlag: @unchecked Sendable {  // one atomic word on the heap
    private let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    init() { word.initialize(to: 0) }
    deinit { word.deallocate() }
    func raise() { xb_store_release_u32(word, 1) }
    var isRaised: Bool { xb_load_acquire_u32(word) != 0 }
}
