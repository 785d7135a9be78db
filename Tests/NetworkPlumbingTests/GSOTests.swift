import Glibc
import NetworkPlumbing
import SystemSupport
import Testing

/// A TCP/IPv4 super-frame written with a GSO header crosses the bridge: as
/// one frame to a TAP that accepts TSO (TUNSETOFFLOAD), as MSS-sized
/// segments with finished checksums to one that does not.
@Suite struct GSOTests {
    static let payloadLength = 4000
    static let mss: UInt16 = 1448

    @Test(arguments: [true, false])
    func tcpSuperFrame(receiverTakesTSO: Bool) throws {
        try withNetworkNamespace { ns in
            let (a, b) = try ns.run { () throws -> (TapDevice, TapDevice) in
                try NetworkInterface.createBridge("xbr0")
                let a = try TapDevice.create(name: "vif1.0")
                let b = try TapDevice.create(name: "vif2.0")
                for name in ["vif1.0", "vif2.0"] {
                    try NetworkInterface.addToBridge(interface: name, bridge: "xbr0")
                    try NetworkInterface.setUp(true, name: name)
                }
                try NetworkInterface.setUp(true, name: "xbr0")
                return (a, b)
            }
            defer { a.close(); b.close() }
            try b.setOffloads(csum: receiverTakesTSO, tso4: receiverTakesTSO, tso6: receiverTakesTSO)

            let payload = (0..<Self.payloadLength).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
            let frame = tcpFrame(payload: payload)
            let header = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                                         headerLength: 54, gsoSize: Self.mss, checksumStart: 34, checksumOffset: 16)
            try header.bytes.withUnsafeBytes { h in try frame.withUnsafeBytes { f in _ = try a.write(h, f) } }

            let isOurs: ([UInt8]) -> Bool = { f in
                f.count >= 12 + 54 && f[12 + 12] == 0x08 && f[12 + 13] == 0x00 && f[12 + 23] == 6
            }
            if receiverTakesTSO {
                let got = try #require(try receiveFrame(on: [b.queue(0)], where: isOurs))
                let gotHeader = try #require(got.frame.withUnsafeBytes { VirtioNetHeader(bytes: $0) })
                #expect(gotHeader.gsoType == VirtioNetHeader.gsoTCPv4)
                #expect(gotHeader.gsoSize == Self.mss)
                #expect(gotHeader.flags & VirtioNetHeader.flagNeedsChecksum != 0)
                #expect(gotHeader.checksumStart == 34 && gotHeader.checksumOffset == 16)
                #expect(Array(got.frame[12...]) == frame)
            } else {
                var received: [UInt8] = []
                var segments = 0
                while received.count < payload.count {
                    let got = try #require(try receiveFrame(on: [b.queue(0)], where: isOurs))
                    let segment = Array(got.frame[12...])
                    let gotHeader = try #require(got.frame.withUnsafeBytes { VirtioNetHeader(bytes: $0) })
                    #expect(gotHeader.gsoType == VirtioNetHeader.gsoNone)
                    #expect(gotHeader.flags & VirtioNetHeader.flagNeedsChecksum == 0)
                    #expect(segment.count <= 14 + 1500)
                    #expect(ipChecksumValid(segment))
                    #expect(tcpChecksumValid(segment))
                    received += segment[54...]
                    segments += 1
                }
                #expect(segments == (Self.payloadLength + Int(Self.mss) - 1) / Int(Self.mss))
                #expect(received == payload)
            }
        }
    }
}

// Ethernet (14) + IPv4 (20, 10.0.0.1 -> 10.0.0.2) + TCP (20) + payload, with
// the IP checksum done and the TCP checksum field holding the pseudo-header
// sum, as a stack that offloads checksums leaves it (CHECKSUM_PARTIAL).
func tcpFrame(payload: [UInt8]) -> [UInt8] {
    let tcpLength = 20 + payload.count
    var f: [UInt8] = [0x02, 0, 0, 0, 0, 0x20, 0x02, 0, 0, 0, 0, 0x10, 0x08, 0x00]
    let totalLength = 20 + tcpLength
    f += [0x45, 0, UInt8(totalLength >> 8), UInt8(totalLength & 0xff), 0x12, 0x34, 0x40, 0, 64, 6, 0, 0,
          10, 0, 0, 1, 10, 0, 0, 2]
    let ipSum = ~onesComplementSum(f[14..<34])
    f[24] = UInt8(ipSum >> 8); f[25] = UInt8(ipSum & 0xff)
    f += [0x30, 0x39, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]
    let pseudo = pseudoHeaderSum(source: [10, 0, 0, 1], destination: [10, 0, 0, 2], tcpLength: tcpLength)
    f[50] = UInt8(pseudo >> 8); f[51] = UInt8(pseudo & 0xff)
    return f + payload
}

func onesComplementSum<C: Collection>(_ bytes: C, initial: UInt32 = 0) -> UInt16 where C.Element == UInt8 {
    var sum = initial
    var high = true
    for b in bytes {
        sum += high ? UInt32(b) << 8 : UInt32(b)
        high.toggle()
    }
    while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
    return UInt16(sum)
}

func pseudoHeaderSum(source: [UInt8], destination: [UInt8], tcpLength: Int) -> UInt16 {
    onesComplementSum(source + destination + [0, 6, UInt8(tcpLength >> 8), UInt8(tcpLength & 0xff)])
}

func ipChecksumValid(_ frame: [UInt8]) -> Bool { onesComplementSum(frame[14..<34]) == 0xffff }

func tcpChecksumValid(_ frame: [UInt8]) -> Bool {
    let ipTotal = Int(frame[16]) << 8 | Int(frame[17])
    let tcp = frame[34..<(14 + ipTotal)]
    let pseudo = pseudoHeaderSum(source: Array(frame[26..<30]), destination: Array(frame[30..<34]), tcpLength: tcp.count)
    return onesComplementSum(tcp, initial: UInt32(pseudo)) == 0xffff
}
