import ArgumentParser
import Logging

/// Options every long-running command of both executables shares.
public struct LoggingOptions: ParsableArguments, Sendable {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    public var logLevel: String = "info"

    public init() {}

    public func makeLogger(_ label: String) -> Logger {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingBootstrap.once(level: level)
        return Logger(label: label)
    }
}

/// swift-log's bootstrap, once per process: to the journal when standard
/// error is the journal's stream (a systemd unit), else to standard error.
public enum LoggingBootstrap {
    nonisolated(unsafe) private static var done = false
    public static func once(level: Logger.Level) {
        guard !done else { return }
        done = true
        if JournalSocket.standardErrorIsJournal(), let socket = JournalSocket() {
            LoggingSystem.bootstrap { label in JournalLogHandler(label: label, level: level, socket: socket) }
            return
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }
}

/// `s` padded with spaces to `width` columns (on the left when `right`).
public func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - s.count))
    return right ? fill + s : s + fill
}
