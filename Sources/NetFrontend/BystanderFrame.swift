/// The frames the net bystander of `xenbackd-lab fuzz` sends: Ethernet with
/// ethertype 0x88B5 (IEEE 802 local experimental), then magic "XBNB", the
/// stream (sender), a sequence number, the frame's length, bytes derived
/// from all three, and an FNV-1a 64 of everything before it. Whoever gets
/// one can tell it from other traffic and check every byte of it.
public enum BystanderFrame {
    public static let etherType: UInt16 = 0x88B5
    public static let magic: UInt32 = 0x5842_4E42
    /// Ethernet header, magic, stream, sequence, length.
    static let headerSize = 14 + 4 + 4 + 8 + 2
    public static let minLength = 60
    public static let maxLength = 1514

    public enum Verdict: Equatable, Sendable {
        /// Not a bystander frame (another guest's, the kernel's).
        case notOurs
        case intact(stream: UInt32, sequence: UInt64)
        case corrupted(String)
    }

    /// Writes frame (`stream`, `sequence`) of `length` bytes (60...1514) at `p`.
    public static func write(into p: UnsafeMutableRawPointer, destination: [UInt8], source: [UInt8],
                             stream: UInt32, sequence: UInt64, length: Int) {
        precondition(length >= minLength && length <= maxLength && destination.count == 6 && source.count == 6)
        let b = p.assumingMemoryBound(to: UInt8.self)
        for i in 0..<6 { b[i] = destination[i]; b[6 + i] = source[i] }
        putBE(b + 12, UInt64(etherType), 2)
        putBE(b + 14, UInt64(magic), 4)
        putBE(b + 18, UInt64(stream), 4)
        putBE(b + 22, sequence, 8)
        putBE(b + 30, UInt64(length), 2)
        var x = filler(stream, sequence)
        for i in headerSize..<(length - 8) { b[i] = next(&x) }
        putBE(b + length - 8, fnv(b, length - 8), 8)
    }

    /// Whether `bytes` is a bystander frame, and if so whether every byte is right.
    public static func check(_ bytes: UnsafeRawBufferPointer) -> Verdict {
        let n = bytes.count
        guard n >= headerSize + 8, getBE(bytes, 12, 2) == UInt64(etherType), getBE(bytes, 14, 4) == UInt64(magic) else {
            return .notOurs
        }
        let stream = UInt32(getBE(bytes, 18, 4)), sequence = getBE(bytes, 22, 8), length = Int(getBE(bytes, 30, 2))
        guard length == n else { return .corrupted("stream \(stream) frame \(sequence): \(n) bytes, its header says \(length)") }
        let sum = bytes.baseAddress!.withMemoryRebound(to: UInt8.self, capacity: n) { fnv($0, n - 8) }
        guard sum == getBE(bytes, n - 8, 8) else { return .corrupted("stream \(stream) frame \(sequence): checksum differs") }
        var x = filler(stream, sequence)
        for i in headerSize..<(n - 8) where bytes[i] != next(&x) {
            return .corrupted("stream \(stream) frame \(sequence): byte \(i) differs")
        }
        return .intact(stream: stream, sequence: sequence)
    }

    public static func check(_ bytes: [UInt8]) -> Verdict { bytes.withUnsafeBytes { check($0) } }

    private static func filler(_ stream: UInt32, _ sequence: UInt64) -> UInt64 {
        (sequence &* 0x9E37_79B9_7F4A_7C15) ^ UInt64(stream) << 32 | 1
    }

    private static func next(_ x: inout UInt64) -> UInt8 {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        return UInt8(truncatingIfNeeded: x >> 24)
    }

    private static func fnv(_ b: UnsafePointer<UInt8>, _ n: Int) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<n { h = (h ^ UInt64(b[i])) &* 0x100_0000_01b3 }
        return h
    }

    private static func fnv(_ b: UnsafeMutablePointer<UInt8>, _ n: Int) -> UInt64 { fnv(UnsafePointer(b), n) }

    private static func putBE(_ p: UnsafeMutablePointer<UInt8>, _ v: UInt64, _ n: Int) {
        for i in 0..<n { p[i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) }
    }

    private static func getBE(_ b: UnsafeRawBufferPointer, _ at: Int, _ n: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<n { v = v << 8 | UInt64(b[at + i]) }
        return v
    }
}
