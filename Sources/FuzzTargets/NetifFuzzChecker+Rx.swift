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
        for i in writable.indices { writable[i] = 0; writableFrom[i] = XenPage.size }
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
                var extras = rxExtras[rxExtras.count - 1]
                let rank = e.type == NetifExtraType.gso ? 1 : e.type == NetifExtraType.hash ? 2 : e.type == NetifExtraType.xdp ? 3 : 0
                if rank == 0 || rank <= extras.rank || e.flags & ~NetifExtraType.flagMore != 0 {
                    fail("rx extra \(rxAnswered): type \(e.type) flags \(e.flags) after extra kind \(extras.rank)")
                }
                extras.rank = rank
                switch rank {
                case 1:
                    if e.gsoSize == 0 || (e.gsoType != NetifGSOType.tcpv4 && e.gsoType != NetifGSOType.tcpv6) {
                        fail("rx extra \(rxAnswered): GSO \(e.gsoType)/\(e.gsoSize)")
                    }
                    extras.gso = (e.gsoSize, e.gsoType)
                case 2:
                    if e.payload[0] > NetifHashType.ipv6TCPBit || e.payload[1] != UInt8(NetifHashAlgorithm.toeplitz) {
                        fail("rx extra \(rxAnswered): hash type \(e.payload[0]) algorithm \(e.payload[1])")
                    }
                    extras.hash = (e.payload[0], (0..<4).reduce(UInt32(0)) { $0 | UInt32(e.payload[2 + $1]) << (8 * UInt32($1)) })
                case 3:
                    extras.xdpHeadroom = UInt16(e.payload[0]) | UInt16(e.payload[1]) << 8
                default:
                    break
                }
                rxExtras[rxExtras.count - 1] = extras
                rxExpectExtra = e.flags & NetifExtraType.flagMore != 0
            } else {
                let r = NetifRxResponse(decoding: raw)
                if r.id != request.id { fail("rx response \(rxAnswered) has id \(r.id), its request \(request.id)") }
                // Data starts past the guest's headroom in a frame's first buffer, at 0 in the others.
                let first = rxSlots.count == 0 || !inChainBefore(r)
                let offset = first ? headroom : 0
                if Int(r.offset) != offset || r.status == 0 || r.status < NetifStatus.error
                    || Int(r.status) > XenPage.size - offset {
                    fail("rx response \(rxAnswered): offset \(r.offset) status \(r.status) (headroom \(headroom))")
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
                    writable[frame] = max(writable[frame], r.status > 0 ? Int(r.offset) + Int(r.status) : XenPage.size)
                    writableFrom[frame] = min(writableFrom[frame], r.status > 0 ? Int(r.offset) : 0)
                }
                if first { rxExtras.append(RxExtras()) }
                rxSlots.append(RxSlot(frame: frame, offset: r.offset, status: r.status, flags: r.flags))
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
    private func checkRxFrame(_ slots: ArraySlice<RxSlot>, extra: RxExtras, uses: [Int]) {
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
    private func problem(with slots: ArraySlice<RxSlot>, extra: RxExtras, uses: [Int],
                         from frame: [UInt8]) -> String? {
        let failed = slots.contains { $0.status < 0 }
        let total = slots.reduce(0) { $0 + max(0, Int($1.status)) }
        let length = frame.count - VirtioNetHeader.size
        let firstRoom = XenPage.size - headroom
        let dataSlots = length <= firstRoom ? 1 : 1 + (length - firstRoom + XenPage.size - 1) / XenPage.size
        guard failed ? dataSlots == slots.count : length == total else { return "" }
        let h = frame.withUnsafeBytes { VirtioNetHeader(bytes: $0)! }
        let first = slots.first!.flags
        let gso = h.gsoType & ~VirtioNetHeader.gsoECN
        if gso != VirtioNetHeader.gsoNone {
            let type = gso == VirtioNetHeader.gsoTCPv4 ? NetifGSOType.tcpv4 : NetifGSOType.tcpv6
            if extra.gso == nil || extra.gso!.size != h.gsoSize || extra.gso!.type != type {
                return "GSO extra \(String(describing: extra.gso)) for \(h)"
            }
        } else if extra.gso != nil {
            return "a GSO extra for a frame without GSO"
        }
        if let expected = expectedHash(frame), expected.typeBit != extra.hash?.typeBit || expected.value != extra.hash?.value {
            return "hash extra \(String(describing: extra.hash)), expected \(expected)"
        } else if expectedHash(frame) == nil && extra.hash != nil {
            return "a hash extra \(extra.hash!) for a frame the guest's settings do not hash"
        }
        if (headroom > 0 ? UInt16(headroom) : nil) != extra.xdpHeadroom {
            return "XDP extra \(String(describing: extra.xdpHeadroom)) with headroom \(headroom)"
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
                let page = UnsafeRawPointer(world.guest.page(f)) + Int(slot.offset)
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

    /// The hash a frame must carry under the guest's settings, if any.
    private func expectedHash(_ frame: [UInt8]) -> (typeBit: UInt8, value: UInt32)? {
        guard let state = hashSettings?.state, state.algorithm == NetifHashAlgorithm.toeplitz, state.flags != 0 else { return nil }
        var input = [UInt8](repeating: 0, count: 64)
        return frame.withUnsafeBytes { f in
            input.withUnsafeMutableBytes { out in
                NetifHashInput.extract(frame: f.baseAddress! + VirtioNetHeader.size, length: f.count - VirtioNetHeader.size,
                                       flags: state.flags, into: out.baseAddress!).map {
                    ($0.typeBit, state.key.hash(out.baseAddress!, count: $0.count))
                }
            }
        }
    }

    /// Every data page byte that changed lies in a region this step's rx
    /// responses gave; the guest then takes the bytes (mapping the marker
    /// values away, as its own writes do) and the shadow follows.
    func checkPages() {
        for frame in NetifFuzzWorld.grantableFrames.lowerBound..<NetifFuzzWorld.secretFrames.upperBound {
            let page = world.guest.page(frame)
            let shadow = world.shadow + frame * XenPage.size
            guard memcmp(page, shadow, XenPage.size) != 0 else { continue }
            let allowed = writable[frame]
            let from = min(writableFrom[frame], allowed)
            if memcmp(page, shadow, from) != 0 {
                fail("frame \(frame) changed before byte \(from), the guest's headroom")
            }
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

// The control ring: every request answered once, in order, with its id and
// type, a status netif.h defines; the settings stay inside their bounds;
// the guest's pages untouched (keys and tables are only read).
extension NetifFuzzChecker {
    /// `before`: the control ring's page as it was before the step (what
    /// the engine read): each response must echo the request in its slot,
    /// whatever the guest did with its producer.
    func checkControl(_ outcome: NetControlEngine.Outcome, before: UnsafeRawPointer, publishedProducer: UInt32) {
        let slots = UInt32(SharedRingLayout.slots(pages: 1, entrySize: RingEntrySize.netifCtrl))
        steps += 1
        for i in writable.indices { writable[i] = 0; writableFrom[i] = XenPage.size }
        checkPages()
        let page = world.guest.page(NetifFuzzWorld.controlRingFrame)
        let responses = page.load(fromByteOffset: 8, as: UInt32.self)
        if controlBroken {
            if responses != controlAnswered { fail("a broken control ring answered again") }
            return
        }
        if case .broken = outcome {
            controlBroken = true
            if publishedProducer &- controlAnswered <= slots {
                fail("control ring broken with \(publishedProducer &- controlAnswered) requests posted")
            }
            if responses != controlAnswered { fail("a control ring found broken still answered") }
            return
        }
        // Every request posted (the producer never ran past the ring here) is answered.
        if responses != publishedProducer { fail("control responses to \(responses), requests to \(publishedProducer)") }
        var k = controlAnswered
        while k != responses {
            let offset = 64 + Int(k & (slots - 1)) * RingEntrySize.netifCtrl
            let q = NetifCtrlRequest(decoding: before + offset)
            let r = NetifCtrlResponse(decoding: page + offset)
            if r.id != q.id || r.type != q.type { fail("control response \(k): id \(r.id) type \(r.type) for \(q.id)/\(q.type)") }
            let getter = q.type == NetifCtrlType.getHashFlags || q.type == NetifCtrlType.getHashMappingSize
            if r.status > NetifCtrlStatus.bufferOverflow || (r.data != 0 && !(getter && r.status == NetifCtrlStatus.success)) {
                fail("control response \(k) to type \(q.type): status \(r.status) data \(r.data)")
            }
            k &+= 1
        }
        controlAnswered = responses
        guard let s = hashSettings?.state else { return }
        if s.algorithm > NetifHashAlgorithm.toeplitz || s.flags & ~NetifHashType.all != 0
            || s.mappingSize > VifHashSettings.maxMappingSize || s.keyLength > ToeplitzKey.maxLength
            || (0..<VifHashSettings.maxMappingSize).contains(where: { s.mapping[$0] != 0 }) {
            fail("hash settings out of bounds: algorithm \(s.algorithm) flags \(s.flags) table \(s.mappingSize) key \(s.keyLength)")
        }
    }
}
