import XenABI

/// A blkif request that passed validation: everything the data path needs,
/// in private memory, checked against the disk and the protocol's limits.
public struct ValidatedRequest {
    public enum Kind: Equatable, Sendable {
        case read, write
        /// WRITE_BARRIER: drain, write (if any segments), then flush.
        case barrier
        case flush
        case discard(sectors: UInt64)
    }
    public var id: UInt64
    public var operation: UInt8
    public var kind: Kind
    public var sector: UInt64
    public var segmentCount: Int
    public var segments: InlineArray<11, BlkifSegment>
    /// Total bytes moved by the segments.
    public var byteCount: Int
}

/// Why a request is refused, and the status it is answered with.
public enum RequestRejection: Error, Equatable, Sendable {
    case badSegmentCount(Int)
    case badSegment(index: Int)
    case beyondEndOfDisk
    case readOnlyDisk
    case unsupportedOperation
    case unsupportedSecureDiscard

    public var status: Int16 {
        switch self {
        case .unsupportedOperation, .unsupportedSecureDiscard: BlkifStatus.notSupported
        default: BlkifStatus.error
        }
    }
}

/// What the backend offers on this disk (decides what it accepts).
public struct DiskLimits: Sendable {
    public var sectors: UInt64
    public var readOnly: Bool
    public var flush: Bool
    public var barrier: Bool
    public var discard: Bool
    public var secureDiscard: Bool
    public init(sectors: UInt64, readOnly: Bool, flush: Bool, barrier: Bool, discard: Bool, secureDiscard: Bool = false) {
        self.sectors = sectors; self.readOnly = readOnly; self.flush = flush
        self.barrier = barrier; self.discard = discard; self.secureDiscard = secureDiscard
    }
}

/// Validates a private copy of a ring slot. Pure: the same bytes always
/// give the same answer, and nothing is read twice from shared memory.
@inline(__always)
public func validateBlkifRequest(_ slot: UnsafeRawPointer, limits: DiskLimits) -> Result<ValidatedRequest, RequestRejection> {
    let operation: UInt8 = slot.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
    switch operation {
    case BlkifOperation.read, BlkifOperation.write, BlkifOperation.writeBarrier, BlkifOperation.flushDiskCache:
        return validateSegmented(BlkifRequest(decoding: slot), limits: limits)
    case BlkifOperation.discard:
        return validateDiscard(BlkifDiscardRequest(decoding: slot), limits: limits)
    default:
        return .failure(.unsupportedOperation)
    }
}

@inline(__always)
func validateSegmented(_ r: BlkifRequest, limits: DiskLimits) -> Result<ValidatedRequest, RequestRejection> {
    let kind: ValidatedRequest.Kind
    switch r.operation {
    case BlkifOperation.read: kind = .read
    case BlkifOperation.write: kind = .write
    case BlkifOperation.writeBarrier: kind = .barrier
    default: kind = .flush
    }
    if kind != .read && kind != .flush && limits.readOnly { return .failure(.readOnlyDisk) }
    if kind == .barrier && !limits.barrier { return .failure(.unsupportedOperation) }
    if kind == .flush && !limits.flush { return .failure(.unsupportedOperation) }
    let count = Int(r.nrSegments)
    // READ/WRITE carry data; a barrier or flush may carry none.
    let minimum = (kind == .read || kind == .write) ? 1 : 0
    guard count >= minimum, count <= Blkif.maxSegmentsPerRequest else {
        return .failure(.badSegmentCount(count))
    }
    if kind == .flush && count != 0 { return .failure(.badSegmentCount(count)) }
    var sectors: UInt64 = 0
    for i in 0..<count {
        let s = r.segments[i]
        guard s.firstSect <= s.lastSect, s.lastSect < UInt8(Blkif.sectorsPerPage) else {
            return .failure(.badSegment(index: i))
        }
        sectors += UInt64(s.lastSect - s.firstSect) + 1
    }
    if count > 0 {
        // Overflow-safe: sector + sectors <= disk size.
        guard r.sectorNumber <= limits.sectors, sectors <= limits.sectors - r.sectorNumber else {
            return .failure(.beyondEndOfDisk)
        }
    }
    // Without segments (a flush, an empty barrier) sector_number means
    // nothing and was not checked above: Linux blkfront sends its flush
    // request's blk_rq_pos, which blk_rq_init sets to (sector_t)-1, and
    // sector * 512 on the data path then overflowed and trapped (seen on
    // Xen 4.17 with a Debian 6.1 domU: the first fsync killed the daemon).
    // Such a request carries sector 0 from here on.
    return .success(ValidatedRequest(id: r.id, operation: r.operation, kind: kind,
                                     sector: count > 0 ? r.sectorNumber : 0,
                                     segmentCount: count, segments: r.segments,
                                     byteCount: Int(sectors) * Blkif.sectorSize))
}

@inline(__always)
func validateDiscard(_ r: BlkifDiscardRequest, limits: DiskLimits) -> Result<ValidatedRequest, RequestRejection> {
    if limits.readOnly { return .failure(.readOnlyDisk) }
    guard limits.discard else { return .failure(.unsupportedOperation) }
    if r.flag & Blkif.discardSecure != 0 && !limits.secureDiscard { return .failure(.unsupportedSecureDiscard) }
    guard r.sectorNumber <= limits.sectors, r.nrSectors <= limits.sectors - r.sectorNumber else {
        return .failure(.beyondEndOfDisk)
    }
    return .success(ValidatedRequest(id: r.id, operation: r.operation, kind: .discard(sectors: r.nrSectors),
                                     sector: r.sectorNumber, segmentCount: 0,
                                     segments: .init(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0)),
                                     byteCount: 0))
}
