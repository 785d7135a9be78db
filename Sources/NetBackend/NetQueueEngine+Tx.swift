import Glibc
import Hypervisor
import NetworkPlumbing
import XenABI
import XenRing

// Tx: the guest's chains of requests become frames on the TAP.
extension NetQueueEngine {
    /// One pass over the tx ring. True if a full batch leaves more to do at once.
    func serviceTx(now: Int) -> Bool {
        if txBlockedUntil != 0 {
            guard now >= txBlockedUntil else { return false }
            txBlockedUntil = 0
        }
        if txNext < txCount {
            // Before answering what waited for credit: a guest that published
            // past the ring meanwhile overwrote slots not yet answered, and
            // these responses would overwrite its new requests in turn.
            do { _ = try txRing.unconsumedRequests() } catch {
                declareBroken("tx ring: \(error)")
                return false
            }
            writeTxPackets(now: now)
            pushTxResponses()
            if txNext < txCount { return false }   // still waiting for credit
        }
        let available: UInt32
        do { available = try txRing.unconsumedRequests() } catch {
            declareBroken("tx ring: \(error)")
            return false
        }
        guard available > 0 else { return false }
        takeTxBatch(available: available)
        if brokenReason != nil { return false }
        if txCopyCount > 0 { grants.copy(UnsafeMutableBufferPointer(rebasing: buffers.txCopies[0..<txCopyCount])) }
        writeTxPackets(now: now)
        pushTxResponses()
        // A short batch took every request there was; the final check looks again.
        return txCount == NetEngineBuffers.txBatch && txBlockedUntil == 0
    }

    /// Takes whole packets (request, extras, fragments) while the batch has
    /// room, validating each chain and queueing the grant copies that
    /// gather it into the packet's buffer.
    private func takeTxBatch(available: UInt32) {
        txCount = 0
        txNext = 0
        txCopyCount = 0
        var left = Int(available)
        while left > 0 && txCount < NetEngineBuffers.txBatch && brokenReason == nil {
            let used = takeTxPacket(into: txCount, available: left)
            left -= used
            txCount += 1
        }
    }

    /// Takes one packet's slots; returns how many it consumed.
    private func takeTxPacket(into index: Int, available: Int) -> Int {
        var p = TxPacket()
        let frame = buffers.txFrame(index)
        let scratch = buffers.scratch
        let copyStart = txCopyCount
        txRing.takeRequest(into: scratch)
        var consumed = 1
        let first = NetifTxRequest(decoding: scratch)
        p.ids[0] = first.id
        p.requestCount = 1
        p.flags = first.flags
        p.frameLength = Int(first.size)
        var rejection: TxChainRejection?

        // Extra-info slots follow the first request.
        if first.flags & NetifTxFlags.extraInfo != 0 {
            var more = true
            while more {
                guard consumed < available else {
                    declareBroken(TxChainRejection.incompleteChain(slots: consumed).description)
                    return consumed
                }
                txRing.takeRequest(into: scratch)
                consumed += 1
                p.extraCount += 1
                let extra = NetifExtraInfo(decoding: scratch)
                more = extra.flags & NetifExtraType.flagMore != 0
                if p.extraCount > TxChainRules.maxExtras {
                    rejection = rejection ?? .tooManySlots(consumed)
                    if consumed > TxChainRules.fatalSlots {
                        declareBroken(TxChainRejection.tooManySlots(consumed).description)
                        return consumed
                    }
                    continue
                }
                switch extra.type {
                case NetifExtraType.gso:
                    if p.gsoType != 0 { rejection = rejection ?? .duplicateExtra(extra.type); continue }
                    let t = extra.gsoType
                    guard (t == NetifGSOType.tcpv4 || t == NetifGSOType.tcpv6), extra.gsoSize > 0 else {
                        rejection = rejection ?? .badGSO(type: t, size: extra.gsoSize)
                        continue
                    }
                    p.gsoType = t
                    p.gsoSize = extra.gsoSize
                case NetifExtraType.mcastAdd, NetifExtraType.mcastDel:
                    if p.multicastEdit != 0 { rejection = rejection ?? .duplicateExtra(extra.type); continue }
                    p.multicastEdit = extra.type
                    p.multicastKey = VifMulticastFilter.key(UnsafeRawPointer(scratch + NetifExtraInfo.Offset.mcastAddr))
                case NetifExtraType.hash:
                    // netif.h: a backend that hashes accepts the guest's hash of
                    // a frame it sends. A TAP has nowhere to carry it: ignored.
                    break
                default:
                    rejection = rejection ?? .badExtraType(extra.type)
                }
            }
        }

        // Fragments: the first request's size is the whole frame; each later
        // request's size is its own share.
        var fragmentBytes = 0
        var more = first.flags & NetifTxFlags.moreData != 0
        var position = 0   // where the next fragment lands, after the head
        // The fragments' grants, copied once the chain is known to be good
        // (a preallocated array: an InlineArray here cost ~60 instructions a
        // packet to initialise).
        let deferred = buffers.txFragments
        while more {
            guard consumed < available else {
                declareBroken(TxChainRejection.incompleteChain(slots: consumed).description)
                return consumed
            }
            txRing.takeRequest(into: scratch)
            consumed += 1
            let r = NetifTxRequest(decoding: scratch)
            more = r.flags & NetifTxFlags.moreData != 0
            let dataSlot = p.requestCount
            p.requestCount += 1
            if dataSlot < TxPacket.maxIDs { p.ids[dataSlot] = r.id }
            if p.requestCount > TxChainRules.fatalSlots {
                declareBroken(TxChainRejection.tooManySlots(p.requestCount).description)
                return consumed
            }
            if p.requestCount > TxChainRules.maxSlots {
                rejection = rejection ?? .tooManySlots(p.requestCount)
                continue
            }
            if Int(r.offset) + Int(r.size) > XenPage.size {
                rejection = rejection ?? .fragmentCrossesPage(offset: r.offset, size: r.size)
                continue
            }
            fragmentBytes += Int(r.size)
            deferred[dataSlot - 1] = (r.gref, r.offset, r.size)
        }

        if rejection == nil && p.multicastEdit != 0 {
            // A filter edit, done now; its slots are answered with it (as
            // netback: OKAY, or ERROR for an add to a full filter).
            if p.multicastEdit == NetifExtraType.mcastAdd {
                if !multicastFilter.add(p.multicastKey) { p.status = NetifStatus.error }
            } else {
                multicastFilter.remove(p.multicastKey)
            }
            statistics.multicastEdits &+= 1
            malformedInARow = 0
            p.copyStart = Int32(copyStart)
            p.copyCount = 0
            buffers.txPackets[index] = p
            return consumed
        }
        if rejection == nil {
            let head = p.frameLength - fragmentBytes
            if fragmentBytes > p.frameLength {
                rejection = .fragmentsExceedFrameSize(frame: p.frameLength, fragments: fragmentBytes)
            } else if head == 0 {
                rejection = .zeroLengthHead
            } else if p.frameLength < FrameLayout.ethernetHeaderLength {
                rejection = .frameShorterThanEthernetHeader(p.frameLength)
            } else if Int(first.offset) + head > XenPage.size {
                rejection = .fragmentCrossesPage(offset: first.offset, size: UInt16(head))
            } else {
                queueTxCopy(ref: first.gref, offset: first.offset, length: head, to: frame)
                position = head
                for i in 0..<(p.requestCount - 1) where deferred[i].size > 0 {
                    queueTxCopy(ref: deferred[i].gref, offset: deferred[i].offset, length: Int(deferred[i].size),
                                to: frame + position)
                    position += Int(deferred[i].size)
                }
            }
        }
        if let rejection {
            txCopyCount = copyStart
            p.status = NetifStatus.error
            noteMalformed(rejection)
        } else {
            malformedInARow = 0
        }
        p.copyStart = Int32(copyStart)
        p.copyCount = Int32(txCopyCount - copyStart)
        buffers.txPackets[index] = p
        return consumed
    }

    @inline(__always)
    private func queueTxCopy(ref: GrantRef, offset: UInt16, length: Int, to local: UnsafeMutableRawPointer) {
        buffers.txCopies[txCopyCount] = GrantCopyOperation(direction: .fromGuest, domain: frontendDomain, ref: ref,
                                                   guestOffset: offset, length: UInt16(length), local: local)
        txCopyCount += 1
    }

    private func noteMalformed(_ r: TxChainRejection) {
        statistics.txMalformed &+= 1
        malformedInARow += 1
        if malformedInARow >= TxChainRules.malformedInARowLimit {
            declareBroken("\(malformedInARow) malformed packets in a row, the last: \(r)")
        }
    }

    /// Writes the batch's packets to the TAP from `txNext` on, answering
    /// each; stops early when the rate limit has no credit left. The frames
    /// ready at once go to the TAP in one `writeFrames` (one system call
    /// with io_uring), then every packet up to there is answered in order.
    private func writeTxPackets(now: Int) {
        let frames = buffers.txWrites
        let statuses = buffers.txStatuses
        // A breach found on the way (too many malformed in a row) ends the
        // batch: nothing after that packet is answered on a ring no longer trusted.
        while txNext < txCount && brokenReason == nil {
            var end = txNext
            var writes = 0
            var blocked = false
            while end < txCount && brokenReason == nil {
                let p = buffers.txPackets[end]
                var status = p.status
                if p.multicastEdit != 0 {
                    statuses[end] = status   // a control request: answered, nothing to write
                    end += 1
                    continue
                }
                if status == NetifStatus.okay {
                    let first = Int(p.copyStart)
                    for c in first..<(first + Int(p.copyCount)) where buffers.txCopies[c].status != 0 {
                        status = NetifStatus.error   // a revoked or bad grant
                    }
                    if status == NetifStatus.okay, credit != nil, !credit!.consume(p.frameLength, now: now) {
                        txBlockedUntil = credit!.nextRefill
                        statistics.txRateLimited &+= 1
                        statistics.txRateLimitedNanoseconds &+= UInt64(max(0, txBlockedUntil &- now))
                        blocked = true
                        break
                    }
                }
                if status == NetifStatus.okay {
                    if let frame = prepareFrame(end) {
                        frames[writes] = frame
                        buffers.txWriteOwners[writes] = Int32(end)
                        writes += 1
                    } else {
                        status = NetifStatus.error
                    }
                } else {
                    statistics.txErrors &+= 1
                }
                statuses[end] = status
                end += 1
            }
            if writes > 0 {
                tap.writeFrames(UnsafeBufferPointer(start: frames, count: writes), results: buffers.txWriteResults)
                for w in 0..<writes {
                    let i = Int(buffers.txWriteOwners[w])
                    let result = buffers.txWriteResults[w]
                    if result >= 0 {
                        statistics.txPackets &+= 1
                        statistics.txBytes &+= UInt64(buffers.txPackets[i].frameLength)
                    } else if result == -Int(EAGAIN) {
                        statistics.txDropped &+= 1
                        statuses[i] = NetifStatus.dropped
                    } else {
                        // The kernel refused the frame or its header (EINVAL), or the
                        // interface is down (EIO): this frame fails, the ring goes on.
                        statistics.txErrors &+= 1
                        statuses[i] = NetifStatus.error
                    }
                }
            }
            while txNext < end {
                respondTx(buffers.txPackets[txNext], status: statuses[txNext])
                txNext += 1
            }
            if blocked { return }
        }
    }

    /// Puts the virtio header in front of packet `i`; the frame to write,
    /// or nil when its offload request cannot be honoured (counted).
    private func prepareFrame(_ i: Int) -> iovec? {
        let p = buffers.txPackets[i]
        let frame = buffers.txFrame(i)
        var header = VirtioNetHeader()
        let wantsChecksum = p.flags & NetifTxFlags.csumBlank != 0
        if wantsChecksum || p.gsoType != 0 {
            guard let layout = FrameLayout.parse(UnsafeRawBufferPointer(start: frame, count: p.frameLength)) else {
                statistics.txErrors &+= 1
                noteMalformed(.unparseableOffload)
                return nil
            }
            header.flags = VirtioNetHeader.flagNeedsChecksum
            header.checksumStart = UInt16(layout.transportOffset)
            header.checksumOffset = UInt16(layout.checksumOffset)
            if p.gsoType != 0 {
                let v4 = p.gsoType == NetifGSOType.tcpv4
                guard layout.transport == .tcp, layout.network == (v4 ? .ipv4 : .ipv6) else {
                    statistics.txErrors &+= 1
                    noteMalformed(.gsoMismatch)
                    return nil
                }
                header.gsoType = v4 ? VirtioNetHeader.gsoTCPv4 : VirtioNetHeader.gsoTCPv6
                header.gsoSize = p.gsoSize
                header.headerLength = UInt16(layout.headerLength)
            }
        } else if p.flags & NetifTxFlags.dataValidated != 0 {
            header.flags = VirtioNetHeader.flagDataValid
        }
        let start = frame - VirtioNetHeader.size
        header.encode(to: start)
        return iovec(iov_base: start, iov_len: VirtioNetHeader.size + p.frameLength)
    }

    /// One response per slot the packet used, in ring order: the first
    /// request, NULL for each extra slot, then each fragment.
    func respondTx(_ p: TxPacket, status: Int16) {
        writeTxResponse(id: p.ids[0], status: status)
        for _ in 0..<p.extraCount { writeTxResponse(id: 0, status: NetifStatus.null) }
        if p.requestCount > 1 {
            for k in 1..<p.requestCount {
                writeTxResponse(id: k < TxPacket.maxIDs ? p.ids[k] : 0, status: status)
            }
        }
    }

    @inline(__always)
    private func writeTxResponse(id: UInt16, status: Int16) {
        NetifTxResponse(id: id, status: status).encode(to: txRing.nextResponseSlot())
        txRing.commitResponse()
    }
}
