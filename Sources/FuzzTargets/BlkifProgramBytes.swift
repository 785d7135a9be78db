/// The fuzzer's bytes, read front to back. Past the end every read gives
/// zeros: the action being decoded still runs, then the program ends.
struct BlkifProgramBytes {
    private let bytes: UnsafeRawBufferPointer
    private(set) var offset = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var isExhausted: Bool { offset >= bytes.count }

    @inline(__always)
    mutating func u8() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        offset += 1
        return bytes[offset - 1]
    }

    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }

    /// A number in 0..<n (n ≥ 1), from one byte when n fits in one.
    mutating func below(_ n: Int) -> Int {
        n <= 256 ? Int(u8()) % n : Int(u16()) % n
    }

    /// `count` bytes into `destination` (zeros past the end).
    mutating func copy(into destination: UnsafeMutableRawPointer, count: Int) {
        let n = max(0, min(count, bytes.count - offset))
        if n > 0 { destination.copyMemory(from: bytes.baseAddress! + offset, byteCount: n) }
        if n < count { (destination + n).initializeMemory(as: UInt8.self, repeating: 0, count: count - n) }
        offset += n
    }
}
