import NetBackend
import NetworkPlumbing

/// Frame bytes for the netif fuzz program: header sets that reach the
/// offload paths, and frames as a TAP with a virtio-net header hands them out.
enum NetifFuzzFrames {
    /// Bytes k * 13 for k in 0..<512 (period 256): byte j of a frame's body is
    /// table[(j + seed) & 255], copied 256 at a time.
    private static let bodyTable: [UInt8] = (0..<512).map { UInt8(truncatingIfNeeded: $0 &* 13) }

    /// Ethernet + IP + TCP/UDP headers (no payload) of `kind`, announcing
    /// `length` bytes in all; kind 4 is raw bytes from the input.
    static func headers(kind: UInt8, length: Int, _ b: inout FuzzBytes) -> [UInt8] {
        var h: [UInt8] = [0x00, 0x16, 0x3e, 0, 0, 2, 0x00, 0x16, 0x3e, 0, 0, 1]
        let ipLength = max(0, length - 14)
        switch kind % 5 {
        case 0, 3:
            if kind % 5 == 3 { h += [0x81, 0x00, 0x00, 0x05] }
            h += [0x08, 0x00, 0x45, 0, UInt8(ipLength >> 8 & 0xff), UInt8(ipLength & 0xff), 0, 1, 0, 0, 64, 6, 0, 0,
                  10, 0, 0, 1, 10, 0, 0, 2]
            h += tcp()
        case 1:
            let payload = max(0, ipLength - 40)
            h += [0x86, 0xdd, 0x60, 0, 0, 0, UInt8(payload >> 8 & 0xff), UInt8(payload & 0xff), 6, 64]
            h += [UInt8](repeating: 0x20, count: 15) + [1] + [UInt8](repeating: 0x20, count: 15) + [2]
            h += tcp()
        case 2:
            h += [0x08, 0x00, 0x45, 0, UInt8(ipLength >> 8 & 0xff), UInt8(ipLength & 0xff), 0, 1, 0, 0, 64, 17, 0, 0,
                  10, 0, 0, 1, 10, 0, 0, 2]
            let udp = max(0, ipLength - 20)
            h += [0x30, 0x39, 0x00, 0x35, UInt8(udp >> 8 & 0xff), UInt8(udp & 0xff), 0, 0]
        default:
            h = (0..<(14 + Int(b.u8() & 63))).map { _ in b.u8() }
        }
        return h
    }

    private static func tcp() -> [UInt8] {
        [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x20, 0, 0, 0, 0, 0]
    }

    /// One frame from the bridge: a virtio-net header (sane or not), then
    /// headers and a patterned body, `size()` bytes long (up to past the
    /// engine's buffer, to be cut).
    static func fromTheBridge(_ b: inout FuzzBytes) -> [UInt8] {
        let kind = b.u8()
        let length = min(b.size(), NetEngineBuffers.rxBufferSize + 64)
        var frame = headers(kind: kind, length: length, &b)
        if frame.count > length { frame.removeLast(frame.count - length) }
        let seed = Int(b.u8())
        if length > frame.count {
            // Copied from a table: a fuzz run makes many 64 KiB frames.
            let start = frame.count
            frame += [UInt8](unsafeUninitializedCapacity: length - start) { body, count in
                var i = 0
                while i < body.count {
                    let n = min(256, body.count - i)
                    let phase = (start + i + seed) & 255
                    bodyTable.withUnsafeBufferPointer { table in
                        body.baseAddress!.advanced(by: i).initialize(from: table.baseAddress!.advanced(by: phase), count: n)
                    }
                    i += n
                }
                count = body.count
            }
        }
        let layout = frame.withUnsafeBytes { FrameLayout.parse($0) }
        var h = VirtioNetHeader()
        let choice = b.u8()
        switch choice & 7 {
        case 0: break
        case 1: h.flags = VirtioNetHeader.flagDataValid
        case 2, 3, 4, 5:
            h.flags = VirtioNetHeader.flagNeedsChecksum
            h.checksumStart = UInt16(layout?.transportOffset ?? 34)
            h.checksumOffset = UInt16(layout?.checksumOffset ?? 16)
            if choice & 7 >= 3 {
                h.gsoType = choice & 7 == 3 ? VirtioNetHeader.gsoTCPv4 : choice & 7 == 4 ? VirtioNetHeader.gsoTCPv6
                    : VirtioNetHeader.gsoTCPv4 | VirtioNetHeader.gsoECN
                h.gsoSize = choice & 0x80 != 0 ? 0 : 1448
                h.headerLength = UInt16(layout?.headerLength ?? 54)
            }
        case 6:
            return (0..<VirtioNetHeader.size).map { _ in b.u8() } + frame
        default:
            h.gsoType = VirtioNetHeader.gsoUDP
            h.gsoSize = 1000
        }
        return h.bytes + frame
    }
}
