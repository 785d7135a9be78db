import Hypervisor
import NetFrontend
import SystemSupport
import XenABI

/// A ping from a guest whose netfront has no TAP (so the guest needs no
/// network namespace of its own): the frames are built here and go through
/// the tx ring, the backend, the vif and the bridge to dom0's IP stack,
/// whose answers come back through the rx ring. An ARP request (unicast to
/// the bridge's MAC) must be answered with the bridge's address, then an
/// ICMP echo request with the same identifier, sequence and payload, every
/// checksum right.
struct RawPing {
    let guestMAC: [UInt8]
    let guestIP: [UInt8]
    let peerMAC: [UInt8]
    let peerIP: [UInt8]

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// Sends the ARP request and `count` echo requests, each answered
    /// before the next. As a guest's stack would, a request is sent again
    /// after a second without its answer (a frame may be lost while the
    /// daemon restarts); `timeout` bounds each exchange. Returns how many
    /// requests were sent again.
    @discardableResult
    func run(on fe: LoopbackNetFrontend, count: Int = 1, timeout: Double = 10) throws -> Int {
        let page = try fe.grantTxPage()
        var resent = try exchange(arpRequest(), via: fe, page: page, timeout: timeout, what: "ARP reply from \(Self.dotted(peerIP))") {
            isArpReply($0)
        }
        let identifier = UInt16(truncatingIfNeeded: Int(guestIP[2]) << 8 | Int(guestIP[3]))
        for sequence in 1...count {
            resent += try exchange(echoRequest(identifier: identifier, sequence: UInt16(sequence)), via: fe, page: page, timeout: timeout,
                         what: "echo reply \(sequence) from \(Self.dotted(peerIP))") {
                isEchoReply($0, identifier: identifier, sequence: UInt16(sequence))
            }
        }
        return resent
    }

    private func exchange(_ frame: [UInt8], via fe: LoopbackNetFrontend,
                          page: (frame: UInt32, ref: GrantRef, bytes: UnsafeMutableRawPointer),
                          timeout: Double, what: String, _ matches: ([UInt8]) -> Bool) throws -> Int {
        let deadline = MonotonicClock.seconds() + timeout
        var sends = 0
        while true {
            try send(frame, via: fe, page: page)
            sends += 1
            let wait = min(1, deadline - MonotonicClock.seconds())
            if try expectFrame(fe, timeout: wait, matches) { return sends - 1 }
            guard MonotonicClock.seconds() < deadline else { throw Failure(description: "no \(what) within \(Int(timeout)) s") }
        }
    }

    private func send(_ frame: [UInt8], via fe: LoopbackNetFrontend,
                      page: (frame: UInt32, ref: GrantRef, bytes: UnsafeMutableRawPointer)) throws {
        frame.withUnsafeBytes { page.bytes.copyMemory(from: $0.baseAddress!, byteCount: frame.count) }
        fe.pushTxSlots([.request(NetifTxRequest(gref: page.ref, offset: 0, flags: 0, id: 0, size: UInt16(frame.count)))])
        let responses = try fe.waitTxResponses(1, timeout: 10)
        guard responses.first?.status == NetifStatus.okay else {
            throw Failure(description: "tx answered \(responses.first.map { String($0.status) } ?? "nothing")")
        }
    }

    /// Reads frames until one satisfies `matches` (others, such as another
    /// guest's broadcast, are skipped); false when `timeout` runs out first.
    private func expectFrame(_ fe: LoopbackNetFrontend, timeout: Double, _ matches: ([UInt8]) -> Bool) throws -> Bool {
        let deadline = MonotonicClock.seconds() + timeout
        while true {
            let left = deadline - MonotonicClock.seconds()
            guard left > 0, let got = try fe.receiveRaw(timeout: left) else { return false }
            if matches(got.frame) { return true }
        }
    }

    // MARK: Frames

    private func ethernet(to destination: [UInt8], type: UInt16) -> [UInt8] {
        destination + guestMAC + [UInt8(type >> 8), UInt8(type & 0xff)]
    }

    func arpRequest() -> [UInt8] {
        var f = ethernet(to: peerMAC, type: 0x0806)
        f += [0, 1, 0x08, 0, 6, 4, 0, 1] + guestMAC + guestIP + [UInt8](repeating: 0, count: 6) + peerIP
        return f + [UInt8](repeating: 0, count: max(0, 60 - f.count))
    }

    func isArpReply(_ f: [UInt8]) -> Bool {
        f.count >= 42 && f[12] == 0x08 && f[13] == 0x06 && f[20] == 0 && f[21] == 2
            && Array(f[22..<28]) == peerMAC && Array(f[28..<32]) == peerIP
            && Array(f[32..<38]) == guestMAC && Array(f[38..<42]) == guestIP && Array(f[0..<6]) == guestMAC
    }

    static let payloadLength = 56

    static func payload(_ identifier: UInt16, _ sequence: UInt16) -> [UInt8] {
        (0..<payloadLength).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(identifier) &+ Int(sequence) &* 13) }
    }

    func echoRequest(identifier: UInt16, sequence: UInt16) -> [UInt8] {
        var icmp: [UInt8] = [8, 0, 0, 0, UInt8(identifier >> 8), UInt8(identifier & 0xff), UInt8(sequence >> 8), UInt8(sequence & 0xff)]
        icmp += Self.payload(identifier, sequence)
        let c = Self.checksum(icmp[...])
        icmp[2] = UInt8(c >> 8); icmp[3] = UInt8(c & 0xff)
        let total = 20 + icmp.count
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), UInt8(sequence >> 8), UInt8(sequence & 0xff),
                           0x40, 0, 64, 1, 0, 0] + guestIP + peerIP
        let h = Self.checksum(ip[...])
        ip[10] = UInt8(h >> 8); ip[11] = UInt8(h & 0xff)
        return ethernet(to: peerMAC, type: 0x0800) + ip + icmp
    }

    func isEchoReply(_ f: [UInt8], identifier: UInt16, sequence: UInt16) -> Bool {
        guard f.count >= 14 + 20 + 8 + Self.payloadLength, f[12] == 0x08, f[13] == 0x00,
              Array(f[0..<6]) == guestMAC, Array(f[6..<12]) == peerMAC else { return false }
        let ihl = Int(f[14] & 0x0f) * 4
        let total = Int(f[16]) << 8 | Int(f[17])
        guard f[14] >> 4 == 4, ihl >= 20, 14 + total <= f.count, f[23] == 1,
              Array(f[26..<30]) == peerIP, Array(f[30..<34]) == guestIP,
              Self.checksum(f[14..<(14 + ihl)]) == 0 else { return false }
        let icmp = f[(14 + ihl)..<(14 + total)]
        let i = icmp.startIndex
        return icmp.count == 8 + Self.payloadLength && icmp[i] == 0 && icmp[i + 1] == 0 && Self.checksum(icmp) == 0
            && (UInt16(icmp[i + 4]) << 8 | UInt16(icmp[i + 5])) == identifier
            && (UInt16(icmp[i + 6]) << 8 | UInt16(icmp[i + 7])) == sequence
            && Array(icmp[(i + 8)...]) == Self.payload(identifier, sequence)
    }

    /// The Internet checksum (RFC 1071); 0 over data that carries a right one.
    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        var sum: UInt32 = 0
        var i = bytes.startIndex
        while i + 1 < bytes.endIndex {
            sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1])
            i += 2
        }
        if i < bytes.endIndex { sum += UInt32(bytes[i]) << 8 }
        while sum >> 16 != 0 { sum = (sum & 0xffff) + (sum >> 16) }
        return ~UInt16(sum)
    }

    static func dotted(_ ip: [UInt8]) -> String { ip.map(String.init).joined(separator: ".") }

    static func mac(_ text: String) -> [UInt8] { text.split(separator: ":").map { UInt8($0, radix: 16) ?? 0 } }
}
