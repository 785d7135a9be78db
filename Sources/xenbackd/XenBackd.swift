import ArgumentParser
import Logging

@main
struct XenBackd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenbackd",
        abstract: "Xen split-driver I/O backend (blkback) served from dom0 userspace.",
        subcommands: [Run.self, Status.self, CheckDisk.self, XenStored.self, Guest.self, Fuzz.self, Bench.self],
        defaultSubcommand: Run.self)
}

/// Options every long-running command shares.
struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func makeLogger(_ label: String) -> Logger {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingBootstrap.once(level: level)
        return Logger(label: label)
    }
}

enum LoggingBootstrap {
    nonisolated(unsafe) private static var done = false
    static func once(level: Logger.Level) {
        guard !done else { return }
        done = true
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }
}
