import XenABI

/// A blkif request that passed validation: everything the data path needs,
/// in private memory, checked against the disk and the protocol's limits.
public struct ValidatedRequest {
    public enum Kind: Equatable, Sendable {
        case read, write
        /// WRITE_BARRIER: drain, write (if any segments), then flush.
        case barrier
        case flush
        /// `secure`: BLKIF_DISCARD_SECURE on a disk offering discard-secure.
        case discard(sectors: UInt64, secure: Bool)
    }
    public var id: UInt64
    public var operation: UInt8
    public var kind: Kind
    public var sector: UInt64
    /// A direct request's segments were decoded, checked, into the
    /// caller's buffer (`validateBlkifRequest`); an indirect one's are in
    /// its pages.
    public var segmentCount: Int
    /// Total bytes moved by the segments (0 for an indirect request until
    /// its pages have been read and `validateIndirectSegments` has counted).
    public var byteCount: Int
    /// BLKIF_OP_INDIRECT: the pages holding the segment descriptors
    /// (`indirectPageCount` of them; 0 for a direct request).
    public var indirectPageCount = 0
    public var indirectPages = InlineArray<8, UInt32>(repeating: 0)
}

/// Why a request is refused, and the status it is answered with.
public enum RequestRejection: Error, Equatable, Sendable {
    case badSegmentCount(Int)
    case badSegment(index: Int)
    case beyondEndOfDisk
    case readOnlyDisk
    case unsupportedOperation
    /// An indirect request whose indirect_op is not READ or WRITE.
    case badIndirectOperation(UInt8)

    public var status: Int16 {
        switch self {
        case .unsupportedOperation: BlkifStatus.notSupported
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
    /// discard-secure: what a BLKIF_DISCARD_SECURE discard gets. Without it
    /// the flag is ignored (blkif.h: "ignored if discard-secure=0") and the
    /// discard is a plain one, as Linux blkback does.
    public var secureDiscard: Bool
    /// feature-max-indirect-segments: the most segments of a
    /// BLKIF_OP_INDIRECT request (0: not offered, the operation is unknown).
    public var maxIndirectSegments: Int
    public init(sectors: UInt64, readOnly: Bool, flush: Bool, barrier: Bool, discard: Bool, secureDiscard: Bool = false,
                maxIndirectSegments: Int = 0) {
        self.sectors = sectors; self.readOnly = readOnly; self.flush = flush
        self.barrier = barrier; self.discard = discard; self.secureDiscard = secureDiscard
        self.maxIndirectSegments = maxIndirectSegments
    }
}

/// Validates a private copy of a ring slot. Pure: the same bytes always
/// give the same answer, and nothing is read twice from shared memory. A
/// direct request's segments are decoded into `segments` (room for
/// `Blkif.maxSegmentsPerRequest`) as they are checked: what was checked is
/// what the caller uses.
@inline(__always)
public func validateBlkifRequest(_ slot: UnsafeRawPointer, limits: DiskLimits,
                                 segments: UnsafeMutablePointer<BlkifSegment>) -> Result<ValidatedRequest, RequestRejection> {
    let operation: UInt8 = slot.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
    switch operation {
    case BlkifOperation.read, BlkifOperation.write, BlkifOperation.writeBarrier, BlkifOperation.flushDiskCache:
        return validateSegmented(slot, operation: operation, limits: limits, segments: segments)
    case BlkifOperation.discard:
        return validateDiscard(BlkifDiscardRequest(decoding: slot), limits: limits)
    case BlkifOperation.indirect where limits.maxIndirectSegments > 0:
        return validateIndirect(BlkifIndirectRequest(decoding: slot), limits: limits)
    default:
        return .failure(.unsupportedOperation)
    }
}

/// The operation a response to this slot carries: the request's own, but
/// an indirect request's indirect_op (Linux blkback answers so, and Linux
/// blkfront checks that a response's operation is the one it sent inside).
@inline(__always)
public func responseOperation(_ slot: UnsafeRawPointer, limits: DiskLimits) -> UInt8 {
    let operation: UInt8 = slot.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
    guard operation == BlkifOperation.indirect && limits.maxIndirectSegments > 0 else { return operation }
    return slot.load(fromByteOffset: BlkifIndirectRequest.Offset.indirectOp, as: UInt8.self)
}

/// The header of a BLKIF_OP_INDIRECT request: what can be checked before
/// its pages are read. Sectors are counted, and checked against the disk,
/// by `validateIndirectSegments` on the private copy of the pages.
@inline(__always)
func validateIndirect(_ r: BlkifIndirectRequest, limits: DiskLimits) -> Result<ValidatedRequest, RequestRejection> {
    let kind: ValidatedRequest.Kind
    switch r.indirectOp {
    case BlkifOperation.read: kind = .read
    case BlkifOperation.write: kind = .write
    default: return .failure(.badIndirectOperation(r.indirectOp))
    }
    if kind == .write && limits.readOnly { return .failure(.readOnlyDisk) }
    let count = Int(r.nrSegments)
    // Checked before the page count is derived from it: at most 8 pages are named.
    guard count >= 1, count <= limits.maxIndirectSegments else { return .failure(.badSegmentCount(count)) }
    guard r.sectorNumber < limits.sectors else { return .failure(.beyondEndOfDisk) }
    var v = ValidatedRequest(id: r.id, operation: r.indirectOp, kind: kind, sector: r.sectorNumber,
                             segmentCount: count, byteCount: 0)
    v.indirectPageCount = Blkif.indirectPages(segments: count)
    v.indirectPages = r.indirectGrefs
    return .success(v)
}

/// The segments of an indirect request, from a private copy of its pages
/// (`descriptors`: `count` wire-format blkif_request_segment, read from
/// the guest once): each checked as a direct request's, decoded into
/// `segments`, and the whole range checked against the disk. Returns the
/// request's byte count. Pure, like `validateBlkifRequest`.
@inline(__always)
public func validateIndirectSegments(_ descriptors: UnsafeRawPointer, count: Int, sector: UInt64, limits: DiskLimits,
                                     into segments: UnsafeMutablePointer<BlkifSegment>) -> Result<Int, RequestRejection> {
    var sectors: UInt64 = 0
    for i in 0..<count {
        let s = BlkifSegment(decoding: descriptors + i * BlkifSegment.size)
        guard s.firstSect <= s.lastSect, s.lastSect < UInt8(Blkif.sectorsPerPage) else {
            return .failure(.badSegment(index: i))
        }
        sectors += UInt64(s.lastSect - s.firstSect) + 1
        segments[i] = s
    }
    guard sector <= limits.sectors, sectors <= limits.sectors - sector else { return .failure(.beyondEndOfDisk) }
    return .success(Int(sectors) * Blkif.sectorSize)
}

/// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, read field by field from
/// the slot: only the segments the request names are decoded.
@inline(__always)
func validateSegmented(_ slot: UnsafeRawPointer, operation: UInt8, limits: DiskLimits,
                       segments: UnsafeMutablePointer<BlkifSegment>) -> Result<ValidatedRequest, RequestRejection> {
    let kind: ValidatedRequest.Kind
    switch operation {
    case BlkifOperation.read: kind = .read
    case BlkifOperation.write: kind = .write
    case BlkifOperation.writeBarrier: kind = .barrier
    default: kind = .flush
    }
    if kind != .read && kind != .flush && limits.readOnly { return .failure(.readOnlyDisk) }
    if kind == .barrier && !limits.barrier { return .failure(.unsupportedOperation) }
    if kind == .flush && !limits.flush { return .failure(.unsupportedOperation) }
    let count = Int(slot.load(fromByteOffset: BlkifRequest.Offset.nrSegments, as: UInt8.self))
    // READ/WRITE carry data; a barrier or flush may carry none.
    let minimum = (kind == .read || kind == .write) ? 1 : 0
    guard count >= minimum, count <= Blkif.maxSegmentsPerRequest else {
        return .failure(.badSegmentCount(count))
    }
    if kind == .flush && count != 0 { return .failure(.badSegmentCount(count)) }
    var sectors: UInt64 = 0
    for i in 0..<count {
        let s = BlkifSegment(decoding: slot + BlkifRequest.Offset.seg + i * BlkifSegment.size)
        guard s.firstSect <= s.lastSect, s.lastSect < UInt8(Blkif.sectorsPerPage) else {
            return .failure(.badSegment(index: i))
        }
        sectors += UInt64(s.lastSect - s.firstSect) + 1
        segments[i] = s
    }
    let sector = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self))
    if count > 0 {
        // Overflow-safe: sector + sectors <= disk size.
        guard sector <= limits.sectors, sectors <= limits.sectors - sector else {
            return .failure(.beyondEndOfDisk)
        }
    }
    // Without segments (a flush, an empty barrier) sector_number means
    // nothing and was not checked above: Linux blkfront sends its flush
    // request's blk_rq_pos, which blk_rq_init sets to (sector_t)-1, and
    // sector * 512 on the data path then overflowed and trapped (seen on
    // Xen 4.17 with a Debian 6.1 domU: the first fsync killed the daemon).
    // Such a request carries sector 0 from here on.
    let id = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self))
    return .success(ValidatedRequest(id: id, operation: operation, kind: kind, sector: count > 0 ? sector : 0,
                                     segmentCount: count, byteCount: Int(sectors) * Blkif.sectorSize))
}

@inline(__always)
func validateDiscard(_ r: BlkifDiscardRequest, limits: DiskLimits) -> Result<ValidatedRequest, RequestRejection> {
    if limits.readOnly { return .failure(.readOnlyDisk) }
    guard limits.discard else { return .failure(.unsupportedOperation) }
    guard r.sectorNumber <= limits.sectors, r.nrSectors <= limits.sectors - r.sectorNumber else {
        return .failure(.beyondEndOfDisk)
    }
    let secure = limits.secureDiscard && r.flag & Blkif.discardSecure != 0
    return .success(ValidatedRequest(id: r.id, operation: r.operation, kind: .discard(sectors: r.nrSectors, secure: secure),
                                     sector: r.sectorNumber, segmentCount: 0, byteCount: 0))
}
