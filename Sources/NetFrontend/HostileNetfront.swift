import Glibc
import Hypervisor
import SystemSupport
import XenABI
import XenBus

/// A hostile netfront against a running backend, stepped round by round by
/// `xenbackd-lab fuzz --net`: each round posts rx requests (writable buffers,
/// duplicate ids, grants the backend may not write) and puts a mix of tx
/// chains on the ring: well-formed frames (one slot or scatter-gather),
/// malformed chains (a head or fragment crossing its page, fragments
/// larger than the frame, an empty head, a frame shorter than Ethernet's
/// header, 19-32 slots, extra-info slots of unknown or multicast types,
/// nonsense GSO, more extras than allowed, offloads on frames that are not
/// TCP/UDP over IP), bad grants (never granted, another domain's,
/// revoked), and frames whose fate the kernel decides (GSO and partial
/// checksums on TCP), kicked or not. Now and then it breaks the ring (tx
/// req_prod backwards or far ahead, a chain without an end, more than 32
/// slots, 64 malformed chains in a row, rx req_prod far ahead) or closes
/// under traffic, then starts over as Linux netfront does (Closing, Closed,
/// Initialising), the toolstack re-adding the NIC if the backend keeps it
/// Closed. The ledgers (HostileNetLedger.swift) say what a backend owes it;
/// pages it never granted writable must stay as it wrote them. Round r
/// draws everything from a seed derived from (seed, r), as HostileBlkfront.
public final class HostileNetfront {
    public struct Options: Sendable {
        public var seed: UInt64
        public var expectReconnect = false
        public var reconnectTimeout = 1.0
        /// How long a tx slot may go unanswered on a live ring.
        public var responseTimeout = 10.0
        public init(seed: UInt64) { self.seed = seed }
    }

    public struct Counters: Sendable {
        public var rounds = 0, frames = 0, wellFormed = 0, refusable = 0, kernelDecides = 0, slots = 0
        public var okay = 0, error = 0, dropped = 0, null = 0
        public var rxPosted = 0, rxData = 0, rxErrors = 0, bystanderFramesSeen = 0
        public var breaches = 0, closes = 0, spuriousStates = 0, reconnects = 0, refusedReconnects = 0, recreated = 0
        public var unansweredAtClose = 0
    }

    public struct Failure: Sendable, CustomStringConvertible {
        public var round: Int
        public var roundSeed: UInt64
        public var message: String
        public var description: String { "net round \(round) (round seed 0x\(String(roundSeed, radix: 16))): \(message)" }
    }

    /// The frontend of the current connection (made anew at each connect).
    public private(set) var fe: LoopbackNetFrontend
    public let options: Options
    /// Makes a frontend with the options a connection drew (no TAP, rx buffers not posted by it).
    private let makeFrontend: (NetFrontendOptions) throws -> LoopbackNetFrontend
    public private(set) var counters = Counters()
    public private(set) var failures: [Failure] = []
    private let recreateDevice: () throws -> Void
    private let mac: [UInt8]
    private var rng: SplitMix64
    private var round = 0
    private var roundSeed: UInt64 = 0
    private var nextID: UInt16 = 0
    private var rx = HostileRxLedger()

    /// Pages it owns for the whole run (grants outlive connections).
    private struct Page { let frame: UInt32; let ref: GrantRef }
    private let heads: [Page]        // read-only, one per chain of a round
    private let filler: [Page]       // read-only, fragments' data
    private let writableTx: Page
    private let rxPool: [Page]       // writable rx buffers
    private let readOnly: Page, foreign: Page
    /// A page whose grant is ended again after every connect: the ring's
    /// grants are made at connect and may reuse a freed reference, so one
    /// freed before would name a live ring page; nothing grants afterwards.
    private let revokedFrame: UInt32
    private var revokedRef: GrantRef = 0
    private var headSums: [UInt64]
    private let neverGranted: [GrantRef]
    private static let maxChains = 24
    private static let readOnlyFill: Int32 = 0x5A, foreignFill: Int32 = 0xA5, revokedFill: Int32 = 0x3C

    /// `makeFrontend`: a frontend without a TAP and with `postRxBuffers`
    /// off (this class owns its rings), on the hostile guest, with the
    /// options given. `mac`: the guest's own, the source of its frames.
    public init(makeFrontend: @escaping (NetFrontendOptions) throws -> LoopbackNetFrontend, mac: [UInt8], options: Options,
                recreateDevice: @escaping () throws -> Void) throws {
        precondition(mac.count == 6)
        self.makeFrontend = makeFrontend
        let frontend = try makeFrontend(NetFrontendOptions(postRxBuffers: false))
        precondition(frontend.tap == nil && !frontend.options.postRxBuffers)
        fe = frontend
        self.mac = mac
        self.options = options
        self.recreateDevice = recreateDevice
        rng = SplitMix64(seed: options.seed)
        let guest = frontend.guest
        func page(readOnly: Bool, to domain: DomID = 0) throws -> Page {
            let frame = try guest.allocatePage()
            memset(guest.page(frame), 0, XenPage.size)
            return Page(frame: frame, ref: try guest.grantAccess(frame: frame, to: domain, readOnly: readOnly))
        }
        heads = try (0..<Self.maxChains + 2).map { _ in try page(readOnly: true) }
        filler = try (0..<4).map { _ in try page(readOnly: true) }
        writableTx = try page(readOnly: false)
        rxPool = try (0..<64).map { _ in try page(readOnly: false) }
        readOnly = try page(readOnly: true)
        foreign = try page(readOnly: false, to: 0x7FEF)
        revokedFrame = try guest.allocatePage()
        memset(guest.page(readOnly.frame), Self.readOnlyFill, XenPage.size)
        memset(guest.page(foreign.frame), Self.foreignFill, XenPage.size)
        memset(guest.page(revokedFrame), Self.revokedFill, XenPage.size)
        for f in filler { for i in 0..<XenPage.size { guest.page(f.frame).storeBytes(of: UInt8(truncatingIfNeeded: i &* 7), toByteOffset: i, as: UInt8.self) } }
        headSums = Array(repeating: 0, count: heads.count + filler.count)
        neverGranted = Array(1...7) + [GrantRef(guest.grantCount), GrantRef.max]
    }

    private func bytes(_ p: Page) -> UnsafeMutableRawPointer { fe.guest.page(p.frame) }

    func fail(_ message: String) {
        failures.append(Failure(round: round, roundSeed: roundSeed, message: message))
    }

    /// The first connection (the toolstack has added the NIC).
    public func connect() throws { try connectRing() }

    /// Each connection draws its split event channels, scatter-gather and
    /// GSO offers anew (the backend's paths for each).
    private func connectRing() throws {
        fe = try makeFrontend(NetFrontendOptions(splitEventChannels: rng.below(2) == 0, scatterGather: rng.below(4) != 0,
                                                 gso: rng.below(2) == 0, postRxBuffers: false))
        try fe.connect(timeout: 10)
        revokedRef = try fe.guest.grantAccess(frame: revokedFrame, to: 0, readOnly: false)
        fe.guest.endAccess(revokedRef)
    }

    // MARK: rounds

    public func playRound() throws {
        round += 1
        counters.rounds += 1
        roundSeed = Self.roundSeed(options.seed, round)
        rng = SplitMix64(seed: roundSeed)
        nextID = UInt16(truncatingIfNeeded: roundSeed)
        let pick = rng.below(1000)
        switch pick {
        case 0..<3: try breachRound(.backwards)
        case 3..<6: try breachRound(.farAhead)
        case 6..<9: try breachRound(.endlessChain)
        case 9..<12: try breachRound(.tooManySlots)
        case 12..<15: try breachRound(.malformedFlood)
        case 15..<18: try rxBreachRound()
        case 18..<24: try closeRound()
        case 24..<28: try spuriousStateRound()
        default: try mixedRound()
        }
    }

    /// The seed of round `r` (splitmix64 of seed + r·golden ratio, as HostileBlkfront's).
    public static func roundSeed(_ seed: UInt64, _ r: Int) -> UInt64 {
        SplitMix64.mix(seed &+ UInt64(r) &* SplitMix64.increment)
    }

    private func mixedRound() throws {
        if rng.below(2) == 0 { try postRx() }
        var ledger = HostileTxLedger()
        try placeChains(&ledger, count: 1 + rng.below(Self.maxChains - 1), closingWithGoodFrame: true)
        let ended = collect(&ledger, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        finish(ledger, ringEnded: ended)
        if ended {
            fail("the backend closed the device in a round without a ring breach: " + backendError)
            try reconnect(afterBreach: true)
        }
    }

    enum Breach { case backwards, farAhead, endlessChain, tooManySlots, malformedFlood }

    /// Something netif.h's rules forbid outright: the backend must
    /// disconnect this frontend (Closing or Closed, an `error` node) within 5 s.
    private func breachRound(_ kind: Breach) throws {
        counters.breaches += 1
        var ledger = HostileTxLedger()
        try placeChains(&ledger, count: rng.below(6), closingWithGoodFrame: false)
        switch kind {
        case .backwards:
            // Only behind what the backend has taken is a breach it can see.
            _ = collect(&ledger, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
            let prod = fe.txRequestProducer
            try fe.publishRawTxRequestProducer(prod &- 1 &- UInt32(rng.below(fe.txRingSlots)))
        case .farAhead:
            let prod = fe.txRequestProducer
            try fe.publishRawTxRequestProducer(prod &+ UInt32(fe.txRingSlots) &+ 1 &+ UInt32(rng.below(1 << 30)))
        case .endlessChain:
            let n = 1 + rng.below(8)
            guard makeRoom(n, &ledger) else { return try noRoom(ledger) }
            let ids = (0..<n).map { _ in takeID() }
            let slots: [TxSlot] = ids.map { .request(NetifTxRequest(gref: heads[0].ref, offset: 0, flags: NetifTxFlags.moreData, id: $0, size: 100)) }
            ledger.place("a chain of \(n) slots without an end", ids: ids, extras: 0, expect: .refused)
            fe.pushTxSlots(slots, notify: true)
            try fe.kick()
        case .tooManySlots:
            let n = 33 + rng.below(8)
            guard makeRoom(n, &ledger) else { return try noRoom(ledger) }
            let (slots, ids) = sgChain(head: heads[heads.count - 1], slots: n, fragment: 64)
            sealHeads()
            ledger.place("a chain of \(n) slots", ids: ids, extras: 0, expect: .refused)
            fe.pushTxSlots(slots, notify: true)
            try fe.kick()
        case .malformedFlood:
            let n = TxChainLimit.malformedInARow + rng.below(16)
            guard makeRoom(n, &ledger) else { return try noRoom(ledger) }
            var slots: [TxSlot] = []
            for _ in 0..<n {
                let id = takeID()
                ledger.place("a frame of 10 bytes (flood)", ids: [id], extras: 0, expect: .refused)
                slots.append(.request(NetifTxRequest(gref: heads[0].ref, offset: 0, flags: 0, id: id, size: 10)))
            }
            fe.pushTxSlots(slots, notify: true)
            try fe.kick()
        }
        let closed = waitForBackend(seconds: 5) { $0 == .closing || $0 == .closed }
        _ = collect(&ledger, until: MonotonicClock.seconds() + 0.05, stopWhenClosed: false)
        counters.unansweredAtClose += ledger.unanswered
        finish(ledger, ringEnded: true)
        if !closed {
            fail("a ring breach (\(kind)) and the backend did not close the device within 5 s")
        } else if ((try? fe.store.read(fe.backendPath + "/error")) ?? nil) == nil {
            fail("the backend closed the device after a ring breach (\(kind)) but wrote no error node")
        }
        try reconnect(afterBreach: true)
    }

    /// Room for `n` more tx slots, after waiting for the answers in flight if need be.
    private func makeRoom(_ n: Int, _ ledger: inout HostileTxLedger) -> Bool {
        if fe.txRingFree < n {
            _ = collect(&ledger, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        }
        return fe.txRingFree >= n
    }

    /// A ring too full for the breach (its answers overdue, a failure already): start over instead.
    private func noRoom(_ ledger: HostileTxLedger) throws {
        finish(ledger, ringEnded: true)
        try reconnect(afterBreach: false)
    }

    /// rx req_prod far ahead: the backend sees it only when it has a frame
    /// to deliver, so it may or may not disconnect; either way we start over.
    private func rxBreachRound() throws {
        counters.breaches += 1
        try fe.publishRawRxRequestProducer(fe.rxRequestProducer &+ UInt32(fe.rxRingSlots) &+ 1 &+ UInt32(rng.below(1 << 30)))
        _ = waitForBackend(seconds: 0.5) { $0 == .closing || $0 == .closed }
        try reconnect(afterBreach: true)
    }

    /// The frontend closes (Closing, or Closed at once) with chains in flight.
    private func closeRound() throws {
        counters.closes += 1
        var ledger = HostileTxLedger()
        try placeChains(&ledger, count: 1 + rng.below(8), closingWithGoodFrame: true)
        try fe.store.writeState(fe.frontendPath, rng.below(3) == 0 ? .closed : .closing)
        let closed = waitForBackend(seconds: 5) { $0 == .closing || $0 == .closed }
        _ = collect(&ledger, until: MonotonicClock.seconds() + 0.05, stopWhenClosed: false)
        counters.unansweredAtClose += ledger.unanswered
        finish(ledger, ringEnded: true)
        if !closed { fail("the frontend closed and the backend did not go Closing or Closed within 5 s") }
        try reconnect(afterBreach: false)
    }

    /// A state written out of turn while Connected, then traffic as usual:
    /// the backend ignores Initialising, InitWait, Initialised and
    /// Connected then (as netback does); Unknown counts as Closed there,
    /// so it may close the device at any moment after (or, reading the
    /// node once we wrote Connected back, never): we start over after it.
    private func spuriousStateRound() throws {
        counters.spuriousStates += 1
        let states: [XenbusState] = [.initialising, .initWait, .initialised, .connected, .unknown]
        let state = states[rng.below(states.count)]
        try fe.store.writeState(fe.frontendPath, state)
        var ledger = HostileTxLedger()
        try placeChains(&ledger, count: 1 + rng.below(8), closingWithGoodFrame: true)
        let ended = collect(&ledger, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        finish(ledger, ringEnded: ended || state == .unknown)
        if ended || state == .unknown {
            try reconnect(afterBreach: false)
        } else {
            try fe.store.writeState(fe.frontendPath, .connected)
        }
    }

    // MARK: rx

    private func postRx() throws {
        let room = min(fe.rxRingFree, 32)
        guard room > 0 else { return }
        let busy = rx.pagesInFlight
        var free = (0..<rxPool.count).filter { !busy.contains($0) }
        var requests: [NetifRxRequest] = []
        for _ in 0..<(1 + rng.below(room)) {
            let id = requests.isEmpty || rng.below(4) != 0 ? UInt16(truncatingIfNeeded: rng.next()) : requests[rng.below(requests.count)].id
            switch rng.below(20) {
            case 0: requests.append(.init(id: id, gref: readOnly.ref)); rx.post(id: id, .unwritable("a read-only grant"))
            case 1: requests.append(.init(id: id, gref: foreign.ref)); rx.post(id: id, .unwritable("another domain's grant"))
            case 2: requests.append(.init(id: id, gref: revokedRef)); rx.post(id: id, .unwritable("a revoked grant"))
            case 3:
                let ref = neverGranted[rng.below(neverGranted.count)]
                requests.append(.init(id: id, gref: ref)); rx.post(id: id, .unwritable("grant \(ref), never granted"))
            default:
                guard !free.isEmpty else { continue }
                let page = free.remove(at: rng.below(free.count))
                requests.append(.init(id: id, gref: rxPool[page].ref)); rx.post(id: id, .writable(page))
            }
        }
        counters.rxPosted += requests.count
        try fe.pushRxRequests(requests, notify: rng.below(4) != 0)
    }

    private func drainRx() {
        guard let slots = try? fe.takeRawRxResponses() else { return }
        for raw in slots {
            let (failure, frame) = rx.record(raw)
            if let failure { fail(failure) }
            guard let frame else { continue }
            var data: [UInt8] = []
            for s in frame.slots {
                let p = UnsafeRawBufferPointer(start: bytes(rxPool[s.page]) + s.offset, count: s.length)
                data += p
            }
            if case .corrupted(let why) = BystanderFrame.check(data) { fail("a bystander frame delivered to the hostile guest is corrupted: \(why)") }
            if case .intact = BystanderFrame.check(data) { counters.bystanderFramesSeen += 1 }
        }
        counters.rxData = rx.dataSlots
        counters.rxErrors = rx.errorSlots
    }

    // MARK: tx

    private func takeID() -> UInt16 {
        defer { nextID &+= 1 }
        return nextID
    }

    /// `count` chains of random kinds, pushed in one to three batches,
    /// kicked or not, and a kick at the end. With `closingWithGoodFrame`
    /// the last is a plain well-formed frame, so the backend's count of
    /// malformed packets in a row never reaches 64 across rounds.
    private func placeChains(_ ledger: inout HostileTxLedger, count: Int, closingWithGoodFrame: Bool) throws {
        var pending: [TxSlot] = []
        let cut = rng.below(3) == 0 ? rng.below(max(count, 1)) : -1
        for c in 0..<count {
            let last = closingWithGoodFrame && c == count - 1
            let (slots, ids, extras, expect, what) = chain(head: c, kind: last ? 0 : rng.below(17))
            guard slots.count + pending.count <= fe.txRingFree else { break }
            ledger.place(what, ids: ids, extras: extras, expect: expect)
            counters.frames += 1
            counters.slots += slots.count
            switch expect {
            case .accepted: counters.wellFormed += 1
            case .refused: counters.refusable += 1
            case .any: counters.kernelDecides += 1
            }
            pending += slots
            if c == cut {
                fe.pushTxSlots(pending, notify: rng.below(2) == 0)
                pending = []
            }
        }
        if !pending.isEmpty { fe.pushTxSlots(pending, notify: rng.below(3) != 0) }
        if rng.below(4) != 0 { try fe.kick() }
        sealHeads()
    }

    /// Remembers what the head pages hold (the backend may only read them).
    private func sealHeads() {
        for (i, h) in (heads + filler).enumerated() { headSums[i] = fnv(bytes(h)) }
    }

    /// One chain on head page `h`: its slots, request ids, extra slots, expectation, name.
    private func chain(head h: Int, kind: Int) -> ([TxSlot], [UInt16], Int, HostileTxLedger.Expect, String) {
        let head = heads[h]
        let p = bytes(head)
        func single(_ size: Int, offset: Int = 0, flags: UInt16 = 0, ref: GrantRef? = nil) -> [TxSlot] {
            [.request(NetifTxRequest(gref: ref ?? head.ref, offset: UInt16(offset), flags: flags, id: takeID(), size: UInt16(size)))]
        }
        func ids(_ s: [TxSlot]) -> [UInt16] { s.compactMap { if case .request(let r) = $0 { r.id } else { nil } } }
        switch kind {
        case 0, 1, 2, 3:   // a well-formed frame in one slot, at any offset that fits
            let size = 60 + rng.below(1455)
            let offset = rng.below(XenPage.size - size + 1)
            writeFrame(p + offset, size)
            let s = single(size, offset: offset)
            return (s, ids(s), 0, .accepted, "a frame of \(size) bytes at offset \(offset)")
        case 4:   // well-formed scatter-gather: head plus 1-17 fragments
            let n = 2 + rng.below(17)
            let frag = 1 + rng.below(1024)
            let (s, i) = sgChain(head: head, slots: n, fragment: frag, headLength: 60 + rng.below(200))
            return (s, i, 0, .accepted, "a frame in \(n) slots")
        case 5:   // from a page granted writable: still a fine frame to send
            let size = 60 + rng.below(1455)
            writeFrame(bytes(writableTx), size)
            let s = single(size, ref: writableTx.ref)
            return (s, ids(s), 0, .accepted, "a frame of \(size) bytes from a writable grant")
        case 6:   // the head crosses its page
            let size = 60 + rng.below(1455)
            let offset = XenPage.size - size + 1 + rng.below(size - 1)
            let s = single(size, offset: offset)
            return (s, ids(s), 0, .refused, "a head of \(size) bytes at offset \(offset)")
        case 7:   // a fragment crosses its page, or the fragments exceed the frame, or the head is empty
            var (s, i) = sgChain(head: head, slots: 2 + rng.below(4), fragment: 100, headLength: 60)
            let variant = rng.below(3)
            if case .request(var r) = s[s.count - 1] {
                switch variant {
                case 0: r.offset = UInt16(XenPage.size - Int(r.size) + 1 + rng.below(Int(r.size)))
                case 1: r.size &+= UInt16(61 + rng.below(1000))   // more than the first request announced
                default: if case .request(var f) = s[0] { f.size -= 60; s[0] = .request(f) }   // head takes 0
                }
                s[s.count - 1] = .request(r)
            }
            return (s, i, 0, .refused, ["a fragment crossing its page", "fragments larger than the frame", "an empty head"][variant])
        case 8:   // shorter than an Ethernet header
            let size = rng.below(14)
            let s = single(size)
            return (s, ids(s), 0, .refused, "a frame of \(size) bytes")
        case 9:   // 19-32 slots: refused, not yet fatal
            let n = 19 + rng.below(14)
            let (s, i) = sgChain(head: head, slots: n, fragment: 64, headLength: 60)
            return (s, i, 0, .refused, "a frame in \(n) slots")
        case 10, 11:   // extra-info slots: unknown, multicast, hash or bad GSO types, too many
            let size = 60 + rng.below(1000)
            writeFrame(p, size)
            var s = single(size, flags: NetifTxFlags.extraInfo)
            let variant = rng.below(4)
            let count = variant == 3 ? 5 + rng.below(4) : 1
            for k in 0..<count {
                var payload = InlineArray<6, UInt8>(repeating: 0)
                for b in 0..<6 { payload[b] = UInt8(truncatingIfNeeded: rng.next()) }
                var type: UInt8
                switch variant {
                case 0: type = [NetifExtraType.none, NetifExtraType.max, 0x80, 0xff][rng.below(4)]
                case 1: type = [NetifExtraType.mcastAdd, NetifExtraType.mcastDel, NetifExtraType.hash][rng.below(3)]
                case 2:
                    type = NetifExtraType.gso
                    if rng.below(2) == 0 { payload[0] = 0; payload[1] = 0 } else { payload[2] = 3 + UInt8(rng.below(200)) }
                default: type = NetifExtraType.gso
                }
                s.append(.extra(NetifExtraInfo(type: type, flags: k < count - 1 ? NetifExtraType.flagMore : 0, payload: payload)))
            }
            let what = ["an unknown extra-info type", "a multicast or hash extra", "a GSO extra of nonsense type or size",
                        "\(count) extra-info slots"][variant]
            // A lone multicast edit is a control request: OKAY, or ERROR once
            // the filter is full (feature-multicast-control). A hash extra is
            // accepted and ignored (netif.h: a hashing backend takes them).
            if case .extra(let e) = s[1], variant == 1 {
                return (s, ids(s), count, .any, e.type == NetifExtraType.hash ? "a frame with the guest's hash" : "a multicast filter edit")
            }
            return (s, ids(s), count, .refused, what)
        case 12:   // GSO or a partial checksum on a frame that is not TCP/UDP over IP
            let size = 60 + rng.below(1000)
            writeFrame(p, size)
            if rng.below(2) == 0 {
                let s = single(size, flags: NetifTxFlags.csumBlank)
                return (s, ids(s), 0, .refused, "a partial checksum on a frame that is not IP")
            }
            var payload = InlineArray<6, UInt8>(repeating: 0)
            payload[0] = 0x28; payload[1] = 0x05; payload[2] = NetifGSOType.tcpv4
            var s = single(size, flags: NetifTxFlags.extraInfo)
            s.append(.extra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: payload)))
            return (s, ids(s), 1, .refused, "TCPv4 GSO on a frame that is not TCP")
        case 13, 14:   // a grant the backend may not use
            let size = 60 + rng.below(1000)
            let (ref, what): (GrantRef, String) = switch rng.below(3) {
            case 0: (neverGranted[rng.below(neverGranted.count)], "a grant never made")
            case 1: (foreign.ref, "another domain's grant")
            default: (revokedRef, "a revoked grant")
            }
            let s = single(size, ref: ref)
            return (s, ids(s), 0, .refused, "a frame from \(what)")
        default:   // a TCP/IPv4 frame with a partial checksum, maybe GSO: the kernel decides
            let size = 54 + rng.below(1400)
            writeTCP(p, size)
            if rng.below(2) == 0 {
                let s = single(size, flags: NetifTxFlags.csumBlank)
                return (s, ids(s), 0, .any, "a TCP frame with a partial checksum")
            }
            var payload = InlineArray<6, UInt8>(repeating: 0)
            let mss = 88 + rng.below(1400)
            payload[0] = UInt8(mss & 0xff); payload[1] = UInt8(mss >> 8); payload[2] = NetifGSOType.tcpv4
            var s = single(size, flags: NetifTxFlags.csumBlank | NetifTxFlags.extraInfo)
            s.append(.extra(NetifExtraInfo(type: NetifExtraType.gso, flags: 0, payload: payload)))
            return (s, ids(s), 1, .any, "a TCP frame with GSO size \(mss)")
        }
    }

    /// A chain of `slots` requests: a frame's first `headLength` bytes on
    /// page `head`, fragments of `fragment` bytes from the filler pages;
    /// the first request's size is the whole frame.
    private func sgChain(head: Page, slots n: Int, fragment: Int, headLength: Int = 60) -> ([TxSlot], [UInt16]) {
        let headID = takeID()
        var requests: [NetifTxRequest] = []
        var total = headLength
        for k in 1..<n {
            let f = filler[k % filler.count]
            let offset = rng.below(XenPage.size - fragment + 1)
            requests.append(NetifTxRequest(gref: f.ref, offset: UInt16(offset), flags: k < n - 1 ? NetifTxFlags.moreData : 0,
                                           id: takeID(), size: UInt16(fragment)))
            total += fragment
        }
        let first = NetifTxRequest(gref: head.ref, offset: 0, flags: NetifTxFlags.moreData, id: headID,
                                   size: UInt16(min(total, 0xffff)))
        writeFrame(bytes(head), headLength)
        let all = [first] + requests
        return (all.map { .request($0) }, all.map(\.id))
    }

    /// An Ethernet frame to ourselves (the bridge learns our MAC and drops
    /// it; never the bystander's MACs as source), ethertype 0x88B6.
    private func writeFrame(_ p: UnsafeMutableRawPointer, _ size: Int) {
        for i in 0..<6 { p.storeBytes(of: mac[i], toByteOffset: i, as: UInt8.self); p.storeBytes(of: mac[i], toByteOffset: 6 + i, as: UInt8.self) }
        p.storeBytes(of: UInt8(0x88), toByteOffset: 12, as: UInt8.self)
        p.storeBytes(of: UInt8(0xB6), toByteOffset: 13, as: UInt8.self)
        var x = rng.next()
        for i in 14..<max(size, 14) { x = x &* 6364136223846793005 &+ 1; p.storeBytes(of: UInt8(truncatingIfNeeded: x >> 33), toByteOffset: i, as: UInt8.self) }
    }

    /// Ethernet + IPv4 + TCP headers (to ourselves, 10.99.7.x), then bytes.
    private func writeTCP(_ p: UnsafeMutableRawPointer, _ size: Int) {
        writeFrame(p, size)
        p.storeBytes(of: UInt8(0x08), toByteOffset: 12, as: UInt8.self)
        p.storeBytes(of: UInt8(0x00), toByteOffset: 13, as: UInt8.self)
        let ip: [UInt8] = [0x45, 0, UInt8((size - 14) >> 8), UInt8((size - 14) & 0xff), 0, 1, 0x40, 0, 64, 6, 0, 0,
                           10, 99, 7, 1, 10, 99, 7, 2]
        let tcp: [UInt8] = [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x20, 0, 0, 0, 0, 0]
        for (i, b) in (ip + tcp).enumerated() { p.storeBytes(of: b, toByteOffset: 14 + i, as: UInt8.self) }
    }

    /// Reads tx responses (and drains rx) until every slot is answered, the
    /// deadline, or (when asked) the backend closing the device; true if it closed.
    private func collect(_ ledger: inout HostileTxLedger, until deadline: Double, stopWhenClosed: Bool) -> Bool {
        var quietSince = MonotonicClock.seconds()
        var kicked = false
        while true {
            drainRx()
            if let responses = try? fe.takeTxResponses(), !responses.isEmpty {
                quietSince = MonotonicClock.seconds()
                for r in responses {
                    switch r.status {
                    case NetifStatus.okay: counters.okay += 1
                    case NetifStatus.error: counters.error += 1
                    case NetifStatus.dropped: counters.dropped += 1
                    case NetifStatus.null: counters.null += 1
                    default: break
                    }
                    if let f = ledger.record(r) { fail(f) }
                }
            }
            if ledger.unanswered <= 0 { return false }
            let now = MonotonicClock.seconds()
            if now >= deadline {
                if stopWhenClosed {
                    fail("\(ledger.unanswered) of \(ledger.slotsPlaced) tx slots unanswered after \(Int(options.responseTimeout)) s on a live ring")
                }
                return false
            }
            if now - quietSince > 0.2 && !kicked {
                // Published without a kick (or the backend saw nothing to do): kick once, late.
                kicked = true
                try? fe.kick()
            }
            if stopWhenClosed && now - quietSince > 0.5 {
                let s = fe.backendState
                if s == .closing || s == .closed { return true }
            }
            _ = try? fe.waitForEvents(timeout: min(deadline - now, 0.1))
        }
    }

    /// After the round: judge the answers; the pages the backend may not write are intact.
    private func finish(_ ledger: HostileTxLedger, ringEnded: Bool) {
        for f in ledger.evaluate(ringEnded: ringEnded) { fail(f) }
        drainRx()
        for (page, fill, what) in [(readOnly, Self.readOnlyFill, "read-only"), (foreign, Self.foreignFill, "another domain's"),
                                   (Page(frame: revokedFrame, ref: revokedRef), Self.revokedFill, "revoked")] {
            let b = bytes(page).assumingMemoryBound(to: UInt8.self)
            if let i = (0..<XenPage.size).first(where: { b[$0] != UInt8(fill) }) {
                fail("the \(what) page changed at byte \(i) (the backend wrote where it may not)")
                memset(b, fill, XenPage.size)
            }
        }
        for (i, h) in (heads + filler).enumerated() where fnv(bytes(h)) != headSums[i] {
            fail("tx page \(i), granted read-only, changed under the backend")
        }
    }

    private var backendError: String { ((try? fe.store.read(fe.backendPath + "/error")) ?? nil) ?? "no error node" }

    // MARK: reconnecting

    /// Closing, Closed, Initialising as Linux netfront does after an error;
    /// the backend should offer InitWait again, else the toolstack re-adds the NIC.
    private func reconnect(afterBreach: Bool) throws {
        do { try fe.disconnect(timeout: 5) } catch { fail("closing the device: \(error)") }
        rx.reset()
        try fe.store.writeState(fe.frontendPath, .initialising)
        if waitForBackend(seconds: options.reconnectTimeout, { $0 == .initWait }) {
            counters.reconnects += 1
        } else {
            counters.refusedReconnects += 1
            if !afterBreach || options.expectReconnect {
                fail("the vif stayed \(fe.backendState.map { "\($0)" } ?? "gone") after the frontend went Closing, Closed, "
                     + "Initialising (after \(afterBreach ? "a ring breach" : "a clean close"))")
            }
            try recreateDevice()
            counters.recreated += 1
        }
        do { try connectRing() } catch {
            fail("connecting again failed: \(error)")
            fe.releaseResources()
            try recreateDevice()
            counters.recreated += 1
            try connectRing()
        }
    }

    /// The end of the run: a clean close.
    public func close() {
        do { try fe.disconnect(timeout: 5) } catch { fail("closing the device at the end: \(error)") }
    }

    /// Polls the backend's state until `condition` holds or `seconds` pass.
    private func waitForBackend(seconds: Double, _ condition: (XenbusState?) -> Bool) -> Bool {
        let deadline = MonotonicClock.seconds() + seconds
        while true {
            if condition(fe.backendState) { return true }
            if MonotonicClock.seconds() >= deadline { return false }
            usleep(5_000)
        }
    }

    private func fnv(_ p: UnsafeMutableRawPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let b = p.assumingMemoryBound(to: UInt8.self)
        for i in 0..<XenPage.size { h = (h ^ UInt64(b[i])) &* 0x100_0000_01b3 }
        return h
    }
}

/// The backend's limit on malformed packets in a row (TxChainRules in
/// NetBackend, which this module does not link).
enum TxChainLimit { static let malformedInARow = 64 }
