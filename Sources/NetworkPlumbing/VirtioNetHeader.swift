/// The 12-byte `struct virtio_net_hdr_v1` (<linux/virtio_net.h>) that a TAP
/// with IFF_VNET_HDR puts before every frame (TUNSETVNETHDRSZ 12). Little
/// endian (TapDevice sets TUNSETVNETLE, as virtio 1.0 specifies).
///
/// `virtio_net_hdr_mrg_rxbuf` has the same 12 bytes; the kernel's TAP reads
/// and writes only the first 10 (`struct virtio_net_hdr`): `numBuffers` is
/// ignored on write and comes back zero on read.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | flags (NEEDS_CSUM, DATA_VALID) |
/// | 1 | 1 | gso_type (NONE, TCPV4, UDP, TCPV6, \| ECN) |
/// | 2 | 2 | hdr_len (Ethernet + IP + TCP/UDP headers) |
/// | 4 | 2 | gso_size (payload bytes per segment) |
/// | 6 | 2 | csum_start (from the start of the frame) |
/// | 8 | 2 | csum_offset (from csum_start) |
/// | 10 | 2 | num_buffers |
public struct VirtioNetHeader: Equatable, Hashable, Sendable {
    public static let size = 12

    public enum Offset {
        public static let flags = 0
        public static let gsoType = 1
        public static let headerLength = 2
        public static let gsoSize = 4
        public static let checksumStart = 6
        public static let checksumOffset = 8
        public static let numBuffers = 10
    }

    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum from `checksumStart` to the
    /// end, stored at `checksumStart + checksumOffset`, still to be done.
    public static let flagNeedsChecksum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID: the checksum was verified.
    public static let flagDataValid: UInt8 = 2

    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    /// UFO: the kernel no longer produces it; listed so it can be refused.
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    /// Or-ed into gsoType: the TCP stream uses ECN (CWR may be set).
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8
    public var gsoType: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16
    public var numBuffers: UInt16

    public init(flags: UInt8 = 0, gsoType: UInt8 = VirtioNetHeader.gsoNone, headerLength: UInt16 = 0,
                gsoSize: UInt16 = 0, checksumStart: UInt16 = 0, checksumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
        self.numBuffers = numBuffers
    }

    /// Decodes the 12 bytes at `raw` (any alignment).
    @inline(__always)
    public init(from raw: UnsafeRawPointer) {
        flags = raw.load(fromByteOffset: Offset.flags, as: UInt8.self)
        gsoType = raw.load(fromByteOffset: Offset.gsoType, as: UInt8.self)
        headerLength = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: Offset.headerLength, as: UInt16.self))
        gsoSize = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: Offset.gsoSize, as: UInt16.self))
        checksumStart = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: Offset.checksumStart, as: UInt16.self))
        checksumOffset = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: Offset.checksumOffset, as: UInt16.self))
        numBuffers = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: Offset.numBuffers, as: UInt16.self))
    }

    /// Decodes the first 12 bytes of `bytes`; nil if there are fewer.
    public init?(bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= VirtioNetHeader.size, let base = bytes.baseAddress else { return nil }
        self.init(from: base)
    }

    /// Writes the 12 bytes at `raw` (any alignment).
    @inline(__always)
    public func encode(to raw: UnsafeMutableRawPointer) {
        raw.storeBytes(of: flags, toByteOffset: Offset.flags, as: UInt8.self)
        raw.storeBytes(of: gsoType, toByteOffset: Offset.gsoType, as: UInt8.self)
        raw.storeBytes(of: headerLength.littleEndian, toByteOffset: Offset.headerLength, as: UInt16.self)
        raw.storeBytes(of: gsoSize.littleEndian, toByteOffset: Offset.gsoSize, as: UInt16.self)
        raw.storeBytes(of: checksumStart.littleEndian, toByteOffset: Offset.checksumStart, as: UInt16.self)
        raw.storeBytes(of: checksumOffset.littleEndian, toByteOffset: Offset.checksumOffset, as: UInt16.self)
        raw.storeBytes(of: numBuffers.littleEndian, toByteOffset: Offset.numBuffers, as: UInt16.self)
    }

    /// The 12 bytes as an array (tests, logging; not for the data path).
    public var bytes: [UInt8] {
        [UInt8](unsafeUninitializedCapacity: VirtioNetHeader.size) { buffer, count in
            encode(to: UnsafeMutableRawPointer(buffer.baseAddress!))
            count = VirtioNetHeader.size
        }
    }
}
