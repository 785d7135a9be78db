/// A request the checker's frontend model wrote well-formed, as it knows it.
struct FuzzRequest {
    enum Kind: UInt8 { case read, write, barrier, flush, discard, indirectRead, indirectWrite }
    var kind: Kind
    /// The operation its response must carry (an indirect request's indirect_op).
    var responseOperation: UInt8
    var index: UInt32
    var sector: UInt64
    var sectorCount: UInt64
    /// Epoch its slot was written.
    var published: UInt32
    /// Its write in the sector model (0: moves no data to the disk).
    var serial: UInt32 = 0
    /// Its data pages: `segmentCount` entries of the ring's segment pool from `segmentStart`.
    var segmentStart: Int32 = 0
    var segmentCount: Int32 = 0
    var indirectFrame: Int8 = -1
    var answered = false
    /// Its data cannot be vouched for (its slot or pages were tampered with).
    var unreliable = false
    /// Its slot or descriptors were rewritten: another version may be answered instead.
    var tampered = false

    var isRead: Bool { kind == .read || kind == .indirectRead }
    var writesData: Bool { kind == .write || kind == .indirectWrite || (kind == .barrier && segmentCount > 0) }
    var isIndirect: Bool { kind == .indirectRead || kind == .indirectWrite }
}

/// One data segment of a well-formed request: a whole frame of its own.
struct FuzzSegment {
    var frame: UInt8
    var first: UInt8
    var last: UInt8
}

/// An id the checker saw offered in raw or rewritten bytes: it may be answered once.
struct FuzzOffer {
    var id: UInt64
    var operation: UInt8
    var answered = false
}

/// Findings of one run, each naming the invariant, the action and details.
final class FuzzFindings {
    var items: [String] = []
    var action = 0
    func report(_ ring: String, _ invariant: String, _ details: @autoclosure () -> String) {
        guard items.count < 3 else { return }   // the first ones say it; the rest follow from them
        items.append("\(ring) action \(action): \(invariant): \(details())")
    }
}
