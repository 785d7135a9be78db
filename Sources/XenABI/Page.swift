/// Xen's page size on x86: grants, ring pages and blkif segments are in these units.
public enum XenPage {
    public static let size = 4096
    public static let shift = 12
}

/// Decoding helpers for little-endian wire structs held in private memory.
/// Every wire struct is copied out of shared memory before it is decoded,
/// so these plain loads never touch a page the other side can change.
extension UnsafeRawPointer {
    @inlinable @inline(__always)
    func wire<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension UnsafeMutableRawPointer {
    @inlinable @inline(__always)
    func setWire<T: FixedWidthInteger>(_ offset: Int, _ value: T) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
}
