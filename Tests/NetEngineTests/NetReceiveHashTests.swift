import EngineDoubles
import Hypervisor
import NetBackend
import NetworkPlumbing
import Testing
import XenABI
import XenRing

/// netif.h's control ring and receive-side hashing, stepped without a
/// thread: the control engine's answer to each message (exact statuses),
/// the hash extra on the rx ring, and steering through the guest's table.
@Suite struct NetReceiveHashTests {
    /// The RSS verification key of Microsoft's NDIS documentation.
    static let standardKey: [UInt8] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
        0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
        0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ]

    /// The guest of a control ring: ring in frame 0, grant r = frame r.
    final class ControlGuest {
        static let domain: DomID = 7
        let guest = InMemoryGuest(domain: ControlGuest.domain, pages: 8, grants: 16)
        let grants: InMemoryGrantTable
        var ring: FrontRing
        let engine: NetControlEngine
        let settings: VifHashSettings
        var nextID: UInt16 = 0

        init(queues: Int = 2) {
            grants = InMemoryGrantTable(guests: [guest])
            ring = FrontRing(initializing: guest.page(0), pages: 1, entrySize: RingEntrySize.netifCtrl)
            settings = VifHashSettings(queues: queues)
            engine = NetControlEngine(ring: guest.page(0), grants: grants, frontendDomain: Self.domain, settings: settings)
            for r in 1..<8 { guest.grant(GrantRef(r), frame: r, readOnly: true) }
        }

        /// Sends one request, steps the engine, returns the response.
        func send(_ type: UInt16, _ d0: UInt32 = 0, _ d1: UInt32 = 0, _ d2: UInt32 = 0) -> NetifCtrlResponse {
            nextID &+= 1
            NetifCtrlRequest(id: nextID, type: type, data: (d0, d1, d2)).encode(to: ring.nextRequestSlot())
            ring.commitRequest()
            _ = ring.pushRequests()
            #expect(engine.step() == .idle(notify: true))
            var slot = [UInt8](repeating: 0, count: 16)
            #expect(ring.unconsumedResponses() == 1)
            return slot.withUnsafeMutableBytes { b in
                ring.takeResponse(into: b.baseAddress!)
                let r = NetifCtrlResponse(decoding: b.baseAddress!)
                #expect(r.id == nextID && r.type == type)
                let more = ring.finalCheckForResponses()   // re-arms rsp_event, as a frontend does
                #expect(!more)
                return r
            }
        }

        func write(frame: Int, bytes: [UInt8]) {
            for (i, b) in bytes.enumerated() { guest.page(frame).storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
        }

        func write(frame: Int, entries: [UInt32]) {
            write(frame: frame, bytes: entries.flatMap { e in (0..<4).map { UInt8(truncatingIfNeeded: e >> (8 * UInt32($0))) } })
        }
    }

    @Test func eachMessageIsAnsweredAsNetifHSays() {
        let g = ControlGuest()
        let s = NetifCtrlStatus.self
        #expect(g.send(NetifCtrlType.getHashFlags).status == s.notSupported)
        #expect(g.send(NetifCtrlType.setHashFlags, NetifHashType.ipv4).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashAlgorithm, 2).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashAlgorithm, NetifHashAlgorithm.toeplitz).status == s.success)
        #expect(g.send(NetifCtrlType.getHashFlags) == NetifCtrlResponse(id: g.nextID, type: NetifCtrlType.getHashFlags,
                                                                        status: s.success, data: 0xf))
        #expect(g.send(NetifCtrlType.setHashFlags, 0x10).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashFlags, NetifHashType.ipv4 | NetifHashType.ipv4TCP).status == s.success)
        // The key: at most 40 bytes from the start of the grant; the rest zero.
        g.write(frame: 1, bytes: Self.standardKey + [0xee])
        #expect(g.send(NetifCtrlType.setHashKey, 1, 41).status == s.bufferOverflow)
        #expect(g.send(NetifCtrlType.setHashKey, 9, 40).status == s.invalidParameter)   // a grant that does not exist
        #expect(g.send(NetifCtrlType.setHashKey, 1, 40).status == s.success)
        #expect(g.settings.state.keyLength == 40)
        #expect(g.settings.state.key.hash([66, 9, 149, 187, 161, 142, 100, 80]) == 0x323e_8fc2)
        // The table.
        #expect(g.send(NetifCtrlType.getHashMappingSize) == NetifCtrlResponse(id: g.nextID, type: NetifCtrlType.getHashMappingSize,
                                                                              status: s.success, data: 128))
        #expect(g.send(NetifCtrlType.setHashMappingSize, 129).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashMappingSize, 8).status == s.success)
        g.write(frame: 2, entries: [1, 1, 0, 1])
        #expect(g.send(NetifCtrlType.setHashMapping, 2, 4, 2).status == s.success)
        #expect(Array(0..<8).map { Int(g.settings.state.mapping[$0]) } == [0, 0, 1, 1, 0, 1, 0, 0])
        // A queue the vif does not have: nothing changes.
        g.write(frame: 3, entries: [0, 2])
        #expect(g.send(NetifCtrlType.setHashMapping, 3, 2, 0).status == s.invalidParameter)
        // Beyond the table, or an offset that would wrap.
        #expect(g.send(NetifCtrlType.setHashMapping, 2, 4, 5).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashMapping, 2, 4, UInt32.max - 1).status == s.invalidParameter)
        #expect(g.send(NetifCtrlType.setHashMapping, 2, 1025, 0).status == s.bufferOverflow)
        #expect(Array(0..<8).map { Int(g.settings.state.mapping[$0]) } == [0, 0, 1, 1, 0, 1, 0, 0])
        // A new size zeroes the table.
        #expect(g.send(NetifCtrlType.setHashMappingSize, 4).status == s.success)
        #expect(g.settings.state.mappingSize == 4 && Array(0..<8).allSatisfy { g.settings.state.mapping[$0] == 0 })
        // What is not hashing.
        for type in [NetifCtrlType.invalid, NetifCtrlType.getGrefMappingSize, NetifCtrlType.addGrefMapping,
                     NetifCtrlType.delGrefMapping, 11, 0xffff] {
            #expect(g.send(type, 1, 2, 3) == NetifCtrlResponse(id: g.nextID, type: type, status: s.notSupported))
        }
        // Key length 0 clears it.
        #expect(g.send(NetifCtrlType.setHashKey, 0, 0).status == s.success)
        #expect(g.settings.state.key.hash([66, 9, 149, 187, 161, 142, 100, 80]) == 0)
        #expect(g.engine.requestsAnswered == UInt64(g.nextID))
    }

    @Test func aControlRingPastItsSizeBreaksOnlyTheControlRing() {
        let g = ControlGuest()
        let beyond = g.ring.requestProducerPrivate &+ g.ring.size &+ 1
        g.ring.publishRawRequestProducer(beyond)
        guard case .broken(let why) = g.engine.step() else {
            Issue.record("an overflowing control ring was served")
            return
        }
        #expect(why.contains("control ring"))
    }

    /// A TCP frame from 66.9.149.187:2794 to 161.142.100.80:1766 (Microsoft's first vector).
    static func vectorFrame(length: Int = 200) -> [UInt8] {
        var f = TestFrame.ipv4(length: length, tcp: true)
        let source: [UInt8] = [66, 9, 149, 187], destination: [UInt8] = [161, 142, 100, 80]
        for i in 0..<4 { f[26 + i] = source[i]; f[30 + i] = destination[i] }
        f[34] = UInt8(2794 >> 8); f[35] = UInt8(2794 & 0xff); f[36] = UInt8(1766 >> 8); f[37] = UInt8(1766 & 0xff)
        return f
    }

    /// What a TAP with TSO hands over for a TCPv4 super-frame: MSS 1448, partial checksum.
    static let tcpv4GSOHeader = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                                                headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16)

    static func hashing(flags: UInt32, mapping: [UInt8] = [], queues: Int = 1) -> VifHashSettings {
        let s = VifHashSettings(queues: queues)
        let key = ToeplitzKey(standardKey)
        _ = s.edit { st in
            st.algorithm = NetifHashAlgorithm.toeplitz
            st.flags = flags
            st.key = key
            st.keyLength = 40
            st.mappingSize = mapping.count
            for (i, q) in mapping.enumerated() { st.mapping[i] = q }
            return NetifCtrlStatus.success
        }
        return s
    }

    @Test func aHashedFrameCarriesAHashExtraAfterItsFirstSlot() throws {
        let h = EngineHarness(hashSettings: Self.hashing(flags: NetifHashType.ipv4 | NetifHashType.ipv4TCP))
        h.tap.queue(Self.vectorFrame())
        h.grantPage(10); h.grantPage(11)
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11)])
        h.step(.tapReadable)
        let answers = h.rxResponses()
        #expect(answers == [.data(NetifRxResponse(id: 0, offset: 0, flags: NetifRxFlags.extraInfo, status: 200)),
                            .hash(typeBit: NetifHashType.ipv4TCPBit, algorithm: 1, value: 0x51cc_c178, more: false)])
        #expect(h.bytes(ofPage: 10, 26..<30) == [66, 9, 149, 187])
    }

    @Test func withoutHashTypesOrWithAlgorithmNoneThereIsNoExtra() throws {
        for settings in [Self.hashing(flags: NetifHashType.ipv6), VifHashSettings(queues: 1)] {
            let h = EngineHarness(hashSettings: settings)
            h.tap.queue(Self.vectorFrame())
            h.grantPage(10)
            h.postRx([(id: 0, ref: 10)])
            h.step(.tapReadable)
            #expect(h.rxResponses() == [.data(NetifRxResponse(id: 0, offset: 0, flags: 0, status: 200))])
        }
    }

    @Test func aGSOFramesExtrasComeGSOFirstThenTheHash() throws {
        let settings = Self.hashing(flags: NetifHashType.ipv4)
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true, gsoTCPv4: true), hashSettings: settings)
        h.tap.queue(Self.vectorFrame(length: 5000), header: Self.tcpv4GSOHeader)
        for r in 10..<14 { h.grantPage(GrantRef(r)) }
        // Two data pages and two extras: three buffers are not enough.
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11), (id: 2, ref: 12)])
        h.step(.tapReadable)
        #expect(h.rxResponses().isEmpty)
        #expect(h.engine.holdsFrame)
        h.postRx([(id: 3, ref: 13)])
        h.step(.kicked)
        let answers = h.rxResponses()
        let first = NetifRxFlags.extraInfo | NetifRxFlags.moreData | NetifRxFlags.csumBlank | NetifRxFlags.dataValidated
        #expect(answers == [.data(NetifRxResponse(id: 0, offset: 0, flags: first, status: 4096)),
                            .gso(size: 1448, type: NetifGSOType.tcpv4),
                            .hash(typeBit: NetifHashType.ipv4Bit, algorithm: 1, value: 0x323e_8fc2, more: false),
                            .data(NetifRxResponse(id: 3, offset: 0, flags: 0, status: 5000 - 4096))])
        // The GSO extra says another follows.
        #expect(NetifExtraInfo(decoding: h.guest.page(1) + SharedRingLayout.headerSize + NetifRxResponse.size).flags
                == NetifExtraType.flagMore)
    }

    /// Records what an engine forwards, and hands it frames "from other queues".
    final class RecordingSteering: RxSteering {
        let queues: Int
        var forwarded: [(queue: Int, bytes: [UInt8])] = []
        var inbox: [[UInt8]] = []
        var full = false
        init(queues: Int) { self.queues = queues }
        func forward(_ frame: UnsafeRawPointer, length: Int, to queue: Int) -> Bool {
            if full { return false }
            forwarded.append((queue, Array(UnsafeRawBufferPointer(start: frame, count: length))))
            return true
        }
        func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
            guard !inbox.isEmpty else { return nil }
            let f = inbox.removeFirst()
            buffer.copyBytes(from: f)
            return f.count
        }
    }

    @Test func framesGoToTheQueueTheGuestsTableNames() throws {
        // 0x51ccc178 % 4 = 0 -> entry 0 -> queue 1; 0x323e8fc2 % 4 = 2 -> entry 2 -> queue 0.
        let settings = Self.hashing(flags: NetifHashType.ipv4 | NetifHashType.ipv4TCP, mapping: [1, 0, 0, 0], queues: 2)
        let steering = RecordingSteering(queues: 2)
        let h = EngineHarness(hashSettings: settings, queueIndex: 0, steering: steering)
        h.tap.queue(Self.vectorFrame())                       // TCP: queue 1
        var udp = Self.vectorFrame()
        udp[23] = 17                                          // IPv4 only: queue 0
        h.tap.queue(udp)
        h.grantPage(10); h.grantPage(11)
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11)])
        h.step(.tapReadable)
        #expect(steering.forwarded.count == 1 && steering.forwarded.first?.queue == 1)
        #expect(steering.forwarded.first.map { Array($0.bytes[VirtioNetHeader.size...]) } == Self.vectorFrame())
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 0, offset: 0, flags: NetifRxFlags.extraInfo, status: 200)),
                                    .hash(typeBit: NetifHashType.ipv4Bit, algorithm: 1, value: 0x323e_8fc2, more: false)])
        #expect(h.engine.statistics.rxSteered == 1 && h.engine.statistics.rxPackets == 1)

        // A frame another queue forwarded is delivered here, never sent on.
        steering.inbox.append(steering.forwarded[0].bytes)
        h.grantPage(12); h.grantPage(13)
        h.postRx([(id: 2, ref: 12), (id: 3, ref: 13)])
        h.step(.tapReadable)
        #expect(steering.forwarded.count == 1)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 2, offset: 0, flags: NetifRxFlags.extraInfo, status: 200)),
                                    .hash(typeBit: NetifHashType.ipv4TCPBit, algorithm: 1, value: 0x51cc_c178, more: false)])

        // A full inbox drops the frame, counted.
        steering.full = true
        h.tap.queue(Self.vectorFrame())
        h.step(.tapReadable)
        #expect(h.engine.statistics.rxDroppedSteering == 1 && h.engine.statistics.rxDropped == 1)
    }

    @Test func withNoTableTheHashModuloTheQueuesPicksAndUnhashedFramesGoToQueueZero() throws {
        // No table: 0x51ccc178 % 2 = 0. Flags that match nothing: hash 0 -> queue 0 as well.
        for flags in [NetifHashType.ipv4TCP, NetifHashType.ipv6] {
            let steering = RecordingSteering(queues: 2)
            let h = EngineHarness(hashSettings: Self.hashing(flags: flags, queues: 2), queueIndex: 1, steering: steering)
            h.tap.queue(Self.vectorFrame())
            h.step(.tapReadable)
            #expect(steering.forwarded.map(\.queue) == [0])
        }
    }

    @Test func settingsChangedBetweenPassesApplyFromTheNextPass() throws {
        let settings = VifHashSettings(queues: 1)
        let h = EngineHarness(hashSettings: settings)
        h.tap.queue(Self.vectorFrame())
        h.grantPage(10); h.grantPage(11); h.grantPage(12)
        h.postRx([(id: 0, ref: 10)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 0, offset: 0, flags: 0, status: 200))])
        _ = settings.edit { s in
            s.algorithm = NetifHashAlgorithm.toeplitz
            s.flags = NetifHashType.ipv4TCP
            s.key = ToeplitzKey(Self.standardKey)
            return NetifCtrlStatus.success
        }
        h.tap.queue(Self.vectorFrame())
        h.postRx([(id: 1, ref: 11), (id: 2, ref: 12)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 1, offset: 0, flags: NetifRxFlags.extraInfo, status: 200)),
                                    .hash(typeBit: NetifHashType.ipv4TCPBit, algorithm: 1, value: 0x51cc_c178, more: false)])
    }
}

/// Linux's xdp-headroom: room left before each frame in its first buffer.
@Suite struct NetRxHeadroomEngineTests {
    @Test func theFirstBufferKeepsTheHeadroomAndAnXDPExtraSaysSo() {
        let headroom = VifRxHeadroom(256)
        let h = EngineHarness(rxHeadroom: headroom)
        let frame = TestFrame.ipv4(length: 1000)
        h.tap.queue(frame)
        h.grantPage(10, [UInt8](repeating: 0xaa, count: 4096))
        h.grantPage(11)
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 0, offset: 256, flags: NetifRxFlags.extraInfo, status: 1000)),
                                    .xdp(headroom: 256, more: false)])
        #expect(h.bytes(ofPage: 10, 0..<256).allSatisfy { $0 == 0xaa })   // the headroom is the guest's, untouched
        #expect(h.bytes(ofPage: 10, 256..<1256) == frame)
    }

    @Test func aFrameLongerThanTheFirstBuffersRoomSpillsIntoTheNextFromItsStart() {
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true), rxHeadroom: VifRxHeadroom(2048))
        let frame = TestFrame.ipv4(length: 3000)
        h.tap.queue(frame)
        for r in 10..<13 { h.grantPage(GrantRef(r)) }
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11), (id: 2, ref: 12)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [
            .data(NetifRxResponse(id: 0, offset: 2048, flags: NetifRxFlags.extraInfo | NetifRxFlags.moreData, status: 2048)),
            .xdp(headroom: 2048, more: false),
            .data(NetifRxResponse(id: 2, offset: 0, flags: 0, status: 3000 - 2048)),
        ])
        #expect(h.bytes(ofPage: 10, 2048..<4096) + h.bytes(ofPage: 12, 0..<(3000 - 2048)) == frame)
    }

    @Test func withoutScatterGatherAFrameBeyondTheRoomIsUnfit() {
        let h = EngineHarness(rxHeadroom: VifRxHeadroom(2048))
        h.tap.queue(TestFrame.ipv4(length: 2100))
        h.tap.queue(TestFrame.ipv4(length: 2000))
        for r in 10..<14 { h.grantPage(GrantRef(r)) }
        h.postRx([(id: 0, ref: 10), (id: 1, ref: 11)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 0, offset: 2048, flags: NetifRxFlags.extraInfo, status: 2000)),
                                    .xdp(headroom: 2048, more: false)])
        #expect(h.engine.statistics.rxDroppedUnfit == 1)
    }

    @Test func extrasComeGSOThenHashThenXDPAndAChangeAppliesFromTheNextPass() {
        let headroom = VifRxHeadroom(256)
        let settings = NetReceiveHashTests.hashing(flags: NetifHashType.ipv4)
        let h = EngineHarness(features: FrontendNetFeatures(scatterGather: true, gsoTCPv4: true), hashSettings: settings,
                              rxHeadroom: headroom)
        h.tap.queue(NetReceiveHashTests.vectorFrame(length: 5000), header: NetReceiveHashTests.tcpv4GSOHeader)
        for r in 10..<20 { h.grantPage(GrantRef(r)) }
        h.postRx((0..<5).map { (id: UInt16($0), ref: GrantRef(10 + $0)) })
        h.step(.tapReadable)
        let first = NetifRxFlags.extraInfo | NetifRxFlags.moreData | NetifRxFlags.csumBlank | NetifRxFlags.dataValidated
        #expect(h.rxResponses() == [
            .data(NetifRxResponse(id: 0, offset: 256, flags: first, status: 4096 - 256)),
            .gso(size: 1448, type: NetifGSOType.tcpv4),
            .hash(typeBit: NetifHashType.ipv4Bit, algorithm: 1, value: 0x323e_8fc2, more: true),
            .xdp(headroom: 256, more: false),
            .data(NetifRxResponse(id: 4, offset: 0, flags: 0, status: 5000 - (4096 - 256))),
        ])
        // The guest gives the room back (its program detached): no XDP extra, offset 0.
        headroom.set(0)
        h.tap.queue(TestFrame.ipv4(length: 100, tcp: false))
        h.postRx([(id: 5, ref: 15), (id: 6, ref: 16)])
        h.step(.tapReadable)
        #expect(h.rxResponses() == [.data(NetifRxResponse(id: 5, offset: 0, flags: NetifRxFlags.extraInfo, status: 100)),
                                    .hash(typeBit: NetifHashType.ipv4Bit, algorithm: 1,
                                          value: ToeplitzKey(NetReceiveHashTests.standardKey).hash([10, 0, 0, 1, 10, 0, 0, 2]),
                                          more: false)])
    }
}
