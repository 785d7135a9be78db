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

/// CLOCK_REALTIME, for times people read (when a device last failed).
public enum WallClock {
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
