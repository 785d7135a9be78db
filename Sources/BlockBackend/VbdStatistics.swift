import Glibc

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
final class StatisticsBox: @unchecked Sendable {   // guarded by `lock`
    private var lock = pthread_mutex_t()
    private var value = VbdStatistics()
    init() { pthread_mutex_init(&lock, nil) }
    deinit { pthread_mutex_destroy(&lock) }
    func publish(_ s: VbdStatistics) {
        pthread_mutex_lock(&lock); value = s; pthread_mutex_unlock(&lock)
    }
    func read() -> VbdStatistics {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        return value
    }
}
