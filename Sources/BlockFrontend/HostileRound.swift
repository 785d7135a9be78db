import Glibc
import XenABI

/// The requests of one round of a hostile frontend and the responses to
/// them, checked against blkif.h from outside the backend: every response
/// answers an id in flight, once (an id placed twice is in flight twice);
/// its padding is zero and its status one blkif.h defines; a well-formed
/// request is answered as the disk's features say (OKAY), with its own
/// operation; a request naming a grant the backend must not use is
/// answered ERROR; what a well-formed read returns is what the model says.
struct HostileRound {
    /// What the guest expects of one request.
    enum Role {
        /// Built by our blkfront with its own pages: `expected` status, exact data.
        case wellFormed(WellFormed)
        /// Otherwise right, but a grant the backend must not use for it: ERROR.
        case refusedGrant
        /// Anything goes but the protocol (one answer, zero padding, a known status).
        case hostile
    }

    struct WellFormed {
        enum Kind { case read, write, barrier, flush, discard }
        var kind: Kind
        var slot: Int
        var sector: UInt64
        var count: Int
        var first: Int
        var version: UInt32
        var expected: Int16
        var operation: UInt8
        /// The sectors it may write (writes, barriers, discards).
        var range: Range<UInt64> { kind == .read || kind == .flush ? 0..<0 : sector..<sector + UInt64(count) }
    }

    struct Placed {
        var id: UInt64
        var role: Role
        var answers: [(status: Int16, operation: UInt8)] = []
    }

    private(set) var placed: [Placed] = []
    /// Requests placed under each id, in ring order.
    private var byID: [UInt64: [Int]] = [:]
    private(set) var unanswered = 0
    /// Sector ranges of well-formed requests in flight (kept apart, so the model stays exact).
    private var busy: [Range<UInt64>] = []

    var ids: [UInt64] { placed.map(\.id) }

    mutating func place(id: UInt64, _ role: Role) {
        byID[id, default: []].append(placed.count)
        placed.append(Placed(id: id, role: role))
        unanswered += 1
        if case .wellFormed(let w) = role, w.count > 0, w.kind != .flush {
            busy.append(w.sector..<w.sector + UInt64(w.count))
        }
    }

    func overlapsBusy(_ r: Range<UInt64>) -> Bool { busy.contains { $0.overlaps(r) } }

    /// One response as read from the ring (its 16 bytes at `raw`); a
    /// protocol failure, if any.
    mutating func record(_ rsp: BlkifResponse, raw: UnsafeRawPointer) -> String? {
        var failure: String?
        let padding = [9, 12, 13, 14, 15].map { raw.load(fromByteOffset: $0, as: UInt8.self) }
        if padding.contains(where: { $0 != 0 }) {
            failure = "response to id \(hex(rsp.id)) has non-zero padding \(padding) (bytes 9, 12-15)"
        }
        if ![BlkifStatus.okay, BlkifStatus.error, BlkifStatus.notSupported].contains(rsp.status) {
            failure = failure ?? "response to id \(hex(rsp.id)) has status \(rsp.status), which blkif.h does not define"
        }
        guard let group = byID[rsp.id], let i = group.first(where: { placed[$0].answers.isEmpty }) else {
            let known = byID[rsp.id] != nil
            return known ? "id \(hex(rsp.id)) answered more often than it was placed (\(byID[rsp.id]!.count))"
                         : "response to id \(hex(rsp.id)), which is not in flight"
        }
        placed[i].answers.append((rsp.status, rsp.operation))
        unanswered -= 1
        return failure
    }

    /// The requests placed under request i's id, in ring order: the first
    /// is the original, the backend refuses the others while it is in flight.
    private func group(of i: Int) -> [Int] { byID[placed[i].id] ?? [i] }

    /// After the round: what each answer means for the model, and what
    /// broke a rule. `ringEnded`: the ring was closed or broken meanwhile,
    /// so requests may go unanswered (never taken). `verify`: compares a
    /// well-formed read's data with the model (its failures).
    func evaluate(model: inout HostileDiskModel, ringEnded: Bool,
                  verify: (WellFormed) -> String?) -> [String] {
        var failures: [String] = []
        for (i, p) in placed.enumerated() {
            let members = group(of: i)
            let isOriginal = members.first == i
            let statuses = members.flatMap { placed[$0].answers.map(\.status) }
            switch p.role {
            case .wellFormed(let w):
                // A copy of a request answers like it; only the original is judged.
                guard isOriginal else { continue }
                guard !p.answers.isEmpty else {
                    if !ringEnded { failures.append("\(w.kind) id \(hex(p.id)) was never answered") }
                    model.forget(w.range)
                    continue
                }
                let met = statuses.contains(w.expected)
                if !met {
                    failures.append("well-formed \(w.kind) id \(hex(p.id)) (sector \(w.sector), \(w.count) sectors) "
                                    + "answered \(statuses.map(statusName)), expected \(statusName(w.expected))")
                } else if members.count == 1 && p.answers[0].operation != w.operation {
                    failures.append("well-formed \(w.kind) id \(hex(p.id)) answered with operation \(p.answers[0].operation), expected \(w.operation)")
                }
                let okay = met && w.expected == BlkifStatus.okay
                switch w.kind {
                case .write, .barrier: okay ? model.written(w.range, version: w.version) : model.forget(w.range)
                case .discard: okay ? model.discarded(w.range) : model.forget(w.range)
                case .read: if okay, let f = verify(w) { failures.append(f) }
                case .flush: break
                }
            case .refusedGrant:
                guard isOriginal, !p.answers.isEmpty else { continue }
                if !statuses.contains(BlkifStatus.error) {
                    failures.append("request id \(hex(p.id)) naming a grant the backend may not use answered \(statuses.map(statusName)), expected ERROR")
                }
            case .hostile:
                break
            }
        }
        return failures
    }
}

func statusName(_ s: Int16) -> String {
    switch s {
    case BlkifStatus.okay: "OKAY"
    case BlkifStatus.error: "ERROR"
    case BlkifStatus.notSupported: "EOPNOTSUPP"
    default: "status \(s)"
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
