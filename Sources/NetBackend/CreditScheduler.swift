import XenBus
/// The guest's transmit rate limit (the vif's `rate` key, "BYTES,USEC":
/// at most BYTES every USEC microseconds), as netback's credit scheduler
/// does it: a budget refilled once per period, with unused credit carried
/// over up to a burst cap so that a frame larger than one period's credit
/// still goes out, just later.
public struct CreditScheduler: Equatable, Sendable {
    public let bytesPerPeriod: UInt64
    public let periodNanoseconds: Int
    /// Carry-over limit: the larger of one period's credit and 128 KiB
    /// (two maximal GSO frames).
    public let burstBytes: UInt64
    public private(set) var remaining: UInt64
    public private(set) var nextRefill: Int

    public init(bytesPerPeriod: UInt64, periodMicroseconds: UInt64, now: Int) {
        self.bytesPerPeriod = bytesPerPeriod
        periodNanoseconds = Int(min(periodMicroseconds, UInt64(Int.max / 1000))) * 1000
        burstBytes = max(bytesPerPeriod, 131_072)
        remaining = bytesPerPeriod
        nextRefill = now &+ periodNanoseconds
    }

    /// Parses libxl's `rate` value "BYTES,USEC" (both positive integers).
    public static func parseRate(_ text: String) -> (bytes: UInt64, microseconds: UInt64)? {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false)
        guard parts.count == 2, let b = XenStoreNumber.parse(parts[0], as: UInt64.self),
              let u = XenStoreNumber.parse(parts[1], as: UInt64.self), b > 0, u > 0, u <= 3_600_000_000 else {
            return nil
        }
        return (b, u)
    }

    /// Takes `bytes` of credit if there is enough now (refilling first if a
    /// period has passed); false means wait until `nextRefill`.
    public mutating func consume(_ bytes: Int, now: Int) -> Bool {
        if now >= nextRefill {
            let periods = UInt64((now - nextRefill) / periodNanoseconds) + 1
            let (credit, overflow) = bytesPerPeriod.multipliedReportingOverflow(by: periods)
            remaining = overflow ? burstBytes : min(remaining &+ credit, max(burstBytes, remaining))
            nextRefill = nextRefill &+ Int(periods) * periodNanoseconds
        }
        guard UInt64(bytes) <= remaining else { return false }
        remaining -= UInt64(bytes)
        return true
    }
}
