/// The Toeplitz hash of netif.h (XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ,
/// the RSS hash of Microsoft's NDIS): for every set bit of the input, XOR in
/// the 32 bits of the key that start at that bit's position. The 32-bit
/// window at each position is precomputed when the key is set, so a hash is
/// one load and XOR per set input bit.
public struct ToeplitzKey: Sendable {
    /// Linux netback's XEN_NETBK_MAX_HASH_KEY_SIZE: enough for the longest
    /// input (IPv6 + TCP, 36 bytes) and its 32-bit window.
    public static let maxLength = 40
    /// The longest input hashed (netif.h's IPv6 + TCP buffer).
    public static let maxInput = 36

    /// windows[i]: key bits i ..< i+32, for every bit i of the longest input.
    private var windows = InlineArray<288, UInt32>(repeating: 0)

    /// A key of up to `maxLength` bytes; bytes not given are zero (netif.h).
    public init(_ key: UnsafeRawBufferPointer) {
        precondition(key.count <= Self.maxLength)
        func bit(_ i: Int) -> UInt32 {
            let byte = i / 8
            guard byte < key.count else { return 0 }
            return UInt32(key[byte] >> (7 - UInt8(i % 8)) & 1)
        }
        var w: UInt32 = 0
        for i in 0..<32 { w = w << 1 | bit(i) }
        for i in 0..<windows.count {
            windows[i] = w
            w = w << 1 | bit(i + 32)
        }
    }

    public init(_ key: [UInt8]) {
        self = key.withUnsafeBytes { ToeplitzKey($0) }
    }

    /// The all-zero key (every hash 0), netif.h's default.
    public init() {}

    /// The hash of `count` (≤ maxInput) bytes at `data`.
    @inline(__always)
    public func hash(_ data: UnsafeRawPointer, count: Int) -> UInt32 {
        var h: UInt32 = 0
        for b in 0..<min(count, Self.maxInput) {
            let byte = data.load(fromByteOffset: b, as: UInt8.self)
            if byte == 0 { continue }
            for bit in 0..<8 where byte & (0x80 >> UInt8(bit)) != 0 {
                h ^= windows[b * 8 + bit]
            }
        }
        return h
    }

    public func hash(_ data: [UInt8]) -> UInt32 {
        data.withUnsafeBytes { hash($0.baseAddress!, count: $0.count) }
    }
}

/// What netif.h hashes in a frame for the guest: the addresses, and the
/// ports for TCP when the guest asked for TCP hashes, in the order of its
/// "Hash types" section. As Linux netback, only untagged IPv4 and IPv6
/// frames are hashed; a fragment or an IPv6 extension header gives the
/// address-only hash.
public enum NetifHashInput {
    /// Writes the input into `out` (36 bytes of room); its length and the
    /// hash type's bit number (NetifHashType.*Bit), or nil when the frame
    /// gets no hash under `flags`.
    @inline(__always)
    public static func extract(frame: UnsafeRawPointer, length n: Int, flags: UInt32,
                               into out: UnsafeMutableRawPointer) -> (count: Int, typeBit: UInt8)? {
        guard n >= 14 else { return nil }
        let etherType = UInt16(frame.load(fromByteOffset: 12, as: UInt8.self)) << 8
            | UInt16(frame.load(fromByteOffset: 13, as: UInt8.self))
        let l3 = 14
        switch etherType {
        case 0x0800:
            guard flags & (NetifHashType.ipv4 | NetifHashType.ipv4TCP) != 0, n >= l3 + 20 else { return nil }
            let v = frame.load(fromByteOffset: l3, as: UInt8.self)
            let ihl = Int(v & 0x0f) * 4
            guard v >> 4 == 4, ihl >= 20, n >= l3 + ihl else { return nil }
            (out).copyMemory(from: frame + l3 + 12, byteCount: 8)
            let fragment = (UInt16(frame.load(fromByteOffset: l3 + 6, as: UInt8.self)) << 8
                | UInt16(frame.load(fromByteOffset: l3 + 7, as: UInt8.self))) & 0x3fff != 0
            let tcp = frame.load(fromByteOffset: l3 + 9, as: UInt8.self) == 6 && !fragment && n >= l3 + ihl + 4
            if tcp && flags & NetifHashType.ipv4TCP != 0 {
                (out + 8).copyMemory(from: frame + l3 + ihl, byteCount: 4)
                return (12, NetifHashType.ipv4TCPBit)
            }
            return flags & NetifHashType.ipv4 != 0 ? (8, NetifHashType.ipv4Bit) : nil
        case 0x86DD:
            guard flags & (NetifHashType.ipv6 | NetifHashType.ipv6TCP) != 0, n >= l3 + 40,
                  frame.load(fromByteOffset: l3, as: UInt8.self) >> 4 == 6 else { return nil }
            out.copyMemory(from: frame + l3 + 8, byteCount: 32)
            let tcp = frame.load(fromByteOffset: l3 + 6, as: UInt8.self) == 6 && n >= l3 + 44
            if tcp && flags & NetifHashType.ipv6TCP != 0 {
                (out + 32).copyMemory(from: frame + l3 + 40, byteCount: 4)
                return (36, NetifHashType.ipv6TCPBit)
            }
            return flags & NetifHashType.ipv6 != 0 ? (32, NetifHashType.ipv6Bit) : nil
        default:
            return nil
        }
    }
}
