import Foundation
import FuzzTargets
import Testing

/// Hand-built blkif fuzz programs that reach the deep paths (the seed
/// corpus in Tests/FuzzCorpus/blkif is these bytes). The opcodes are
/// BlkifFuzzWorld.perform's.
enum BlkifSeedPrograms {
    /// Ring A: a well-formed request, published and stepped at once.
    /// `segments` sector bytes: 0x38 is a whole page.
    static func request(_ kind: UInt8, count: UInt8, frame: UInt8 = 0, sector: UInt16, segments: Int,
                        publish: Bool = true, extra: [UInt8] = []) -> [UInt8] {
        [0, kind | (publish ? 0x08 : 0), count, frame, UInt8(sector & 0xFF), UInt8(sector >> 8)]
            + [UInt8](repeating: 0x38, count: segments) + extra
    }
    static let completeAllA: [UInt8] = [150, 0x80, 0]
    static let completeAllB: [UInt8] = [240, 0x80, 0]
    static func bystander(_ kind: UInt8, count: UInt8, sector: UInt16, segments: Int) -> [UInt8] {
        [190, kind, count, 0, UInt8(sector & 0xFF), UInt8(sector >> 8)] + [UInt8](repeating: 0x38, count: segments)
    }

    static func program(_ parts: [UInt8]...) -> [UInt8] { parts.flatMap { $0 } }

    static let writeReadFlush = program(
        [0x00, 0x03],
        request(1, count: 2, sector: 16, segments: 3), completeAllA,
        request(0, count: 2, frame: 5, sector: 16, segments: 3), completeAllA,
        request(3, count: 0, sector: 0, segments: 0, extra: [0xFF]), completeAllA,
        bystander(1, count: 1, sector: 40, segments: 2), completeAllB,
        bystander(0, count: 1, sector: 40, segments: 2), completeAllB)

    static let indirectWriteRead = program(
        [0x08, 0x05],
        request(6, count: 9, sector: 100, segments: 10), completeAllA,
        request(5, count: 9, frame: 11, sector: 100, segments: 10), completeAllA)

    static let barrierAfterRevokedGrant = program(
        [0x00, 0x03],
        [140, 4, 0],   // revoke frame 8, the first data frame
        request(1, count: 0, frame: 0, sector: 0, segments: 1, publish: false),
        request(2, count: 1, frame: 1, sector: 8, segments: 1), completeAllA, completeAllA,
        request(0, count: 1, frame: 2, sector: 0, segments: 2), completeAllA)

    static let discard = program(
        [0x20, 0x04],
        request(1, count: 1, sector: 64, segments: 2), completeAllA,
        request(4, count: 7, sector: 64, segments: 0, extra: [1]), completeAllA,
        request(0, count: 1, frame: 3, sector: 64, segments: 2), completeAllA)

    static let persistentGrants = program(
        [0x0C, 0x02],
        request(1, count: 3, sector: 0, segments: 4), completeAllA,
        request(6, count: 4, frame: 6, sector: 32, segments: 5), completeAllA,
        request(1, count: 3, sector: 0, segments: 4), completeAllA,
        request(0, count: 3, frame: 10, sector: 0, segments: 4), completeAllA,
        request(5, count: 4, frame: 14, sector: 32, segments: 5), completeAllA)

    static func unpublished(_ kind: UInt8, _ i: Int) -> [UInt8] {
        request(kind, count: 0, frame: UInt8(i), sector: UInt16(i * 8), segments: 1, publish: false)
    }

    static let multiPageRingAcrossTheWrap = program(
        [0x43, 0xF3],
        (0..<12).flatMap { unpublished(1, $0) },
        [80, 107, 0], [150, 5, 0], [150, 0, 0], completeAllA,
        (0..<12).flatMap { unpublished(0, $0) },
        [80, 107, 0], completeAllA,
        request(2, count: 0, sector: 0, segments: 0), completeAllA)

    static let all: [(String, [UInt8])] = [
        ("write-read-flush", writeReadFlush), ("indirect-write-read", indirectWriteRead),
        ("barrier-after-revoked-grant", barrierAfterRevokedGrant), ("discard", discard),
        ("persistent-grants", persistentGrants), ("multi-page-ring-wrap", multiPageRingAcrossTheWrap),
    ]
}

@Suite("the blkif fuzz target, without libFuzzer")
struct BlkifFuzzProgramTests {
    static func run(_ input: [UInt8]) -> [String] {
        input.withUnsafeBytes { BlkifFuzzTarget.run($0) }
    }

    static var corpus: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("FuzzCorpus/blkif")
    }

    @Test("the seed programs run clean and are the corpus files", arguments: BlkifSeedPrograms.all.map(\.0))
    func seed(_ name: String) throws {
        let program = BlkifSeedPrograms.all.first { $0.0 == name }!.1
        #expect(Self.run(program) == [])
        let file = Self.corpus.appendingPathComponent("seed-\(name)")
        if ProcessInfo.processInfo.environment["BLKIF_WRITE_SEEDS"] != nil { try Data(program).write(to: file) }
        #expect(try Data(contentsOf: file) == Data(program))
    }

    @Test("20,000 pseudo-random programs run clean")
    func randomPrograms() {
        var g = FuzzProgramGenerator(seed: 0x626C_6B69_6600)
        var failures = 0
        for i in 0..<20_000 {
            let input = g.bytes(Int(g.next() % 600))
            let findings = Self.run(input)
            if !findings.isEmpty {
                failures += 1
                if failures <= 3 { Issue.record("program \(i) [\(input.count) bytes]: \(findings.joined(separator: "; "))") }
            }
        }
        #expect(failures == 0)
    }

    @Test("a program is deterministic")
    func deterministic() {
        var g = FuzzProgramGenerator(seed: 7)
        for _ in 0..<200 {
            let input = g.bytes(300)
            #expect(Self.run(input) == Self.run(input))
        }
    }
}
