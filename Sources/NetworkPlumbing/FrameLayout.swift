/// Where the headers of an Ethernet frame carrying TCP or UDP over IPv4 or
/// IPv6 are: what a checksum offload (csum_start / csum_offset) and a GSO
/// header length (hdr_len) need. netif's NETTXF_csum_blank and
/// NETRXF_csum_blank say only "the checksum is partial"; the side that hands
/// the frame to a TAP finds the offsets here, as Linux's
/// skb_checksum_setup() does.
///
/// Parsing treats the frame as hostile: every length is checked against
/// the bytes present, and anything unusual (IP fragments, IPv4 options
/// cut short, an unknown IPv6 extension, a TCP data offset below 5) gives
/// nil rather than a guess.
public struct FrameLayout: Equatable, Sendable {
    public enum Network: Equatable, Sendable { case ipv4, ipv6 }
    public enum Transport: Equatable, Sendable { case tcp, udp }

    public var network: Network
    public var transport: Transport
    /// Offset of the IP header from the start of the frame.
    public var networkOffset: Int
    /// Offset of the TCP/UDP header from the start of the frame (csum_start).
    public var transportOffset: Int
    /// Where the checksum sits inside the TCP/UDP header (csum_offset):
    /// 16 for TCP, 6 for UDP.
    public var checksumOffset: Int
    /// Ethernet, IP and TCP/UDP headers together (virtio's hdr_len).
    public var headerLength: Int

    public static let ethernetHeaderLength = 14
    static let etherTypeIPv4: UInt16 = 0x0800
    static let etherTypeIPv6: UInt16 = 0x86DD
    static let etherTypeVLAN: UInt16 = 0x8100
    static let etherTypeQinQ: UInt16 = 0x88A8
    static let protocolTCP: UInt8 = 6
    static let protocolUDP: UInt8 = 17

    /// Parses `frame` (starting at the Ethernet header, no virtio header).
    /// Nil for anything that is not TCP or UDP over unfragmented IP.
    public static func parse(_ frame: UnsafeRawBufferPointer) -> FrameLayout? {
        let n = frame.count
        func u8(_ i: Int) -> UInt8 { frame[i] }
        func be16(_ i: Int) -> UInt16 { UInt16(frame[i]) << 8 | UInt16(frame[i + 1]) }

        guard n >= ethernetHeaderLength else { return nil }
        var typeOffset = 12
        var etherType = be16(typeOffset)
        // Up to two VLAN tags (802.1Q, 802.1ad), each 4 bytes before the real type.
        var tags = 0
        while etherType == etherTypeVLAN || etherType == etherTypeQinQ {
            tags += 1
            guard tags <= 2, n >= typeOffset + 6 else { return nil }
            typeOffset += 4
            etherType = be16(typeOffset)
        }
        let l3 = typeOffset + 2

        var network: Network
        var proto: UInt8
        var l4: Int
        switch etherType {
        case etherTypeIPv4:
            guard n >= l3 + 20, u8(l3) >> 4 == 4 else { return nil }
            let ihl = Int(u8(l3) & 0x0f) * 4
            guard ihl >= 20, n >= l3 + ihl else { return nil }
            // More-fragments flag or a fragment offset: no L4 header to trust.
            guard be16(l3 + 6) & 0x3fff == 0 else { return nil }
            network = .ipv4
            proto = u8(l3 + 9)
            l4 = l3 + ihl
        case etherTypeIPv6:
            guard n >= l3 + 40, u8(l3) >> 4 == 6 else { return nil }
            network = .ipv6
            proto = u8(l3 + 6)
            l4 = l3 + 40
            // Hop-by-hop (0), routing (43) and destination options (60) are
            // skipped; a fragment header (44) or anything else ends the parse.
            var extensions = 0
            while proto == 0 || proto == 43 || proto == 60 {
                extensions += 1
                guard extensions <= 8, n >= l4 + 8 else { return nil }
                let length = (Int(u8(l4 + 1)) + 1) * 8
                proto = u8(l4)
                l4 += length
            }
        default:
            return nil
        }

        switch proto {
        case protocolTCP:
            guard n >= l4 + 20 else { return nil }
            let dataOffset = Int(u8(l4 + 12) >> 4) * 4
            guard dataOffset >= 20, n >= l4 + dataOffset else { return nil }
            return FrameLayout(network: network, transport: .tcp, networkOffset: l3, transportOffset: l4,
                               checksumOffset: 16, headerLength: l4 + dataOffset)
        case protocolUDP:
            guard n >= l4 + 8 else { return nil }
            return FrameLayout(network: network, transport: .udp, networkOffset: l3, transportOffset: l4,
                               checksumOffset: 6, headerLength: l4 + 8)
        default:
            return nil
        }
    }
}
