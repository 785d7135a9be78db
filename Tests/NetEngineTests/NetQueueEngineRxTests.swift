import EngineDoubles
import NetBackend
import NetworkPlumbing
import Testing
import XenABI

/// The rx half of the queue engine: frames queued on the TAP land in the
/// buffers the guest posted, with exact responses; too few buffers hold a
/// frame, stop polling the TAP and, past the stall limit, drop.
@Suite struct NetQueueEngineRxTests {
    static let ms = 1_000_000

    @Test func aFrameLandsInThePostedBufferWithItsFlags() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 1500, tcp: false)
        h.tap.queue(frame, header: VirtioNetHeader(flags: VirtioNetHeader.flagDataValid))
        h.grantPage(10)
        h.postRx([(id: 3, ref: 10)])
        let s = h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 3, offset: 0, flags: NetifRxFlags.dataValidated, status: 1500))])
        #expect(h.bytes(ofPage: 10, 0..<1500) == frame)
        #expect(h.bytes(ofPage: 10, 1500..<4096) == [UInt8](repeating: 0, count: 2596))
        #expect(s.notifyRx && !s.notifyTx && s.pollTap && s.idle)
        #expect(h.engine.statistics.rxPackets == 1 && h.engine.statistics.rxBytes == 1500)
    }

    @Test func aGSOFrameSpansBuffersWithItsExtraSecond() {
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true, gsoTCPv4: true))
        let frame = TestFrame.ipv4(length: 5000)
        h.tap.queue(frame, header: VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                                                    headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16))
        h.grantPage(10); h.grantPage(11); h.grantPage(12)
        h.postRx([(id: 1, ref: 10), (id: 2, ref: 11), (id: 3, ref: 12)])
        h.step(.tapReadable)
        let first = NetifRxFlags.csumBlank | NetifRxFlags.dataValidated | NetifRxFlags.extraInfo | NetifRxFlags.moreData
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 1, offset: 0, flags: first, status: 4096)),
                                    .gso(size: 1448, type: NetifGSOType.tcpv4),
                                    .data(NetifRxResponse(id: 3, offset: 0, flags: 0, status: 904))])
        #expect(h.bytes(ofPage: 10, 0..<4096) == Array(frame[0..<4096]))
        #expect(h.bytes(ofPage: 12, 0..<904) == Array(frame[4096...]))
        #expect(h.bytes(ofPage: 11, 0..<4096) == [UInt8](repeating: 0, count: 4096))   // the extra's buffer stays untouched
    }

    /// A TAP found empty is not read again by passes run for tx alone
    /// (`.tick`) but one in every `tapLookEvery`; a wakeup (`.kicked`,
    /// `.tapReadable`) reads it at once. A frame queued meanwhile is
    /// delivered within `tapLookEvery` passes.
    @Test func anEmptyTapIsNotReadByEveryPass() {
        let h = EngineHarness()
        h.grantPage(10); h.grantPage(11)
        h.postRx([(id: 1, ref: 10), (id: 2, ref: 11)])
        h.step(.kicked)
        let afterEmpty = h.tap.reads
        #expect(afterEmpty >= 1)
        let every = NetQueueEngine<InMemoryTap>.tapLookEvery
        for _ in 0..<(every - 1) { h.step(.tick) }
        #expect(h.tap.reads == afterEmpty, "tx-only passes skip the empty TAP")
        h.step(.tick)
        #expect(h.tap.reads == afterEmpty + 1, "but one pass in \(every) looks")
        h.step(.kicked)
        #expect(h.tap.reads == afterEmpty + 2, "a wakeup looks at once")
        let frame = TestFrame.ipv4(length: 200, tcp: false)
        h.tap.queue(frame)
        var passes = 0
        var delivered: [EngineHarness.RxAnswer] = []
        while delivered.isEmpty && passes < every {
            h.step(.tick)
            passes += 1
            delivered = h.rxResponses()
        }
        #expect(passes == every)
        #expect(delivered == [.data(NetifRxResponse(id: 1, offset: 0, flags: 0, status: 200))])
        h.tap.queue(frame)
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 2, offset: 0, flags: 0, status: 200))])
        // A pass that read frames before finding the TAP empty is a stream
        // still coming in: the next pass reads again.
        h.grantPage(12)
        h.postRx([(id: 3, ref: 12)])
        let beforeStream = h.tap.reads
        h.tap.queue(frame)
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 3, offset: 0, flags: 0, status: 200))])
        #expect(h.tap.reads == beforeStream + 2)
        h.step(.tick)
        #expect(h.tap.reads == beforeStream + 3)
    }

    @Test func aReadOnlyBufferIsAnsweredError() {
        let h = EngineHarness()
        h.tap.queue(TestFrame.ipv4(length: 60))
        h.grantPage(10, readOnly: true)
        h.postRx([(id: 4, ref: 10)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 4, offset: 0, flags: 0, status: NetifStatus.error))])
        #expect(h.bytes(ofPage: 10, 0..<60) == [UInt8](repeating: 0, count: 60))
        #expect(h.engine.statistics.rxErrors == 1)
    }

    @Test func tooFewBuffersHoldTheFrameThenTheStallDropsAfterTheLimit() {
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true), rxStallMilliseconds: 100)
        let big = TestFrame.ipv4(length: 5000, tcp: false)
        h.tap.queue(big)
        h.tap.queue(big)
        h.grantPage(10); h.grantPage(11)
        h.postRx([(id: 1, ref: 10)])
        let s1 = h.step(.tapReadable, now: 5 * Self.ms)
        #expect(h.rxResponses().isEmpty && h.engine.holdsFrame)
        #expect(!s1.pollTap && s1.idle && s1.deadline == 105 * Self.ms)
        #expect(h.tap.pending == 1)
        // Not polled while held: the TAP is not read again.
        let reads = h.tap.reads
        let s2 = h.step(.tick, now: 50 * Self.ms)
        #expect(h.tap.reads == reads && !s2.pollTap && s2.deadline == 105 * Self.ms)
        // The limit: the held frame and then the next are dropped, counted, and the TAP polled again.
        let s3 = h.step(.tick, now: 105 * Self.ms)
        #expect(s3.pollTap && !s3.idle)
        let s4 = h.step(.tick, now: 105 * Self.ms)
        #expect(s4.pollTap && s4.idle && s4.deadline == nil)
        #expect(h.engine.statistics.rxDropped == 2 && h.engine.statistics.rxDroppedUnfit == 0 && !h.engine.holdsFrame && h.tap.pending == 0)
        #expect(h.rxResponses().isEmpty)
        // Buffers again: frames are delivered, and a later shortage holds again.
        h.postRx([(id: 2, ref: 11)])
        h.tap.queue(big)
        h.step(.kicked, now: 200 * Self.ms)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 1, offset: 0, flags: NetifRxFlags.moreData, status: 4096)),
                                    .data(NetifRxResponse(id: 2, offset: 0, flags: 0, status: 904))])
        h.tap.queue(big)
        let s5 = h.step(.tapReadable, now: 300 * Self.ms)
        #expect(!s5.pollTap && s5.deadline == 400 * Self.ms && h.engine.holdsFrame)
    }

    @Test func buffersPostedWhileAFrameIsHeldTakeIt() {
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true))
        let big = TestFrame.ipv4(length: 5000, tcp: false)
        h.tap.queue(big)
        h.grantPage(10); h.grantPage(11)
        h.postRx([(id: 1, ref: 10)])
        #expect(!h.step(.tapReadable).pollTap)
        h.postRx([(id: 2, ref: 11)])
        let s = h.step(.kicked, now: 1)
        #expect(s.pollTap && s.notifyRx && s.deadline == nil && !h.engine.holdsFrame)
        #expect(h.bytes(ofPage: 10, 0..<4096) + h.bytes(ofPage: 11, 0..<904) == big)
    }

    @Test func aFrameTooLargeForAFrontendWithoutScatterGatherIsDropped() {
        let h = EngineHarness()
        h.tap.queue(TestFrame.ipv4(length: 5000, tcp: false))
        h.tap.queue(TestFrame.ipv4(length: 60, tcp: false))
        h.grantPage(10)
        h.postRx([(id: 1, ref: 10)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 1, offset: 0, flags: 0, status: 60))])
        #expect(h.engine.statistics.rxDropped == 1 && h.engine.statistics.rxDroppedUnfit == 1)
    }

    @Test func stopDropsAHeldFrameAndLeavesNothingInFlight() {
        let h = EngineHarness()
        h.tap.queue(TestFrame.ipv4(length: 60))
        h.step(.tapReadable)
        #expect(h.engine.holdsFrame)
        let s = h.step(.stop, now: 1)
        #expect(s.outcome == .drained && !h.engine.holdsFrame && h.engine.rxRequestsInFlight == 0)
        #expect(h.engine.statistics.rxDropped == 1 && h.engine.statistics.rxDroppedUnfit == 0)
    }
}
