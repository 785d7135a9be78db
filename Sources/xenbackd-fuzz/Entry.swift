// The fuzzer binary (built by scripts/fuzz with -DXENBACKD_FUZZ and
// -sanitize=fuzzer,address) or, in the normal build, the replayer of saved
// inputs. One executable for every target: XENBACKD_FUZZ_TARGET (fuzzing)
// or the first argument (replay) names it.
import FuzzTargets
import Glibc

private func printTargetNames() {
    for target in FuzzTargetRegistry.all { print(target.name) }
}

/// One line on stderr, written at once (libFuzzer's own output goes there too).
private func printError(_ text: String) {
    let line = text + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

#if XENBACKD_FUZZ

/// Chosen once in LLVMFuzzerInitialize, before libFuzzer's first input.
nonisolated(unsafe) private var selectedTarget: (any FuzzTarget.Type)?

@_cdecl("LLVMFuzzerInitialize")
public func fuzzerInitialize(_ argc: UnsafeMutablePointer<Int32>?, _ argv: UnsafeMutableRawPointer?) -> Int32 {
    let name = getenv("XENBACKD_FUZZ_TARGET").map { String(cString: $0) } ?? ""
    guard let target = FuzzTargetRegistry.target(named: name) else {
        printError("xenbackd-fuzz: XENBACKD_FUZZ_TARGET must name one of these targets (it is \"\(name)\"):")
        for target in FuzzTargetRegistry.all { printError("  " + target.name) }
        exit(2)
    }
    selectedTarget = target
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let findings = selectedTarget!.run(UnsafeRawBufferPointer(start: data, count: size))
    guard findings.isEmpty else {
        for finding in findings { printError("FINDING: \(finding)") }
        abort()  // libFuzzer saves the input as a crash artifact
    }
    return 0
}

#else

@main
struct ReplayCommand {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments == ["--list"] {
            printTargetNames()
            exit(0)
        }
        guard arguments.count >= 2, let target = FuzzTargetRegistry.target(named: arguments[0]) else {
            printError("usage: xenbackd-fuzz --list | xenbackd-fuzz TARGET FILE_OR_DIR...\ntargets:")
            for target in FuzzTargetRegistry.all { printError("  " + target.name) }
            exit(2)
        }
        let files = FuzzCorpus.files(at: Array(arguments.dropFirst()))
        var failed = 0
        for file in files {
            guard let findings = FuzzCorpus.replay(target, file: file) else {
                print("\(file): cannot be read")
                failed += 1
                continue
            }
            if findings.isEmpty {
                print("\(file): clean")
            } else {
                failed += 1
                for finding in findings { print("\(file): FINDING: \(finding)") }
            }
        }
        print("\(target.name): \(files.count) inputs replayed, \(failed) with findings")
        exit(failed == 0 && !files.isEmpty ? 0 : 1)
    }
}

#endif
