import Logging

/// A LogHandler that hands every line to `sink`: its message and its
/// metadata (the logger's and the line's) as text. For tests and fuzzers
/// that check what the backend logged.
public struct LineLogHandler: LogHandler {
    public let sink: @Sendable (_ message: String, _ metadata: [String: String]) -> Void
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level

    public init(level: Logger.Level = .info, sink: @escaping @Sendable (_ message: String, _ metadata: [String: String]) -> Void) {
        logLevel = level
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        sink(event.message.description, metadata.merging(event.metadata ?? [:]) { $1 }.mapValues { "\($0)" })
    }
}
