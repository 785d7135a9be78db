import FuzzTargets
import Testing

@Suite("the xenbus fuzz program, without the fuzzer")
struct XenbusFuzzTests {
    @Test("hand-made programs: good keys, a bad port, a bad order, an unplug, garbage state; the vif's too")
    func seeds() {
        let programs: [[UInt8]] = [
            [],
            [0, 6, 0, 4, 3],                  // event-channel "0": not open
            [0, 5, 16, 0, 1, 0, 4, 3],        // ring-page-order "16", ring-ref "0", state 3
            [6, 4, 3, 6],                     // state 3, unplug
            [0, 9, 21, 7, 201, 5, 0xff, 0xfe, 0, 1, 2], // state with escapes, raw mode bytes
            // Bytes from 0x80 act on the vif.
            Self.vifConnects + [0x80, 2, 10, 0x84, 5, 0x84, 1, 0x84, 4],   // reconnect with port 2^32-1
            Self.vifConnects + [0x86, 0x84, 1, 0x84, 4],                   // unplug while Connected, connect again
            Self.vifConnects + [0x87, 0, 0],                               // replugged as vifname "vif2.0": taken
            [0x80, 1, 201, 4, 0x1b, 0x5b, 0x33, 0x0a, 0x84, 4],            // raw bytes as rx-ring-ref, then Connected
        ]
        for p in programs {
            let findings = p.withUnsafeBytes { XenbusFuzzTarget.run($0) }
            #expect(findings.isEmpty, "\(p): \(findings)")
        }
    }

    /// Netfront's keys for one queue (tx-ring-ref 1, rx-ring-ref 2,
    /// event-channel 3, request-rx-copy, feature-rx-notify), then Connected.
    static let vifConnects: [UInt8] = [0x80, 0, 1, 0x80, 1, 2, 0x80, 2, 3, 0x80, 6, 1, 0x80, 7, 1, 0x84, 4]
    /// Two queues: queue 0 on split ports 3 and 4, queue 1 on port 4.
    static let vifTwoQueues: [UInt8] = [0x80, 5, 2, 0x80, 9, 1, 0x80, 10, 2, 0x80, 12, 3, 0x80, 13, 4,
                                        0x80, 14, 5, 0x80, 15, 6, 0x80, 16, 4, 0x80, 6, 1, 0x80, 7, 1, 0x84, 4]

    @Test("the hostile vif connects with netfront's keys, one queue or two; both guests' vifs exist")
    func vifConnects() {
        for p in [Self.vifConnects, Self.vifTwoQueues] {
            let outcome = p.withUnsafeBytes { XenbusFuzzTarget.outcome($0) }
            #expect(outcome.findings.isEmpty, "\(p): \(outcome.findings)")
            #expect(outcome.hostileVifConnected, "\(p)")
            #expect(!outcome.hostileVbdConnected, "\(p)")
            #expect(outcome.interfacesCreated == 2, "\(p)")
        }
    }

    @Test("a vif without request-rx-copy, or with a third queue, never connects")
    func vifRefused() {
        let noRxCopy: [UInt8] = Array(Self.vifConnects[0..<9]) + [0x80, 7, 1, 0x84, 4]
        let threeQueues: [UInt8] = [0x80, 5, 3] + Self.vifConnects
        for p in [noRxCopy, threeQueues] {
            let outcome = p.withUnsafeBytes { XenbusFuzzTarget.outcome($0) }
            #expect(outcome.findings.isEmpty, "\(p): \(outcome.findings)")
            #expect(!outcome.hostileVifConnected, "\(p)")
        }
    }

    @Test("300 pseudo-random programs")
    func random() {
        var rng = FuzzProgramGenerator(seed: 12)
        for i in 0..<300 {
            let p = rng.bytes(Int(rng.next() % 64))
            let findings = p.withUnsafeBytes { XenbusFuzzTarget.run($0) }
            #expect(findings.isEmpty, "program \(i) \(p): \(findings)")
            if !findings.isEmpty { break }
        }
    }
}
