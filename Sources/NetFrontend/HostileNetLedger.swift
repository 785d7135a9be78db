import XenABI

/// What a hostile netfront placed on its tx ring in one round and what it
/// expects back, checked against netif.h and netback from outside: each
/// request slot is answered once, under an id it used (extra-info slots
/// with NETIF_RSP_NULL), every slot of one chain with the same status, and
/// that status fits the chain: OKAY or DROPPED for a well-formed frame,
/// ERROR or DROPPED for one the backend must refuse, any defined status
/// for one whose fate the kernel decides.
public struct HostileTxLedger: Sendable {
    public enum Expect: Sendable { case accepted, refused, any }

    struct Chain {
        var what: String
        var expect: Expect
        var extras: Int
        var statuses: [Int16] = []
        var slots: Int
    }

    private(set) var chains: [Chain] = []
    /// The chain of each request id placed (ids are unique within a round).
    private var chainOf: [UInt16: Int] = [:]
    private var answeredIDs: Set<UInt16> = []
    private var extrasPlaced = 0, nullAnswers = 0
    public private(set) var slotsPlaced = 0, answered = 0

    public init() {}

    public var unanswered: Int { slotsPlaced - answered }

    /// One chain: its request ids in ring order (extra slots not included).
    public mutating func place(_ what: String, ids: [UInt16], extras: Int, expect: Expect) {
        precondition(ids.allSatisfy { chainOf[$0] == nil }, "an id placed twice in one round")
        for id in ids { chainOf[id] = chains.count }
        chains.append(Chain(what: what, expect: expect, extras: extras, slots: ids.count))
        extrasPlaced += extras
        slotsPlaced += ids.count + extras
    }

    /// One response; a protocol failure, if any.
    public mutating func record(_ r: NetifTxResponse) -> String? {
        answered += 1
        if r.status == NetifStatus.null {
            nullAnswers += 1
            return nullAnswers > extrasPlaced ? "more NETIF_RSP_NULL answers (\(nullAnswers)) than extra slots placed (\(extrasPlaced))" : nil
        }
        guard [NetifStatus.okay, NetifStatus.error, NetifStatus.dropped].contains(r.status) else {
            return "tx response to id \(r.id) has status \(r.status), which netif.h does not define"
        }
        guard let c = chainOf[r.id] else { return "tx response to id \(r.id), which is not in flight" }
        guard answeredIDs.insert(r.id).inserted else { return "tx id \(r.id) answered twice" }
        chains[c].statuses.append(r.status)
        return nil
    }

    /// After the round (`ringEnded`: a breach or close may leave slots unanswered).
    public func evaluate(ringEnded: Bool) -> [String] {
        var failures: [String] = []
        for c in chains {
            if c.statuses.count < c.slots {
                if !ringEnded { failures.append("\(c.what): \(c.slots - c.statuses.count) of \(c.slots) slots never answered") }
                continue
            }
            guard let s = c.statuses.first else { continue }
            if c.statuses.contains(where: { $0 != s }) {
                failures.append("\(c.what): its slots answered \(c.statuses.map(Self.name)), not one status")
            }
            switch c.expect {
            case .accepted where s != NetifStatus.okay && s != NetifStatus.dropped:
                failures.append("well-formed \(c.what) answered \(Self.name(s)), expected OKAY (or DROPPED)")
            case .refused where s == NetifStatus.okay:
                failures.append("\(c.what) answered OKAY, expected ERROR (or DROPPED)")
            default: break
            }
        }
        return failures
    }

    public static func name(_ s: Int16) -> String {
        switch s {
        case NetifStatus.okay: "OKAY"
        case NetifStatus.error: "ERROR"
        case NetifStatus.dropped: "DROPPED"
        case NetifStatus.null: "NULL"
        default: "status \(s)"
        }
    }
}

/// The rx requests a hostile netfront posted, in ring order, and the
/// responses to them: the backend consumes requests and writes responses
/// in lockstep, so the response at ring index i answers the request at i,
/// under its id (duplicates included). Only a buffer granted writable may
/// be answered with data, within its page; a frame's extra-info slots are
/// well-formed GSO extras; a bystander frame that arrives is intact.
public struct HostileRxLedger: Sendable {
    public enum Buffer: Sendable, Equatable {
        /// One of our writable pages (index in the frontend's pool).
        case writable(Int)
        /// A grant the backend may not write: read-only, another domain's, never granted, revoked.
        case unwritable(String)
    }

    public struct Delivered: Sendable {
        public var slots: [(page: Int, offset: Int, length: Int)]
    }

    private var posted: [(id: UInt16, buffer: Buffer)] = []
    private var head = 0
    private enum State { case idle, extras, data }
    private var state = State.idle
    private var firstFlags: UInt16 = 0
    private var packet: [(page: Int, offset: Int, length: Int)] = []
    private var packetBad = false
    public private(set) var responses = 0, dataSlots = 0, errorSlots = 0, extras = 0

    public init() {}

    public var outstanding: Int { posted.count - head }

    /// Pages posted and not answered yet.
    public var pagesInFlight: Set<Int> {
        var s = Set<Int>()
        for p in posted[head...] { if case .writable(let i) = p.buffer { s.insert(i) } }
        return s
    }

    public mutating func post(id: UInt16, _ buffer: Buffer) { posted.append((id, buffer)) }

    /// Forgets everything (the ring is gone).
    public mutating func reset() {
        posted = []; head = 0; state = .idle; packet = []; packetBad = false
    }

    /// One response slot (8 raw bytes): a failure, and a frame completed
    /// with data in writable buffers (to check its bytes), if any.
    public mutating func record(_ raw: InlineArray<8, UInt8>) -> (failure: String?, frame: Delivered?) {
        responses += 1
        guard head < posted.count else { return ("an rx response with no request posted for it", nil) }
        let request = posted[head]
        head += 1
        if head > 512 { posted.removeFirst(head); head = 0 }
        let bytes = [UInt8](unsafeUninitializedCapacity: 8) { b, n in for i in 0..<8 { b[i] = raw[i] }; n = 8 }
        if state == .extras {
            extras += 1
            let e = bytes.withUnsafeBytes { NetifExtraInfo(decoding: $0.baseAddress!) }
            var failure: String?
            if e.type != NetifExtraType.gso || e.gsoSize == 0
                || (e.gsoType != NetifGSOType.tcpv4 && e.gsoType != NetifGSOType.tcpv6) || e.payload[3] != 0 {
                failure = "an rx extra-info slot that is no well-formed GSO extra: type \(e.type), bytes \(bytes)"
            }
            if e.flags & NetifExtraType.flagMore == 0 {
                state = firstFlags & NetifRxFlags.moreData != 0 ? .data : .idle
            }
            return (failure, state == .idle ? finishPacket() : nil)
        }
        let r = bytes.withUnsafeBytes { NetifRxResponse(decoding: $0.baseAddress!) }
        var failure: String?
        if r.id != request.id {
            failure = "rx response at this ring position has id \(r.id), the request there had id \(request.id)"
        }
        if state == .idle {
            firstFlags = r.flags
            packet = []
            packetBad = false
        }
        if r.status > 0 {
            dataSlots += 1
            switch request.buffer {
            case .writable(let page) where Int(r.offset) + Int(r.status) <= 4096:
                packet.append((page, Int(r.offset), Int(r.status)))
            case .writable:
                failure = failure ?? "rx response of \(r.status) bytes at offset \(r.offset) runs past its page"
                packetBad = true
            case .unwritable(let what):
                failure = failure ?? "rx response says \(r.status) bytes went into a buffer posted with \(what)"
                packetBad = true
            }
        } else {
            errorSlots += 1
            packetBad = true
            if r.status != NetifStatus.error && r.status != NetifStatus.dropped && r.status != 0 {
                failure = failure ?? "rx response with status \(r.status), which netif.h does not define"
            }
        }
        if state == .idle && r.flags & NetifRxFlags.extraInfo != 0 {
            state = .extras
            return (failure, nil)
        }
        state = r.flags & NetifRxFlags.moreData != 0 ? .data : .idle
        return (failure, state == .idle ? finishPacket() : nil)
    }

    private mutating func finishPacket() -> Delivered? {
        defer { packet = [] }
        return packetBad || packet.isEmpty ? nil : Delivered(slots: packet)
    }
}
