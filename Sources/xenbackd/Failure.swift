import ArgumentParser
import Glibc

/// A command's one-line reason on standard error, alone (no usage text, so
/// the block script can store it as `hotplug-error`), and exit status 1.
func failure(_ line: String) -> ExitCode {
    let bytes = Array("\(line)\n".utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    return ExitCode(1)
}
