/// Finishes a partial checksum in software: what the backend does for a
/// frame whose checksum the kernel left partial (virtio NEEDS_CSUM) when
/// the frontend cannot take NETRXF_csum_blank for it (`feature-no-csum-offload`,
/// or IPv6 without `feature-ipv6-csum-offload`). The field at
/// `start + offset` already holds the pseudo-header sum, as NEEDS_CSUM
/// promises; the Internet checksum of everything from `start` on goes there.
enum PartialChecksum {
    /// False when the offsets do not fit the frame (the frame is dropped).
    static func complete(_ frame: UnsafeMutableRawPointer, length: Int, start: Int, offset: Int, isUDP: Bool) -> Bool {
        guard start >= 0, offset >= 0, start + offset + 2 <= length else { return false }
        var sum: UInt64 = 0
        var i = start
        // 8 bytes at a time in native (little-endian) order, folded at the end.
        while i + 8 <= length {
            let w = frame.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            let (s, carry) = sum.addingReportingOverflow(w)
            sum = s &+ (carry ? 1 : 0)
            i += 8
        }
        var tail: UInt64 = 0
        var shift: UInt64 = 0
        while i < length {
            tail |= UInt64(frame.load(fromByteOffset: i, as: UInt8.self)) << shift
            shift += 8
            i += 1
        }
        let (s, carry) = sum.addingReportingOverflow(tail)
        sum = s &+ (carry ? 1 : 0)
        // Fold 64 -> 16 bits.
        var folded = (sum & 0xffff_ffff) + (sum >> 32)
        folded = (folded & 0xffff) + (folded >> 16)
        folded = (folded & 0xffff) + (folded >> 16)
        folded = (folded & 0xffff) + (folded >> 16)
        // Stored in the same (little-endian) order it was summed in, the
        // complement lands as the right network-order bytes.
        var result = ~UInt16(truncatingIfNeeded: folded)
        if isUDP && result == 0 { result = 0xffff }   // 0 means "no checksum" for UDP
        frame.storeBytes(of: result, toByteOffset: start + offset, as: UInt16.self)
        return true
    }
}
