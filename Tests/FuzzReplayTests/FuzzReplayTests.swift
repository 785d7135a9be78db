import FuzzTargets
import Testing

/// Tests/FuzzCorpus/<target>/: the seeds, and findings/ with every minimised
/// finding (each named for what it found). All of them must run clean.
@Suite("fuzz corpus replay")
struct FuzzReplayTests {
    static let corpusRoot: String = {
        let file = "\(#filePath)"
        let testsFolder = file.split(separator: "/", omittingEmptySubsequences: false).dropLast(2).joined(separator: "/")
        return testsFolder + "/FuzzCorpus"
    }()

    static var targetNames: [String] { FuzzTargetRegistry.all.map { $0.name } }

    @Test("every seed and finding of the target runs clean", arguments: targetNames)
    func replayCorpus(_ name: String) throws {
        let target = try #require(FuzzTargetRegistry.target(named: name))
        let files = FuzzCorpus.files(at: [Self.corpusRoot + "/" + name])
        #expect(!files.isEmpty, "Tests/FuzzCorpus/\(name)/ has no seeds")
        for file in files {
            let findings = try #require(FuzzCorpus.replay(target, file: file), "\(file) cannot be read")
            #expect(findings.isEmpty, "\(file): \(findings)")
        }
    }
}
