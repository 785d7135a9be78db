/// Why the backend refused a request (answered it BLKIF_RSP_ERROR or
/// EOPNOTSUPP without doing it): counted per reason for `xenbackd status`
/// and logged, rate-limited, with the device, so an operator can tell which
/// guest sent what.
public enum VbdRejectionReason: Int, CaseIterable, Sendable, CustomStringConvertible {
    case badSegmentCount, badSegment, beyondEndOfDisk, readOnlyDisk, unsupportedOperation, badIndirectOperation
    /// An id already in flight.
    case duplicateID
    /// A grant that could not be copied (or mapped): revoked, never granted,
    /// read-only where the backend must write, another domain's.
    case badGrant

    init(_ r: RequestRejection) {
        switch r {
        case .badSegmentCount: self = .badSegmentCount
        case .badSegment: self = .badSegment
        case .beyondEndOfDisk: self = .beyondEndOfDisk
        case .readOnlyDisk: self = .readOnlyDisk
        case .unsupportedOperation: self = .unsupportedOperation
        case .badIndirectOperation: self = .badIndirectOperation
        }
    }

    public var description: String {
        switch self {
        case .badSegmentCount: "bad-segment-count"
        case .badSegment: "bad-segment"
        case .beyondEndOfDisk: "beyond-end-of-disk"
        case .readOnlyDisk: "read-only-disk"
        case .unsupportedOperation: "unsupported-operation"
        case .badIndirectOperation: "bad-indirect-operation"
        case .duplicateID: "duplicate-id"
        case .badGrant: "bad-grant"
        }
    }
}

/// Refused requests by reason.
public struct VbdRejections: Equatable, Sendable {
    public static let count = VbdRejectionReason.allCases.count
    private var counts: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
    // One counter per VbdRejectionReason, by raw value.
    public init() {}

    public subscript(_ r: VbdRejectionReason) -> UInt64 {
        get { withUnsafeBytes(of: counts) { $0.load(fromByteOffset: r.rawValue * 8, as: UInt64.self) } }
        set { withUnsafeMutableBytes(of: &counts) { $0.storeBytes(of: newValue, toByteOffset: r.rawValue * 8, as: UInt64.self) } }
    }

    public var total: UInt64 { VbdRejectionReason.allCases.reduce(0) { $0 &+ self[$1] } }

    /// The reasons seen, by name.
    public var named: [String: UInt64] {
        var out: [String: UInt64] = [:]
        for r in VbdRejectionReason.allCases where self[r] > 0 { out[r.description] = self[r] }
        return out
    }

    /// Field by field: compared on every pass (`allCases` would build an array each time).
    public static func == (a: VbdRejections, b: VbdRejections) -> Bool {
        a.counts.0 == b.counts.0 && a.counts.1 == b.counts.1 && a.counts.2 == b.counts.2 && a.counts.3 == b.counts.3
            && a.counts.4 == b.counts.4 && a.counts.5 == b.counts.5 && a.counts.6 == b.counts.6 && a.counts.7 == b.counts.7
    }

    func adding(_ o: VbdRejections) -> VbdRejections {
        var s = self
        for r in VbdRejectionReason.allCases { s[r] &+= o[r] }
        return s
    }
}

/// One refused request, as the engine keeps it for the loop to log.
public struct VbdRejectedRequest: Equatable, Sendable {
    public var reason: VbdRejectionReason
    public var id: UInt64
    public var operation: UInt8
    public var sector: UInt64
    public init(reason: VbdRejectionReason, id: UInt64, operation: UInt8, sector: UInt64) {
        self.reason = reason; self.id = id; self.operation = operation; self.sector = sector
    }
}
