import CXenBackSupport
import Glibc
import Hypervisor
import LoopbackHypervisor
import XenABI
import XenRing

/// One netif queue of a simulated guest: the tx and rx rings, their event
/// channel port(s), and the guest pages behind them. Both the pump thread
/// and the raw test hooks drive it through these primitives; whoever owns it
/// is the only thread that touches it (the pump while it runs, else the
/// test's thread).
///
/// Tx: one page per request id (ids 0..<ring size), granted read-only to
/// the backend once and reused; a request's page is free again when its
/// response comes back.
///
/// Rx: one page per ring slot, granted writable once and reused. As in
/// Linux netfront, the request posted at ring index i has id i mod size,
/// and the response at index i answers it: the backend consumes requests
/// and produces responses in lockstep, one slot each (an extra-info
/// response, which carries no id, uses up the buffer posted at its index).
final class NetFrontendQueue {   // confined to one thread at a time
    let guest: LoopbackGuestDomain
    let backendDomain: DomID
    let events: LoopbackEventChannels
    let txPort: EventChannelPort
    let rxPort: EventChannelPort

    var tx: FrontRing
    var rx: FrontRing
    let txRingGrant: GrantRef
    let rxRingGrant: GrantRef
    private let resources: GuestPages

    // MARK: tx buffers
    let txSlots: Int
    private let txPages: UnsafeMutablePointer<UnsafeMutableRawPointer>
    private let txGrants: UnsafeMutablePointer<GrantRef>
    private let txInFlight: UnsafeMutablePointer<Bool>
    /// Free tx ids, a stack (capacity txSlots, never reallocated).
    private var txFree: [UInt16]

    // MARK: rx buffers
    let rxSlots: Int
    private let rxMask: UInt32
    private let rxPages: UnsafeMutablePointer<UnsafeMutableRawPointer>
    private let rxGrants: UnsafeMutablePointer<GrantRef>
    /// The buffer posted at each ring position (index mod size); -1 when none.
    private let rxBufferAt: UnsafeMutablePointer<Int32>
    private var rxFree: [UInt16]

    // MARK: rx packet being assembled
    /// Data slots one packet may use (XEN_NETIF_NR_SLOTS_MIN, as Linux netfront allows).
    static let maxRxDataSlots = Netif.nrSlotsMin
    /// Extra slots one packet may carry (one of each type, as netfront allows).
    static let maxRxExtras = Int(NetifExtraType.max) - 1
    private enum AssemblyState { case idle, extras, data }
    private var state = AssemblyState.idle
    private var packetFlags: UInt16 = 0
    private var packetGSO: NetifExtraInfo?
    private var packetHash: NetifExtraInfo?
    /// The packet's XDP extra's headroom, and its first buffer's offset.
    private var packetHeadroom: UInt16?
    private var packetFirstOffset: UInt16 = 0
    /// Set once the frontend asked for rx headroom (XDP extras are then expected).
    var headroomAsked: HeadroomAsked?
    private var packetBad = false
    private var packetLength = 0
    private var packetFragments = 0
    private var packetExtras = 0
    private var packetDataSlots = 0
    /// Element 0 is left for the caller (a virtio header); fragments from 1.
    let rxVectors: UnsafeMutablePointer<iovec>
    private let rxStaged: UnsafeMutablePointer<UInt16>

    private let scratch = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    var stats = NetFrontendStatistics()
    /// Whether tx responses must name an id of ours (false in raw mode,
    /// where the test chooses ids).
    var trackTxIDs = true
    /// Checks the hash extras received against the settings we gave on the
    /// control ring (nil: hash extras are counted, not checked).
    var hashVerifier: ReceiveHashVerifier?

    /// Allocates and grants the two ring pages and every buffer page.
    /// `rxPort == txPort` when the event channel is not split.
    init(guest: LoopbackGuestDomain, backendDomain: DomID, events: LoopbackEventChannels,
         txPort: EventChannelPort, rxPort: EventChannelPort) throws(HypervisorError) {
        self.guest = guest
        self.backendDomain = backendDomain
        self.events = events
        self.txPort = txPort
        self.rxPort = rxPort
        let pages = GuestPages(guest: guest, grantee: backendDomain)
        resources = pages
        do throws(HypervisorError) {
            let (txRing, txRef) = try pages.grant(readOnly: false)
            let (rxRing, rxRef) = try pages.grant(readOnly: false)
            tx = FrontRing(initializing: guest.page(txRing), pages: 1, entrySize: RingEntrySize.netifTx)
            rx = FrontRing(initializing: guest.page(rxRing), pages: 1, entrySize: RingEntrySize.netifRx)
            txRingGrant = txRef
            rxRingGrant = rxRef
        } catch {
            pages.release()
            throw error
        }
        txSlots = Int(tx.size)
        rxSlots = Int(rx.size)
        rxMask = rx.size - 1
        txPages = .allocate(capacity: txSlots)
        txGrants = .allocate(capacity: txSlots)
        txInFlight = .allocate(capacity: txSlots)
        txInFlight.initialize(repeating: false, count: txSlots)
        rxPages = .allocate(capacity: rxSlots)
        rxGrants = .allocate(capacity: rxSlots)
        rxBufferAt = .allocate(capacity: rxSlots)
        rxBufferAt.initialize(repeating: -1, count: rxSlots)
        rxVectors = .allocate(capacity: 1 + Self.maxRxDataSlots)
        rxVectors.initialize(repeating: iovec(), count: 1 + Self.maxRxDataSlots)
        rxStaged = .allocate(capacity: Self.maxRxDataSlots)
        txFree = []
        txFree.reserveCapacity(txSlots)
        rxFree = []
        rxFree.reserveCapacity(rxSlots)
        do throws(HypervisorError) {
            for i in 0..<txSlots {
                let (frame, ref) = try pages.grant(readOnly: true)
                txPages[i] = guest.page(frame)
                txGrants[i] = ref
            }
            for i in 0..<rxSlots {
                let (frame, ref) = try pages.grant(readOnly: false)
                rxPages[i] = guest.page(frame)
                rxGrants[i] = ref
            }
        } catch {
            pages.release()
            throw error
        }
        // Popped from the end: ids 0, 1, 2, ... come first.
        for i in (0..<txSlots).reversed() { txFree.append(UInt16(i)) }
        for i in (0..<rxSlots).reversed() { rxFree.append(UInt16(i)) }
    }

    deinit {
        txPages.deallocate(); txGrants.deallocate(); txInFlight.deallocate()
        rxPages.deallocate(); rxGrants.deallocate(); rxBufferAt.deallocate()
        rxVectors.deallocate(); rxStaged.deallocate(); scratch.deallocate()
    }

    /// Revokes every grant and frees every page (the rings included), and
    /// closes the event channel handle. The queue is unusable afterwards.
    func release() {
        resources.release()
        events.close()
    }

    /// A page granted read-only to the backend for a raw test (freed by `release`).
    func grantRawTxPage() throws(HypervisorError) -> (frame: UInt32, ref: GrantRef, bytes: UnsafeMutableRawPointer) {
        let (frame, ref) = try resources.grant(readOnly: true)
        return (frame, ref, guest.page(frame))
    }

    // MARK: events

    func notify(_ port: EventChannelPort) {
        if (try? events.notify(port)) != nil { stats.notificationsSent &+= 1 }
    }

    /// Takes every delivered port and unmasks it (the rings are looked at
    /// afterwards anyway, whichever port fired).
    func drainEvents() {
        while let port = try? events.nextPending() {
            stats.eventsReceived &+= 1
            try? events.unmask(port)
        }
    }

    // MARK: tx

    var txFreeIDs: Int { txFree.count }
    func popTxID() -> UInt16? { txFree.popLast() }
    func pushTxID(_ id: UInt16) { txFree.append(id) }
    func txPage(_ id: UInt16) -> UnsafeMutableRawPointer { txPages[Int(id)] }

    /// Writes a request into the next tx slot (not yet published); a pool
    /// id is marked in flight until its response.
    func putTxRequest(_ r: NetifTxRequest, pooled: Bool) {
        let slot = tx.nextRequestSlot()
        r.encode(to: slot)
        tx.commitRequest()
        if pooled { txInFlight[Int(r.id)] = true }
    }

    func putTxRequest(id: UInt16, offset: UInt16, flags: UInt16, size: UInt16) {
        putTxRequest(NetifTxRequest(gref: txGrants[Int(id)], offset: offset, flags: flags, id: id, size: size), pooled: true)
    }

    /// Writes an extra-info slot (the 4 bytes past it zeroed).
    func putTxExtra(_ e: NetifExtraInfo) {
        let slot = tx.nextRequestSlot()
        slot.storeBytes(of: UInt32(0), toByteOffset: NetifExtraInfo.size, as: UInt32.self)
        e.encode(to: slot)
        tx.commitRequest()
    }

    /// Publishes the tx requests written so far; notifies if the backend asked.
    func pushTx() {
        if tx.pushRequests() { notify(txPort) }
    }

    /// Consumes the tx responses available (never more than requests
    /// outstanding); frees the page of each answered id. Returns how many.
    @discardableResult
    func reapTxResponses(limit: Int = .max, _ body: (NetifTxResponse) -> Void = { _ in }) -> Int {
        let outstanding = tx.requestProducerPrivate &- tx.responseConsumer
        let published = tx.unconsumedResponses()
        if published > outstanding { stats.protocolErrors &+= 1 }
        let n = min(Int(min(published, outstanding)), limit)
        for _ in 0..<n {
            tx.takeResponse(into: scratch)
            let r = NetifTxResponse(decoding: scratch)
            body(r)
            if r.status == NetifStatus.null { continue }
            if r.status != NetifStatus.okay { stats.txErrors &+= 1 }
            let id = Int(r.id)
            if id < txSlots && txInFlight[id] {
                txInFlight[id] = false
                txFree.append(r.id)
            } else if trackTxIDs {
                stats.protocolErrors &+= 1
            }
        }
        return n
    }

    /// Tx responses ready to reap (never counting more than we have outstanding).
    var txResponsesWaiting: Bool {
        min(tx.unconsumedResponses(), tx.requestProducerPrivate &- tx.responseConsumer) > 0
    }

    // MARK: rx buffers

    var rxFreeBuffers: Int { rxFree.count }
    var rxOutstanding: Int { Int(rx.requestProducerPrivate &- rx.responseConsumer) }

    /// Posts up to `limit` free buffers (as many as fit), publishes them and
    /// notifies if the backend asked (feature-rx-notify). Returns how many.
    @discardableResult
    func postRx(limit: Int = .max) -> Int {
        var n = 0
        while n < limit, rx.freeRequests > 0, let b = rxFree.popLast() {
            let index = rx.requestProducerPrivate
            rxBufferAt[Int(index & rxMask)] = Int32(b)
            NetifRxRequest(id: UInt16(index & rxMask), gref: rxGrants[Int(b)]).encode(to: rx.nextRequestSlot())
            rx.commitRequest()
            n += 1
        }
        if n > 0 {
            stats.rxBuffersPosted &+= UInt64(n)
            if rx.pushRequests() { notify(rxPort) }
        }
        stats.rxBuffersOutstanding = UInt64(rxOutstanding)
        return n
    }

    var rxResponsesWaiting: Bool { min(rx.unconsumedResponses(), UInt32(rxOutstanding)) > 0 }

    // MARK: rx packets

    /// A packet assembled from the rx ring, valid during the `receive` callback.
    struct Packet {
        /// Flags of its first response (NETRXF_*).
        var flags: UInt16
        /// Its GSO extra, if it had one.
        var gso: NetifExtraInfo?
        /// Its hash extra (XEN_NETIF_EXTRA_TYPE_HASH), if it had one.
        var hash: NetifExtraInfo?
        /// Total bytes.
        var length: Int
        /// Its data, one vector per buffer, at vectors[1...fragmentCount]
        /// (vectors[0] is free for a header).
        var vectors: UnsafeMutablePointer<iovec>
        var fragmentCount: Int

        var fragments: FrameFragments {
            FrameFragments(vectors: UnsafePointer(vectors + 1), count: fragmentCount, length: length)
        }

        func bytes() -> [UInt8] {
            [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
                if length > 0 { fragments.copy(from: 0, count: length, into: buffer.baseAddress!) }
                count = length
            }
        }
    }

    /// Consumes rx responses and hands each complete, well-formed packet to
    /// `deliver` (its buffers are free again afterwards; call `postRx` to
    /// give them back to the backend). A packet whose slots have not all
    /// been published yet stays assembled here until they are. Stops after
    /// `limit` packets. Returns how many responses it consumed.
    @discardableResult
    func receive(limit: Int, _ deliver: (Packet) -> Void) -> Int {
        let outstanding = UInt32(rxOutstanding)
        let published = rx.unconsumedResponses()
        if published > outstanding { stats.protocolErrors &+= 1 }
        var available = min(published, outstanding)
        var packets = 0
        var consumed = 0
        while available > 0 && packets < limit {
            available -= 1
            consumed += 1
            let index = rx.responseConsumer
            rx.takeResponse(into: scratch)
            let position = Int(index & rxMask)
            let buffer = rxBufferAt[position]
            rxBufferAt[position] = -1
            guard buffer >= 0 else { stats.protocolErrors &+= 1; continue }   // cannot happen: bounded by outstanding
            let b = UInt16(buffer)
            if take(slotAt: index, buffer: b) {
                packets += 1
                finishPacket(deliver)
            }
        }
        stats.rxBuffersOutstanding = UInt64(rxOutstanding)
        return consumed
    }

    /// Feeds one response slot (in `scratch`) to the packet being assembled.
    /// True when it completed the packet.
    private func take(slotAt index: UInt32, buffer: UInt16) -> Bool {
        switch state {
        case .idle:
            let r = NetifRxResponse(decoding: scratch)
            packetFlags = r.flags
            packetGSO = nil
            packetHash = nil
            packetHeadroom = nil
            packetFirstOffset = r.offset
            packetBad = false
            packetLength = 0
            packetFragments = 0
            packetExtras = 0
            packetDataSlots = 0
            // We never asked for GSO prefix descriptors (feature-gso-tcpv4-prefix).
            if r.flags & NetifRxFlags.gsoPrefix != 0 { markBad() }
            addData(r, index: index, buffer: buffer)
            if r.flags & NetifRxFlags.extraInfo != 0 {
                state = .extras
                return false
            }
            if r.flags & NetifRxFlags.moreData == 0 { return true }
            state = .data
            return false
        case .extras:
            rxFree.append(buffer)   // the extra used its buffer up, with no data in it
            let e = NetifExtraInfo(decoding: scratch)
            packetExtras += 1
            if e.type == NetifExtraType.xdp && headroomAsked?.value == true {
                let headroom = UInt16(e.payload[0]) | UInt16(e.payload[1]) << 8
                if packetHeadroom != nil || packetExtras > Self.maxRxExtras { markBad() } else { packetHeadroom = headroom }
            } else if packetExtras > Self.maxRxExtras || e.type == NetifExtraType.none || e.type >= NetifExtraType.max {
                markBad()
            } else if e.type == NetifExtraType.gso {
                if packetGSO != nil { markBad() } else { packetGSO = e }
            } else if e.type == NetifExtraType.hash {
                if packetHash != nil { markBad() } else { packetHash = e }
            }
            if e.flags & NetifExtraType.flagMore != 0 { return false }
            if packetFlags & NetifRxFlags.moreData != 0 {
                state = .data
                return false
            }
            state = .idle
            return true
        case .data:
            let r = NetifRxResponse(decoding: scratch)
            addData(r, index: index, buffer: buffer)
            if r.flags & NetifRxFlags.moreData != 0 { return false }
            state = .idle
            return true
        }
    }

    private func addData(_ r: NetifRxResponse, index: UInt32, buffer: UInt16) {
        packetDataSlots += 1
        if r.id != UInt16(index & rxMask) || r.status < 0 || Int(r.offset) + Int(r.status) > XenPage.size
            || packetDataSlots > Self.maxRxDataSlots {
            markBad()
        }
        if packetBad {
            rxFree.append(buffer)
            return
        }
        rxStaged[packetFragments] = buffer
        packetFragments += 1
        rxVectors[packetFragments] = iovec(iov_base: rxPages[Int(buffer)] + Int(r.offset), iov_len: Int(r.status))
        packetLength += Int(r.status)
    }

    /// Gives the packet's buffers back and drops its data.
    private func markBad() {
        guard !packetBad else { return }
        packetBad = true
        for i in 0..<packetFragments { rxFree.append(rxStaged[i]) }
        packetFragments = 0
        packetLength = 0
    }

    private func finishPacket(_ deliver: (Packet) -> Void) {
        state = .idle
        if packetBad || packetLength == 0 {
            stats.rxErrors &+= 1
            markBad()
            return
        }
        stats.rxFrames &+= 1
        stats.rxBytes &+= UInt64(packetLength)
        if packetGSO != nil { stats.rxGSOFrames &+= 1 }
        let packet = Packet(flags: packetFlags, gso: packetGSO, hash: packetHash, length: packetLength, vectors: rxVectors,
                            fragmentCount: packetFragments)
        if packetHeadroom != nil { stats.rxHeadroomFrames &+= 1 }
        if packetFirstOffset != packetHeadroom ?? 0 { stats.rxHeadroomMismatches &+= 1 }
        if let hash = packetHash {
            stats.rxHashedFrames &+= 1
            if let v = hashVerifier, !v.matches(hash, fragments: packet.fragments, length: packetLength) {
                stats.rxHashMismatches &+= 1
            }
        }
        deliver(packet)
        for i in 0..<packetFragments { rxFree.append(rxStaged[i]) }
        packetFragments = 0
    }
}

/// Every page and grant a queue took from its guest, given back at once.
final class GuestPages {   // confined like its queue
    let guest: LoopbackGuestDomain
    let grantee: DomID
    private var frames: [UInt32] = []
    private var grants: [GrantRef] = []

    init(guest: LoopbackGuestDomain, grantee: DomID) {
        self.guest = guest
        self.grantee = grantee
    }

    /// A zeroed page, granted to the backend.
    func grant(readOnly: Bool) throws(HypervisorError) -> (frame: UInt32, ref: GrantRef) {
        let frame = try guest.allocatePage()
        frames.append(frame)
        memset(guest.page(frame), 0, XenPage.size)
        let ref = try guest.grantAccess(frame: frame, to: grantee, readOnly: readOnly)
        grants.append(ref)
        return (frame, ref)
    }

    func release() {
        for g in grants { guest.endAccess(g) }
        for f in frames { guest.freePage(f) }
        grants = []
        frames = []
    }
}
