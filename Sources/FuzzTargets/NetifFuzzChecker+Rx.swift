import EngineDoubles
import Glibc
import NetBackend
import NetworkPlumbing
import XenABI

// The rx invariants: responses match the requests taken, each frame
// delivered is one the TAP gave, and the guest's pages change only where
// a response says the backend wrote.
extension NetifFuzzChecker {
    func checkRx(_ engine: NetQueueEngine<InMemoryTap>, step s: NetEngineStep, brokeNow: Bool) {
        for i in writable.indices { writable[i] = 0 }
        let page = world.guest.page(NetifFuzzWorld.rxRingFrame)
        let published = page.load(fromByteOffset: 8, as: UInt32.self)
        if !brokeNow && engine.rxRequestsInFlight != 0 { fail("\(engine.rxRequestsInFlight) rx requests left in flight after a step") }
        let consumed = published &+ engine.rxRequestsInFlight
        let newly = consumed &- rxConsumed
        guard newly <= 256 else { return fail("rx consumer moved by \(Int32(bitPattern: newly))") }
        if s.notifyRx && newly == 0 { fail("notify rx without a response") }
        var k = rxConsumed
        while k != consumed {
            let slot = Int(k & 255) * NetifRxRequest.size
            world.rxConsumed.advanced(by: slot).copyMemory(from: world.rxSlotsBefore + 64 + slot, byteCount: NetifRxRequest.size)
            k &+= 1
        }
        rxConsumed = consumed
        var inChain = false
        rxSlots.removeAll(keepingCapacity: true)
        rxExtras.removeAll(keepingCapacity: true)
        while rxAnswered != published {
            let slot = Int(rxAnswered & 255) * NetifRxRequest.size
            let request = NetifRxRequest(decoding: world.rxConsumed + slot)
            let raw = page + 64 + slot
            if rxExpectExtra {
                let e = NetifExtraInfo(decoding: raw)
                if e.type != NetifExtraType.gso || e.flags != 0 || e.gsoSize == 0
                    || (e.gsoType != NetifGSOType.tcpv4 && e.gsoType != NetifGSOType.tcpv6) {
                    fail("rx extra \(rxAnswered): type \(e.type) flags \(e.flags) GSO \(e.gsoType)/\(e.gsoSize)")
                }
                rxExpectExtra = false
                rxExtras[rxExtras.count - 1] = (e.gsoSize, e.gsoType)
            } else {
                let r = NetifRxResponse(decoding: raw)
                if r.id != request.id { fail("rx response \(rxAnswered) has id \(r.id), its request \(request.id)") }
                if r.offset != 0 || r.status == 0 || r.status < NetifStatus.error || r.status > Int16(XenPage.size) {
                    fail("rx response \(rxAnswered): offset \(r.offset) status \(r.status)")
                }
                if r.flags & ~(NetifRxFlags.dataValidated | NetifRxFlags.csumBlank | NetifRxFlags.moreData | NetifRxFlags.extraInfo) != 0 {
                    fail("rx response \(rxAnswered) flags \(r.flags)")
                }
                if inChain && r.flags & (NetifRxFlags.extraInfo | NetifRxFlags.csumBlank | NetifRxFlags.dataValidated) != 0 {
                    fail("rx response \(rxAnswered) inside a frame has first-slot flags \(r.flags)")
                }
                rxExpectExtra = r.flags & NetifRxFlags.extraInfo != 0
                inChain = r.flags & NetifRxFlags.moreData != 0
                let frame = writable(request.gref)
                if let frame {
                    writable[frame] = max(writable[frame], r.status > 0 ? Int(r.status) : XenPage.size)
                }
                if rxSlots.count == 0 || !inChainBefore(r) { rxExtras.append(nil) }
                rxSlots.append(RxSlot(frame: frame, status: r.status, flags: r.flags))
            }
            rxAnswered &+= 1
        }
        if inChain || rxExpectExtra { return fail("rx responses end inside a frame") }
        checkRxFrames()
    }

    private func inChainBefore(_ r: NetifRxResponse) -> Bool {
        rxSlots[rxSlots.count - 1].flags & NetifRxFlags.moreData != 0
    }

    /// Each frame delivered this step is one the TAP gave (in order, some
    /// dropped between): its size, flags, GSO extra and, where no other
    /// buffer of the step shares its page, its bytes.
    private func checkRxFrames() {
        var uses = [Int](repeating: 0, count: NetifFuzzWorld.pageCount)
        for slot in rxSlots { if let f = slot.frame { uses[f] += 1 } }
        var start = 0
        var packet = 0
        while start < rxSlots.count {
            var end = start
            while rxSlots[end].flags & NetifRxFlags.moreData != 0 { end += 1 }
            checkRxFrame(rxSlots[start...end], extra: rxExtras[packet], uses: uses)
            start = end + 1
            packet += 1
        }
    }

    /// The frame delivered must be one the TAP gave after the last one
    /// delivered (those between were dropped): the first that explains
    /// it is taken, with all before it.
    private func checkRxFrame(_ slots: ArraySlice<RxSlot>, extra: (size: UInt16, type: UInt8)?, uses: [Int]) {
        var firstProblem: String?
        for (i, frame) in fromTheBridge.enumerated() {
            guard let problem = problem(with: slots, extra: extra, uses: uses, from: frame) else {
                fromTheBridge.removeFirst(i + 1)
                return
            }
            if firstProblem == nil && !problem.isEmpty { firstProblem = problem }
        }
        let total = slots.reduce(0) { $0 + max(0, Int($1.status)) }
        fail("rx delivered \(slots.count) slots (\(total) bytes) that match no frame from the TAP: \(firstProblem ?? "no frame that long")")
    }

    /// Why `slots` cannot be `frame` ("" when its size alone differs), or nil.
    private func problem(with slots: ArraySlice<RxSlot>, extra: (size: UInt16, type: UInt8)?, uses: [Int],
                         from frame: [UInt8]) -> String? {
        let failed = slots.contains { $0.status < 0 }
        let total = slots.reduce(0) { $0 + max(0, Int($1.status)) }
        let length = frame.count - VirtioNetHeader.size
        guard failed ? (length + XenPage.size - 1) / XenPage.size == slots.count : length == total else { return "" }
        let h = frame.withUnsafeBytes { VirtioNetHeader(bytes: $0)! }
        let first = slots.first!.flags
        let gso = h.gsoType & ~VirtioNetHeader.gsoECN
        if gso != VirtioNetHeader.gsoNone {
            let type = gso == VirtioNetHeader.gsoTCPv4 ? NetifGSOType.tcpv4 : NetifGSOType.tcpv6
            if extra == nil || extra!.size != h.gsoSize || extra!.type != type { return "GSO extra \(String(describing: extra)) for \(h)" }
        } else if extra != nil {
            return "a GSO extra for a frame without GSO"
        }
        let validated = first & NetifRxFlags.dataValidated != 0
        if h.flags & (VirtioNetHeader.flagNeedsChecksum | VirtioNetHeader.flagDataValid) != 0 ? !validated
            : first & (NetifRxFlags.dataValidated | NetifRxFlags.csumBlank) != 0 {
            return "flags \(first) for a frame with virtio flags \(h.flags)"
        }
        guard !failed else { return nil }
        // The bytes, but for a checksum the engine may have completed.
        let checksum = h.flags & VirtioNetHeader.flagNeedsChecksum != 0 ? Int(h.checksumStart) + Int(h.checksumOffset) : -10
        var offset = 0
        return frame.withUnsafeBytes { raw -> String? in
            for slot in slots {
                defer { offset += Int(slot.status) }
                guard let f = slot.frame, uses[f] == 1 else { continue }
                let page = UnsafeRawPointer(world.guest.page(f))
                let sent = raw.baseAddress! + VirtioNetHeader.size + offset
                // Compared around the two checksum bytes, if they fall in this buffer.
                let skip = max(0, min(Int(slot.status), checksum - offset))
                let resume = max(0, min(Int(slot.status), checksum + 2 - offset))
                if memcmp(page, sent, skip) != 0 || memcmp(page + resume, sent + resume, Int(slot.status) - resume) != 0 {
                    return "the bytes of a \(total)-byte frame differ in the guest's buffer \(slot)"
                }
            }
            return nil
        }
    }

    private func writable(_ ref: UInt32) -> Int? { grants.writableFrame(ref) }

    /// Every data page byte that changed lies in a region this step's rx
    /// responses gave; the guest then takes the bytes (mapping the marker
    /// values away, as its own writes do) and the shadow follows.
    func checkPages() {
        for frame in NetifFuzzWorld.grantableFrames.lowerBound..<NetifFuzzWorld.pageCount {
            let page = world.guest.page(frame)
            let shadow = world.shadow + frame * XenPage.size
            guard memcmp(page, shadow, XenPage.size) != 0 else { continue }
            let allowed = writable[frame]
            if memcmp(page + allowed, shadow + allowed, XenPage.size - allowed) != 0 {
                fail("frame \(frame) changed past byte \(allowed), where no rx buffer allowed it")
                shadow.copyMemory(from: page, byteCount: XenPage.size)
                continue
            }
            for marker in [NetifFuzzWorld.ungrantedByte, NetifFuzzWorld.secretByte] {
                while let hit = memchr(page, Int32(marker), allowed) {
                    hit.storeBytes(of: marker ^ 0x10, as: UInt8.self)
                }
            }
            shadow.copyMemory(from: page, byteCount: allowed)
        }
    }
}
