import EngineDoubles
import Glibc
import Hypervisor
import NetBackend
import NetworkPlumbing
import XenABI

/// The grants as the guest set them (the checker's own copy).
struct NetifFuzzGrants {
    var granted = [Bool](repeating: false, count: NetifFuzzWorld.grantCount)
    var readOnly = [Bool](repeating: false, count: NetifFuzzWorld.grantCount)
    var frame = [Int](repeating: 0, count: NetifFuzzWorld.grantCount)

    func isGranted(_ ref: GrantRef) -> Bool { Int(ref) < granted.count && granted[Int(ref)] }

    /// The frame a copy to the guest under `ref` may write, if any.
    func writableFrame(_ ref: UInt32) -> Int? {
        guard Int(ref) < granted.count, granted[Int(ref)], !readOnly[Int(ref)] else { return nil }
        return frame[Int(ref)]
    }

    func grants(frame f: Int) -> Bool { granted.indices.contains { granted[$0] && frame[$0] == f } }
}

/// The invariants of the netif fuzz program, checked after every step:
/// each tx slot answered once, in ring order, with its id (NULL for extra
/// slots); frames on the TAP well-formed and made only of bytes of pages
/// the guest granted; rx writes only into granted, writable buffers it was
/// given, within the response's size; rx responses matching the requests;
/// nothing in flight after stop; nothing touched after a breach or stop;
/// a bounded engine.
final class NetifFuzzChecker {
    let world: NetifFuzzWorld
    var grants = NetifFuzzGrants()
    private(set) var findings: [String] = []
    /// Ring indices: responses checked so far and requests seen consumed.
    private var txAnswered: UInt32
    private var txConsumed: UInt32
    var rxAnswered: UInt32
    var rxConsumed: UInt32
    /// Where the tx response walk is inside a packet.
    private enum TxPosition { case first, extra(moreData: Bool), fragment }
    private var txPosition = TxPosition.first
    private var txPacketStatus: Int16 = 0
    var rxExpectExtra = false
    private var finished = false
    var steps = 0
    /// Per data frame: bytes [0, end) may be written by this step's rx copies.
    var writable = [Int](repeating: 0, count: NetifFuzzWorld.pageCount)
    /// Per frame: some grant points at it (its bytes are the granted pattern).
    private var frameGranted = [Bool](repeating: false, count: NetifFuzzWorld.pageCount)
    /// Frames the engine read from the TAP and has not delivered (or dropped), oldest first.
    var fromTheBridge: [[UInt8]] = []
    var tapCursor = 0
    /// One rx data response of this step: the frame its buffer is (if
    /// writable), where its data starts and its status.
    struct RxSlot { var frame: Int?; var offset: UInt16; var status: Int16; var flags: UInt16 }
    var rxSlots: [RxSlot] = []
    /// One delivered frame's extra slots.
    struct RxExtras {
        var gso: (size: UInt16, type: UInt8)?
        var hash: (typeBit: UInt8, value: UInt32)?
        var xdpHeadroom: UInt16?
        /// The last kind seen (1 GSO, 2 hash, 3 XDP): they come in that order, once each.
        var rank = 0
    }
    var rxExtras: [RxExtras] = []
    /// What the guest set for hashing (read as the step ends), and the
    /// headroom it asked for (0: none).
    var hashSettings: VifHashSettings?
    var headroom = 0
    /// Per data frame: bytes before this are the guest's (its headroom) and stay as they were.
    var writableFrom = [Int](repeating: XenPage.size, count: NetifFuzzWorld.pageCount)
    /// Control ring: responses checked so far.
    var controlAnswered: UInt32 = 0
    var controlBroken = false

    init(world: NetifFuzzWorld, startIndex: UInt32) {
        self.world = world
        txAnswered = startIndex; txConsumed = startIndex
        rxAnswered = startIndex; rxConsumed = startIndex
    }

    func fail(_ what: String) {
        if findings.count < 8 { findings.append("step \(steps): \(what)") }
    }

    // MARK: the guest's own actions (kept in the shadow)

    /// The guest writes its page; the bytes that mark ungranted and secret
    /// pages are never written, so a frame holding one leaked it.
    func guestWrites(frame: Int, offset: Int, _ value: UInt8) {
        let v = value == NetifFuzzWorld.ungrantedByte || value == NetifFuzzWorld.secretByte ? value ^ 0x10 : value
        world.guest.page(frame).storeBytes(of: v, toByteOffset: offset, as: UInt8.self)
        world.shadow.storeBytes(of: v, toByteOffset: frame * XenPage.size + offset, as: UInt8.self)
    }

    func grant(_ ref: GrantRef, frame: Int, readOnly: Bool) {
        let old = grants.granted[Int(ref)] ? grants.frame[Int(ref)] : nil
        grants.granted[Int(ref)] = true
        grants.readOnly[Int(ref)] = readOnly
        grants.frame[Int(ref)] = frame
        world.guest.grant(ref, frame: frame, readOnly: readOnly)
        if let old, old != frame { refill(old) }
        refill(frame)
    }

    func revoke(_ ref: GrantRef) {
        guard grants.granted[Int(ref)] else { return }
        grants.granted[Int(ref)] = false
        world.guest.revoke(ref)
        refill(grants.frame[Int(ref)])
    }

    func setReadOnly(_ ref: GrantRef, _ on: Bool) {
        grants.readOnly[Int(ref)] = on
        world.guest.setReadOnly(ref, on)
    }

    /// A frame that becomes granted gets the granted pattern; one no
    /// longer granted gets the ungranted marker (its old bytes are not the
    /// backend's to see any more).
    private func refill(_ frame: Int) {
        let granted = grants.grants(frame: frame)
        guard granted != frameGranted[frame] else { return }
        frameGranted[frame] = granted
        if granted { world.fillGranted(frame) } else { world.fillUngranted(frame) }
        world.shadow.advanced(by: frame * XenPage.size).copyMemory(from: world.guest.page(frame), byteCount: XenPage.size)
    }

    // MARK: a step

    func step(_ engine: NetQueueEngine<InMemoryTap>, _ input: NetEngineInput, now: Int) -> NetEngineStep {
        steps += 1
        let txPage = world.guest.page(NetifFuzzWorld.txRingFrame)
        let rxPage = world.guest.page(NetifFuzzWorld.rxRingFrame)
        world.txSlotsBefore.copyMemory(from: txPage, byteCount: XenPage.size)
        world.rxSlotsBefore.copyMemory(from: rxPage, byteCount: XenPage.size)
        let written = world.tap.written.count
        let reads = world.tap.reads
        if world.tap.framesRead < tapCursor { tapCursor = 0 }
        let s = engine.step(input, now: now)
        while tapCursor < world.tap.framesRead {
            let f = world.tap.toGuest[tapCursor]
            fromTheBridge.append(Array(f.prefix(NetEngineBuffers.rxBufferSize)))
            tapCursor += 1
        }

        if finished {
            // Broken or drained: the rings, the TAP and the guest's pages stay as they were.
            if memcmp(txPage, world.txSlotsBefore, XenPage.size) != 0 || memcmp(rxPage, world.rxSlotsBefore, XenPage.size) != 0 {
                fail("a stopped or broken engine wrote to a ring")
            }
            if world.tap.written.count != written || world.tap.reads != reads { fail("a stopped or broken engine used the TAP") }
            if s.notifyTx || s.notifyRx { fail("a stopped or broken engine asked to notify") }
            for i in writable.indices { writable[i] = 0; writableFrom[i] = XenPage.size }
            checkPages()
            if case .running = s.outcome { fail("a stopped or broken engine runs again") }
            return s
        }

        let brokeNow: Bool
        if case .broken = s.outcome { brokeNow = true } else { brokeNow = false }
        checkTx(engine, step: s)
        for i in written..<world.tap.written.count { checkFrame(world.tap.written[i]) }
        checkRx(engine, step: s, brokeNow: brokeNow)
        checkPages()
        if input == NetEngineInput.stop {
            if s.outcome != NetEngineStep.Outcome.drained && !brokeNow { fail("stop gave \(s.outcome)") }
        }
        if s.outcome != NetEngineStep.Outcome.running {
            finished = true
            if s.outcome == NetEngineStep.Outcome.drained { expectDrained(engine) }
        }
        return s
    }

    func expectDrained(_ engine: NetQueueEngine<InMemoryTap>) {
        guard engine.step(.stop, now: 0).outcome == NetEngineStep.Outcome.drained else { return }   // broken
        if engine.txRequestsInFlight != 0 || engine.rxRequestsInFlight != 0 || engine.holdsFrame {
            fail("after stop: \(engine.txRequestsInFlight) tx and \(engine.rxRequestsInFlight) rx requests in flight, frame held \(engine.holdsFrame)")
        }
        if txConsumed != txAnswered { fail("after stop: tx consumed to \(txConsumed), answered to \(txAnswered)") }
    }

    // MARK: tx

    private func checkTx(_ engine: NetQueueEngine<InMemoryTap>, step s: NetEngineStep) {
        let page = world.guest.page(NetifFuzzWorld.txRingFrame)
        let published = page.load(fromByteOffset: 8, as: UInt32.self)
        let consumed = published &+ engine.txRequestsInFlight
        // Responses are pushed as soon as written, breach or not: the
        // consumer is the published responses plus those in flight.
        let newly = consumed &- txConsumed
        guard newly <= 256 else { return fail("tx consumer moved by \(Int32(bitPattern: newly))") }
        // What the engine consumed this step is what the slots held before it.
        var k = txConsumed
        while k != consumed {
            let slot = Int(k & 255) * NetifTxRequest.size
            world.txConsumed.advanced(by: slot).copyMemory(from: world.txSlotsBefore + 64 + slot, byteCount: NetifTxRequest.size)
            k &+= 1
        }
        txConsumed = consumed
        let answered = published &- txAnswered
        if s.notifyTx && answered == 0 { fail("notify tx without a response") }
        guard answered <= txConsumed &- txAnswered else {
            return fail("tx responses to \(published), past the \(txConsumed) requests consumed")
        }
        while txAnswered != published {
            let slot = Int(txAnswered & 255)
            let request = world.txConsumed + slot * NetifTxRequest.size
            let response = NetifTxResponse(decoding: page + 64 + slot * NetifTxRequest.size)
            checkTxResponse(response, to: request, index: txAnswered)
            txAnswered &+= 1
        }
    }

    private func checkTxResponse(_ r: NetifTxResponse, to slot: UnsafeRawPointer, index: UInt32) {
        switch txPosition {
        case .first:
            let q = NetifTxRequest(decoding: slot)
            if r.id != q.id { fail("tx response \(index) has id \(r.id), its request \(q.id)") }
            if r.status != NetifStatus.okay && r.status != NetifStatus.error && r.status != NetifStatus.dropped {
                fail("tx response \(index) status \(r.status)")
            }
            txPacketStatus = r.status
            let more = q.flags & NetifTxFlags.moreData != 0
            txPosition = q.flags & NetifTxFlags.extraInfo != 0 ? .extra(moreData: more) : more ? .fragment : .first
        case .extra(let moreData):
            if r.id != 0 || r.status != NetifStatus.null { fail("tx extra slot \(index) answered id \(r.id) status \(r.status)") }
            let e = NetifExtraInfo(decoding: slot)
            txPosition = e.flags & NetifExtraType.flagMore != 0 ? .extra(moreData: moreData) : moreData ? .fragment : .first
        case .fragment:
            let q = NetifTxRequest(decoding: slot)
            if r.id != q.id { fail("tx fragment response \(index) has id \(r.id), its request \(q.id)") }
            if r.status != txPacketStatus { fail("tx fragment \(index) status \(r.status), its packet's \(txPacketStatus)") }
            txPosition = q.flags & NetifTxFlags.moreData != 0 ? .fragment : .first
        }
    }

    /// A frame on the TAP: a consistent virtio header, a sane length, and
    /// no byte from a page that was not granted.
    private func checkFrame(_ bytes: [UInt8]) {
        guard bytes.count >= VirtioNetHeader.size + FrameLayout.ethernetHeaderLength,
              bytes.count <= VirtioNetHeader.size + Netif.maxTxSize else {
            return fail("a frame of \(bytes.count) bytes on the TAP")
        }
        let length = bytes.count - VirtioNetHeader.size
        let h = bytes.withUnsafeBytes { VirtioNetHeader(bytes: $0)! }
        if h.flags & ~(VirtioNetHeader.flagNeedsChecksum | VirtioNetHeader.flagDataValid) != 0 || h.numBuffers != 0 {
            fail("frame header \(h)")
        }
        if h.flags & VirtioNetHeader.flagNeedsChecksum != 0 && Int(h.checksumStart) + Int(h.checksumOffset) + 2 > length {
            fail("checksum at \(h.checksumStart)+\(h.checksumOffset) in a frame of \(length)")
        }
        if h.gsoType != VirtioNetHeader.gsoNone {
            if h.gsoType != VirtioNetHeader.gsoTCPv4 && h.gsoType != VirtioNetHeader.gsoTCPv6 { fail("GSO type \(h.gsoType)") }
            if h.flags & VirtioNetHeader.flagNeedsChecksum == 0 || h.gsoSize == 0 || Int(h.headerLength) > length
                || h.headerLength <= h.checksumStart {
                fail("GSO header \(h) for a frame of \(length)")
            }
        }
        bytes.withUnsafeBytes { raw in
            let body = raw.baseAddress! + VirtioNetHeader.size
            for marker in [NetifFuzzWorld.ungrantedByte, NetifFuzzWorld.secretByte] {
                if let hit = memchr(body, Int32(marker), length) {
                    fail("frame byte \(body.distance(to: UnsafeRawPointer(hit))) is \(marker): from a page not granted")
                }
            }
        }
    }
}
