import Foundation
import Glibc
import Hypervisor
import LoopbackHypervisor
import NetBackend
import NetFrontend
import Testing
import XenABI
import XenBus

/// A frontend that breaks netif's rules, driven slot by slot: each
/// malformed chain is answered NETIF_RSP_ERROR and counted, the device
/// stays up, a frontend that keeps at it is disconnected, and the other
/// guests never notice.
@Suite(.serialized) struct HostileNetfrontTests {
    /// A 60-byte broadcast UDP frame (valid, so the backend writes it).
    static func fillFrame(_ p: UnsafeMutableRawPointer, length: Int = 60) {
        let bytes: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x16, 0x3e, 0, 0, 0x09, 0x08, 0x00,
                              0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 99, 0, 9, 10, 99, 0, 255,
                              0x04, 0x00, 0x00, 0x09, 0, 26, 0, 0]
        p.initializeMemory(as: UInt8.self, repeating: 0, count: length)
        for (i, b) in bytes.enumerated() { p.storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
    }

    static func request(_ ref: GrantRef, offset: UInt16 = 0, flags: UInt16 = 0, id: UInt16, size: UInt16) -> TxSlot {
        .request(NetifTxRequest(gref: ref, offset: offset, flags: flags, id: id, size: size))
    }

    @Test func eachMalformedChainIsRefusedAloneAndCounted() throws {
        try withNetTestBed { bed in
            let h = try bed.addGuest(9, withTap: false)
            let page = try h.frontend.grantTxPage()
            Self.fillFrame(page.bytes)
            let more = NetifTxFlags.moreData

            func expectStatuses(_ slots: [TxSlot], _ expected: [Int16], _ what: String) throws {
                h.frontend.pushTxSlots(slots)
                let responses = try h.frontend.waitTxResponses(slots.count, timeout: 5)
                #expect(responses.map(\.status) == expected, "\(what)")
            }
            let err = NetifStatus.error, ok = NetifStatus.okay, null = NetifStatus.null

            // A valid frame first: OKAY.
            try expectStatuses([Self.request(page.ref, id: 1, size: 60)], [ok], "valid frame")
            // The head crosses its page.
            try expectStatuses([Self.request(page.ref, offset: 4000, id: 2, size: 200)], [err], "head crossing its page")
            // A fragment crosses its page.
            try expectStatuses([Self.request(page.ref, flags: more, id: 3, size: 1060),
                                Self.request(page.ref, offset: 3500, id: 4, size: 1000)], [err, err], "fragment crossing")
            // Fragments larger than the frame (a frame over 64 KiB, or a lie).
            try expectStatuses([Self.request(page.ref, flags: more, id: 5, size: 100),
                                Self.request(page.ref, flags: more, id: 6, size: 4000),
                                Self.request(page.ref, id: 7, size: 4000)], [err, err, err], "fragments exceed the frame")
            // Zero-length head: the fragment takes the whole frame.
            try expectStatuses([Self.request(page.ref, flags: more, id: 8, size: 100),
                                Self.request(page.ref, id: 9, size: 100)], [err, err], "zero-length head")
            // More slots than a frontend may use (19 > 18).
            var chain: [TxSlot] = []
            for i in 0..<19 {
                chain.append(Self.request(page.ref, flags: i < 18 ? more : 0, id: UInt16(20 + i), size: i == 0 ? 19 * 64 : 64))
            }
            try expectStatuses(chain, Array(repeating: err, count: 19), "19 slots")
            // A bad extra type: refused, its slot answered NULL.
            try expectStatuses([Self.request(page.ref, flags: NetifTxFlags.extraInfo, id: 40, size: 60),
                                .extra(NetifExtraInfo(type: 7, flags: 0))], [err, null], "extra type 7")
            // A GSO extra with size 0.
            try expectStatuses([Self.request(page.ref, flags: NetifTxFlags.extraInfo | NetifTxFlags.csumBlank, id: 41, size: 60),
                                .extra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0,
                                                      payload: [0, 0, NetifGSOType.tcpv4, 0, 0, 0]))], [err, null], "GSO size 0")
            // A revoked grant: an error for that frame only.
            try expectStatuses([Self.request(7, id: 42, size: 60)], [err], "bad grant")
            // And the device still carries good frames.
            try expectStatuses([Self.request(page.ref, id: 43, size: 60)], [ok], "valid frame after")

            // The frontend sees responses as soon as they are pushed; the
            // counters are published after the step, and status reads the
            // connection once the control thread has recorded it: wait for both.
            _ = bed.waitUntil(10) { (bed.vifStatus(h)?.statistics.txPackets ?? 0) >= 2 }
            let s = try #require(bed.vifStatus(h)).statistics
            #expect(s.txMalformed == 7, "\(s)")
            #expect(s.txErrors == 8, "\(s)")
            #expect(s.txPackets == 2, "\(s)")
            #expect(bed.host.toolstack.store.readState(bed.backendPath(h)) == .connected)
        }
    }

    @Test func aFrontendThatKeepsSendingMalformedChainsIsDisconnected() throws {
        try withNetTestBed { bed in
            let a = try bed.addGuest(1)
            let b = try bed.addGuest(2)
            let h = try bed.addGuest(9, withTap: false)
            let page = try h.frontend.grantTxPage()
            Self.fillFrame(page.bytes)
            var slots: [TxSlot] = []
            for i in 0..<TxChainRules.malformedInARowLimit {
                slots.append(Self.request(page.ref, offset: 4090, id: UInt16(i), size: 60))
            }
            h.frontend.pushTxSlots(slots)
            #expect(bed.waitUntil(5) { bed.host.toolstack.store.readState(bed.backendPath(h)) == .closing })
            let error = try bed.host.toolstack.store.read(bed.backendPath(h) + "/error") ?? ""
            #expect(error.contains("malformed packets in a row"), "\(error)")
            // The other guests carry on.
            let ping = try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.address], timeout: 30)
            #expect(ping.contains("2 received"), "\(ping)")
        }
    }

    @Test func anIncompleteChainDisconnectsAtOnce() throws {
        try withNetTestBed { bed in
            let h = try bed.addGuest(9, withTap: false)
            let page = try h.frontend.grantTxPage()
            Self.fillFrame(page.bytes)
            h.frontend.pushTxSlots([Self.request(page.ref, flags: NetifTxFlags.moreData, id: 1, size: 60)])
            #expect(bed.waitUntil(5) { bed.host.toolstack.store.readState(bed.backendPath(h)) == .closing })
            let error = try bed.host.toolstack.store.read(bed.backendPath(h) + "/error") ?? ""
            #expect(error.contains("ends with NETTXF_more_data"), "\(error)")
        }
    }

    /// The `rate` key: 60000 bytes per 100 ms lets 100 frames of 1200
    /// bytes (120000 bytes) through in no less than about 100 ms, where
    /// without a limit they take a millisecond or two.
    @Test func theRateKeyLimitsTheGuestsTransmitRate() throws {
        try withNetTestBed { bed in
            let h = try bed.addGuest(9, nic: LoopbackToolstack.Nic(devid: 0, bridge: bed.bridge, rate: "60000,100000"),
                                     withTap: false)
            let page = try h.frontend.grantTxPage()
            Self.fillFrame(page.bytes, length: 1200)
            // Spend the carried-over credit (up to a 128 KiB burst), then
            // time the next 100 frames: they need two more periods' credit.
            h.frontend.pushTxSlots((0..<125).map { Self.request(page.ref, id: UInt16($0), size: 1200) })
            _ = try h.frontend.waitTxResponses(125, timeout: 5)
            let start = Date()
            var answered = 0
            for batch in 0..<4 {
                h.frontend.pushTxSlots((0..<25).map { Self.request(page.ref, id: UInt16(100 + batch * 25 + $0), size: 1200) })
                let r = try h.frontend.waitTxResponses(25, timeout: 5)
                answered += r.filter { $0.status == NetifStatus.okay }.count
            }
            let elapsed = Date().timeIntervalSince(start)
            #expect(answered == 100)
            #expect(elapsed >= 0.09, "100 frames of 1200 bytes at 600 kB/s took \(elapsed) s")
            #expect(elapsed < 2, "\(elapsed) s")
        }
    }
}
