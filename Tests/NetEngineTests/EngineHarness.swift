import EngineDoubles
import Hypervisor
import NetBackend
import NetworkPlumbing
import XenABI
import XenRing

/// One vif queue's guest side in memory, EmbeddedChannel-style: the test
/// plays netfront on real ring pages (FrontRing), steps the engine and
/// reads back exact responses, frames and page bytes. Grant ref r grants
/// frame r; frames 0 and 1 are the tx and rx rings.
final class EngineHarness {
    static let domain: DomID = 5
    let guest = InMemoryGuest(domain: EngineHarness.domain, pages: 32, grants: 64)
    let grants: InMemoryGrantTable
    let tap = InMemoryTap()
    var tx: FrontRing
    var rx: FrontRing
    let engine: NetQueueEngine<InMemoryTap>

    enum TxSlot {
        case request(NetifTxRequest)
        case extra(NetifExtraInfo)
    }

    /// An rx ring answer: a data buffer's response or the extra slot after it.
    enum RxAnswer: Equatable {
        case data(NetifRxResponse)
        case gso(size: UInt16, type: UInt8)
        /// A hash extra: its type bit, algorithm and value, and whether another extra follows.
        case hash(typeBit: UInt8, algorithm: UInt8, value: UInt32, more: Bool)
        /// An XDP extra: the headroom, and whether another extra follows.
        case xdp(headroom: UInt16, more: Bool)
    }

    init(features: FrontendNetFeatures = FrontendNetFeatures(), rate: (bytes: UInt64, microseconds: UInt64)? = nil,
         rxStallMilliseconds: Int = 100, startIndex: UInt32 = 0, multicastFilter: VifMulticastFilter? = nil,
         hashSettings: VifHashSettings? = nil, queueIndex: Int = 0, steering: (any RxSteering)? = nil,
         rxHeadroom: VifRxHeadroom? = nil) {
        grants = InMemoryGrantTable(guests: [guest])
        tx = FrontRing(initializing: guest.page(0), pages: 1, entrySize: RingEntrySize.netifTx, startIndex: startIndex)
        rx = FrontRing(initializing: guest.page(1), pages: 1, entrySize: RingEntrySize.netifRx, startIndex: startIndex)
        var c = NetQueueConfiguration(frontendDomain: Self.domain, txRingRef: 0, rxRingRef: 1, txRemotePort: 1,
                                      rxRemotePort: 1, frontend: features, rate: rate, rxStallMilliseconds: rxStallMilliseconds)
        if let multicastFilter { c.multicastFilter = multicastFilter }
        c.hashSettings = hashSettings
        c.queueIndex = queueIndex
        if let rxHeadroom { c.rxHeadroom = rxHeadroom }
        engine = NetQueueEngine(txRing: guest.page(0), rxRing: guest.page(1), grants: grants, tap: tap,
                                configuration: c, buffers: try! NetEngineBuffers(backing: .heap), now: 0,   // only a mapping can fail
                                steering: steering)
    }

    /// Grants frame `ref` (2...) to the backend and fills it with `bytes` at `offset`.
    func grantPage(_ ref: GrantRef, _ bytes: [UInt8] = [], at offset: Int = 0, readOnly: Bool = false) {
        guest.grant(ref, frame: Int(ref), readOnly: readOnly)
        for (i, b) in bytes.enumerated() { guest.page(Int(ref)).storeBytes(of: b, toByteOffset: offset + i, as: UInt8.self) }
    }

    func bytes(ofPage frame: Int, _ range: Range<Int>) -> [UInt8] {
        range.map { guest.page(frame).load(fromByteOffset: $0, as: UInt8.self) }
    }

    /// Publishes the slots; whether the backend asked to be notified (req_event).
    @discardableResult
    func pushTx(_ slots: [TxSlot]) -> Bool {
        for slot in slots {
            switch slot {
            case .request(let r): r.encode(to: tx.nextRequestSlot())
            case .extra(let e): e.encode(to: tx.nextRequestSlot())
            }
            tx.commitRequest()
        }
        return tx.pushRequests()
    }

    func postRx(_ requests: [(id: UInt16, ref: GrantRef)]) {
        for r in requests {
            NetifRxRequest(id: r.id, gref: r.ref).encode(to: rx.nextRequestSlot())
            rx.commitRequest()
        }
        _ = rx.pushRequests()
    }

    func txResponses() -> [NetifTxResponse] {
        var out: [NetifTxResponse] = []
        var slot = [UInt8](repeating: 0, count: 16)
        // As netfront: consume, then re-arm rsp_event and look again.
        repeat {
            while tx.unconsumedResponses() > 0 {
                slot.withUnsafeMutableBytes { b in
                    tx.takeResponse(into: b.baseAddress!)
                    out.append(NetifTxResponse(decoding: b.baseAddress!))
                }
            }
        } while tx.finalCheckForResponses()
        return out
    }

    func rxResponses() -> [RxAnswer] {
        var out: [RxAnswer] = []
        var slot = [UInt8](repeating: 0, count: 16)
        var extraNext = false
        while rx.unconsumedResponses() > 0 || rx.finalCheckForResponses() {
            slot.withUnsafeMutableBytes { b in
                rx.takeResponse(into: b.baseAddress!)
                if extraNext {
                    let e = NetifExtraInfo(decoding: b.baseAddress!)
                    let more = e.flags & NetifExtraType.flagMore != 0
                    if e.type == NetifExtraType.xdp {
                        out.append(.xdp(headroom: UInt16(e.payload[0]) | UInt16(e.payload[1]) << 8, more: more))
                    } else if e.type == NetifExtraType.hash {
                        let v = (0..<4).reduce(UInt32(0)) { $0 | UInt32(e.payload[2 + $1]) << (8 * UInt32($1)) }
                        out.append(.hash(typeBit: e.payload[0], algorithm: e.payload[1], value: v, more: more))
                    } else {
                        out.append(.gso(size: e.gsoSize, type: e.gsoType))
                    }
                    extraNext = more
                } else {
                    let r = NetifRxResponse(decoding: b.baseAddress!)
                    out.append(.data(r))
                    extraNext = r.flags & NetifRxFlags.extraInfo != 0
                }
            }
        }
        return out
    }

    @discardableResult
    func step(_ input: NetEngineInput = .kicked, now: Int = 0) -> NetEngineStep { engine.step(input, now: now) }
}

/// Test frames: Ethernet + IPv4 + TCP or UDP headers, then a counting payload.
enum TestFrame {
    static let tcpHeaderLength = 14 + 20 + 20

    static func ipv4(length: Int, tcp: Bool = true) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: length)
        let eth: [UInt8] = [0x00, 0x16, 0x3e, 0, 0, 2, 0x00, 0x16, 0x3e, 0, 0, 1, 0x08, 0x00]
        for (i, b) in eth.enumerated() { f[i] = b }
        f[14] = 0x45
        let ipLength = length - 14
        f[16] = UInt8(ipLength >> 8); f[17] = UInt8(ipLength & 0xff)
        f[22] = 64
        f[23] = tcp ? 6 : 17
        f[26] = 10; f[29] = 1; f[30] = 10; f[33] = 2
        if tcp { f[34 + 12] = 5 << 4 } else { f[34 + 4] = UInt8((ipLength - 20) >> 8); f[34 + 5] = UInt8((ipLength - 20) & 0xff) }
        let payloadStart = tcp ? tcpHeaderLength : 14 + 20 + 8
        for i in payloadStart..<length { f[i] = UInt8(truncatingIfNeeded: i &* 7) }
        return f
    }
}
