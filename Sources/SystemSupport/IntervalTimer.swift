import CXenBackSupport
import Glibc

/// A descriptor that becomes readable every `milliseconds` (a timerfd), for
/// an event loop's periodic work; `acknowledge` after each readiness.
/// Closed when the last reference goes: the loop's handler holds it.
public final class IntervalTimer: @unchecked Sendable {   // the descriptor is immutable; reads are the loop's
    public let fileDescriptor: Int32

    public init(milliseconds: UInt32) throws(SystemError) {
        let fd = xb_interval_timer(milliseconds)
        guard fd >= 0 else { throw SystemError("timerfd_create", errno: errno) }
        fileDescriptor = fd
    }

    /// Reads the expiry count (missed periods fold into one).
    public func acknowledge() {
        var expirations: UInt64 = 0
        _ = read(fileDescriptor, &expirations, MemoryLayout<UInt64>.size)
    }

    deinit { Glibc.close(fileDescriptor) }
}
