import FuzzTargets
import Testing

/// A small fixed-seed generator: the same inputs on every run.
struct SplitMix64 {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }
}

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
        var rng = SplitMix64(state: 12)
        for i in 0..<300 {
            let p = rng.bytes(Int(rng.next() % 64))
            let findings = p.withUnsafeBytes { XenbusFuzzTarget.run($0) }
            #expect(findings.isEmpty, "program \(i) \(p): \(findings)")
            if !findings.isEmpty { break }
        }
    }
}
