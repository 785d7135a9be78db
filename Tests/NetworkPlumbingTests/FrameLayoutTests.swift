import NetworkPlumbing
import Testing

@Suite struct FrameLayoutTests {
    func layout(_ bytes: [UInt8]) -> FrameLayout? {
        bytes.withUnsafeBytes { FrameLayout.parse($0) }
    }

    static func ipv4TCP(ihl: Int = 5, dataOffset: Int = 5, fragment: UInt16 = 0, vlan: Bool = false) -> [UInt8] {
        var f: [UInt8] = Array(repeating: 0xaa, count: 12)
        if vlan { f += [0x81, 0x00, 0x00, 0x05] }
        f += [0x08, 0x00]
        var ip: [UInt8] = [UInt8(0x40 | ihl), 0, 0, 0, 0, 0, UInt8(fragment >> 8), UInt8(fragment & 0xff), 64, 6, 0, 0]
        ip += [10, 0, 0, 1, 10, 0, 0, 2] + Array(repeating: 1, count: (ihl - 5) * 4)
        f += ip
        var tcp: [UInt8] = Array(repeating: 0, count: 12) + [UInt8(dataOffset << 4), 0x18] + Array(repeating: 0, count: 6)
        tcp += Array(repeating: 1, count: (dataOffset - 5) * 4)
        return f + tcp + Array(repeating: 0x55, count: 100)
    }

    @Test func tcpOverIPv4WithOptions() throws {
        let l = try #require(layout(Self.ipv4TCP(ihl: 6, dataOffset: 8)))
        #expect(l.network == .ipv4 && l.transport == .tcp)
        #expect(l.networkOffset == 14 && l.transportOffset == 38 && l.checksumOffset == 16 && l.headerLength == 38 + 32)
    }

    @Test func vlanTaggedFrame() throws {
        let l = try #require(layout(Self.ipv4TCP(vlan: true)))
        #expect(l.networkOffset == 18 && l.transportOffset == 38 && l.headerLength == 58)
    }

    @Test func udpOverIPv6WithAHopByHopHeader() throws {
        var f: [UInt8] = Array(repeating: 0xbb, count: 12) + [0x86, 0xdd]
        f += [0x60, 0, 0, 0, 0, 16, 0 /* next: hop-by-hop */, 64] + Array(repeating: 0xfe, count: 32)
        f += [17 /* next: UDP */, 0, 0, 0, 0, 0, 0, 0]   // 8-byte hop-by-hop header
        f += [0, 1, 0, 2, 0, 8, 0, 0]
        let l = try #require(layout(f))
        #expect(l.network == .ipv6 && l.transport == .udp)
        #expect(l.networkOffset == 14 && l.transportOffset == 62 && l.checksumOffset == 6 && l.headerLength == 70)
    }

    @Test func refusesWhatCannotBeTrusted() {
        #expect(layout(Self.ipv4TCP(fragment: 0x2000)) == nil, "more-fragments")
        #expect(layout(Self.ipv4TCP(fragment: 0x0010)) == nil, "fragment offset")
        var shortTCP = Self.ipv4TCP()
        shortTCP[14 + 20 + 12] = 0x40
        #expect(layout(shortTCP) == nil, "TCP data offset 4")
        #expect(layout(Array(Self.ipv4TCP().prefix(40))) == nil, "TCP header cut short")
        #expect(layout(Array(Self.ipv4TCP(ihl: 15).prefix(60))) == nil, "IP options cut short")
        #expect(layout([UInt8](repeating: 0, count: 13)) == nil, "shorter than Ethernet")
        var arp = Self.ipv4TCP()
        arp[12] = 0x08; arp[13] = 0x06
        #expect(layout(arp) == nil, "ARP")
        var badVersion = Self.ipv4TCP()
        badVersion[14] = 0x65
        #expect(layout(badVersion) == nil, "IPv4 ethertype with version 6")
        var sctp = Self.ipv4TCP()
        sctp[23] = 132
        #expect(layout(sctp) == nil, "SCTP")
    }
}
