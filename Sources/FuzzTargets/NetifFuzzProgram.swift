import EngineDoubles
import Hypervisor
import NetBackend
import NetworkPlumbing
import XenABI
import XenRing

/// One run of the netif fuzz program: the hostile frontend's side (its
/// rings, grants, pages and the TAP's far end) and the engine it plays
/// against.
final class NetifFuzzProgram {
    let world: NetifFuzzWorld
    let engine: NetQueueEngine<InMemoryTap>
    let checker: NetifFuzzChecker
    var tx: FrontRing
    var rx: FrontRing
    var control: FrontRing
    let controlEngine: NetControlEngine
    var controlID: UInt16 = 0
    var now = 0
    var lastDeadline: Int?

    init(world: NetifFuzzWorld, setup b: inout FuzzBytes) {
        self.world = world
        let f = b.u8()
        let features = FrontendNetFeatures(scatterGather: f & 1 != 0, gsoTCPv4: f & 2 != 0, gsoTCPv6: f & 4 != 0,
                                           checksumOffload: f & 8 == 0, ipv6ChecksumOffload: f & 16 != 0)
        let r = b.u8()
        let rate: (bytes: UInt64, microseconds: UInt64)? = r & 3 == 0 ? (60 + UInt64(b.u16()), 1 + UInt64(b.u16())) : nil
        let stall = 1 + Int(b.u8())
        let start: UInt32 = b.bool() ? 0xffff_fff0 &+ UInt32(b.u8() & 31) : 0
        tx = FrontRing(initializing: world.guest.page(NetifFuzzWorld.txRingFrame), pages: 1, entrySize: RingEntrySize.netifTx,
                       startIndex: start)
        rx = FrontRing(initializing: world.guest.page(NetifFuzzWorld.rxRingFrame), pages: 1, entrySize: RingEntrySize.netifRx,
                       startIndex: start)
        var c = NetQueueConfiguration(frontendDomain: NetifFuzzWorld.domain, txRingRef: 0, rxRingRef: 1, txRemotePort: 1,
                                      rxRemotePort: 1, frontend: features, rate: rate, rxStallMilliseconds: stall)
        // The vif's hash settings (edited by `.control`, or hashing from the
        // start in a quarter of the set-ups) and, in another quarter, rx headroom.
        let settings = VifHashSettings(queues: 1)
        if r & 0x30 == 0x30 {
            let flags = UInt32(b.u8() & 0xf), seed = Int(b.u8())
            let key = ToeplitzKey((0..<ToeplitzKey.maxLength).map { UInt8(truncatingIfNeeded: seed &* 131 &+ $0 &* 29) })
            _ = settings.edit { s in
                s.algorithm = NetifHashAlgorithm.toeplitz
                s.flags = flags
                s.key = key
                s.keyLength = ToeplitzKey.maxLength
                return NetifCtrlStatus.success
            }
        }
        c.hashSettings = settings
        let headroom = r & 0xc0 == 0xc0 ? Int(b.u16()) % (VifRxHeadroom.maximum + 1) : 0
        c.rxHeadroom = VifRxHeadroom(headroom)
        engine = NetQueueEngine(txRing: world.guest.page(NetifFuzzWorld.txRingFrame),
                                rxRing: world.guest.page(NetifFuzzWorld.rxRingFrame), grants: world.grants, tap: world.tap,
                                configuration: c, buffers: world.buffers, now: 0)
        checker = NetifFuzzChecker(world: world, startIndex: start)
        checker.hashSettings = settings
        checker.headroom = headroom
        control = FrontRing(initializing: world.guest.page(NetifFuzzWorld.controlRingFrame), pages: 1,
                            entrySize: RingEntrySize.netifCtrl)
        controlEngine = NetControlEngine(ring: world.guest.page(NetifFuzzWorld.controlRingFrame), grants: world.grants,
                                         frontendDomain: NetifFuzzWorld.domain, settings: settings)
    }

    func perform(_ action: NetifFuzzTarget.Action, _ b: inout FuzzBytes) {
        switch action {
        case .txRequest:
            let r = NetifTxRequest(gref: UInt32(b.u8() % UInt8(NetifFuzzWorld.grantCount + 2)), offset: b.offset(),
                                   flags: UInt16(b.u8() & 0x1f), id: UInt16(b.u8()), size: UInt16(truncatingIfNeeded: b.size()))
            r.encode(to: tx.nextRequestSlot())
            tx.commitRequest()
        case .txExtra:
            let type = b.u8() % 6
            var payload = InlineArray<6, UInt8>(repeating: 0)
            let size = b.bool() ? UInt16(b.u8()) : 1448
            payload[0] = UInt8(size & 0xff); payload[1] = UInt8(size >> 8); payload[2] = b.u8() % 4
            NetifExtraInfo(type: type, flags: b.u8() & 3, payload: payload).encode(to: tx.nextRequestSlot())
            tx.commitRequest()
        case .txPacket:
            writeTxPacket(&b)
        case .txPush:
            _ = tx.pushRequests()
        case .txProducer:
            tx.publishRawRequestProducer(producer(tx.requestProducerPrivate, &b))
        case .rxRequest:
            NetifRxRequest(id: UInt16(b.u8()), gref: UInt32(b.u8() % UInt8(NetifFuzzWorld.grantCount + 2))).encode(to: rx.nextRequestSlot())
            rx.commitRequest()
        case .rxBuffers:
            // A well-behaved refill: n buffers on granted, writable refs.
            for _ in 0..<(1 + Int(b.u8() % 20)) {
                let ref = grantedRef(writable: true, &b)
                NetifRxRequest(id: UInt16(b.u8()), gref: ref).encode(to: rx.nextRequestSlot())
                rx.commitRequest()
            }
            _ = rx.pushRequests()
        case .rxPush:
            _ = rx.pushRequests()
        case .rxProducer:
            rx.publishRawRequestProducer(producer(rx.requestProducerPrivate, &b))
        case .grant:
            let ref = Int(b.u8()) % NetifFuzzWorld.grantCount
            let frame = NetifFuzzWorld.grantableFrames.lowerBound + Int(b.u8()) % NetifFuzzWorld.grantableFrames.count
            checker.grant(GrantRef(ref), frame: frame, readOnly: b.u8() & 3 == 0)
        case .revoke:
            checker.revoke(GrantRef(Int(b.u8()) % NetifFuzzWorld.grantCount))
        case .readOnly:
            checker.setReadOnly(GrantRef(Int(b.u8()) % NetifFuzzWorld.grantCount), b.bool())
        case .writePage:
            let frame = NetifFuzzWorld.grantableFrames.lowerBound + Int(b.u8()) % NetifFuzzWorld.grantableFrames.count
            let offset = Int(b.u16() & 4095)
            let count = min(Int(b.u8() & 31), XenPage.size - offset)
            for i in 0..<count { checker.guestWrites(frame: frame, offset: offset + i, b.u8()) }
        case .writeHeaders:
            let frame = NetifFuzzWorld.grantableFrames.lowerBound + Int(b.u8()) % NetifFuzzWorld.grantableFrames.count
            let bytes = NetifFuzzFrames.headers(kind: b.u8(), length: b.size(), &b)
            let offset = Int(b.offset() & 4095)
            for (i, v) in bytes.prefix(XenPage.size - offset).enumerated() { checker.guestWrites(frame: frame, offset: offset + i, v) }
        case .tapFrame:
            world.tap.queue(raw: NetifFuzzFrames.fromTheBridge(&b))
        case .tapFull:
            world.tap.full = b.bool()
        case .tapError:
            // Every write fails, or one of the next eight (a frame in the
            // middle of a batch: the others go out), or none.
            let v = b.u8()
            let refused = NetworkError.system(call: "writev", interface: "", errno: 22)
            let which = world.tap.writes + Int(v >> 3 & 7)
            switch v & 7 {
            case 0: world.tap.writeError = refused
            case 1: world.tap.refusedAtWrite[which] = refused
            case 2: world.tap.fullAtWrite.insert(which)
            default: world.tap.writeError = nil
            }
        case .kick:
            step(.kicked)
        case .tick:
            step(.tick)
        case .tapReadable:
            step(.tapReadable)
        case .advanceTime:
            // To the deadline the engine asked for, or by a little, or by a lot.
            switch b.u8() & 3 {
            case 0: if let d = lastDeadline, d > now { now = d }
            case 1: now += Int(b.u16())
            case 2: now += Int(b.u16()) * 1_000_000
            default: now += Int(b.u8()) * 1_000
            }
            step(.tick)
        case .stop:
            step(.stop)
        case .revokeDuringCopy:
            let ref = GrantRef(Int(b.u8()) % NetifFuzzWorld.grantCount)
            world.grants.beforeCopy = { [checker, world] in
                world.grants.beforeCopy = nil
                checker.revoke(ref)
            }
            step(.kicked)
            world.grants.beforeCopy = nil
        case .control:
            controlRequests(&b)
        }
    }

    /// One to three control requests of any type, with data biased to each
    /// type's edges (keys of 40 and 41 bytes, tables that end at the size,
    /// queue numbers past the one queue), pushed; or a producer past the ring.
    private func controlRequests(_ b: inout FuzzBytes) {
        for _ in 0..<(1 + Int(b.u8() % 3)) {
            controlID &+= 1
            let type = UInt16(b.u8() % 12)
            let ref = UInt32(b.u8() % UInt8(NetifFuzzWorld.grantCount + 2))
            let data: (UInt32, UInt32, UInt32)
            switch type {
            case NetifCtrlType.setHashAlgorithm: data = (UInt32(b.u8() % 3), 0, 0)
            case NetifCtrlType.setHashFlags: data = (UInt32(b.u8() & 0x1f), 0, 0)
            case NetifCtrlType.setHashKey: data = (ref, b.u8() & 1 == 0 ? UInt32(b.u8() % 42) : b.u32(), 0)
            case NetifCtrlType.setHashMappingSize: data = (b.u8() & 1 == 0 ? UInt32(b.u8() % 130) : b.u32(), 0, 0)
            case NetifCtrlType.setHashMapping:
                data = (ref, b.u8() & 1 == 0 ? UInt32(b.u8() % 130) : b.u32(), b.u8() & 1 == 0 ? UInt32(b.u8() % 130) : b.u32())
            default: data = (b.u32(), b.u32(), b.u32())
            }
            let q = NetifCtrlRequest(id: controlID, type: type, data: data)
            q.encode(to: control.nextRequestSlot())
            control.commitRequest()
        }
        if b.u8() & 15 == 15 {
            control.publishRawRequestProducer(producer(control.requestProducerPrivate, &b))
        } else {
            _ = control.pushRequests()
        }
        let page = world.guest.page(NetifFuzzWorld.controlRingFrame)
        let producer = page.load(as: UInt32.self)
        world.controlSlotsBefore.copyMemory(from: page, byteCount: XenPage.size)
        checker.checkControl(controlEngine.step(), before: world.controlSlotsBefore, publishedProducer: producer)
        while control.unconsumedResponses() > 0 || control.finalCheckForResponses() { control.takeResponse(into: world.txSlotsBefore) }
    }

    /// req_prod anywhere: a little ahead, behind, past the ring, or any value.
    private func producer(_ current: UInt32, _ b: inout FuzzBytes) -> UInt32 {
        switch b.u8() & 3 {
        case 0: current
        case 1: current &- UInt32(b.u8())
        case 2: current &+ 250 &+ UInt32(b.u8() & 15)
        default: b.u32()
        }
    }

    /// A ref that grants a page (granting one if the choice does not).
    private func grantedRef(writable: Bool, _ b: inout FuzzBytes) -> GrantRef {
        let ref = GrantRef(Int(b.u8()) % NetifFuzzWorld.grantCount)
        if !checker.grants.isGranted(ref) || (writable && checker.grants.readOnly[Int(ref)]) {
            checker.grant(ref, frame: NetifFuzzWorld.grantableFrames.lowerBound + Int(ref) % NetifFuzzWorld.grantableFrames.count,
                          readOnly: false)
        }
        return ref
    }

    /// A packet a real netfront could send (headers in the first page, an
    /// optional GSO extra, fragments on granted pages), so the fuzzer
    /// reaches checksum and GSO offload with few bytes; then it is pushed.
    private func writeTxPacket(_ b: inout FuzzBytes) {
        let headRef = grantedRef(writable: false, &b)
        let headFrame = checker.grants.frame[Int(headRef)]
        let headOffset = Int(b.u8() & 63)
        let head = 54 + Int(b.u16()) % (XenPage.size - headOffset - 54)
        let headers = NetifFuzzFrames.headers(kind: b.u8(), length: head, &b)
        for (i, v) in headers.enumerated() where headOffset + i < XenPage.size {
            checker.guestWrites(frame: headFrame, offset: headOffset + i, v)
        }
        var fragments: [(ref: GrantRef, offset: UInt16, size: UInt16)] = []
        let count = b.u8() & 7 == 7 ? Int(b.u8() % 24) : Int(b.u8() % 4)
        for _ in 0..<count {
            let offset = UInt16(b.u16() & 4095)
            fragments.append((grantedRef(writable: false, &b), offset, UInt16(1 + Int(b.u16()) % (XenPage.size - Int(offset)))))
        }
        let total = head + fragments.reduce(0) { $0 + Int($1.size) }
        let gso = b.u8()
        let withGSO = gso & 3 != 0
        var flags = b.bool() ? NetifTxFlags.csumBlank : NetifTxFlags.dataValidated
        if withGSO { flags |= NetifTxFlags.extraInfo | NetifTxFlags.csumBlank }
        if !fragments.isEmpty { flags |= NetifTxFlags.moreData }
        let id = UInt16(b.u8())
        NetifTxRequest(gref: headRef, offset: UInt16(headOffset), flags: flags, id: id,
                       size: UInt16(truncatingIfNeeded: total)).encode(to: tx.nextRequestSlot())
        tx.commitRequest()
        if withGSO {
            var payload = InlineArray<6, UInt8>(repeating: 0)
            let size: UInt16 = gso & 4 != 0 ? 536 : 1448
            payload[0] = UInt8(size & 0xff); payload[1] = UInt8(size >> 8)
            payload[2] = gso & 3 == 1 ? NetifGSOType.tcpv4 : gso & 3 == 2 ? NetifGSOType.tcpv6 : gso >> 6
            NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: payload).encode(to: tx.nextRequestSlot())
            tx.commitRequest()
        }
        for (i, f) in fragments.enumerated() {
            NetifTxRequest(gref: f.ref, offset: f.offset, flags: i + 1 < fragments.count ? NetifTxFlags.moreData : 0,
                           id: id &+ UInt16(i + 1), size: f.size).encode(to: tx.nextRequestSlot())
            tx.commitRequest()
        }
        _ = tx.pushRequests()
    }

    func step(_ input: NetEngineInput) {
        let s = checker.step(engine, input, now: now)
        if let d = s.deadline { lastDeadline = d }
        // The guest takes its responses (so its rings have room) and re-arms rsp_event.
        let scratch = world.txSlotsBefore
        while tx.unconsumedResponses() > 0 || tx.finalCheckForResponses() { tx.takeResponse(into: scratch) }
        while rx.unconsumedResponses() > 0 || rx.finalCheckForResponses() { rx.takeResponse(into: scratch) }
    }

    /// The end of the program: stop, and everything taken must be answered.
    func finish() {
        step(.stop)
        checker.expectDrained(engine)
    }
}
