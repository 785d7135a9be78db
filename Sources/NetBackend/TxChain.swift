import XenABI

/// Why a guest's tx chain was refused. Each is answered NETIF_RSP_ERROR
/// and counted; `isFatal` ones disconnect the frontend at once (netback
/// does the same: they mean the frontend no longer follows the ring
/// protocol at all, so nothing later on its ring can be trusted).
public enum TxChainRejection: Equatable, Sendable, CustomStringConvertible {
    /// NETTXF_more_data on the last request published: frontends publish
    /// whole packets, so the rest never comes.
    case incompleteChain(slots: Int)
    /// Longer than any frontend may make a packet (fatal above `fatalSlots`).
    case tooManySlots(Int)
    case fragmentCrossesPage(offset: UInt16, size: UInt16)
    /// The head (first request's share) is empty: the first request's size
    /// is the whole frame, the rest of the chain took all of it or more.
    case zeroLengthHead
    /// The fragments add up to more than the frame size the first request
    /// announced (the frame would exceed 64 KiB or contradict itself).
    case fragmentsExceedFrameSize(frame: Int, fragments: Int)
    case frameShorterThanEthernetHeader(Int)
    case badExtraType(UInt8)
    case duplicateExtra(UInt8)
    case badGSO(type: UInt8, size: UInt16)
    /// Checksum offload or GSO asked for a frame that is not TCP/UDP over IP.
    case unparseableOffload
    case gsoMismatch

    public var isFatal: Bool {
        switch self {
        case .incompleteChain: true
        case .tooManySlots(let n): n > TxChainRules.fatalSlots
        default: false
        }
    }

    public var description: String {
        switch self {
        case .incompleteChain(let n): "chain of \(n) slots ends with NETTXF_more_data"
        case .tooManySlots(let n): "\(n) slots in one packet (at most \(TxChainRules.maxSlots))"
        case .fragmentCrossesPage(let o, let s): "fragment at offset \(o) of \(s) bytes crosses its page"
        case .zeroLengthHead: "zero-length head"
        case .fragmentsExceedFrameSize(let f, let g): "fragments total \(g) bytes, more than the frame's \(f)"
        case .frameShorterThanEthernetHeader(let n): "frame of \(n) bytes is shorter than an Ethernet header"
        case .badExtraType(let t): "extra-info type \(t) is not GSO"
        case .duplicateExtra(let t): "extra-info type \(t) given twice"
        case .badGSO(let t, let s): "GSO type \(t) size \(s)"
        case .unparseableOffload: "checksum offload or GSO on a frame that is not TCP/UDP over IP"
        case .gsoMismatch: "GSO type does not match the frame's IP version or protocol"
        }
    }
}

public enum TxChainRules {
    /// XEN_NETBK_LEGACY_SLOTS_MAX: data slots one packet may use.
    public static let maxSlots = Netif.nrSlotsMin
    /// Beyond this the chain is not a mistake but a broken frontend.
    public static let fatalSlots = 32
    /// Extra-info slots one packet may carry (one per type, GSO only here).
    public static let maxExtras = 4
    /// Malformed packets in a row after which the frontend is disconnected.
    public static let malformedInARowLimit = 64
}
