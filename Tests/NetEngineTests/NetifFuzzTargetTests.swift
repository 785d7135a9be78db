import Foundation
import FuzzTargets
import Testing
import XenABI

/// The netif fuzz program without libFuzzer: pseudo-random programs from a
/// fixed seed, hand-built ones that reach GSO chains, extra slots and rx
/// stalls, and the corpus under Tests/FuzzCorpus/netif; none may find anything.
@Suite struct NetifFuzzTargetTests {
    typealias Action = NetifFuzzTarget.Action

    typealias Generator = FuzzProgramGenerator

    static func run(_ bytes: [UInt8]) -> [String] {
        bytes.withUnsafeBytes { NetifFuzzTarget.run($0) }
    }

    @Test func randomProgramsFindNothing() {
        var g = Generator(seed: 0x6e65_7469_6600_0001)
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
        var g = Generator(seed: 0x6e65_7469_6600_0002)
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

    /// Hand-built programs (the operand bytes follow `NetifFuzzProgram`'s reads).
    enum Programs {
        static func op(_ a: Action, _ operands: [UInt8] = []) -> [UInt8] { [a.rawValue] + operands }

        /// Features, no rate, a 10 ms stall limit, ring indices from 0.
        static func setup(features: UInt8) -> [UInt8] { [features, 1, 9, 0] }

        /// A TCPv4 GSO packet (1000-byte head, fragments of 2000 and 500
        /// bytes), then six rx buffers and a GSO frame of 8 KiB from the bridge.
        static let gsoBothWays: [UInt8] = setup(features: 0x07)
            + op(.txPacket, [3, 0, 0xb2, 0x03, 0, 0, 2, 0, 0, 4, 0xcf, 0x07, 100, 0, 5, 0xf3, 0x01, 1, 1, 10])
            + op(.kick)
            + op(.rxBuffers, [5, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 6])
            + op(.tapFrame, [0, 7, 1, 0, 0x21, 3])
            + op(.tapReadable)

        /// A request with extra slots of every kind chained by MORE (GSO,
        /// multicast add, an unknown type), then a plain request.
        static let extraSlots: [UInt8] = setup(features: 0x01)
            + op(.grant, [2, 0, 1])
            + op(.txRequest, [2, 0, UInt8(NetifTxFlags.extraInfo), 1, 1])
            + op(.txExtra, [1, 0, 1, 1])
            + op(.txExtra, [2, 1, 5, 0, 1])
            + op(.txExtra, [5, 0, 0, 0])
            + op(.txRequest, [2, 0, 0, 2, 1])
            + op(.txPush) + op(.kick)

        /// One rx buffer for a frame that needs two: held, the TAP left
        /// alone, then dropped after the stall limit; buffers again after.
        static let rxStall: [UInt8] = setup(features: 0x01)
            + op(.rxBuffers, [0, 1, 1])
            + op(.tapFrame, [2, 7, 1, 0, 0, 0])
            + op(.tapFrame, [2, 1, 0, 0])
            + op(.tapReadable)
            + op(.advanceTime, [2, 5, 0])
            + op(.advanceTime, [2, 50, 0])
            + op(.rxBuffers, [4, 2, 1, 3, 2, 4, 3, 5, 4, 6, 5])
            + op(.kick)
    }

    @Test(arguments: [("GSO both ways", Programs.gsoBothWays), ("extra slots", Programs.extraSlots), ("rx stall", Programs.rxStall)])
    func handBuiltProgramsFindNothing(_ name: String, _ program: [UInt8]) {
        #expect(Self.run(program) == [], "\(name)")
    }

    /// Every input under Tests/FuzzCorpus/netif (seeds and minimised findings).
    @Test func theCorpusFindsNothing() throws {
        let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("FuzzCorpus/netif")
        let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
        #expect(!names.isEmpty)
        for name in names {
            let bytes = try [UInt8](Data(contentsOf: folder.appendingPathComponent(name)))
            #expect(Self.run(bytes) == [], "\(name)")
        }
    }
}
