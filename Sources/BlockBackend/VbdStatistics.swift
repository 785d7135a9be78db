import SystemSupport

/// Counters of one ring, kept by its data-plane thread and published to
/// readers (status, metrics) at most every few milliseconds.
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
    public init() {}
}

/// The published copy, readable from any thread.
final class StatisticsBox: @unchecked Sendable {   // `value` guarded by `lock`
    private let lock = PThreadMutex()
    private var value = VbdStatistics()
    func publish(_ s: VbdStatistics) { lock.withLock { value = s } }
    func read() -> VbdStatistics { lock.withLock { value } }
}
