import FuzzTargets
import Testing

@Suite("the xenbus fuzz program, without the fuzzer")
struct XenbusFuzzTests {
    @Test("hand-made programs: good keys, a bad port, a bad order, an unplug, garbage state")
    func seeds() {
        let programs: [[UInt8]] = [
            [],
            [0, 6, 0, 4, 3],                  // event-channel "0": not open
            [0, 5, 16, 0, 1, 0, 4, 3],        // ring-page-order "16", ring-ref "0", state 3
            [6, 4, 3, 6],                     // state 3, unplug
            [0, 9, 21, 7, 201, 5, 0xff, 0xfe, 0, 1, 2], // state with escapes, raw mode bytes
        ]
        for p in programs {
            let findings = p.withUnsafeBytes { XenbusFuzzTarget.run($0) }
            #expect(findings.isEmpty, "\(p): \(findings)")
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
