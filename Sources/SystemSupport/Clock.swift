import Glibc

/// CLOCK_MONOTONIC, for deadlines and latencies.
public enum MonotonicClock {
    @inline(__always)
    public static func nanoseconds() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    }

    @inline(__always)
    public static func seconds() -> Double { Double(nanoseconds()) / 1e9 }
}
