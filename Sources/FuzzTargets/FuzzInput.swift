/// Reads a fuzz program's fields from the fuzzer's bytes, front to back.
/// Past the end every number reads as zero and every slice as empty, so a
/// decoder never fails: a short input is simply a short program.
public struct FuzzInput {
    private let bytes: UnsafeRawBufferPointer
    private var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var isExhausted: Bool { offset >= bytes.count }
    public var remainingCount: Int { max(0, bytes.count - offset) }

    public mutating func uint8() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    /// Little-endian; bytes past the end read as zero.
    public mutating func uint16() -> UInt16 { UInt16(truncatingIfNeeded: littleEndian(2)) }
    public mutating func uint32() -> UInt32 { UInt32(truncatingIfNeeded: littleEndian(4)) }
    public mutating func uint64() -> UInt64 { littleEndian(8) }

    public mutating func bool() -> Bool { uint8() & 1 == 1 }

    /// A number in 0..<n (n ≥ 1): one byte for n ≤ 256, two otherwise.
    public mutating func choice(_ n: Int) -> Int {
        precondition(n >= 1, "choice needs at least one option")
        return n <= 256 ? Int(uint8()) % n : Int(uint16()) % n
    }

    /// The next `count` bytes, or fewer when the input ends first.
    public mutating func bytes(_ count: Int) -> [UInt8] {
        let n = min(max(0, count), remainingCount)
        defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }

    private mutating func littleEndian(_ width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<width { value |= UInt64(uint8()) << (8 * i) }
        return value
    }
}
