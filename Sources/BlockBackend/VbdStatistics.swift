import CXenBackSupport

/// Counters of one ring, kept by its data-plane thread, published to
/// status readers after each pass and to swift-metrics every 50 ms.
public struct VbdStatistics: Equatable, Sendable {
    public var requests: UInt64 = 0
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var flushes: UInt64 = 0
    public var discards: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Requests answered BLKIF_RSP_ERROR or EOPNOTSUPP.
    public var errors: UInt64 = 0
    /// Of those, the ones refused without being done, by reason.
    public var rejected = VbdRejections()
    /// How long the requests carried out took (with a clock; see `VbdEngine.clock`).
    public var latency = VbdLatencyHistogram()
    /// Gauges, as of the last push: requests taken off the ring and not yet
    /// answered, and grants kept mapped (feature-persistent).
    public var inFlight: UInt64 = 0
    public var persistentGrants: UInt64 = 0
    public init() {}
}

/// The published copy, readable from any thread. The data-plane thread
/// stores each counter atomically (no lock on its path); a reader may see
/// counters from two neighbouring publications, which is fine for status.
final class StatisticsBox: @unchecked Sendable {   // every field accessed atomically
    private static let fields = 8 + VbdRejections.count + VbdLatencyHistogram.bucketCount + 1 + 2
    private static let gaugeField = 8 + VbdRejections.count + VbdLatencyHistogram.bucketCount + 1
    private static let latencyField = 8 + VbdRejections.count
    private let counters = UnsafeMutablePointer<UInt64>.allocate(capacity: fields)

    init() { counters.initialize(repeating: 0, count: Self.fields) }
    deinit { counters.deallocate() }

    func publish(_ s: VbdStatistics) {
        xb_store_release_u64(counters, s.requests)
        xb_store_release_u64(counters + 1, s.reads)
        xb_store_release_u64(counters + 2, s.writes)
        xb_store_release_u64(counters + 3, s.flushes)
        xb_store_release_u64(counters + 4, s.discards)
        xb_store_release_u64(counters + 5, s.bytesRead)
        xb_store_release_u64(counters + 6, s.bytesWritten)
        xb_store_release_u64(counters + 7, s.errors)
        for i in 0..<VbdRejections.count { xb_store_release_u64(counters + 8 + i, s.rejected[VbdRejectionReason(rawValue: i)!]) }
        let latency = counters + Self.latencyField
        for i in 0..<VbdLatencyHistogram.bucketCount { xb_store_release_u64(latency + i, s.latency[i]) }
        xb_store_release_u64(latency + VbdLatencyHistogram.bucketCount, s.latency.sumNanoseconds)
        xb_store_release_u64(counters + Self.gaugeField, s.inFlight)
        xb_store_release_u64(counters + Self.gaugeField + 1, s.persistentGrants)
    }

    func read() -> VbdStatistics {
        var s = VbdStatistics()
        s.requests = xb_load_acquire_u64(counters)
        s.reads = xb_load_acquire_u64(counters + 1)
        s.writes = xb_load_acquire_u64(counters + 2)
        s.flushes = xb_load_acquire_u64(counters + 3)
        s.discards = xb_load_acquire_u64(counters + 4)
        s.bytesRead = xb_load_acquire_u64(counters + 5)
        s.bytesWritten = xb_load_acquire_u64(counters + 6)
        s.errors = xb_load_acquire_u64(counters + 7)
        for i in 0..<VbdRejections.count { s.rejected[VbdRejectionReason(rawValue: i)!] = xb_load_acquire_u64(counters + 8 + i) }
        let latency = counters + Self.latencyField
        for i in 0..<VbdLatencyHistogram.bucketCount { s.latency[i] = xb_load_acquire_u64(latency + i) }
        s.latency.sumNanoseconds = xb_load_acquire_u64(latency + VbdLatencyHistogram.bucketCount)
        s.inFlight = xb_load_acquire_u64(counters + Self.gaugeField)
        s.persistentGrants = xb_load_acquire_u64(counters + Self.gaugeField + 1)
        return s
    }
}
