import Testing
import XenABI
import XenABIReference

/// netif.h's Toeplitz hash (ToeplitzKey) against the header's own reference
/// function and Microsoft's published RSS verification values, and what
/// NetifHashInput takes from a frame.
@Suite("the Toeplitz hash and its input")
struct ToeplitzTests {
    /// The RSS verification key of Microsoft's NDIS documentation.
    static let standardKey: [UInt8] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
        0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
        0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ]

    /// An Ethernet + IPv4 + TCP frame from `source` to `destination`.
    static func ipv4TCPFrame(source: [UInt8], sourcePort: UInt16, destination: [UInt8], destinationPort: UInt16) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: 14 + 20 + 20)
        f[12] = 0x08; f[13] = 0x00
        f[14] = 0x45; f[17] = 40; f[22] = 64; f[23] = 6
        for i in 0..<4 { f[26 + i] = source[i]; f[30 + i] = destination[i] }
        f[34] = UInt8(sourcePort >> 8); f[35] = UInt8(sourcePort & 0xff)
        f[36] = UInt8(destinationPort >> 8); f[37] = UInt8(destinationPort & 0xff)
        f[46] = 5 << 4
        return f
    }

    static func hashOf(_ frame: [UInt8], flags: UInt32) -> (value: UInt32, typeBit: UInt8)? {
        var input = [UInt8](repeating: 0, count: 64)
        let key = ToeplitzKey(standardKey)
        return frame.withUnsafeBytes { f in
            input.withUnsafeMutableBytes { out in
                NetifHashInput.extract(frame: f.baseAddress!, length: f.count, flags: flags, into: out.baseAddress!).map {
                    (key.hash(out.baseAddress!, count: $0.count), $0.typeBit)
                }
            }
        }
    }

    @Test func microsoftsIPv4VerificationValues() throws {
        // 66.9.149.187:2794 -> 161.142.100.80:1766: IPv4 0x323e8fc2, with TCP 0x51ccc178.
        let frame = Self.ipv4TCPFrame(source: [66, 9, 149, 187], sourcePort: 2794,
                                      destination: [161, 142, 100, 80], destinationPort: 1766)
        let tcp = try #require(Self.hashOf(frame, flags: NetifHashType.ipv4 | NetifHashType.ipv4TCP))
        #expect(tcp.value == 0x51cc_c178 && tcp.typeBit == NetifHashType.ipv4TCPBit)
        let ip = try #require(Self.hashOf(frame, flags: NetifHashType.ipv4))
        #expect(ip.value == 0x323e_8fc2 && ip.typeBit == NetifHashType.ipv4Bit)
        // 199.92.111.2:14230 -> 65.69.140.83:4739: 0xd718262a, with TCP 0xc626b0ea.
        let second = Self.ipv4TCPFrame(source: [199, 92, 111, 2], sourcePort: 14230,
                                       destination: [65, 69, 140, 83], destinationPort: 4739)
        #expect(Self.hashOf(second, flags: NetifHashType.ipv4)?.value == 0xd718_262a)
        #expect(Self.hashOf(second, flags: NetifHashType.ipv4TCP)?.value == 0xc626_b0ea)
    }

    @Test func aFragmentGetsTheAddressHashAndOtherFramesNone() throws {
        var frame = Self.ipv4TCPFrame(source: [66, 9, 149, 187], sourcePort: 2794,
                                      destination: [161, 142, 100, 80], destinationPort: 1766)
        frame[20] = 0x20   // more fragments
        #expect(Self.hashOf(frame, flags: NetifHashType.ipv4 | NetifHashType.ipv4TCP)?.value == 0x323e_8fc2)
        #expect(Self.hashOf(frame, flags: NetifHashType.ipv4TCP) == nil)
        #expect(Self.hashOf(frame, flags: NetifHashType.ipv6 | NetifHashType.ipv6TCP) == nil)
        var arp = frame
        arp[12] = 0x08; arp[13] = 0x06
        #expect(Self.hashOf(arp, flags: NetifHashType.all) == nil)
        #expect(Self.hashOf(Array(frame[0..<30]), flags: NetifHashType.all) == nil)
    }

    @Test func ipv6InputIsTheAddressesThenThePorts() throws {
        var f = [UInt8](repeating: 0, count: 14 + 40 + 20)
        f[12] = 0x86; f[13] = 0xdd
        f[14] = 0x60; f[14 + 6] = 6
        for i in 0..<32 { f[14 + 8 + i] = UInt8(i * 7 + 1) }
        f[54] = 0x12; f[55] = 0x34; f[56] = 0x56; f[57] = 0x78
        let key = ToeplitzKey(Self.standardKey)
        let tcp = try #require(Self.hashOf(f, flags: NetifHashType.ipv6TCP))
        #expect(tcp.typeBit == NetifHashType.ipv6TCPBit)
        #expect(tcp.value == key.hash(Array(f[22..<54]) + [0x12, 0x34, 0x56, 0x78]))
        let ip = try #require(Self.hashOf(f, flags: NetifHashType.ipv6))
        #expect(ip.typeBit == NetifHashType.ipv6Bit && ip.value == key.hash(Array(f[22..<54])))
    }

    /// Random keys (of every length up to 40) and inputs (up to 36 bytes)
    /// against netif.h's xen_netif_toeplitz_hash.
    @Test func agreesWithNetifHsReferenceFunction() {
        var rng = XorShift(seed: 0x70e9_11f2)
        for round in 0..<2000 {
            let keyLength = round % (ToeplitzKey.maxLength + 1)
            let inputLength = Int(rng.next() % UInt64(ToeplitzKey.maxInput + 1))
            let key = (0..<keyLength).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let input = (0..<inputLength).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let reference = key.withUnsafeBufferPointer { k in
                input.withUnsafeBufferPointer { i in
                    xar_toeplitz_hash(k.baseAddress, UInt32(keyLength), i.baseAddress, UInt32(inputLength))
                }
            }
            let ours = ToeplitzKey(key).hash(input)
            #expect(ours == reference, "key \(key) input \(input)")
            if ours != reference { break }
        }
    }
}
