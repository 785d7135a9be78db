import CXenBackSupport
import Glibc
import Hypervisor
import Logging
import Metrics
import NetworkPlumbing
import SystemSupport
import XenABI
import XenRing

/// The data plane of one vif queue: one OS thread with an epoll loop over
/// the queue's event channel(s), its TAP queue and a wakeup. It moves
/// frames guest -> TAP (tx ring: gather the chain by grant copy into one
/// buffer, write it with a virtio-net header) and TAP -> guest (rx ring:
/// read a frame, grant-copy it into the buffers the guest posted). Every
/// buffer is allocated at start; the hot path does not allocate, lock or
/// log. After start everything below runs on that thread only.
public final class NetDataPlane: @unchecked Sendable {   // thread-confined after start(); control touches only stop flag + stats box
    private let name: String
    private let logger: Logger
    private let tap: TapQueue
    private let grants: any GrantTableHandle
    private let events: any EventChannelHandle
    private let txMapping: GrantMapping
    private let rxMapping: GrantMapping
    private var txRing: BackRing
    private var rxRing: BackRing
    private let txPort: EventChannelPort
    private let rxPort: EventChannelPort
    private let frontendDomain: DomID
    private let features: FrontendNetFeatures
    private var credit: CreditScheduler?
    private let rxStallNanoseconds: Int
    private let epoll: Int32
    private let wakeup: Wakeup
    private let onFatal: @Sendable (String) -> Void

    // Tx: one batch of packets per pass, each gathered into its own buffer.
    static let txBatch = 64
    /// Per packet: a virtio header's room, then up to 64 KiB of frame.
    static let frameOffset = 64
    static let packetStride = frameOffset + 65_536
    private let txBuffers: UnsafeMutableRawPointer
    private let txPackets: UnsafeMutablePointer<TxPacket>
    private var txCount = 0
    /// Packets of the batch before this one are written and answered.
    private var txNext = 0
    private let txCopies: UnsafeMutableBufferPointer<GrantCopyOperation>
    private var txCopyCount = 0
    private var malformedInARow = 0
    /// Waiting for the credit scheduler's next refill (CLOCK_MONOTONIC ns), or 0.
    private var txBlockedUntil = 0

    // Rx: frames read from the TAP, copied into the guest's posted buffers.
    static let rxBatch = 64
    /// A virtio header and the largest frame a TAP with TSO hands out.
    static let rxBufferSize = VirtioNetHeader.size + 65_550
    /// rxBatch buffers, plus one for a frame held while the guest has no buffers.
    private let rxBuffers: UnsafeMutablePointer<UnsafeMutableRawPointer>
    private let rxFrames: UnsafeMutablePointer<RxFrame>
    private var rxCount = 0
    private let rxCopies: UnsafeMutableBufferPointer<GrantCopyOperation>
    private var rxCopyCount = 0
    /// Request slots (id) taken for this pass's frames, in ring order.
    private let rxTaken: UnsafeMutablePointer<UInt16>
    private var rxTakenCount = 0
    private var rxHeldLength = 0
    /// When the held frame started waiting for buffers (0: none held).
    private var rxStalledSince = 0
    /// Stalled past the limit: drop frames until the guest posts buffers.
    private var rxDropping = false
    private var tapPolled = true
    static let maxRxSlots = 1 + (65_550 + XenPage.size - 1) / XenPage.size

    private let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
    private let scratch: UnsafeMutableRawPointer

    // Life cycle.
    private let stopFlag = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    private var broken = false
    private var thread: NativeThread?

    private var stats = NetStatistics()
    private var publishedStats = NetStatistics()
    private let statsBox = NetStatisticsBox()
    private var lastPublish = 0
    private let txCounter: Counter
    private let rxCounter: Counter
    private let dropCounter: Counter

    private enum Token: UInt64 { case eventChannel = 1, tap = 2, wakeup = 3 }

    /// Maps both rings, binds the event channel(s) and allocates every
    /// buffer. Throws (releasing what it took) if any step fails.
    public init(name: String, platform: any HypervisorPlatform, tap: TapQueue, configuration c: NetQueueConfiguration,
                logger: Logger, onFatal: @escaping @Sendable (String) -> Void) throws(HypervisorError) {
        self.name = name
        self.logger = logger
        self.tap = tap
        self.frontendDomain = c.frontendDomain
        self.features = c.frontend
        self.rxStallNanoseconds = c.rxStallMilliseconds * 1_000_000
        self.onFatal = onFatal
        if let r = c.rate {
            credit = CreditScheduler(bytesPerPeriod: r.bytes, periodMicroseconds: r.microseconds,
                                     now: MonotonicClock.nanoseconds())
        }
        grants = try platform.openGrantTable()
        txMapping = try grants.map(domain: c.frontendDomain, refs: [c.txRingRef], writable: true)
        do {
            rxMapping = try grants.map(domain: c.frontendDomain, refs: [c.rxRingRef], writable: true)
        } catch {
            grants.unmap(txMapping)
            throw error
        }
        var bound: [EventChannelPort] = []
        let channels: any EventChannelHandle
        do {
            channels = try platform.openEventChannels()
        } catch {
            grants.unmap(rxMapping); grants.unmap(txMapping)
            throw error
        }
        do {
            bound.append(try channels.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: c.txRemotePort))
            if c.splitEventChannels {
                bound.append(try channels.bindInterdomain(remoteDomain: c.frontendDomain, remotePort: c.rxRemotePort))
            }
            wakeup = try Self.makeWakeup()
        } catch {
            for p in bound { try? channels.unbind(p) }
            channels.close()
            grants.unmap(rxMapping); grants.unmap(txMapping)
            throw error
        }
        events = channels
        txPort = bound[0]
        rxPort = bound.count > 1 ? bound[1] : bound[0]
        txRing = BackRing(attachingTo: txMapping.address, pages: 1, entrySize: RingEntrySize.netifTx)
        rxRing = BackRing(attachingTo: rxMapping.address, pages: 1, entrySize: RingEntrySize.netifRx)

        var raw: UnsafeMutableRawPointer?
        precondition(posix_memalign(&raw, XenPage.size, Self.txBatch * Self.packetStride) == 0, "out of memory for tx buffers")
        txBuffers = raw!
        txPackets = .allocate(capacity: Self.txBatch)
        txPackets.initialize(repeating: TxPacket(), count: Self.txBatch)
        txCopies = .allocate(capacity: Self.txBatch * (TxChainRules.maxSlots + 1))
        rxBuffers = .allocate(capacity: Self.rxBatch + 1)
        for i in 0...Self.rxBatch {
            var b: UnsafeMutableRawPointer?
            precondition(posix_memalign(&b, 64, Self.rxBufferSize) == 0, "out of memory for rx buffers")
            rxBuffers[i] = b!
        }
        rxFrames = .allocate(capacity: Self.rxBatch)
        rxFrames.initialize(repeating: RxFrame(), count: Self.rxBatch)
        rxCopies = .allocate(capacity: Self.rxBatch * Self.maxRxSlots)
        rxTaken = .allocate(capacity: Self.rxBatch * (Self.maxRxSlots + 1))
        scratch = .allocate(byteCount: 16, alignment: 16)
        stopFlag.initialize(to: 0)

        epoll = xb_epoll_create()
        precondition(epoll >= 0, "epoll_create failed: \(errno)")
        _ = xb_epoll_add(epoll, events.fileDescriptor, xb_EPOLLIN, Token.eventChannel.rawValue)
        _ = xb_epoll_add(epoll, tap.fileDescriptor, xb_EPOLLIN, Token.tap.rawValue)
        _ = xb_epoll_add(epoll, wakeup.fd, xb_EPOLLIN, Token.wakeup.rawValue)

        let dims: [(String, String)] = [("device", name)]
        txCounter = Counter(label: "xenbackd_vif_tx_packets_total", dimensions: dims)
        rxCounter = Counter(label: "xenbackd_vif_rx_packets_total", dimensions: dims)
        dropCounter = Counter(label: "xenbackd_vif_dropped_total", dimensions: dims)
    }

    private static func makeWakeup() throws(HypervisorError) -> Wakeup {
        do { return try Wakeup() } catch { throw HypervisorError("eventfd", errno: error.errno) }
    }

    deinit {
        if thread == nil { releaseResources() }
        free(txBuffers)
        txPackets.deallocate()
        txCopies.deallocate()
        for i in 0...Self.rxBatch { free(rxBuffers[i]) }
        rxBuffers.deallocate()
        rxFrames.deallocate()
        rxCopies.deallocate()
        rxTaken.deallocate()
        iov.deallocate()
        scratch.deallocate()
        stopFlag.deallocate()
    }

    public var statistics: NetStatistics { statsBox.read() }

    public func start() throws(HypervisorError) {
        do {
            thread = try NativeThread(name: "vif-\(name)") { [self] in self.run() }
        } catch {
            throw HypervisorError("start data plane thread", errno: error.errno)
        }
    }

    /// Answers what was taken, unbinds and unmaps. Blocks until the thread
    /// is gone. Idempotent.
    public func stop() {
        xb_store_release_u32(stopFlag, 1)
        wakeup.signal()
        if let t = thread {
            t.join()
            thread = nil
            releaseResources()
        }
    }

    private var released = false
    private func releaseResources() {
        guard !released else { return }
        released = true
        try? events.unbind(txPort)
        if rxPort != txPort { try? events.unbind(rxPort) }
        events.close()
        grants.unmap(rxMapping)
        grants.unmap(txMapping)
        Glibc.close(epoll)
        wakeup.close()
    }

    // MARK: the loop

    private func run() {
        let tokens = UnsafeMutablePointer<UInt64>.allocate(capacity: 4)
        let evs = UnsafeMutablePointer<UInt32>.allocate(capacity: 4)
        defer { tokens.deallocate(); evs.deallocate() }
        service()
        while !broken {
            let n = xb_epoll_wait(epoll, tokens, evs, 4, sleepMilliseconds())
            for i in 0..<Int(max(n, 0)) {
                switch tokens[i] {
                case Token.eventChannel.rawValue: drainEventChannel()
                case Token.wakeup.rawValue: wakeup.drain()
                default: break   // the TAP: read in service()
                }
            }
            if xb_load_acquire_u32(stopFlag) != 0 { break }
            service()
        }
        finishOnStop()
        publishStatistics(force: true)
    }

    private func drainEventChannel() {
        while let port = try? events.nextPending() {
            try? events.unmask(port)
        }
    }

    /// How long epoll may sleep: until the rate limiter's refill or the
    /// rx stall limit, whichever comes first; forever otherwise.
    private func sleepMilliseconds() -> Int32 {
        var deadline = Int.max
        if txBlockedUntil != 0 { deadline = txBlockedUntil }
        if rxStalledSince != 0 && !rxDropping { deadline = min(deadline, rxStalledSince + rxStallNanoseconds) }
        guard deadline != Int.max else { return -1 }
        let remaining = deadline - MonotonicClock.nanoseconds()
        return remaining <= 0 ? 0 : Int32(min((remaining + 999_999) / 1_000_000, 60_000))
    }

    /// Moves frames both ways until neither ring nor the TAP has work, then
    /// arms the rings' event indices.
    private func service() {
        while !broken {
            let txMore = serviceTx()
            let rxMore = serviceRx()
            publishStatistics(force: false)
            if broken { return }
            if txMore || rxMore { continue }
            do throws(RingOverflow) {
                // Tx waiting on credit sleeps on the timer, not on the guest.
                let txPending = txBlockedUntil == 0 ? try txRing.finalCheckForRequests() : false
                if txPending { continue }
            } catch {
                declareBroken("tx ring: \(error)")
            }
            return
        }
    }

    private func declareBroken(_ reason: String) {
        guard !broken else { return }
        broken = true
        onFatal("frontend dom\(frontendDomain) broke the netif protocol: \(reason)")
    }

    // MARK: tx (guest -> TAP)

    /// One pass over the tx ring. True if there may be more to do at once.
    private func serviceTx() -> Bool {
        if txBlockedUntil != 0 {
            guard MonotonicClock.nanoseconds() >= txBlockedUntil else { return false }
            txBlockedUntil = 0
        }
        if txNext < txCount {
            writeTxPackets()
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
        if broken { return false }
        if txCopyCount > 0 { grants.copy(UnsafeMutableBufferPointer(rebasing: txCopies[0..<txCopyCount])) }
        writeTxPackets()
        pushTxResponses()
        return txBlockedUntil == 0
    }

    /// Takes whole packets (request, extras, fragments) while the batch has
    /// room, validating each chain and queueing the grant copies that
    /// gather it into the packet's buffer.
    private func takeTxBatch(available: UInt32) {
        txCount = 0
        txNext = 0
        txCopyCount = 0
        var left = Int(available)
        while left > 0 && txCount < Self.txBatch && !broken {
            let used = takeTxPacket(into: txCount, available: left)
            left -= used
            txCount += 1
        }
    }

    /// Takes one packet's slots; returns how many it consumed.
    private func takeTxPacket(into index: Int, available: Int) -> Int {
        var p = TxPacket()
        let frame = txBuffers + index * Self.packetStride + Self.frameOffset
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
        var deferred = InlineArray<18, (gref: UInt32, offset: UInt16, size: UInt16)>(repeating: (0, 0, 0))
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
        txPackets[index] = p
        return consumed
    }

    @inline(__always)
    private func queueTxCopy(ref: GrantRef, offset: UInt16, length: Int, to local: UnsafeMutableRawPointer) {
        txCopies[txCopyCount] = GrantCopyOperation(direction: .fromGuest, domain: frontendDomain, ref: ref,
                                                   guestOffset: offset, length: UInt16(length), local: local)
        txCopyCount += 1
    }

    private func noteMalformed(_ r: TxChainRejection) {
        stats.txMalformed &+= 1
        malformedInARow += 1
        if malformedInARow >= TxChainRules.malformedInARowLimit {
            declareBroken("\(malformedInARow) malformed packets in a row, the last: \(r)")
        }
    }

    /// Writes the batch's packets to the TAP from `txNext` on, answering
    /// each; stops early when the rate limit has no credit left.
    private func writeTxPackets() {
        while txNext < txCount {
            let i = txNext
            var status = txPackets[i].status
            if status == NetifStatus.okay {
                let first = Int(txPackets[i].copyStart)
                for c in first..<(first + Int(txPackets[i].copyCount)) where txCopies[c].status != 0 {
                    status = NetifStatus.error   // a revoked or bad grant
                }
                if status == NetifStatus.okay, credit != nil,
                   !credit!.consume(txPackets[i].frameLength, now: MonotonicClock.nanoseconds()) {
                    txBlockedUntil = credit!.nextRefill
                    return
                }
            }
            if status == NetifStatus.okay { status = transmit(i) } else { stats.txErrors &+= 1 }
            respondTx(txPackets[i], status: status)
            txNext += 1
        }
    }

    /// Puts the virtio header in front of packet `i` and writes it.
    private func transmit(_ i: Int) -> Int16 {
        let p = txPackets[i]
        let frame = txBuffers + i * Self.packetStride + Self.frameOffset
        var header = VirtioNetHeader()
        let wantsChecksum = p.flags & NetifTxFlags.csumBlank != 0
        if wantsChecksum || p.gsoType != 0 {
            guard let layout = FrameLayout.parse(UnsafeRawBufferPointer(start: frame, count: p.frameLength)) else {
                stats.txErrors &+= 1
                noteMalformed(.unparseableOffload)
                return NetifStatus.error
            }
            header.flags = VirtioNetHeader.flagNeedsChecksum
            header.checksumStart = UInt16(layout.transportOffset)
            header.checksumOffset = UInt16(layout.checksumOffset)
            if p.gsoType != 0 {
                let v4 = p.gsoType == NetifGSOType.tcpv4
                guard layout.transport == .tcp, layout.network == (v4 ? .ipv4 : .ipv6) else {
                    stats.txErrors &+= 1
                    noteMalformed(.gsoMismatch)
                    return NetifStatus.error
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
        iov.pointee = iovec(iov_base: start, iov_len: VirtioNetHeader.size + p.frameLength)
        do {
            guard try tap.write(UnsafeBufferPointer(start: iov, count: 1)) != nil else {
                stats.txDropped &+= 1
                return NetifStatus.dropped
            }
        } catch {
            // The kernel refused the frame or its header (EINVAL), or the
            // interface is down (EIO): this frame fails, the ring goes on.
            stats.txErrors &+= 1
            return NetifStatus.error
        }
        stats.txPackets &+= 1
        stats.txBytes &+= UInt64(p.frameLength)
        return NetifStatus.okay
    }

    /// One response per slot the packet used, in ring order: the first
    /// request, NULL for each extra slot, then each fragment.
    private func respondTx(_ p: TxPacket, status: Int16) {
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

    // MARK: rx (TAP -> guest)

    /// One pass: read up to a batch of frames, copy them into posted
    /// buffers, answer. True if there may be more to do at once.
    private func serviceRx() -> Bool {
        rxCount = 0
        rxCopyCount = 0
        rxTakenCount = 0
        var tapEmpty = false
        while rxCount < Self.rxBatch {
            let buffer: UnsafeMutableRawPointer
            var length: Int
            if rxHeldLength > 0 {
                // The held frame goes first; swap it into this pass's buffer.
                swap(&rxBuffers[rxCount], &rxBuffers[Self.rxBatch])
                length = rxHeldLength
                rxHeldLength = 0
                buffer = rxBuffers[rxCount]
            } else {
                if !tapPolled && !rxDropping { break }
                buffer = rxBuffers[rxCount]
                do {
                    guard let n = try tap.read(into: UnsafeMutableRawBufferPointer(start: buffer, count: Self.rxBufferSize)) else {
                        tapEmpty = true
                        break
                    }
                    length = n
                } catch {
                    tapEmpty = true
                    break
                }
            }
            guard let needed = rxSlotsNeeded(buffer, length: length) else {
                stats.rxDropped &+= 1
                continue
            }
            let available: UInt32
            do { available = try rxRing.unconsumedRequests() } catch {
                declareBroken("rx ring: \(error)")
                return false
            }
            if Int(available) < needed {
                if rxDropping {
                    stats.rxDropped &+= 1
                    continue
                }
                // Hold it, stop reading the TAP, and ask to be told when the
                // guest posts buffers.
                swap(&rxBuffers[rxCount], &rxBuffers[Self.rxBatch])
                rxHeldLength = length
                if rxStalledSince == 0 { rxStalledSince = MonotonicClock.nanoseconds() }
                break
            }
            takeRxBuffers(frame: rxCount, buffer: buffer, length: length, slots: needed)
            rxCount += 1
        }
        if rxCount > 0 {
            rxStalledSince = 0
            rxDropping = false
            grants.copy(UnsafeMutableBufferPointer(rebasing: rxCopies[0..<rxCopyCount]))
            respondRx()
            pushRxResponses()
        }
        return updateRxStall(tapEmpty: tapEmpty)
    }

    /// After a pass: decides whether the TAP is polled, and whether to run
    /// another pass at once. True if there may be more to do now.
    private func updateRxStall(tapEmpty: Bool) -> Bool {
        if rxHeldLength == 0 {
            setTapPolled(true)
            return !tapEmpty && rxCount == Self.rxBatch
        }
        // A frame is held: buffers may have come meanwhile (arm rx req_event first).
        let posted: Bool
        do { posted = try rxRing.finalCheckForRequests() } catch {
            declareBroken("rx ring: \(error)")
            return false
        }
        if posted { return true }
        let now = MonotonicClock.nanoseconds()
        if now - rxStalledSince >= rxStallNanoseconds {
            // Stalled too long: drop what waits and keep dropping until buffers come.
            rxHeldLength = 0
            rxDropping = true
            stats.rxDropped &+= 1
            setTapPolled(true)
            return true
        }
        setTapPolled(false)
        return false
    }

    private func setTapPolled(_ on: Bool) {
        guard on != tapPolled else { return }
        tapPolled = on
        _ = xb_epoll_mod(epoll, tap.fileDescriptor, on ? xb_EPOLLIN : 0, Token.tap.rawValue)
    }

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
        let dataSlots = (frameLength + XenPage.size - 1) / XenPage.size
        guard dataSlots == 1 || features.scatterGather else { return nil }
        return dataSlots + extra
    }

    /// Takes `slots` posted buffers for one frame and queues the copies
    /// that fill them.
    private func takeRxBuffers(frame index: Int, buffer: UnsafeMutableRawPointer, length: Int, slots: Int) {
        let header = VirtioNetHeader(from: buffer)
        let frameLength = length - VirtioNetHeader.size
        let hasExtra = header.gsoType & ~VirtioNetHeader.gsoECN != VirtioNetHeader.gsoNone
        var f = RxFrame()
        f.takenStart = Int32(rxTakenCount)
        f.slotCount = Int32(slots)
        f.copyStart = Int32(rxCopyCount)
        f.length = Int32(frameLength)
        f.header = header
        var offset = 0
        for s in 0..<slots {
            rxRing.takeRequest(into: scratch)
            let request = NetifRxRequest(decoding: scratch)
            rxTaken[rxTakenCount] = request.id
            rxTakenCount += 1
            if hasExtra && s == 1 { continue }   // the GSO extra's slot carries no data
            let chunk = min(XenPage.size, frameLength - offset)
            rxCopies[rxCopyCount] = GrantCopyOperation(direction: .toGuest, domain: frontendDomain, ref: request.gref,
                                                       guestOffset: 0, length: UInt16(chunk),
                                                       local: buffer + VirtioNetHeader.size + offset)
            rxCopyCount += 1
            offset += chunk
        }
        rxFrames[index] = f
    }

    /// Writes the responses of this pass's frames, in ring order: the first
    /// data buffer (with the frame's flags), the GSO extra, the rest.
    private func respondRx() {
        for i in 0..<rxCount {
            let f = rxFrames[i]
            let hasExtra = f.header.gsoType & ~VirtioNetHeader.gsoECN != VirtioNetHeader.gsoNone
            var failed = false
            for c in Int(f.copyStart)..<(Int(f.copyStart) + Int(f.slotCount) - (hasExtra ? 1 : 0))
                where rxCopies[c].status != 0 { failed = true }   // a data slot's copy
            var firstFlags: UInt16 = 0
            if f.header.flags & VirtioNetHeader.flagNeedsChecksum != 0 {
                firstFlags |= NetifRxFlags.csumBlank | NetifRxFlags.dataValidated
            } else if f.header.flags & VirtioNetHeader.flagDataValid != 0 {
                firstFlags |= NetifRxFlags.dataValidated
            }
            if hasExtra { firstFlags |= NetifRxFlags.extraInfo }
            var copy = Int(f.copyStart)
            let dataSlots = Int(f.slotCount) - (hasExtra ? 1 : 0)
            var dataIndex = 0
            for s in 0..<Int(f.slotCount) {
                let id = rxTaken[Int(f.takenStart) + s]
                if hasExtra && s == 1 {
                    var payload = InlineArray<6, UInt8>(repeating: 0)
                    payload[0] = UInt8(truncatingIfNeeded: f.header.gsoSize)
                    payload[1] = UInt8(truncatingIfNeeded: f.header.gsoSize >> 8)
                    let v4 = f.header.gsoType & ~VirtioNetHeader.gsoECN == VirtioNetHeader.gsoTCPv4
                    payload[2] = v4 ? NetifGSOType.tcpv4 : NetifGSOType.tcpv6
                    NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: payload).encode(to: rxRing.nextResponseSlot())
                    rxRing.commitResponse()
                    continue
                }
                var flags: UInt16 = s == 0 ? firstFlags : 0
                if dataIndex < dataSlots - 1 { flags |= NetifRxFlags.moreData }
                dataIndex += 1
                let status: Int16 = failed ? NetifStatus.error : Int16(rxCopies[copy].length)
                NetifRxResponse(id: id, offset: 0, flags: flags, status: status).encode(to: rxRing.nextResponseSlot())
                rxRing.commitResponse()
                copy += 1
            }
            if failed {
                stats.rxErrors &+= 1
            } else {
                stats.rxPackets &+= 1
                stats.rxBytes &+= UInt64(f.length)
            }
        }
    }

    // MARK: common

    // Counters first, so a frontend that sees a response sees it counted.
    private func pushTxResponses() {
        publishStatistics(force: false)
        if txRing.pushResponses() { notify(txPort) }
    }

    private func pushRxResponses() {
        publishStatistics(force: false)
        if rxRing.pushResponses() { notify(rxPort) }
    }

    @inline(__always)
    private func notify(_ port: EventChannelPort) { try? events.notify(port) }

    /// On stop: packets taken but not written (waiting for credit) are
    /// answered DROPPED, so the frontend gets every slot back.
    private func finishOnStop() {
        guard !broken else { return }
        while txNext < txCount {
            let p = txPackets[txNext]
            respondTx(p, status: p.status == NetifStatus.okay ? NetifStatus.dropped : p.status)
            txNext += 1
        }
        pushTxResponses()
    }

    private func publishStatistics(force: Bool) {
        guard stats != publishedStats else { return }
        statsBox.publish(stats)
        // The coarse clock: a few ns, where CLOCK_MONOTONIC cost 8% of a
        // busy queue's time in profiles (this VM's clocksource).
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
        let now = ts.tv_sec * 1_000_000_000 + ts.tv_nsec
        guard force || now - lastPublish >= 50_000_000 else { return }
        lastPublish = now
        txCounter.increment(by: Int64(stats.txPackets &- publishedStats.txPackets))
        rxCounter.increment(by: Int64(stats.rxPackets &- publishedStats.rxPackets))
        dropCounter.increment(by: Int64((stats.txDropped &+ stats.rxDropped) &- (publishedStats.txDropped &+ publishedStats.rxDropped)))
        publishedStats = stats
    }
}

/// A tx packet between taking its chain and answering it.
struct TxPacket {
    static let maxIDs = 32
    var ids = InlineArray<32, UInt16>(repeating: 0)
    /// Request slots (the first and its fragments), extras not included.
    var requestCount = 0
    var extraCount = 0
    var flags: UInt16 = 0
    var frameLength = 0
    var gsoType: UInt8 = 0
    var gsoSize: UInt16 = 0
    /// NETIF_RSP_ERROR when the chain was refused on taking.
    var status: Int16 = NetifStatus.okay
    var copyStart: Int32 = 0
    var copyCount: Int32 = 0
}

/// An rx frame between taking its buffers and answering them.
struct RxFrame {
    var takenStart: Int32 = 0
    var slotCount: Int32 = 0
    var copyStart: Int32 = 0
    var length: Int32 = 0
    var header = VirtioNetHeader()
}
