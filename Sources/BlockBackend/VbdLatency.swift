/// How long requests took, from the pass that took them off the ring to the
/// push of their responses, counted in fixed buckets on the ring's thread.
/// A tuple, not an array: it lives in `VbdStatistics`, which is copied and
/// compared on every pass, and must not allocate.
public struct VbdLatencyHistogram: Equatable, Sendable {
    /// Each bucket's upper bound in nanoseconds; the last bucket has none.
    public static let upperBoundsNanoseconds: [UInt64] = [
        50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
        10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000, 1_000_000_000,
    ]
    public static let bucketCount = 14

    private var counts: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                         UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) =
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    /// The sum of every recorded duration.
    public var sumNanoseconds: UInt64 = 0

    public init() {}

    /// Requests whose duration fell in bucket `i` (not cumulative).
    public subscript(_ i: Int) -> UInt64 {
        get { withUnsafeBytes(of: counts) { $0.load(fromByteOffset: i * 8, as: UInt64.self) } }
        set { withUnsafeMutableBytes(of: &counts) { $0.storeBytes(of: newValue, toByteOffset: i * 8, as: UInt64.self) } }
    }

    public var count: UInt64 {
        var n: UInt64 = 0
        for i in 0..<Self.bucketCount { n &+= self[i] }
        return n
    }

    @inline(__always)
    mutating func record(nanoseconds t: UInt64) {
        // A ladder of the bounds above: no array on the ring's path.
        let i: Int
        if t <= 1_000_000 {
            i = t <= 50_000 ? 0 : t <= 100_000 ? 1 : t <= 250_000 ? 2 : t <= 500_000 ? 3 : 4
        } else if t <= 50_000_000 {
            i = t <= 2_500_000 ? 5 : t <= 5_000_000 ? 6 : t <= 10_000_000 ? 7 : t <= 25_000_000 ? 8 : 9
        } else {
            i = t <= 100_000_000 ? 10 : t <= 250_000_000 ? 11 : t <= 1_000_000_000 ? 12 : 13
        }
        self[i] &+= 1
        sumNanoseconds &+= t
    }

    func adding(_ o: VbdLatencyHistogram) -> VbdLatencyHistogram {
        var s = self
        for i in 0..<Self.bucketCount { s[i] &+= o[i] }
        s.sumNanoseconds &+= o.sumNanoseconds
        return s
    }

    /// Field by field, as `VbdRejections` does: compared on every pass.
    public static func == (a: VbdLatencyHistogram, b: VbdLatencyHistogram) -> Bool {
        a.sumNanoseconds == b.sumNanoseconds && a.counts.0 == b.counts.0 && a.counts.1 == b.counts.1
            && a.counts.2 == b.counts.2 && a.counts.3 == b.counts.3 && a.counts.4 == b.counts.4
            && a.counts.5 == b.counts.5 && a.counts.6 == b.counts.6 && a.counts.7 == b.counts.7
            && a.counts.8 == b.counts.8 && a.counts.9 == b.counts.9 && a.counts.10 == b.counts.10
            && a.counts.11 == b.counts.11 && a.counts.12 == b.counts.12 && a.counts.13 == b.counts.13
    }
}
