import Glibc
import NetBackend
import NetworkPlumbing
import Testing
import XenABI

/// The tx half of the queue engine: chains in, frames on the TAP and
/// responses out, stepped by hand.
@Suite struct NetQueueEngineTxTests {
    @Test func aChecksumBlankFrameGoesOutWithNeedsChecksum() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 100)
        h.grantPage(2, frame, at: 8)
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 8, flags: NetifTxFlags.csumBlank, id: 7, size: 100))])
        let s = h.step()
        let header = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, checksumStart: 34, checksumOffset: 16)
        #expect(h.tap.written == [header.bytes + frame])
        #expect(h.txResponses() == [NetifTxResponse(id: 7, status: NetifStatus.okay)])
        #expect(s.notifyTx && !s.notifyRx && s.idle && s.pollTap && s.deadline == nil && s.outcome == .running)
        #expect(h.engine.statistics.txPackets == 1 && h.engine.statistics.txBytes == 100)
    }

    @Test func aDataValidatedFrameGoesOutWithDataValid() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 60, tcp: false)
        h.grantPage(2, frame)
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.dataValidated, id: 1, size: 60))])
        h.step()
        #expect(h.tap.written == [VirtioNetHeader(flags: VirtioNetHeader.flagDataValid).bytes + frame])
    }

    @Test func aGSOChainIsGatheredIntoOneFrame() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 3000)
        h.grantPage(2, Array(frame[0..<2000]))
        h.grantPage(3, Array(frame[2000...]), at: 100)
        var gso = InlineArray<6, UInt8>(repeating: 0)
        gso[0] = 0xa8; gso[1] = 0x05; gso[2] = NetifGSOType.tcpv4   // 1448
        h.pushTx([
            .request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.csumBlank | NetifTxFlags.extraInfo | NetifTxFlags.moreData,
                                    id: 11, size: 3000)),
            .extra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: gso)),
            .request(NetifTxRequest(gref: 3, offset: 100, flags: 0, id: 12, size: 1000)),
        ])
        h.step()
        let header = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                                     headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
        #expect(h.tap.written == [header.bytes + frame])
        #expect(h.txResponses() == [NetifTxResponse(id: 11, status: NetifStatus.okay), NetifTxResponse(id: 0, status: NetifStatus.null),
                                    NetifTxResponse(id: 12, status: NetifStatus.okay)])
    }

    @Test func aRevokedGrantFailsThatFrameOnly() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 60)
        h.grantPage(2, frame)
        h.grantPage(3, frame)
        h.guest.revoke(3)
        h.pushTx([.request(NetifTxRequest(gref: 3, offset: 0, flags: 0, id: 1, size: 60)),
                  .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 2, size: 60))])
        h.step()
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.error), NetifTxResponse(id: 2, status: NetifStatus.okay)])
        #expect(h.tap.written == [VirtioNetHeader().bytes + frame])
        #expect(h.engine.statistics.txErrors == 1 && h.engine.statistics.txMalformed == 0)
    }

    @Test func aChainTheRulesRefuseIsAnsweredErrorOnEverySlot() {
        let h = EngineHarness()
        h.grantPage(2, TestFrame.ipv4(length: 1060))
        var badGSO = InlineArray<6, UInt8>(repeating: 0)
        badGSO[2] = NetifGSOType.tcpv4   // size 0
        h.pushTx([
            // A fragment crossing its page.
            .request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.moreData, id: 1, size: 1060)),
            .request(NetifTxRequest(gref: 2, offset: 3500, flags: 0, id: 2, size: 1000)),
            // A GSO extra of size 0: its slot is answered NULL.
            .request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.extraInfo, id: 3, size: 60)),
            .extra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: badGSO)),
            // Shorter than an Ethernet header.
            .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 4, size: 10)),
        ])
        let s = h.step()
        let err = NetifStatus.error
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: err), NetifTxResponse(id: 2, status: err),
                                    NetifTxResponse(id: 3, status: err), NetifTxResponse(id: 0, status: NetifStatus.null),
                                    NetifTxResponse(id: 4, status: err)])
        #expect(h.tap.written.isEmpty)
        #expect(h.engine.statistics.txMalformed == 3 && s.outcome == .running)
    }

    @Test func aChainEndingWithMoreDataBreaksTheProtocolAndTheRingIsLeftAlone() {
        let h = EngineHarness()
        h.grantPage(2, TestFrame.ipv4(length: 200))
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.moreData, id: 1, size: 200))])
        let s = h.step()
        guard case .broken(let reason) = s.outcome else { Issue.record("\(s.outcome)"); return }
        #expect(reason.contains("NETTXF_more_data"))
        #expect(!s.pollTap && h.txResponses().isEmpty)
        // Nothing more happens on its rings, whatever the guest does.
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 2, size: 60))])
        h.tap.queue(TestFrame.ipv4(length: 60))
        h.postRx([(1, 2)])
        #expect(h.step(.kicked).outcome == .broken(reason))
        #expect(h.step(.stop).outcome == .broken(reason))
        #expect(h.txResponses().isEmpty && h.rxResponses().isEmpty && h.tap.written.isEmpty && h.tap.reads == 0)
    }

    @Test func aRequestProducerBeyondTheRingBreaksTheProtocol() {
        let h = EngineHarness(startIndex: 0xffff_fff0)
        h.tx.publishRawRequestProducer(0xffff_fff0 &+ 257)
        guard case .broken(let reason) = h.step().outcome else { Issue.record("not broken"); return }
        #expect(reason.contains("more than 256 slots ahead"))
    }

    @Test func aFullTapDropsTheFrame() {
        let h = EngineHarness()
        h.grantPage(2, TestFrame.ipv4(length: 60))
        h.tap.full = true
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 9, size: 60))])
        h.step()
        #expect(h.txResponses() == [NetifTxResponse(id: 9, status: NetifStatus.dropped)])
        #expect(h.engine.statistics.txDropped == 1)
    }

    @Test func theRateLimitHoldsTheRestUntilTheRefillDeadline() {
        let ms = 1_000_000
        let h = EngineHarness(rate: (bytes: 1000, microseconds: 1000))
        let frame = TestFrame.ipv4(length: 600)
        h.grantPage(2, frame)
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 1, size: 600)),
                  .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 2, size: 600))])
        let s1 = h.step(now: 0)
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.okay)])
        #expect(s1.deadline == ms && s1.idle)
        #expect(h.engine.txRequestsInFlight == 1)
        // One wait, of a whole period (the refill is 1 ms away).
        #expect(h.engine.statistics.txRateLimited == 1 && h.engine.statistics.txRateLimitedNanoseconds == UInt64(ms))
        // Before the refill nothing moves, and the deadline stays.
        let s2 = h.step(.tick, now: ms - 1)
        #expect(h.txResponses().isEmpty && s2.deadline == ms)
        let s3 = h.step(.tick, now: ms)
        #expect(h.txResponses() == [NetifTxResponse(id: 2, status: NetifStatus.okay)])
        #expect(s3.deadline == nil && h.tap.written.count == 2 && h.engine.txRequestsInFlight == 0)
        #expect(h.engine.statistics.txRateLimited == 1, "waiting out the same refill is one wait")
    }

    @Test func stopAnswersWhatWaitsForCreditDropped() {
        let h = EngineHarness(rate: (bytes: 100, microseconds: 1000))
        h.grantPage(2, TestFrame.ipv4(length: 60))
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 1, size: 60)),
                  .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 2, size: 60))])
        h.step(now: 0)
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.okay)])
        let s = h.step(.stop, now: 10)
        #expect(s.outcome == .drained && s.notifyTx)
        #expect(h.txResponses() == [NetifTxResponse(id: 2, status: NetifStatus.dropped)])
        #expect(h.engine.txRequestsInFlight == 0 && h.tap.written.count == 1)
        // Drained stays drained: later requests are not taken.
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 3, size: 60))])
        #expect(h.step(.kicked, now: 20).outcome == .drained)
        #expect(h.txResponses().isEmpty)
    }
}

/// Seen while writing the netif fuzz program's checks: a breach found while writing a batch
/// (the 64th malformed packet in a row, an offload on a frame that is not
/// TCP/UDP over IP) went on answering the rest of the batch.
@Suite struct NetQueueEngineBreachTests {
    @Test func aBreachWhileWritingEndsTheBatch() {
        let h = EngineHarness()
        var notIP = TestFrame.ipv4(length: 60)
        notIP[12] = 0x88; notIP[13] = 0xb5   // a local experimental EtherType
        h.grantPage(2, notIP)
        var slots: [EngineHarness.TxSlot] = [.request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.csumBlank, id: 100, size: 60))]
        for i in 0..<63 { slots.append(.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: UInt16(i), size: 10))) }
        h.pushTx(slots)
        let s = h.step()
        guard case .broken(let reason) = s.outcome else { Issue.record("\(s.outcome)"); return }
        #expect(reason.contains("64 malformed packets in a row"))
        #expect(h.txResponses() == [NetifTxResponse(id: 100, status: NetifStatus.error)])
        #expect(h.tap.written.isEmpty)
    }
}

/// Found by the netif fuzz program: while packets waited for credit, a
/// guest published requests past the ring (over slots not yet answered);
/// the engine answered the waiting packets first, which moved its own
/// bound, then took its own responses as requests.
@Suite struct NetQueueEngineOverrunTests {
    @Test func aGuestThatOverrunsTheRingWhilePacketsWaitForCreditBreaksTheProtocol() {
        let ms = 1_000_000
        let h = EngineHarness(rate: (bytes: 100, microseconds: 1000))
        h.grantPage(2, TestFrame.ipv4(length: 60))
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 1, size: 60)),
                  .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 2, size: 60))])
        h.step(now: 0)
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.okay)])
        // One response published, so at most 256 requests past it; 257 is an overrun.
        h.tx.publishRawRequestProducer(1 + 257)
        let s = h.step(.tick, now: ms)
        guard case .broken(let reason) = s.outcome else { Issue.record("\(s.outcome)"); return }
        #expect(reason.contains("more than 256 slots ahead"))
        #expect(h.txResponses().isEmpty && h.tap.written.count == 1)
    }
}

/// A pass's frames go to the TAP in one `writeFrames` (one io_uring
/// submission in the daemon), and each packet is answered with its own
/// frame's result.
@Suite struct NetQueueEngineTxBatchTests {
    @Test func aPassWritesItsFramesInOneBatchAndAnswersEachByItsResult() {
        let h = EngineHarness()
        let frames = (0..<4).map { TestFrame.ipv4(length: 60 + $0, tcp: false) }
        for (i, f) in frames.enumerated() { h.grantPage(UInt32(2 + i), f) }
        h.tap.fullAtWrite = [1]
        h.tap.refusedAtWrite = [2: .system(call: "writev", interface: "", errno: EINVAL)]
        var chains: [EngineHarness.TxSlot] = []
        for i in 0..<4 {
            chains.append(.request(NetifTxRequest(gref: UInt32(2 + i), offset: 0, flags: 0, id: UInt16(10 + i), size: UInt16(60 + i))))
        }
        h.pushTx(chains)
        let s = h.step()
        #expect(h.tap.batches == [4])
        #expect(h.tap.written == [VirtioNetHeader().bytes + frames[0], VirtioNetHeader().bytes + frames[3]])
        #expect(h.txResponses() == [NetifTxResponse(id: 10, status: NetifStatus.okay), NetifTxResponse(id: 11, status: NetifStatus.dropped),
                                    NetifTxResponse(id: 12, status: NetifStatus.error), NetifTxResponse(id: 13, status: NetifStatus.okay)])
        let st = h.engine.statistics
        #expect(st.txPackets == 2 && st.txBytes == 123 && st.txDropped == 1 && st.txErrors == 1 && st.txMalformed == 0)
        #expect(s.notifyTx && s.idle)
    }

    /// Refused chains and failed grant copies take no place in the batch.
    @Test func framesThatFailBeforeTheTapAreNotInTheBatch() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 70, tcp: false)
        h.grantPage(2, frame)
        h.grantPage(3, frame)
        h.guest.revoke(3)
        h.pushTx([.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 1, size: 10)),   // shorter than Ethernet
                  .request(NetifTxRequest(gref: 3, offset: 0, flags: 0, id: 2, size: 70)),   // revoked
                  .request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: 3, size: 70))])
        h.step()
        #expect(h.tap.batches == [1])
        #expect(h.tap.written == [VirtioNetHeader().bytes + frame])
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.error), NetifTxResponse(id: 2, status: NetifStatus.error),
                                    NetifTxResponse(id: 3, status: NetifStatus.okay)])
    }
}

/// Notification suppression, both ways: the backend notifies only when the
/// frontend armed rsp_event past the responses it pushes, and the frontend
/// is asked to notify only when the backend's final check armed req_event.
@Suite struct NetQueueEngineNotificationTests {
    @Test func eachSideIsNotifiedOnlyWhenItAsked() {
        let h = EngineHarness()
        let frame = TestFrame.ipv4(length: 60, tcp: false)
        h.grantPage(2, frame)
        let request = { (id: UInt16) in EngineHarness.TxSlot.request(NetifTxRequest(gref: 2, offset: 0, flags: 0, id: id, size: 60)) }
        // A fresh ring asks for the first request and the first response.
        #expect(h.pushTx([request(1)]))
        #expect(h.step().notifyTx)
        // The engine slept after a final check (req_event armed): the next request is announced.
        #expect(h.pushTx([request(2)]))
        // The frontend has not consumed the first response, so rsp_event is
        // still behind: this response goes out unannounced.
        #expect(!h.step().notifyTx)
        // Published while the backend has not looked again since it armed req_event at 3.
        #expect(h.pushTx([request(3)]))
        // Nor did the backend re-arm: without a step in between, a further request is not announced.
        #expect(!h.pushTx([request(4)]))
        #expect(!h.step().notifyTx)
        // The frontend consumes all four and re-arms rsp_event: the next response is announced.
        #expect(h.txResponses().map(\.id) == [1, 2, 3, 4])
        h.pushTx([request(5)])
        #expect(h.step().notifyTx)
        #expect(h.txResponses().map(\.id) == [5])
        #expect(h.tap.written.count == 5)
    }
}
