import NetFrontend
import Testing
import XenABI

/// The hostile netfront's bookkeeping alone: what it accepts from a backend
/// and what it reports, without a backend.
@Suite struct HostileNetfrontLedgerTests {
    let ok = NetifStatus.okay, err = NetifStatus.error, dropped = NetifStatus.dropped, null = NetifStatus.null

    @Test func txAnswersThatFitPass() {
        var l = HostileTxLedger()
        l.place("good", ids: [1], extras: 0, expect: .accepted)
        l.place("bad chain", ids: [2, 3], extras: 1, expect: .refused)
        l.place("kernel", ids: [4], extras: 0, expect: .any)
        for r in [NetifTxResponse(id: 1, status: dropped), .init(id: 2, status: err), .init(id: 0, status: null),
                  .init(id: 3, status: err), .init(id: 4, status: err)] {
            #expect(l.record(r) == nil)
        }
        #expect(l.unanswered == 0)
        #expect(l.evaluate(ringEnded: false).isEmpty)
    }

    @Test func txAnswersThatDoNotFitAreReported() {
        var l = HostileTxLedger()
        l.place("good", ids: [1], extras: 0, expect: .accepted)
        l.place("bad", ids: [2], extras: 0, expect: .refused)
        l.place("chain", ids: [3, 4], extras: 0, expect: .any)
        #expect(l.record(.init(id: 1, status: err)) == nil)
        #expect(l.record(.init(id: 2, status: ok)) == nil)
        #expect(l.record(.init(id: 9, status: ok))?.contains("not in flight") == true)
        #expect(l.record(.init(id: 2, status: err))?.contains("twice") == true)
        #expect(l.record(.init(id: 0, status: null))?.contains("NULL") == true)
        #expect(l.record(.init(id: 3, status: 7))?.contains("does not define") == true)
        #expect(l.record(.init(id: 3, status: ok)) == nil)
        #expect(l.record(.init(id: 4, status: err)) == nil)
        let failures = l.evaluate(ringEnded: false)
        #expect(failures.count == 3, "\(failures)")
        #expect(failures.contains { $0.contains("well-formed good answered ERROR") })
        #expect(failures.contains { $0.contains("bad answered OKAY") })
        #expect(failures.contains { $0.contains("not one status") })
    }

    @Test func unansweredSlotsAreAFailureOnlyOnALiveRing() {
        var l = HostileTxLedger()
        l.place("good", ids: [1, 2], extras: 0, expect: .accepted)
        #expect(l.record(.init(id: 1, status: ok)) == nil)
        #expect(l.unanswered == 1)
        #expect(l.evaluate(ringEnded: false).count == 1)
        #expect(l.evaluate(ringEnded: true).isEmpty)
    }

    static func raw(_ r: NetifRxResponse) -> InlineArray<8, UInt8> {
        var b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { r.encode(to: $0.baseAddress!) }
        return InlineArray { b[$0] }
    }

    static func raw(_ e: NetifExtraInfo) -> InlineArray<8, UInt8> {
        var b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { e.encode(to: $0.baseAddress!) }
        return InlineArray { b[$0] }
    }

    @Test func rxResponsesAnswerTheirPositionAndOnlyWritableBuffersGetData() {
        var l = HostileRxLedger()
        l.post(id: 5, .writable(0))
        l.post(id: 5, .writable(1))          // a duplicate id: fine, answered in its turn
        l.post(id: 6, .unwritable("a read-only grant"))
        l.post(id: 7, .writable(2))
        #expect(l.pagesInFlight == [0, 1, 2])
        // A frame in two slots: the first with more_data.
        var r = l.record(Self.raw(NetifRxResponse(id: 5, offset: 0, flags: NetifRxFlags.moreData, status: 4096)))
        #expect(r.failure == nil && r.frame == nil)
        r = l.record(Self.raw(NetifRxResponse(id: 5, offset: 0, flags: 0, status: 100)))
        #expect(r.failure == nil)
        #expect(r.frame?.slots.map(\.length) == [4096, 100])
        // Data into the read-only buffer.
        r = l.record(Self.raw(NetifRxResponse(id: 6, offset: 0, flags: 0, status: 60)))
        #expect(r.failure?.contains("read-only") == true)
        // The wrong id for this position.
        r = l.record(Self.raw(NetifRxResponse(id: 8, offset: 0, flags: 0, status: NetifStatus.error)))
        #expect(r.failure?.contains("id 8") == true)
        #expect(l.outstanding == 0)
        r = l.record(Self.raw(NetifRxResponse(id: 1, offset: 0, flags: 0, status: 60)))
        #expect(r.failure?.contains("no request posted") == true)
    }

    @Test func rxExtraSlotsMustBeGSO() {
        var l = HostileRxLedger()
        for i in 0..<5 { l.post(id: UInt16(i), .writable(i)) }
        var r = l.record(Self.raw(NetifRxResponse(id: 0, offset: 0, flags: NetifRxFlags.extraInfo, status: 1000)))
        #expect(r.failure == nil && r.frame == nil)
        var gso = InlineArray<6, UInt8>(repeating: 0)
        gso[0] = 0xa8; gso[1] = 0x05; gso[2] = NetifGSOType.tcpv4
        r = l.record(Self.raw(NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: gso)))
        #expect(r.failure == nil)
        #expect(r.frame?.slots.count == 1)
        r = l.record(Self.raw(NetifRxResponse(id: 2, offset: 0, flags: NetifRxFlags.extraInfo, status: 1000)))
        r = l.record(Self.raw(NetifExtraInfo(type: NetifExtraType.mcastAdd, flags: 0)))
        #expect(r.failure?.contains("GSO") == true)
        r = l.record(Self.raw(NetifRxResponse(id: 4, offset: 4000, flags: 0, status: 200)))
        #expect(r.failure?.contains("past its page") == true)
    }

    @Test func bystanderFramesAreCheckedByteForByte() {
        var page = [UInt8](repeating: 0, count: 1514)
        let a: [UInt8] = [0, 0x16, 0x3e, 8, 0, 0], b: [UInt8] = [0, 0x16, 0x3e, 8, 0, 1]
        page.withUnsafeMutableBytes {
            BystanderFrame.write(into: $0.baseAddress!, destination: b, source: a, stream: 3, sequence: 77, length: 1000)
        }
        let frame = Array(page[0..<1000])
        #expect(BystanderFrame.check(frame) == .intact(stream: 3, sequence: 77))
        for i in [0, 7, 40, 999] {
            var bad = frame
            bad[i] ^= 0x10
            if case .corrupted = BystanderFrame.check(bad) {} else { Issue.record("byte \(i) flipped went unnoticed") }
        }
        if case .corrupted = BystanderFrame.check(Array(frame[0..<999])) {} else { Issue.record("a short frame went unnoticed") }
        var other = frame
        other[13] = 0x00   // another ethertype
        #expect(BystanderFrame.check(other) == .notOurs)
    }
}
