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

    /// Rewrites the x86_32 request in `narrow` (one 108-byte slot, a private
    /// copy) in the x86_64 layout at `wide` (112 bytes), so that everything
    /// after the ring reads one layout. Any operation byte is carried over;
    /// an unknown one keeps the common header (operation, id) for its answer.
    public static func widen(_ narrow: UnsafeRawPointer, into wide: UnsafeMutableRawPointer) {
        wide.initializeMemory(as: UInt8.self, repeating: 0, count: Blkif.slotSize)
        let operation: UInt8 = narrow.wire(0)
        wide.setWire(0, operation)
        switch operation {
        case BlkifOperation.indirect:
            typealias O = BlkifIndirectRequest.Offset
            wide.setWire(O.indirectOp, narrow.wire(1, as: UInt8.self))
            wide.setWire(O.nrSegments, narrow.wire(Indirect.nrSegments, as: UInt16.self))
            wide.setWire(O.id, narrow.wire(Indirect.id, as: UInt64.self))
            wide.setWire(O.sectorNumber, narrow.wire(Indirect.sectorNumber, as: UInt64.self))
            wide.setWire(O.handle, narrow.wire(Indirect.handle, as: UInt16.self))
            (wide + O.indirectGrefs).copyMemory(from: narrow + Indirect.indirectGrefs,
                                                byteCount: Blkif.maxIndirectPagesPerRequest * 4)
        case BlkifOperation.discard:
            typealias O = BlkifDiscardRequest.Offset
            wide.setWire(O.flag, narrow.wire(1, as: UInt8.self))
            wide.setWire(O.handle, narrow.wire(2, as: UInt16.self))
            wide.setWire(O.id, narrow.wire(Discard.id, as: UInt64.self))
            wide.setWire(O.sectorNumber, narrow.wire(Discard.sectorNumber, as: UInt64.self))
            wide.setWire(O.nrSectors, narrow.wire(Discard.nrSectors, as: UInt64.self))
        default:
            typealias O = BlkifRequest.Offset
            wide.setWire(O.nrSegments, narrow.wire(Request.nrSegments, as: UInt8.self))
            wide.setWire(O.handle, narrow.wire(Request.handle, as: UInt16.self))
            wide.setWire(O.id, narrow.wire(Request.id, as: UInt64.self))
            wide.setWire(O.sectorNumber, narrow.wire(Request.sectorNumber, as: UInt64.self))
            (wide + O.seg).copyMemory(from: narrow + Request.seg,
                                      byteCount: Blkif.maxSegmentsPerRequest * BlkifSegment.size)
        }
    }

    /// The x86_64 request at `wide` in the x86_32 layout at `narrow`
    /// (108 bytes): what a 32-bit frontend writes. The inverse of `widen`.
    public static func narrow(_ wide: UnsafeRawPointer, into narrow: UnsafeMutableRawPointer) {
        narrow.initializeMemory(as: UInt8.self, repeating: 0, count: slotSize)
        let operation: UInt8 = wide.wire(0)
        narrow.setWire(0, operation)
        switch operation {
        case BlkifOperation.indirect:
            typealias O = BlkifIndirectRequest.Offset
            narrow.setWire(1, wide.wire(O.indirectOp, as: UInt8.self))
            narrow.setWire(Indirect.nrSegments, wide.wire(O.nrSegments, as: UInt16.self))
            narrow.setWire(Indirect.id, wide.wire(O.id, as: UInt64.self))
            narrow.setWire(Indirect.sectorNumber, wide.wire(O.sectorNumber, as: UInt64.self))
            narrow.setWire(Indirect.handle, wide.wire(O.handle, as: UInt16.self))
            (narrow + Indirect.indirectGrefs).copyMemory(from: wide + O.indirectGrefs,
                                                         byteCount: Blkif.maxIndirectPagesPerRequest * 4)
        case BlkifOperation.discard:
            typealias O = BlkifDiscardRequest.Offset
            narrow.setWire(1, wide.wire(O.flag, as: UInt8.self))
            narrow.setWire(2, wide.wire(O.handle, as: UInt16.self))
            narrow.setWire(Discard.id, wide.wire(O.id, as: UInt64.self))
            narrow.setWire(Discard.sectorNumber, wide.wire(O.sectorNumber, as: UInt64.self))
            narrow.setWire(Discard.nrSectors, wide.wire(O.nrSectors, as: UInt64.self))
        default:
            typealias O = BlkifRequest.Offset
            narrow.setWire(Request.nrSegments, wide.wire(O.nrSegments, as: UInt8.self))
            narrow.setWire(Request.handle, wide.wire(O.handle, as: UInt16.self))
            narrow.setWire(Request.id, wide.wire(O.id, as: UInt64.self))
            narrow.setWire(Request.sectorNumber, wide.wire(O.sectorNumber, as: UInt64.self))
            (narrow + Request.seg).copyMemory(from: wide + O.seg,
                                              byteCount: Blkif.maxSegmentsPerRequest * BlkifSegment.size)
        }
    }
}
