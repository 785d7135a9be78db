import Foundation
import Testing

/// EINTR is handled once, in SystemSupport's Syscall: a retry loop anywhere
/// else is a second place to get it wrong.
@Suite("system calls are retried on EINTR in SystemSupport only")
struct SyscallsHandledOnceTests {
    @Test("no Swift file outside Sources/SystemSupport mentions EINTR")
    func eintrOnlyInSystemSupport() throws {
        let sources = ModuleTableTests.root.appendingPathComponent("Sources")
        guard let files = FileManager.default.enumerator(at: sources, includingPropertiesForKeys: nil) else {
            throw ModuleTableTests.Failure("cannot list \(sources.path)")
        }
        var offenders: [String] = []
        var checked = 0
        for case let url as URL in files where url.pathExtension == "swift" {
            let relative = String(url.path.dropFirst(sources.path.count + 1))
            if relative.hasPrefix("SystemSupport/") { continue }
            checked += 1
            for (number, line) in try String(contentsOf: url, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false).enumerated()
            where line.contains("EINTR") {
                offenders.append("Sources/\(relative):\(number + 1): \(line.trimmingCharacters(in: .whitespaces))")
            }
        }
        #expect(checked > 100, "only \(checked) Swift files found under \(sources.path)")
        #expect(offenders.isEmpty, "EINTR outside SystemSupport (use Syscall.retryingOnInterrupt or a wrapper):\n\(offenders.joined(separator: "\n"))")
    }
}
