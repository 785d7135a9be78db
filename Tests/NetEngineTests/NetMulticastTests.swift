import EngineDoubles
import Hypervisor
import NetBackend
import NetworkPlumbing
import Testing
import XenABI

/// feature-multicast-control (netif.h): the guest edits a filter with
/// MCAST_ADD / MCAST_DEL extra slots on its tx ring, each answered as a
/// control request and never written to the TAP; with
/// request-multicast-control the rx side then drops multicast frames the
/// filter does not hold, and lets unicast and broadcast through.
@Suite struct NetMulticastTests {
    static let group: [UInt8] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]   // 224.0.0.251's MAC
    static let other: [UInt8] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01]

    /// A request carrying one MCAST_ADD or MCAST_DEL extra slot, as Windows' PV drivers send them.
    static func edit(_ type: UInt8, _ mac: [UInt8], id: UInt16) -> [EngineHarness.TxSlot] {
        let payload = InlineArray<6, UInt8> { mac[$0] }
        return [.request(NetifTxRequest(gref: 2, offset: 0, flags: NetifTxFlags.extraInfo, id: id, size: 0)),
                .extra(NetifExtraInfo(type: type, flags: 0, payload: payload))]
    }

    static func frame(to mac: [UInt8]) -> [UInt8] {
        var f = TestFrame.ipv4(length: 200, tcp: false)
        f.replaceSubrange(0..<6, with: mac)
        return f
    }

    /// feature-dynamic-multicast-control: the guest turns filtering on and
    /// off under the connection; the addresses it added stay.
    @Test func filteringGoesOnAndOffWithTheListKept() {
        let filter = VifMulticastFilter(enabled: false)
        _ = filter.add(VifMulticastFilter.key(Self.group))
        let h = EngineHarness(multicastFilter: filter)
        func delivered(_ mac: [UInt8], ref: GrantRef) -> Bool {
            h.tap.queue(Self.frame(to: mac))
            h.grantPage(ref)
            h.postRx([(id: UInt16(ref), ref: ref)])
            h.step(.tapReadable)
            return !h.rxResponses().isEmpty
        }
        #expect(delivered(Self.other, ref: 10))
        filter.setEnabled(true)
        #expect(!delivered(Self.other, ref: 11))
        #expect(h.engine.statistics.rxDroppedFiltered == 1)
        #expect(delivered(Self.group, ref: 12))
        filter.setEnabled(false)
        #expect(filter.count == 1 && !filter.enabled)
        #expect(delivered(Self.other, ref: 13))
    }

    @Test func editsAreAnsweredAndNeverReachTheTap() {
        let filter = VifMulticastFilter(enabled: true)
        let h = EngineHarness(multicastFilter: filter)
        h.grantPage(2, [])
        h.pushTx(Self.edit(NetifExtraType.mcastAdd, Self.group, id: 1) + Self.edit(NetifExtraType.mcastAdd, Self.other, id: 2))
        h.step()
        #expect(h.txResponses() == [NetifTxResponse(id: 1, status: NetifStatus.okay), NetifTxResponse(id: 0, status: NetifStatus.null),
                                    NetifTxResponse(id: 2, status: NetifStatus.okay), NetifTxResponse(id: 0, status: NetifStatus.null)])
        #expect(h.tap.written.isEmpty && filter.count == 2)
        #expect(h.engine.statistics.multicastEdits == 2 && h.engine.statistics.txMalformed == 0)
        h.pushTx(Self.edit(NetifExtraType.mcastDel, Self.other, id: 3))
        h.step()
        #expect(h.txResponses().first == NetifTxResponse(id: 3, status: NetifStatus.okay))
        #expect(filter.count == 1 && filter.contains(VifMulticastFilter.key(Self.group)))
    }

    @Test func aFullFilterRefusesTheNextAdd() {
        let filter = VifMulticastFilter(enabled: true)
        for i in 0..<VifMulticastFilter.capacity {
            #expect(filter.add(VifMulticastFilter.key([0x01, 0, 0x5e, 0, 1, UInt8(i)])))
        }
        let h = EngineHarness(multicastFilter: filter)
        h.grantPage(2, [])
        h.pushTx(Self.edit(NetifExtraType.mcastAdd, Self.group, id: 7))
        h.step()
        #expect(h.txResponses().first == NetifTxResponse(id: 7, status: NetifStatus.error))
        #expect(filter.count == VifMulticastFilter.capacity && !filter.contains(VifMulticastFilter.key(Self.group)))
    }

    @Test func theFilterDropsOnlyMulticastItDoesNotHold() {
        let filter = VifMulticastFilter(enabled: true)
        let h = EngineHarness(multicastFilter: filter)
        _ = filter.add(VifMulticastFilter.key(Self.group))
        let unicast: [UInt8] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x05]
        let broadcast: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        for (i, mac) in [Self.other, Self.group, unicast, broadcast].enumerated() {
            h.tap.queue(Self.frame(to: mac))
            h.grantPage(GrantRef(10 + i))
            h.postRx([(id: UInt16(i), ref: GrantRef(10 + i))])
        }
        h.step(.tapReadable)
        // The frame for `other` was dropped: the three after it took the first three buffers.
        let delivered = h.rxResponses()
        #expect(delivered.count == 3, "\(delivered)")
        #expect(h.bytes(ofPage: 10, 0..<6) == Self.group && h.bytes(ofPage: 11, 0..<6) == unicast
                && h.bytes(ofPage: 12, 0..<6) == broadcast)
        #expect(h.engine.statistics.rxDropped == 1 && h.engine.statistics.rxDroppedFiltered == 1)
    }

    @Test func withoutRequestMulticastControlEverythingIsFlooded() {
        let filter = VifMulticastFilter(enabled: false)
        let h = EngineHarness(multicastFilter: filter)
        h.tap.queue(Self.frame(to: Self.other))
        h.grantPage(10)
        h.postRx([(id: 1, ref: 10)])
        h.step(.tapReadable)
        #expect(h.rxResponses().count == 1 && h.bytes(ofPage: 10, 0..<6) == Self.other)
        #expect(h.engine.statistics.rxDroppedFiltered == 0)
    }
}
