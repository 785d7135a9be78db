import Hypervisor
import NetworkPlumbing
import XenABI
import XenRing

// Rx: frames from the TAP are copied into the buffers the guest posted.
extension NetQueueEngine {
    /// One pass: read up to a batch of frames, copy them into posted
    /// buffers, answer. True if there may be more to do at once.
    func serviceRx(now: Int) -> Bool {
        rxCount = 0
        rxCopyCount = 0
        rxTakenCount = 0
        var tapEmpty = false
        let rxBuffers = buffers.rxBuffers
        let spare = NetEngineBuffers.rxBatch
        if let hashSettings { hashPolicy.refresh(from: hashSettings) }
        passHeadroom = rxHeadroom.bytes
        let hashingOn = hashPolicy.state.algorithm == NetifHashAlgorithm.toeplitz
        while rxCount < NetEngineBuffers.rxBatch {
            let buffer: UnsafeMutableRawPointer
            var length: Int
            var forwarded = false
            if rxHeldLength > 0 {
                // The held frame goes first; swap it into this pass's buffer.
                swap(&rxBuffers[rxCount], &rxBuffers[spare])
                length = rxHeldLength
                forwarded = rxHeldForwarded
                rxHeldLength = 0
                buffer = rxBuffers[rxCount]
            } else {
                if !tapPolled && !rxDropping { break }
                if tapFoundEmpty && !rxDropping {
                    passesWithoutTapLook += 1
                    if passesWithoutTapLook < Self.tapLookEvery {
                        tapEmpty = true
                        break
                    }
                }
                passesWithoutTapLook = 0
                buffer = rxBuffers[rxCount]
                let room = UnsafeMutableRawBufferPointer(start: buffer, count: NetEngineBuffers.rxBufferSize)
                if let steering, let n = steering.receive(into: room) {
                    // Another queue's frame, steered here by the guest's table.
                    length = n
                    forwarded = true
                    tapFoundEmpty = false
                } else {
                    do {
                        guard let n = try tap.read(into: room) else {
                            tapEmpty = true
                            // Empty at the pass's first look: nothing is
                            // coming in. (Frames, then EAGAIN: a stream the
                            // next pass should keep reading.)
                            tapFoundEmpty = rxCount == 0
                            break
                        }
                        tapFoundEmpty = false
                        length = n
                    } catch {
                        tapEmpty = true
                        break
                    }
                }
            }
            if length >= VirtioNetHeader.size + 6,
               !multicastFilter.admits(destination: UnsafeRawPointer(buffer + VirtioNetHeader.size)) {
                statistics.rxDropped &+= 1
                statistics.rxDroppedFiltered &+= 1
                continue
            }
            var hash: (value: UInt32, typeBit: UInt8)?
            if hashingOn {
                hash = receiveHash(buffer, length: length)
                if let steering, !forwarded {
                    // netif.h: the table (or the hash modulo the queues)
                    // picks the queue; a frame with no hash goes by hash 0.
                    let target = hashPolicy.queue(for: hash?.value ?? 0, queues: steering.queues)
                    if target != queueIndex {
                        if steering.forward(buffer, length: length, to: target) {
                            statistics.rxSteered &+= 1
                        } else {
                            statistics.rxDropped &+= 1
                            statistics.rxDroppedSteering &+= 1
                        }
                        continue
                    }
                }
            }
            guard var needed = rxSlotsNeeded(buffer, length: length) else {
                statistics.rxDropped &+= 1
                statistics.rxDroppedUnfit &+= 1
                continue
            }
            if hash != nil { needed += 1 }
            let available: UInt32
            do { available = try rxRing.unconsumedRequests() } catch {
                declareBroken("rx ring: \(error)")
                return false
            }
            if Int(available) < needed {
                if rxDropping {
                    statistics.rxDropped &+= 1
                    continue
                }
                // Hold it, stop reading the TAP, and ask to be told when the
                // guest posts buffers.
                swap(&rxBuffers[rxCount], &rxBuffers[spare])
                rxHeldLength = length
                rxHeldSlots = needed
                rxHeldForwarded = forwarded
                if rxStalledSince == nil { rxStalledSince = now }
                break
            }
            takeRxBuffers(frame: rxCount, buffer: buffer, length: length, slots: needed, hash: hash)
            rxCount += 1
        }
        if rxCount > 0 {
            rxStalledSince = nil
            rxDropping = false
            grants.copy(UnsafeMutableBufferPointer(rebasing: buffers.rxCopies[0..<rxCopyCount]))
            respondRx()
            pushRxResponses()
        }
        return updateRxStall(tapEmpty: tapEmpty, now: now)
    }

    /// After a pass: decides whether the TAP is polled, and whether to run
    /// another pass at once. True if there may be more to do now.
    private func updateRxStall(tapEmpty: Bool, now: Int) -> Bool {
        if rxHeldLength == 0 {
            setTapPolled(true)
            return !tapEmpty && rxCount == NetEngineBuffers.rxBatch
        }
        // A frame is held: enough buffers may have come meanwhile (arm rx
        // req_event first). Fewer than it needs is no reason to run again.
        let posted: Bool
        do { posted = try rxRing.finalCheckForRequests(atLeast: UInt32(rxHeldSlots)) } catch {
            declareBroken("rx ring: \(error)")
            return false
        }
        if posted { return true }
        if now &- (rxStalledSince ?? now) >= rxStallNanoseconds {
            // Stalled too long: drop what waits and keep dropping until buffers come.
            rxHeldLength = 0
            rxDropping = true
            statistics.rxDropped &+= 1
            setTapPolled(true)
            return true
        }
        setTapPolled(false)
        return false
    }

    private func setTapPolled(_ on: Bool) { tapPolled = on }

    /// Slots a frame needs on the rx ring (data buffers, plus one for the
    /// GSO extra), after fixing up what the frontend cannot take; nil to
    /// drop it.
    private func rxSlotsNeeded(_ buffer: UnsafeMutableRawPointer, length: Int) -> Int? {
        let frameLength = length - VirtioNetHeader.size
        guard frameLength >= FrameLayout.ethernetHeaderLength else { return nil }
        let header = VirtioNetHeader(from: buffer)
        let frame = buffer + VirtioNetHeader.size
        var extra = 0
        let gso = header.gsoType & ~VirtioNetHeader.gsoECN
        if gso != VirtioNetHeader.gsoNone {
            guard (gso == VirtioNetHeader.gsoTCPv4 && features.gsoTCPv4) || (gso == VirtioNetHeader.gsoTCPv6 && features.gsoTCPv6),
                  header.gsoSize > 0 else { return nil }
            extra = 1
        }
        if header.flags & VirtioNetHeader.flagNeedsChecksum != 0 && gso == VirtioNetHeader.gsoNone {
            guard let layout = FrameLayout.parse(UnsafeRawBufferPointer(start: frame, count: frameLength)) else { return nil }
            let partialOK = features.checksumOffload && (layout.network == .ipv4 || features.ipv6ChecksumOffload)
            if !partialOK {
                guard PartialChecksum.complete(frame, length: frameLength, start: Int(header.checksumStart),
                                               offset: Int(header.checksumOffset), isUDP: layout.transport == .udp) else {
                    return nil
                }
                // Complete now: tell the guest it is valid, not partial.
                var fixed = header
                fixed.flags = VirtioNetHeader.flagDataValid
                fixed.encode(to: buffer)
            }
        }
        // The first buffer keeps the guest's headroom free.
        let firstRoom = XenPage.size - passHeadroom
        let dataSlots = frameLength <= firstRoom ? 1 : 1 + (frameLength - firstRoom + XenPage.size - 1) / XenPage.size
        guard dataSlots == 1 || features.scatterGather else { return nil }
        return dataSlots + extra + (passHeadroom > 0 ? 1 : 0)
    }

    /// The frame's Toeplitz hash over what the guest's hash types name, and
    /// the type's bit number; nil when no type applies.
    @inline(__always)
    private func receiveHash(_ buffer: UnsafeMutableRawPointer, length: Int) -> (value: UInt32, typeBit: UInt8)? {
        guard hashPolicy.state.flags != 0,
              let input = NetifHashInput.extract(frame: buffer + VirtioNetHeader.size, length: length - VirtioNetHeader.size,
                                              flags: hashPolicy.state.flags, into: buffers.hashInput) else { return nil }
        return (hashPolicy.state.key.hash(buffers.hashInput, count: input.count), input.typeBit)
    }

    /// Takes `slots` posted buffers for one frame and queues the copies
    /// that fill them. Extra slots (GSO, then hash) follow the first data slot.
    private func takeRxBuffers(frame index: Int, buffer: UnsafeMutableRawPointer, length: Int, slots: Int,
                               hash: (value: UInt32, typeBit: UInt8)?) {
        let header = VirtioNetHeader(from: buffer)
        let frameLength = length - VirtioNetHeader.size
        var f = RxFrame()
        f.takenStart = Int32(rxTakenCount)
        f.slotCount = Int32(slots)
        f.copyStart = Int32(rxCopyCount)
        f.length = Int32(frameLength)
        f.header = header
        f.gsoExtra = header.gsoType & ~VirtioNetHeader.gsoECN != VirtioNetHeader.gsoNone
        if let hash {
            f.hashExtra = true
            f.hashValue = hash.value
            f.hashTypeBit = hash.typeBit
        }
        f.headroom = UInt16(passHeadroom)
        let extras = f.extras
        var offset = 0
        let scratch = buffers.scratch
        for s in 0..<slots {
            rxRing.takeRequest(into: scratch)
            let request = NetifRxRequest(decoding: scratch)
            buffers.rxTaken[rxTakenCount] = request.id
            rxTakenCount += 1
            if s >= 1 && s <= extras { continue }   // an extra's slot carries no data
            let room = s == 0 ? passHeadroom : 0
            let chunk = min(XenPage.size - room, frameLength - offset)
            buffers.rxCopies[rxCopyCount] = GrantCopyOperation(direction: .toGuest, domain: frontendDomain, ref: request.gref,
                                                       guestOffset: UInt16(room), length: UInt16(chunk),
                                                       local: buffer + VirtioNetHeader.size + offset)
            rxCopyCount += 1
            offset += chunk
        }
        buffers.rxFrames[index] = f
    }

    /// Writes the responses of this pass's frames, in ring order: the first
    /// data buffer (with the frame's flags), the extras, the rest.
    private func respondRx() {
        for i in 0..<rxCount {
            let f = buffers.rxFrames[i]
            let extras = f.extras
            let dataSlots = Int(f.slotCount) - extras
            var failed = false
            for c in Int(f.copyStart)..<(Int(f.copyStart) + dataSlots)
                where buffers.rxCopies[c].status != 0 { failed = true }   // a data slot's copy
            var firstFlags: UInt16 = 0
            if f.header.flags & VirtioNetHeader.flagNeedsChecksum != 0 {
                firstFlags |= NetifRxFlags.csumBlank | NetifRxFlags.dataValidated
            } else if f.header.flags & VirtioNetHeader.flagDataValid != 0 {
                firstFlags |= NetifRxFlags.dataValidated
            }
            if extras > 0 { firstFlags |= NetifRxFlags.extraInfo }
            var copy = Int(f.copyStart)
            var dataIndex = 0
            for s in 0..<Int(f.slotCount) {
                let id = buffers.rxTaken[Int(f.takenStart) + s]
                if s >= 1 && s <= extras {
                    let more: UInt8 = s < extras ? NetifExtraType.flagMore : 0
                    var payload = InlineArray<6, UInt8>(repeating: 0)
                    // In order: GSO, hash, XDP, each only if the frame has it.
                    let kind = s == 1 && f.gsoExtra ? NetifExtraType.gso
                        : s <= (f.gsoExtra ? 1 : 0) + (f.hashExtra ? 1 : 0) ? NetifExtraType.hash : NetifExtraType.xdp
                    if kind == NetifExtraType.gso {
                        payload[0] = UInt8(truncatingIfNeeded: f.header.gsoSize)
                        payload[1] = UInt8(truncatingIfNeeded: f.header.gsoSize >> 8)
                        let v4 = f.header.gsoType & ~VirtioNetHeader.gsoECN == VirtioNetHeader.gsoTCPv4
                        payload[2] = v4 ? NetifGSOType.tcpv4 : NetifGSOType.tcpv6
                        NetifExtraInfo(type: NetifExtraType.gso, flags: more, payload: payload).encode(to: rxRing.nextResponseSlot())
                    } else if kind == NetifExtraType.xdp {
                        // Linux's XDP extra: the headroom, little-endian.
                        payload[0] = UInt8(truncatingIfNeeded: f.headroom)
                        payload[1] = UInt8(truncatingIfNeeded: f.headroom >> 8)
                        NetifExtraInfo(type: NetifExtraType.xdp, flags: more, payload: payload).encode(to: rxRing.nextResponseSlot())
                    } else {
                        // netif.h's hash extra: type bit, algorithm, value little-endian.
                        payload[0] = f.hashTypeBit
                        payload[1] = UInt8(NetifHashAlgorithm.toeplitz)
                        for b in 0..<4 { payload[2 + b] = UInt8(truncatingIfNeeded: f.hashValue >> (8 * UInt32(b))) }
                        NetifExtraInfo(type: NetifExtraType.hash, flags: more, payload: payload).encode(to: rxRing.nextResponseSlot())
                    }
                    rxRing.commitResponse()
                    continue
                }
                var flags: UInt16 = s == 0 ? firstFlags : 0
                if dataIndex < dataSlots - 1 { flags |= NetifRxFlags.moreData }
                dataIndex += 1
                let status: Int16 = failed ? NetifStatus.error : Int16(buffers.rxCopies[copy].length)
                // The data's offset in the buffer: past the headroom in the first.
                NetifRxResponse(id: id, offset: buffers.rxCopies[copy].guestOffset, flags: flags, status: status)
                    .encode(to: rxRing.nextResponseSlot())
                rxRing.commitResponse()
                copy += 1
            }
            if failed {
                statistics.rxErrors &+= 1
            } else {
                statistics.rxPackets &+= 1
                statistics.rxBytes &+= UInt64(f.length)
            }
        }
    }
}
