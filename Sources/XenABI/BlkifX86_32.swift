// The x86_32 layout of xen/io/blkif.h, which a 32-bit PV guest's blkfront
// writes (`protocol` = "x86_32-abi"). i386 aligns a uint64_t to 4 bytes, so
// each request's `id` sits at 4 instead of 8 and everything after it moves
// 4 bytes down; a ring slot is 108 bytes instead of 112. Segments and
// indirect pages are the same in both. A response's first 12 bytes are the
// same too: 16-byte x86_64 responses fit in a 108-byte slot unchanged.
// XenABITests checks these offsets against Xen's headers compiled with -m32.

/// The ring ABIs a blkfront may name in its `protocol` key.
public enum BlkifProtocol: Sendable, Equatable {
    case x86_64
    case x86_32

    /// The `protocol` key's value (XEN_IO_PROTO_ABI_X86_64 / _X86_32).
    public var name: String { self == .x86_64 ? "x86_64-abi" : "x86_32-abi" }

    /// Bytes per ring slot (sizeof(union blkif_sring_entry)).
    public var slotSize: Int { self == .x86_64 ? Blkif.slotSize : BlkifX86_32.slotSize }

    /// The protocol a `protocol` key names; nil for one not served. A
    /// missing key means the backend's own ABI (x86_64), as blkback reads it.
    public init?(name: String?) {
        switch name {
        case nil, "x86_64-abi": self = .x86_64
        case "x86_32-abi": self = .x86_32
        default: return nil
        }
    }
}

public enum BlkifX86_32 {
    public static let slotSize = 108
    public static let responseSize = 12

    /// struct blkif_request (read, write, barrier, flush).
    public enum Request {
        public static let operation = 0
        public static let nrSegments = 1
        public static let handle = 2
        public static let id = 4
        public static let sectorNumber = 12
        public static let seg = 20
    }

    /// struct blkif_request_discard.
    public enum Discard {
        public static let id = 4
        public static let sectorNumber = 12
        public static let nrSectors = 20
    }

    /// struct blkif_request_indirect.
    public enum Indirect {
        public static let nrSegments = 2
        public static let id = 4
        public static let sectorNumber = 12
        public static let handle = 20
        public static let indirectGrefs = 24
    }

    /// Where each field past the common first four bytes (operation and the
    /// bytes beside it, at the same place in both layouts) sits in each
    /// layout, per request form: (x86_64 offset, x86_32 offset, bytes).
    private typealias Move = (wide: Int, narrow: Int, bytes: Int)
    private static let requestMoves: [Move] = [
        (BlkifRequest.Offset.id, Request.id, 8), (BlkifRequest.Offset.sectorNumber, Request.sectorNumber, 8),
        (BlkifRequest.Offset.seg, Request.seg, Blkif.maxSegmentsPerRequest * BlkifSegment.size),
    ]
    private static let discardMoves: [Move] = [
        (BlkifDiscardRequest.Offset.id, Discard.id, 8), (BlkifDiscardRequest.Offset.sectorNumber, Discard.sectorNumber, 8),
        (BlkifDiscardRequest.Offset.nrSectors, Discard.nrSectors, 8),
    ]
    private static let indirectMoves: [Move] = [
        (BlkifIndirectRequest.Offset.id, Indirect.id, 8),
        (BlkifIndirectRequest.Offset.sectorNumber, Indirect.sectorNumber, 8),
        (BlkifIndirectRequest.Offset.handle, Indirect.handle, 2),
        (BlkifIndirectRequest.Offset.indirectGrefs, Indirect.indirectGrefs, Blkif.maxIndirectPagesPerRequest * 4),
    ]

    /// An unknown operation keeps the plain request's layout, so that its
    /// id is found for its answer.
    @inline(__always)
    private static func moves(_ operation: UInt8) -> [Move] {
        switch operation {
        case BlkifOperation.indirect: indirectMoves
        case BlkifOperation.discard: discardMoves
        default: requestMoves
        }
    }

    /// Rewrites the x86_32 request in `narrow` (one 108-byte slot, a private
    /// copy) in the x86_64 layout at `wide` (112 bytes), so that everything
    /// after the ring reads one layout. Padding comes out zero.
    public static func widen(_ narrow: UnsafeRawPointer, into wide: UnsafeMutableRawPointer) {
        wide.initializeMemory(as: UInt8.self, repeating: 0, count: Blkif.slotSize)
        wide.copyMemory(from: narrow, byteCount: 4)
        for m in moves(narrow.load(as: UInt8.self)) {
            (wide + m.wide).copyMemory(from: narrow + m.narrow, byteCount: m.bytes)
        }
    }

    /// The x86_64 request at `wide` in the x86_32 layout at `narrow`
    /// (108 bytes): what a 32-bit frontend writes. The inverse of `widen`.
    public static func narrow(_ wide: UnsafeRawPointer, into narrow: UnsafeMutableRawPointer) {
        narrow.initializeMemory(as: UInt8.self, repeating: 0, count: slotSize)
        narrow.copyMemory(from: wide, byteCount: 4)
        for m in moves(wide.load(as: UInt8.self)) {
            (narrow + m.narrow).copyMemory(from: wide + m.wide, byteCount: m.bytes)
        }
    }
}
