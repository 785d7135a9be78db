// The block protocol of xen/io/blkif.h, x86_64 layout.
// Offsets are explicit and checked against Xen's headers by XenABITests.

/// blkif operations (the `operation` byte of a request).
public enum BlkifOperation {
    public static let read: UInt8 = 0
    public static let write: UInt8 = 1
    public static let writeBarrier: UInt8 = 2
    public static let flushDiskCache: UInt8 = 3
    public static let reserved1: UInt8 = 4
    public static let discard: UInt8 = 5
    public static let indirect: UInt8 = 6
}

/// Response status values.
public enum BlkifStatus {
    public static let okay: Int16 = 0
    public static let error: Int16 = -1
    public static let notSupported: Int16 = -2
}

public enum Blkif {
    public static let maxSegmentsPerRequest = 11
    public static let maxIndirectPagesPerRequest = 8
    /// Segments held by one indirect page: 4096 / sizeof(blkif_request_segment).
    public static let segmentsPerIndirectPage = XenPage.size / BlkifSegment.size
    /// Indirect pages that hold `segments` segment descriptors (Linux's INDIRECT_PAGES).
    @inline(__always)
    public static func indirectPages(segments: Int) -> Int {
        (segments + segmentsPerIndirectPage - 1) / segmentsPerIndirectPage
    }
    public static let sectorSize = 512
    public static let sectorsPerPage = XenPage.size / sectorSize
    /// `flag` bit of a discard request.
    public static let discardSecure: UInt8 = 1
    /// Bits of the `info` key.
    public static let vdiskCDROM: UInt32 = 0x1
    public static let vdiskRemovable: UInt32 = 0x2
    public static let vdiskReadOnly: UInt32 = 0x4
    /// One ring slot: union blkif_sring_entry (the request is the larger member).
    public static let slotSize = BlkifRequest.size
}

/// struct blkif_request_segment.
public struct BlkifSegment: Equatable, Sendable {
    public static let size = 8
    public enum Offset {
        public static let gref = 0
        public static let firstSect = 4
        public static let lastSect = 5
    }
    public var gref: UInt32
    public var firstSect: UInt8
    public var lastSect: UInt8

    @inlinable
    public init(gref: UInt32, firstSect: UInt8, lastSect: UInt8) {
        self.gref = gref; self.firstSect = firstSect; self.lastSect = lastSect
    }

    // Inlinable: the backend decodes every segment of every request.
    @inlinable
    public init(decoding p: UnsafeRawPointer) {
        gref = p.wire(Offset.gref)
        firstSect = p.wire(Offset.firstSect)
        lastSect = p.wire(Offset.lastSect)
    }

    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.gref, gref)
        p.setWire(Offset.firstSect, firstSect)
        p.setWire(Offset.lastSect, lastSect)
        p.setWire(6, UInt16(0))
    }
}

/// struct blkif_request: READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE.
/// The segment array is carried as raw wire bytes; `segment(_:)` decodes one.
public struct BlkifRequest: Sendable {
    public static let size = 112
    public enum Offset {
        public static let operation = 0
        public static let nrSegments = 1
        public static let handle = 2
        public static let id = 8
        public static let sectorNumber = 16
        public static let seg = 24
    }
    public var operation: UInt8
    public var nrSegments: UInt8
    public var handle: UInt16
    public var id: UInt64
    public var sectorNumber: UInt64
    public var segments: InlineArray<11, BlkifSegment>

    public init(operation: UInt8, nrSegments: UInt8 = 0, handle: UInt16 = 0, id: UInt64,
                sectorNumber: UInt64 = 0,
                segments: InlineArray<11, BlkifSegment> = .init(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0))) {
        self.operation = operation; self.nrSegments = nrSegments; self.handle = handle
        self.id = id; self.sectorNumber = sectorNumber; self.segments = segments
    }

    /// Decodes a private copy of a ring slot.
    public init(decoding p: UnsafeRawPointer) {
        operation = p.wire(Offset.operation)
        nrSegments = p.wire(Offset.nrSegments)
        handle = p.wire(Offset.handle)
        id = p.wire(Offset.id)
        sectorNumber = p.wire(Offset.sectorNumber)
        segments = InlineArray { i in BlkifSegment(decoding: p + Offset.seg + i * BlkifSegment.size) }
    }

    public func encode(to p: UnsafeMutableRawPointer) {
        p.initializeMemory(as: UInt8.self, repeating: 0, count: Self.size)
        p.setWire(Offset.operation, operation)
        p.setWire(Offset.nrSegments, nrSegments)
        p.setWire(Offset.handle, handle)
        p.setWire(Offset.id, id)
        p.setWire(Offset.sectorNumber, sectorNumber)
        for i in 0..<Blkif.maxSegmentsPerRequest {
            segments[i].encode(to: p + Offset.seg + i * BlkifSegment.size)
        }
    }
}

/// struct blkif_request_discard: the DISCARD view of a ring slot.
public struct BlkifDiscardRequest: Sendable {
    public static let size = 32
    public enum Offset {
        public static let operation = 0
        public static let flag = 1
        public static let handle = 2
        public static let id = 8
        public static let sectorNumber = 16
        public static let nrSectors = 24
    }
    public var operation: UInt8
    public var flag: UInt8
    public var handle: UInt16
    public var id: UInt64
    public var sectorNumber: UInt64
    public var nrSectors: UInt64

    public init(flag: UInt8 = 0, handle: UInt16 = 0, id: UInt64, sectorNumber: UInt64, nrSectors: UInt64) {
        operation = BlkifOperation.discard
        self.flag = flag; self.handle = handle; self.id = id
        self.sectorNumber = sectorNumber; self.nrSectors = nrSectors
    }

    public init(decoding p: UnsafeRawPointer) {
        operation = p.wire(Offset.operation)
        flag = p.wire(Offset.flag)
        handle = p.wire(Offset.handle)
        id = p.wire(Offset.id)
        sectorNumber = p.wire(Offset.sectorNumber)
        nrSectors = p.wire(Offset.nrSectors)
    }

    public func encode(to p: UnsafeMutableRawPointer) {
        p.initializeMemory(as: UInt8.self, repeating: 0, count: BlkifRequest.size)
        p.setWire(Offset.operation, operation)
        p.setWire(Offset.flag, flag)
        p.setWire(Offset.handle, handle)
        p.setWire(Offset.id, id)
        p.setWire(Offset.sectorNumber, sectorNumber)
        p.setWire(Offset.nrSectors, nrSectors)
    }
}

/// struct blkif_request_indirect: segments live in up to 8 granted pages.
public struct BlkifIndirectRequest: Sendable {
    public static let size = 64
    public enum Offset {
        public static let operation = 0
        public static let indirectOp = 1
        public static let nrSegments = 2
        public static let id = 8
        public static let sectorNumber = 16
        public static let handle = 24
        public static let indirectGrefs = 28
    }
    public var operation: UInt8
    public var indirectOp: UInt8
    public var nrSegments: UInt16
    public var id: UInt64
    public var sectorNumber: UInt64
    public var handle: UInt16
    public var indirectGrefs: InlineArray<8, UInt32>

    public init(indirectOp: UInt8, nrSegments: UInt16, id: UInt64, sectorNumber: UInt64,
                handle: UInt16 = 0, indirectGrefs: InlineArray<8, UInt32>) {
        operation = BlkifOperation.indirect
        self.indirectOp = indirectOp; self.nrSegments = nrSegments; self.id = id
        self.sectorNumber = sectorNumber; self.handle = handle; self.indirectGrefs = indirectGrefs
    }

    public init(decoding p: UnsafeRawPointer) {
        operation = p.wire(Offset.operation)
        indirectOp = p.wire(Offset.indirectOp)
        nrSegments = p.wire(Offset.nrSegments)
        id = p.wire(Offset.id)
        sectorNumber = p.wire(Offset.sectorNumber)
        handle = p.wire(Offset.handle)
        indirectGrefs = InlineArray { i in p.wire(Offset.indirectGrefs + 4 * i) }
    }

    public func encode(to p: UnsafeMutableRawPointer) {
        p.initializeMemory(as: UInt8.self, repeating: 0, count: BlkifRequest.size)
        p.setWire(Offset.operation, operation)
        p.setWire(Offset.indirectOp, indirectOp)
        p.setWire(Offset.nrSegments, nrSegments)
        p.setWire(Offset.id, id)
        p.setWire(Offset.sectorNumber, sectorNumber)
        p.setWire(Offset.handle, handle)
        for i in 0..<Blkif.maxIndirectPagesPerRequest {
            p.setWire(Offset.indirectGrefs + 4 * i, indirectGrefs[i])
        }
    }
}

/// struct blkif_response.
public struct BlkifResponse: Equatable, Sendable {
    public static let size = 16
    public enum Offset {
        public static let id = 0
        public static let operation = 8
        public static let status = 10
    }
    public var id: UInt64
    public var operation: UInt8
    public var status: Int16

    @inlinable
    public init(id: UInt64, operation: UInt8, status: Int16) {
        self.id = id; self.operation = operation; self.status = status
    }

    public init(decoding p: UnsafeRawPointer) {
        id = p.wire(Offset.id)
        operation = p.wire(Offset.operation)
        status = p.wire(Offset.status)
    }

    /// Writes the whole 16-byte response, padding zeroed (inlinable: once
    /// per request on the backend's path).
    @inlinable
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.id, id)
        p.setWire(Offset.operation, operation)
        p.setWire(9, UInt8(0))
        p.setWire(Offset.status, status)
        p.setWire(12, UInt32(0))
    }
}
