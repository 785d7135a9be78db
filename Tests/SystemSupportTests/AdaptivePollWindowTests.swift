import SystemSupport
import Testing

@Suite("AdaptivePollWindow: the idle-poll window follows what polling wins and stops on a contended CPU")
struct AdaptivePollWindowTests {
    @Test("a maximum of 0 never polls, whatever it is told")
    func disabled() {
        var w = AdaptivePollWindow(maximumNanoseconds: 0)
        w.woke(afterNanoseconds: 10)
        w.found(afterNanoseconds: 10)
        #expect(w.beginIdle() == 0)
        #expect(w.windowNanoseconds == 0)
    }

    @Test("it starts at the maximum; each expired window halves it, down to 0 under a microsecond")
    func expiredHalves() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        var seen: [Int] = []
        for _ in 0..<8 {
            seen.append(w.beginIdle())
            w.expired()
        }
        #expect(seen == [50_000, 25_000, 12_500, 6_250, 3_125, 1_562, 0, 0])
    }

    @Test("a window shrunk to 0 comes back when work returns soon after the sleep, not when it comes late")
    func wokeRestores() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        for _ in 0..<7 { _ = w.beginIdle(); w.expired() }
        #expect(w.beginIdle() == 0)
        w.woke(afterNanoseconds: 60_000)   // beyond the maximum: no window would have won
        #expect(w.beginIdle() == 0)
        w.woke(afterNanoseconds: 12_000)   // a 24 µs window would have
        #expect(w.beginIdle() == 24_000)
        w.woke(afterNanoseconds: 40_000)   // clamped to the maximum
        #expect(w.windowNanoseconds == 50_000)
        w.woke(afterNanoseconds: 3_000)    // smaller than the window: nothing to learn
        #expect(w.windowNanoseconds == 50_000)
    }

    @Test("a win grows the window to twice its wait at once and shrinks it by an eighth of the excess")
    func foundTracks() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        for _ in 0..<3 { _ = w.beginIdle(); w.expired() }      // 6,250
        _ = w.beginIdle()
        w.found(afterNanoseconds: 5_000)                        // 2 × 5,000 + 1,000
        #expect(w.windowNanoseconds == 11_000)
        w.found(afterNanoseconds: 30_000)                       // clamped
        #expect(w.windowNanoseconds == 50_000)
        w.found(afterNanoseconds: 0)                            // target 1,000: 50,000 - 49,000 / 8
        #expect(w.windowNanoseconds == 43_875)
    }

    @Test("quiet and back to back: every idle period polls the whole maximum while polls win early")
    func quietStaysOpen() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        for _ in 0..<1000 {
            #expect(w.beginIdle() > 0)
            w.found(afterNanoseconds: 20_000)
        }
        #expect((41_000..<41_008).contains(w.windowNanoseconds))   // integer steps stop within 7 ns
    }

    @Test("a preemption holds polling off for 64 idle periods, then the old window comes back")
    func preemptionHoldsOff() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        #expect(w.beginIdle() == 50_000)
        w.preempted()
        for _ in 0..<64 {
            #expect(w.beginIdle() == 0)
            w.woke(afterNanoseconds: 2_000)   // held off: teaches nothing
        }
        #expect(w.windowNanoseconds == 50_000)
        #expect(w.beginIdle() == 50_000)
    }

    @Test("preempted again and again, the hold-off grows fourfold to its cap; after 1024 clean polls it starts over")
    func holdOffBacksOff() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        var polls = 0
        for _ in 0..<200_000 {
            if w.beginIdle() > 0 {
                polls += 1
                w.preempted()
            }
        }
        // Held off 64, 256, 1024, 4096, 16384, then 65536 periods at a time.
        #expect(polls == 8)
        #expect(w.holdOffIdlePeriods == AdaptivePollWindow.maximumHoldOffIdlePeriods)
        for _ in 0..<AdaptivePollWindow.maximumHoldOffIdlePeriods { _ = w.beginIdle() }
        for _ in 0..<1023 { w.found(afterNanoseconds: 1_000) }
        w.preempted()   // one clean poll short: still contended
        #expect(w.holdOffIdlePeriods == AdaptivePollWindow.maximumHoldOffIdlePeriods)
        for _ in 0..<1024 { w.expired() }
        w.preempted()
        #expect(w.holdOffIdlePeriods == AdaptivePollWindow.initialHoldOffIdlePeriods)
    }

    @Test("a quiet machine's rare preemption (one poll in 2000) costs 64 idle periods each time, never more")
    func rarePreemptionStaysCheap() {
        var w = AdaptivePollWindow(maximumNanoseconds: 50_000)
        var polls = 0
        for period in 0..<100_000 {
            guard w.beginIdle() > 0 else { continue }
            polls += 1
            if polls % 2000 == 0 {
                w.preempted()
                #expect(w.idlePeriodsHeldOff == 64, "period \(period)")
            } else {
                w.found(afterNanoseconds: 2_000)
            }
        }
        #expect(polls == 100_000 - 48 * 64)   // 48 preemptions, 64 periods each
    }

    @Test("a clock jump of a quarter millisecond between two looks is a preemption; a storage worker's turn is not")
    func preemptionGap() {
        #expect(AdaptivePollWindow.isPreemption(gapNanoseconds: 250_000))
        #expect(AdaptivePollWindow.isPreemption(gapNanoseconds: 4_000_000))
        #expect(!AdaptivePollWindow.isPreemption(gapNanoseconds: 100_000))
        #expect(!AdaptivePollWindow.isPreemption(gapNanoseconds: 0))
    }
}
