import CXenBackSupport

/// Counters of one vif, summed over its queues.
public struct NetStatistics: Equatable, Sendable {
    /// Frames from the guest written to the TAP.
    public var txPackets: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Guest frames refused: malformed chains, failed grant copies,
    /// frames the TAP rejected (each answered NETIF_RSP_ERROR).
    public var txErrors: UInt64 = 0
    /// Of those, chains that broke netif's rules (the frontend's fault).
    public var txMalformed: UInt64 = 0
    /// Guest frames the TAP had no room for (NETIF_RSP_DROPPED).
    public var txDropped: UInt64 = 0
    /// Frames delivered into the guest's rx buffers.
    public var rxPackets: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Frames for the guest dropped here: no buffers posted for too long,
    /// too large for a frontend without scatter-gather, unusable offload.
    public var rxDropped: UInt64 = 0
    /// Of those, frames the frontend cannot take however many buffers it
    /// posts (too large without scatter-gather, an offload it did not ask
    /// for); the rest found no buffers posted.
    public var rxDroppedUnfit: UInt64 = 0
    /// Of `rxDropped`, multicast frames the guest's filter did not admit.
    public var rxDroppedFiltered: UInt64 = 0
    /// MCAST_ADD and MCAST_DEL requests carried out.
    public var multicastEdits: UInt64 = 0
    /// Frames for the guest handed to the queue its hash table names
    /// (the kernel gave them to another TAP queue).
    public var rxSteered: UInt64 = 0
    /// Of `rxDropped`, frames whose queue's inbox was full.
    public var rxDroppedSteering: UInt64 = 0
    /// Control-ring requests answered (queue 0 serves the control ring).
    public var controlRequests: UInt64 = 0
    /// Times the guest's frames waited for the rate limit's next refill
    /// (the vif's `rate`), and the waits' total length.
    public var txRateLimited: UInt64 = 0
    public var txRateLimitedNanoseconds: UInt64 = 0
    /// Rx buffers the guest granted that could not be written.
    public var rxErrors: UInt64 = 0
    /// Event-channel notifications sent to the guest (tx and rx ports
    /// counted apart when split), and wake-ups by its notifications (one
    /// per port delivered): the loop's counts, not the engine's.
    public var notificationsSent: UInt64 = 0
    public var eventsReceived: UInt64 = 0
    /// Times the loop waited in epoll (went to sleep, or found events at once).
    public var waits: UInt64 = 0
    public init() {}

    public func adding(_ o: NetStatistics) -> NetStatistics {
        var s = self
        s.txPackets &+= o.txPackets; s.txBytes &+= o.txBytes; s.txErrors &+= o.txErrors
        s.txMalformed &+= o.txMalformed; s.txDropped &+= o.txDropped
        s.rxPackets &+= o.rxPackets; s.rxBytes &+= o.rxBytes; s.rxDropped &+= o.rxDropped; s.rxErrors &+= o.rxErrors
        s.notificationsSent &+= o.notificationsSent; s.eventsReceived &+= o.eventsReceived; s.waits &+= o.waits
        s.rxDroppedUnfit &+= o.rxDroppedUnfit
        s.rxDroppedFiltered &+= o.rxDroppedFiltered; s.multicastEdits &+= o.multicastEdits
        s.txRateLimited &+= o.txRateLimited; s.txRateLimitedNanoseconds &+= o.txRateLimitedNanoseconds
        s.rxSteered &+= o.rxSteered; s.rxDroppedSteering &+= o.rxDroppedSteering; s.controlRequests &+= o.controlRequests
        return s
    }
}

/// The published copy of a queue's counters: the data-plane thread stores
/// each one atomically (no lock on its path); readers on other threads may
/// see one pass's counters partly updated, never torn values.
final class NetStatisticsBox: @unchecked Sendable {   // every field accessed atomically
    private static let fields = 20
    private let counters = UnsafeMutablePointer<UInt64>.allocate(capacity: fields)

    init() { counters.initialize(repeating: 0, count: Self.fields) }
    deinit { counters.deallocate() }

    func publish(_ s: NetStatistics) {
        xb_store_release_u64(counters, s.txPackets)
        xb_store_release_u64(counters + 1, s.txBytes)
        xb_store_release_u64(counters + 2, s.txErrors)
        xb_store_release_u64(counters + 3, s.txMalformed)
        xb_store_release_u64(counters + 4, s.txDropped)
        xb_store_release_u64(counters + 5, s.rxPackets)
        xb_store_release_u64(counters + 6, s.rxBytes)
        xb_store_release_u64(counters + 7, s.rxDropped)
        xb_store_release_u64(counters + 8, s.rxErrors)
        xb_store_release_u64(counters + 9, s.notificationsSent)
        xb_store_release_u64(counters + 10, s.eventsReceived)
        xb_store_release_u64(counters + 11, s.waits)
        xb_store_release_u64(counters + 12, s.rxDroppedUnfit)
        xb_store_release_u64(counters + 13, s.txRateLimited)
        xb_store_release_u64(counters + 14, s.txRateLimitedNanoseconds)
        xb_store_release_u64(counters + 15, s.rxDroppedFiltered)
        xb_store_release_u64(counters + 16, s.multicastEdits)
        xb_store_release_u64(counters + 17, s.rxSteered)
        xb_store_release_u64(counters + 18, s.rxDroppedSteering)
        xb_store_release_u64(counters + 19, s.controlRequests)
    }

    func read() -> NetStatistics {
        var s = NetStatistics()
        s.txPackets = xb_load_acquire_u64(counters)
        s.txBytes = xb_load_acquire_u64(counters + 1)
        s.txErrors = xb_load_acquire_u64(counters + 2)
        s.txMalformed = xb_load_acquire_u64(counters + 3)
        s.txDropped = xb_load_acquire_u64(counters + 4)
        s.rxPackets = xb_load_acquire_u64(counters + 5)
        s.rxBytes = xb_load_acquire_u64(counters + 6)
        s.rxDropped = xb_load_acquire_u64(counters + 7)
        s.rxErrors = xb_load_acquire_u64(counters + 8)
        s.notificationsSent = xb_load_acquire_u64(counters + 9)
        s.eventsReceived = xb_load_acquire_u64(counters + 10)
        s.waits = xb_load_acquire_u64(counters + 11)
        s.rxDroppedUnfit = xb_load_acquire_u64(counters + 12)
        s.txRateLimited = xb_load_acquire_u64(counters + 13)
        s.txRateLimitedNanoseconds = xb_load_acquire_u64(counters + 14)
        s.rxDroppedFiltered = xb_load_acquire_u64(counters + 15)
        s.multicastEdits = xb_load_acquire_u64(counters + 16)
        s.rxSteered = xb_load_acquire_u64(counters + 17)
        s.rxDroppedSteering = xb_load_acquire_u64(counters + 18)
        s.controlRequests = xb_load_acquire_u64(counters + 19)
        return s
    }
}
