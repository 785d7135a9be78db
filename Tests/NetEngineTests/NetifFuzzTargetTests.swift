import FuzzTargets
import Testing

/// The netif fuzz program without libFuzzer: pseudo-random programs from a
/// fixed seed, hand-built ones that reach GSO chains, extra slots and rx
/// stalls, and the corpus under Tests/FuzzCorpus/netif; none may find anything.
@Suite struct NetifFuzzTargetTests {
    typealias Action = NetifFuzzTarget.Action

    /// SplitMix64: the same programs on every machine.
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
        mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
    }

    static func run(_ bytes: [UInt8]) -> [String] {
        bytes.withUnsafeBytes { NetifFuzzTarget.run($0) }
    }

    @Test func randomProgramsFindNothing() {
        var g = Generator(state: 0x6e65_7469_6600_0001)
        var findings: [(Int, [String])] = []
        for i in 0..<20_000 {
            let length = Int(g.next() % 600)
            let bytes = (0..<length).map { _ in g.byte() }
            let f = Self.run(bytes)
            if !f.isEmpty && findings.count < 5 { findings.append((i, f)) }
        }
        #expect(findings.isEmpty, "\(findings)")
    }

    /// Programs made of whole actions: a well-behaved guest's packets and
    /// buffers mixed with hostile slots, so most bytes land on deep paths.
    @Test func actionProgramsFindNothing() {
        var g = Generator(state: 0x6e65_7469_6600_0002)
        let actions = UInt64(Action.allCases.count)
        var findings: [(Int, [String])] = []
        for i in 0..<5_000 {
            var bytes: [UInt8] = (0..<6).map { _ in g.byte() }
            for _ in 0..<(g.next() % 60) {
                let a = g.next() % actions
                bytes.append(UInt8(a))
                for _ in 0..<(g.next() % 12) { bytes.append(g.byte()) }
            }
            let f = Self.run(bytes)
            if !f.isEmpty && findings.count < 5 { findings.append((i, f)) }
        }
        #expect(findings.isEmpty, "\(findings)")
    }
}
