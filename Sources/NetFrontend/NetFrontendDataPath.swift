import Glibc
import NetworkPlumbing
import SystemSupport
import XenABI

/// The pump: one thread that joins a queue's rings to a TAP queue, as a
/// guest's netfront joins them to its network stack (with several queues,
/// one pump per ring pair, each with its own TAP queue and event channel
/// handle; they share nothing but the statistics box). Frames the namespace's kernel
/// sends (read from the TAP) go out on the tx ring; frames the backend puts
/// on the rx ring are written to the TAP. One poll loop over the event
/// channel's FIFO, a wakeup eventfd (stop) and the TAP (only while the tx
/// ring has room for a whole frame).
///
/// Per pass: reap tx responses (their pages are free again), take rx
/// packets to the TAP (written together, one io_uring submission, before
/// their buffers are posted again), read frames from the TAP onto the tx
/// ring; when nothing moved, arm rsp_event on both rings
/// (RING_FINAL_CHECK_FOR_RESPONSES), look once more, and sleep.
///
/// No allocation per frame: frames are read from the TAP straight into the
/// granted tx pages (a virtio header, then 16 pages: 65535 bytes at most
/// fit), and written to the TAP straight from the rx pages.
final class NetFrontendPump: @unchecked Sendable {  // everything below is the pump thread's, but for start/stop
    /// Pages one frame may span: 65535 bytes (XEN_NETIF_MAX_TX_SIZE) from
    /// offset 0. With a GSO extra, 17 slots: within XEN_NETIF_NR_SLOTS_MIN.
    static let maxTxFragments = (Netif.maxTxSize + XenPage.size - 1) / XenPage.size
    /// Frames (each way) per pass before looking at the other side.
    static let batch = 64

    private let queue: NetFrontendQueue
    private let tap: TapQueue
    /// Received packets go to the TAP together, one io_uring submission
    /// per pass (as the backend's tx does).
    private let tapWriter: BatchingTapQueue
    /// One pass's received packets waiting for that write: each packet's
    /// vectors (its virtio header's first) at `slotVectors` per packet,
    /// how many, and its header. The vectors point into rx buffers the
    /// pass does not post again before the write.
    private static let slotVectors = 1 + NetFrontendQueue.maxRxDataSlots
    private let outVectors = UnsafeMutablePointer<iovec>.allocate(capacity: NetFrontendPump.batch * NetFrontendPump.slotVectors)
    private let outCounts = UnsafeMutablePointer<Int>.allocate(capacity: NetFrontendPump.batch)
    private let outHeaders = UnsafeMutableRawPointer.allocate(byteCount: NetFrontendPump.batch * 16, alignment: 16)
    private let outResults = UnsafeMutablePointer<Int>.allocate(capacity: NetFrontendPump.batch)
    private var outCount = 0
    private let negotiated: NetFrontendNegotiated
    private let postRx: Bool
    private let statistics: StatisticsBox
    /// This queue's index (its slot in the statistics box).
    private let index: Int
    private let name: String
    private let stopFlag = StopFlag()
    private let wakeup: Wakeup
    private var thread: NativeThread?

    private let headerSize: Int
    private let txHeader = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    private let txVectors = UnsafeMutablePointer<iovec>.allocate(capacity: 1 + maxTxFragments)
    /// Tx ids (pages) held for the next frame read from the TAP, with their
    /// vectors in `txVectors`; kept from frame to frame, so a small frame
    /// takes one id from the free list, not a whole frame's.
    private let reserved = UnsafeMutablePointer<UInt16>.allocate(capacity: maxTxFragments)
    private var reservedCount = 0
    /// Where the first bytes of a received frame are gathered when its first
    /// buffer holds less than its headers.
    private static let headerWindowSize = 256
    private let headerWindow = UnsafeMutableRawPointer.allocate(byteCount: headerWindowSize, alignment: 16)
    private let pollFDs = UnsafeMutablePointer<pollfd>.allocate(capacity: 3)
    private var tapUsable = true

    init(queue: NetFrontendQueue, tap: TapQueue, negotiated: NetFrontendNegotiated, postRx: Bool,
         statistics: StatisticsBox, index: Int = 0, name: String) throws(SystemError) {
        self.queue = queue
        self.tap = tap
        tapWriter = BatchingTapQueue(tap)
        self.negotiated = negotiated
        self.postRx = postRx
        self.statistics = statistics
        self.index = index
        self.name = name
        headerSize = tap.vnetHeaderSize
        wakeup = try Wakeup()
        txVectors.initialize(repeating: iovec(), count: 1 + Self.maxTxFragments)
        pollFDs.initialize(repeating: pollfd(), count: 3)
    }

    deinit {
        txHeader.deallocate(); txVectors.deallocate(); reserved.deallocate()
        headerWindow.deallocate(); pollFDs.deallocate()
        outVectors.deallocate(); outCounts.deallocate(); outHeaders.deallocate(); outResults.deallocate()
    }

    func start() throws(SystemError) {
        thread = try NativeThread(name: name) { [self] in run() }
    }

    /// Stops the thread and waits for it; the queue is the caller's again.
    func stop() {
        guard let t = thread else { return }
        thread = nil
        stopFlag.raise()
        wakeup.signal()
        t.join()
        wakeup.close()
    }

    // MARK: the loop

    private func run() {
        while !stopFlag.isRaised {
            var worked = false
            if queue.reapTxResponses() > 0 { worked = true }
            if queue.receive(limit: Self.batch, { deliver($0) }) > 0 { worked = true }
            writeReceived()   // before postRx gives their buffers back
            if postRx { queue.postRx() }
            if transmitFromTap() > 0 { worked = true }
            statistics.publish(queue.stats, queue: index)
            if worked { continue }
            // Arm rsp_event on both rings, then look again before sleeping.
            _ = queue.tx.finalCheckForResponses()
            _ = queue.rx.finalCheckForResponses()
            if queue.txResponsesWaiting || queue.rxResponsesWaiting { continue }
            sleep()
        }
        // The queue goes back to its owner with every free id on its list.
        while reservedCount > 0 {
            reservedCount -= 1
            queue.pushTxID(reserved[reservedCount])
        }
        statistics.publish(queue.stats, queue: index)
    }

    private func sleep() {
        pollFDs[0] = pollfd(fd: queue.events.fileDescriptor, events: Int16(POLLIN), revents: 0)
        pollFDs[1] = pollfd(fd: wakeup.fd, events: Int16(POLLIN), revents: 0)
        var count = 2
        if tapUsable && txHasRoomForFrame {
            pollFDs[2] = pollfd(fd: tap.fileDescriptor, events: Int16(POLLIN), revents: 0)
            count = 3
        }
        queue.stats.waits &+= 1
        // A failed poll: just go round (an interrupted one is retried inside).
        guard let ready = try? Syscall.poll(pollFDs, count, timeoutMilliseconds: -1), ready > 0 else { return }
        if pollFDs[0].revents != 0 { queue.drainEvents() }
        if pollFDs[1].revents != 0 { wakeup.drain() }
        if count == 3 && pollFDs[2].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 { tapUsable = false }
    }

    // MARK: TAP -> tx ring

    private var txHasRoomForFrame: Bool {
        queue.tx.freeRequests > UInt32(Self.maxTxFragments) && queue.txFreeIDs + reservedCount >= Self.maxTxFragments
    }

    /// Reads frames from the TAP onto the tx ring while it has room.
    private func transmitFromTap() -> Int {
        var frames = 0
        let firstPage = headerSize > 0 ? 1 : 0
        if headerSize > 0 { txVectors[0] = iovec(iov_base: txHeader, iov_len: headerSize) }
        while frames < Self.batch && tapUsable && txHasRoomForFrame {
            while reservedCount < Self.maxTxFragments {
                let id = queue.popTxID()!
                reserved[reservedCount] = id
                txVectors[firstPage + reservedCount] = iovec(iov_base: queue.txPage(id), iov_len: XenPage.size)
                reservedCount += 1
            }
            let n: Int?
            do {
                n = try tap.read(UnsafeBufferPointer(start: txVectors, count: firstPage + Self.maxTxFragments))
            } catch {
                tapUsable = false
                n = nil
            }
            guard let n else { break }
            frames += 1
            let used = n >= headerSize ? send(frameLength: n - headerSize) : 0
            if used == 0 { queue.stats.txDropped &+= 1 }
            dropReserved(used, vectorsFrom: firstPage)
        }
        return frames
    }

    /// The first `used` reserved ids are on the ring now: the others move
    /// to the front (with their vectors), for the next frame.
    private func dropReserved(_ used: Int, vectorsFrom firstPage: Int) {
        guard used > 0 else { return }
        let kept = reservedCount - used
        if kept > 0 {
            memmove(reserved, reserved + used, kept * MemoryLayout<UInt16>.stride)
            memmove(txVectors + firstPage, txVectors + firstPage + used, kept * MemoryLayout<iovec>.stride)
        }
        reservedCount = kept
    }

    /// Puts the frame in the reserved pages on the ring: the first request
    /// carries the whole length and the checksum flags, a GSO extra slot
    /// follows it, then one request per further page, NETTXF_more_data on
    /// all but the last. Returns the pages used (0: dropped).
    private func send(frameLength length: Int) -> Int {
        guard length >= FrameLayout.ethernetHeaderLength, length <= Netif.maxTxSize else { return 0 }
        let pages = (length + XenPage.size - 1) / XenPage.size
        guard pages == 1 || negotiated.txScatterGather else { return 0 }
        let header = headerSize > 0 ? VirtioNetHeader(from: txHeader) : VirtioNetHeader()

        var gsoType = NetifGSOType.none
        switch header.gsoType & ~VirtioNetHeader.gsoECN {
        case VirtioNetHeader.gsoNone: break
        case VirtioNetHeader.gsoTCPv4 where negotiated.txGSOTCPv4: gsoType = NetifGSOType.tcpv4
        case VirtioNetHeader.gsoTCPv6 where negotiated.txGSOTCPv6: gsoType = NetifGSOType.tcpv6
        default: return 0
        }
        if gsoType != NetifGSOType.none && header.gsoSize == 0 { return 0 }

        var flags: UInt16 = 0
        if header.flags & VirtioNetHeader.flagNeedsChecksum != 0 {
            let start = Int(header.checksumStart), offset = Int(header.checksumOffset)
            guard start + offset + 2 <= length else { return 0 }
            let firstPage = UnsafeRawBufferPointer(start: queue.txPage(reserved[0]), count: min(length, XenPage.size))
            let layout = FrameLayout.parse(firstPage)
            // IPv4 partial checksums the backend always takes (netif has no
            // way to refuse them but feature-no-csum-offload, which is the
            // frontend's); IPv6 ones only with feature-ipv6-csum-offload; a
            // frame it cannot parse it could not finish either.
            if let layout, layout.network == .ipv4 || negotiated.txIPv6ChecksumOffload {
                flags |= NetifTxFlags.csumBlank | NetifTxFlags.dataValidated
            } else if gsoType != NetifGSOType.none {
                return 0   // segmentation is the backend's, and needs its checksum offload
            } else {
                FrameFragments(vectors: UnsafePointer(txVectors + (headerSize > 0 ? 1 : 0)), count: pages, length: length)
                    .completeChecksum(start: start, offset: offset)
                queue.stats.txChecksumsCompleted &+= 1
                flags |= NetifTxFlags.dataValidated
            }
        } else if header.flags & VirtioNetHeader.flagDataValid != 0 {
            flags |= NetifTxFlags.dataValidated
        }

        var first = flags
        if pages > 1 { first |= NetifTxFlags.moreData }
        if gsoType != NetifGSOType.none { first |= NetifTxFlags.extraInfo }
        queue.putTxRequest(id: reserved[0], offset: 0, flags: first, size: UInt16(length))
        if gsoType != NetifGSOType.none {
            let size = header.gsoSize
            queue.putTxExtra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0,
                                            payload: [UInt8(size & 0xff), UInt8(size >> 8), gsoType, 0, 0, 0]))
            queue.stats.txGSOFrames &+= 1
        }
        for i in 1..<pages {
            let size = min(XenPage.size, length - i * XenPage.size)
            queue.putTxRequest(id: reserved[i], offset: 0, flags: i < pages - 1 ? NetifTxFlags.moreData : 0,
                               size: UInt16(size))
        }
        queue.pushTx()
        queue.stats.txFrames &+= 1
        queue.stats.txBytes &+= UInt64(length)
        return pages
    }

    // MARK: rx ring -> TAP

    /// Writes one received packet to the TAP, its netif flags and GSO extra
    /// turned into a virtio header.
    private func deliver(_ packet: NetFrontendQueue.Packet) {
        var header = VirtioNetHeader()
        let blank = packet.flags & NetifRxFlags.csumBlank != 0
        if blank || packet.gso != nil {
            // Where the checksum and the headers are: netif only says "partial".
            let w = min(packet.length, Self.headerWindowSize)
            let window: UnsafeRawBufferPointer
            if packet.vectors[1].iov_len >= w {
                window = UnsafeRawBufferPointer(start: packet.vectors[1].iov_base, count: w)
            } else {
                packet.fragments.copy(from: 0, count: w, into: headerWindow)
                window = UnsafeRawBufferPointer(start: headerWindow, count: w)
            }
            guard let layout = FrameLayout.parse(window) else {
                queue.stats.rxDropped &+= 1
                return
            }
            if let gso = packet.gso {
                let virtioType: UInt8
                switch (gso.gsoType, layout.network) {
                case (NetifGSOType.tcpv4, .ipv4): virtioType = VirtioNetHeader.gsoTCPv4
                case (NetifGSOType.tcpv6, .ipv6): virtioType = VirtioNetHeader.gsoTCPv6
                default: virtioType = VirtioNetHeader.gsoNone
                }
                guard headerSize > 0, virtioType != VirtioNetHeader.gsoNone, layout.transport == .tcp, gso.gsoSize > 0 else {
                    queue.stats.rxDropped &+= 1
                    return
                }
                // A GSO frame must carry a partial checksum; a backend that
                // did not say so gets the fixup Linux netfront applies.
                if !blank {
                    packet.fragments.setTCPPseudoHeaderSum(layout: layout, headers: window)
                    queue.stats.rxGSOChecksumFixups &+= 1
                }
                header.gsoType = virtioType
                header.gsoSize = gso.gsoSize
                header.headerLength = UInt16(layout.headerLength)
                header.flags = VirtioNetHeader.flagNeedsChecksum
                header.checksumStart = UInt16(layout.transportOffset)
                header.checksumOffset = UInt16(layout.checksumOffset)
            } else if headerSize > 0 {
                header.flags = VirtioNetHeader.flagNeedsChecksum
                header.checksumStart = UInt16(layout.transportOffset)
                header.checksumOffset = UInt16(layout.checksumOffset)
            } else {
                // No virtio header to say it: finish the checksum here.
                packet.fragments.completeChecksum(start: layout.transportOffset, offset: layout.checksumOffset)
            }
        } else if packet.flags & NetifRxFlags.dataValidated != 0 {
            header.flags = VirtioNetHeader.flagDataValid
        }

        // Queued for the pass's write (`writeReceived`).
        let out = outVectors + outCount * Self.slotVectors
        var n = 0
        if headerSize > 0 {
            let h = outHeaders + outCount * 16
            header.encode(to: h)
            out[0] = iovec(iov_base: h, iov_len: headerSize)
            n = 1
        }
        (out + n).update(from: packet.vectors + 1, count: packet.fragmentCount)
        outCounts[outCount] = n + packet.fragmentCount
        outCount += 1
    }

    /// Writes the pass's received packets to the TAP in one submission.
    private func writeReceived() {
        guard outCount > 0 else { return }
        let vectors = outVectors, counts = outCounts
        tapWriter.writeFrames(outCount, results: outResults) {
            UnsafeBufferPointer(start: vectors + $0 * Self.slotVectors, count: counts[$0])
        }
        for i in 0..<outCount where outResults[i] < 0 { queue.stats.rxDropped &+= 1 }
        outCount = 0
    }
}
