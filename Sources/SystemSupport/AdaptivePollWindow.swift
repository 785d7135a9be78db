/// How long a thread that just ran out of work keeps polling for more
/// before it sleeps, adapted to what polling wins, in the spirit of Linux's
/// hybrid block polling and NAPI's busy-poll budget: polling pays when the
/// next piece of work comes within the window (no wakeup, no notification),
/// and costs a whole window of CPU when it does not.
///
/// A value with no clock: the loop that polls feeds it what happened and
/// asks it for the next window, so tests check its decisions without timing.
/// - `found(afterNanoseconds:)`: the poll found work that long after it began.
///   The window grows at once to twice that (room for jitter), or drifts
///   down towards it by an eighth when it was larger.
/// - `expired()`: the whole window went by without work: halved, and 0 once
///   under `minimumWindowNanoseconds` (a window that short cannot win much).
/// - `woke(afterNanoseconds:)`: the thread slept (window 0 or expired) and
///   work came that long after the idle period began. Within the maximum a
///   window of twice that would have won: it grows to that. So a window shrunk
///   to 0 comes back when work returns to being back to back, with no probing.
/// - `preempted()`: the poll saw the clock jump by more than
///   `preemptionGapNanoseconds` between two looks, so the scheduler gave the
///   CPU to something else: the CPU is contended, and a spinning thread there
///   only takes time from the thread it waits for, or loses its slice (some
///   milliseconds) and answers late. A poll saves a wakeup, some
///   microseconds, so polling pays only while fewer than about one poll in
///   a thousand is preempted: no polling at all for the next
///   `holdOffIdlePeriods` idle periods (a sleeping thread is woken, and a
///   woken thread preempts a busy one at once); the hold-off grows fourfold
///   (up to `maximumHoldOffIdlePeriods`) when the poll before it came fewer
///   than `cleanPollsToRecover` clean polls after the last preemption, and
///   starts again from `initialHoldOffIdlePeriods` otherwise. A sleep in a
///   held-off period teaches the window nothing.
public struct AdaptivePollWindow: Sendable, Equatable {
    /// The configured window (`--poll-us`, `spinMicroseconds`); 0 disables polling.
    public let maximumNanoseconds: Int
    /// The window the next idle period gets unless held off.
    public private(set) var windowNanoseconds: Int
    /// Idle periods left with no polling (the CPU was contended).
    public private(set) var idlePeriodsHeldOff = 0
    /// How many idle periods the next preemption holds polling off for.
    public private(set) var holdOffIdlePeriods = Self.initialHoldOffIdlePeriods
    /// Polls since the last preemption that were not preempted.
    public private(set) var cleanPolls = Self.cleanPollsToRecover
    /// The current idle period was held off.
    private var heldOff = false

    public static let minimumWindowNanoseconds = 1_000
    /// More than a loop device's worker copying 1 MiB (a yield to the storage
    /// is not contention) and less than one CFS slice of a busy process.
    public static let preemptionGapNanoseconds = 250_000
    public static let initialHoldOffIdlePeriods = 64
    public static let maximumHoldOffIdlePeriods = 1 << 16
    public static let cleanPollsToRecover = 1024

    public init(maximumNanoseconds: Int) {
        self.maximumNanoseconds = max(maximumNanoseconds, 0)
        windowNanoseconds = self.maximumNanoseconds
    }

    /// The window of the idle period that begins now (0: sleep at once).
    public mutating func beginIdle() -> Int {
        guard maximumNanoseconds > 0 else { return 0 }
        heldOff = idlePeriodsHeldOff > 0
        if heldOff {
            idlePeriodsHeldOff -= 1
            return 0
        }
        return windowNanoseconds
    }

    public mutating func found(afterNanoseconds elapsed: Int) {
        let target = min(maximumNanoseconds, 2 * max(elapsed, 0) + Self.minimumWindowNanoseconds)
        if target > windowNanoseconds {
            windowNanoseconds = target
        } else {
            windowNanoseconds -= (windowNanoseconds - target) / 8
        }
        cleanPoll()
    }

    public mutating func expired() {
        windowNanoseconds /= 2
        if windowNanoseconds < Self.minimumWindowNanoseconds { windowNanoseconds = 0 }
        cleanPoll()
    }

    public mutating func woke(afterNanoseconds gap: Int) {
        guard !heldOff, maximumNanoseconds > 0, gap >= 0, gap <= maximumNanoseconds, gap > windowNanoseconds else { return }
        windowNanoseconds = min(maximumNanoseconds, max(2 * gap, Self.minimumWindowNanoseconds))
    }

    public mutating func preempted() {
        holdOffIdlePeriods = cleanPolls < Self.cleanPollsToRecover
            ? min(holdOffIdlePeriods * 4, Self.maximumHoldOffIdlePeriods) : Self.initialHoldOffIdlePeriods
        idlePeriodsHeldOff = holdOffIdlePeriods
        cleanPolls = 0
    }

    /// Whether the clock moved so far between two looks of a spin that the
    /// thread must have been descheduled.
    @inline(__always)
    public static func isPreemption(gapNanoseconds: Int) -> Bool { gapNanoseconds >= preemptionGapNanoseconds }

    private mutating func cleanPoll() {
        if cleanPolls < Self.cleanPollsToRecover { cleanPolls += 1 }
    }
}
