import Glibc
import Logging

/// Log lines sent to systemd's journal with its native protocol
/// (systemd.journal-fields(7), "Native Journal Protocol"): one datagram per
/// line to /run/systemd/journal/socket, each a list of `FIELD=value` lines.
/// The journal stamps the time itself, so no timestamp is written; the
/// level becomes PRIORITY, and every metadata key becomes a field of its
/// own (`device=vif-1-0` is `DEVICE=vif-1-0`, so `journalctl DEVICE=vif-1-0`
/// shows one device). MESSAGE keeps the metadata as `key=value` words before
/// the text, as the stream handler prints them, for readers of
/// `journalctl -o cat`.
///
/// Used when standard error is the journal's stream (JOURNAL_STREAM names
/// it), as systemd's documentation asks of programs that switch to the
/// native protocol; a line the socket refuses goes to standard error.
public struct JournalLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let label: String
    private let socket: JournalSocket

    public init(label: String, level: Logger.Level, socket: JournalSocket) {
        self.label = label
        logLevel = level
        self.socket = socket
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { $1 }.sorted { $0.key < $1.key }
        let words = all.map { "\($0.key)=\($0.value)" }
        let text = (words + [event.message.description]).joined(separator: " ")
        var fields: [(String, String)] = [("MESSAGE", text), ("PRIORITY", String(Self.priority(event.level))),
                                         ("SYSLOG_IDENTIFIER", "xenbackd"), ("XENBACKD_LOGGER", label)]
        for (key, value) in all { fields.append((Self.fieldName(key), "\(value)")) }
        if !socket.send(Self.encode(fields)) {
            let line = Array((text + "\n").utf8)
            _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        }
    }

    /// syslog(3)'s levels, as the journal's PRIORITY takes them.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// A journal field name: upper case letters, digits and underscores, not
    /// starting with an underscore (those are the journal's own) or a digit.
    static func fieldName(_ key: String) -> String {
        var name = String(key.uppercased().map { ($0.isASCII && ($0.isLetter || $0.isNumber)) ? $0 : "_" })
        while name.hasPrefix("_") { name.removeFirst() }
        if name.isEmpty || name.first!.isNumber { name = "X" + name }
        return String(name.prefix(64))
    }

    /// The native protocol's encoding: `NAME=value\n`, or for a value with a
    /// newline `NAME\n`, its length as 64-bit little endian, the value, `\n`.
    static func encode(_ fields: [(String, String)]) -> [UInt8] {
        var out: [UInt8] = []
        for (name, value) in fields {
            out += Array(name.utf8)
            let bytes = Array(value.utf8)
            if bytes.contains(UInt8(ascii: "\n")) {
                out.append(UInt8(ascii: "\n"))
                withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { out += $0 }
            } else {
                out.append(UInt8(ascii: "="))
            }
            out += bytes
            out.append(UInt8(ascii: "\n"))
        }
        return out
    }
}

/// A datagram socket to the journal, shared by every logger of the process.
public final class JournalSocket: Sendable {
    public static let defaultPath = "/run/systemd/journal/socket"
    private let fd: Int32
    /// The journal's address, made once; each line is a `sendto` to it (as
    /// sd_journal_send does: a socket connected once would stay tied to a
    /// journald that was restarted).
    private let address: sockaddr_un

    public init?(path: String = JournalSocket.defaultPath) {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: a.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &a.sun_path) { $0.copyBytes(from: pathBytes) }
        address = a
        fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
    }

    deinit { close(fd) }

    /// False when the journal is not there or refuses the datagram.
    func send(_ bytes: [UInt8]) -> Bool {
        var to = address
        let sent = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &to) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        }
        return sent == bytes.count
    }

    /// Standard error is the journal's stream: JOURNAL_STREAM ("DEV:INODE",
    /// set by systemd for a unit's stdout/stderr) names the descriptor's device and inode.
    public static func standardErrorIsJournal(
        journalStream: String? = getenv("JOURNAL_STREAM").map { String(cString: $0) }
    ) -> Bool {
        guard let value = journalStream else { return false }
        let parts = value.split(separator: ":")
        var st = stat()
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]), fstat(2, &st) == 0 else {
            return false
        }
        return UInt64(st.st_dev) == device && UInt64(st.st_ino) == inode
    }
}
