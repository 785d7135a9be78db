import Glibc

/// Where an NBD export is, from a disk's `params`.
///
/// Accepted forms:
/// - the old Xen forms `nbd:HOST:PORT` and `nbd:HOST PORT` (also
///   `nbd:[IPV6]:PORT`; `nbd:HOST` alone means port 10809), default export;
/// - NBD URIs as libnbd parses them: `nbd://host[:port][/export]`,
///   `nbds://…` (TLS), `nbd+unix:///[export]?socket=PATH`,
///   `nbds+unix:///…?socket=PATH`. The export name is the percent-decoded
///   path without its leading slash; the port defaults to 10809.
///
/// URIs are connected with `nbd_connect_uri` on the original string (so
/// libnbd's own rules, TLS query parameters included, apply); the old forms
/// with `nbd_connect_tcp`.
public struct NBDAddress: Equatable, Sendable, CustomStringConvertible {
    public enum Transport: Equatable, Sendable {
        case tcp(host: String, port: String)
        case unix(socketPath: String)
    }

    public var transport: Transport
    public var exportName: String
    public var tls: Bool
    /// The URI handed to libnbd; nil for the old Xen forms.
    public var uri: String?

    public init(transport: Transport, exportName: String = "", tls: Bool = false, uri: String? = nil) {
        self.transport = transport; self.exportName = exportName; self.tls = tls; self.uri = uri
    }

    public static let defaultPort = "10809"

    /// True when `params` names an NBD export (so a caller can choose this storage).
    public static func isNBD(_ params: String) -> Bool {
        params.hasPrefix("nbd:") || params.hasPrefix("nbds:") || params.hasPrefix("nbd+") || params.hasPrefix("nbds+")
    }

    public var description: String {
        if let uri { return uri }
        switch transport {
        case .tcp(let host, let port): return "nbd:\(host):\(port)"
        case .unix(let path): return "nbd+unix:///\(exportName)?socket=\(path)"
        }
    }

    /// Parses `params`; throws EINVAL (with the text) for anything else.
    public static func parse(_ params: String) throws(StorageError) -> NBDAddress {
        let text = params.trimmingWhitespace()
        let bad = StorageError("parse NBD address", errno: EINVAL, path: params)
        if let schemeEnd = text.range(of: "://") {
            let scheme = String(text[..<schemeEnd.lowerBound])
            let rest = text[schemeEnd.upperBound...]
            guard let address = parseURI(scheme: scheme, rest: rest, original: text) else { throw bad }
            return address
        }
        guard text.hasPrefix("nbd:") else { throw bad }
        guard let address = parseXenForm(text.dropFirst(4)) else { throw bad }
        return address
    }

    private static func parseXenForm(_ rest: Substring) -> NBDAddress? {
        let words = rest.split(whereSeparator: { $0 == " " || $0 == "\t" })
        var host: Substring, port: Substring
        switch words.count {
        case 2:
            host = words[0]; port = words[1]
            if host.hasPrefix("[") && host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        case 1:
            guard let split = splitHostPort(words[0]) else { return nil }
            (host, port) = split
        default:
            return nil
        }
        guard !host.isEmpty, !host.contains("/"), isValidPort(port) else { return nil }
        return NBDAddress(transport: .tcp(host: String(host), port: String(port)))
    }

    /// `host`, `host:port`, `[v6]`, `[v6]:port`; nil when malformed. An
    /// empty port is the default one.
    private static func splitHostPort(_ text: Substring) -> (Substring, Substring)? {
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            let host = text[text.index(after: text.startIndex)..<close]
            let after = text[text.index(after: close)...]
            if after.isEmpty { return (host, Substring(defaultPort)) }
            guard after.hasPrefix(":") else { return nil }
            let port = after.dropFirst()
            return (host, port.isEmpty ? Substring(defaultPort) : port)
        }
        let colons = text.filter { $0 == ":" }.count
        if colons == 0 { return (text, Substring(defaultPort)) }
        guard colons == 1, let colon = text.firstIndex(of: ":") else { return nil }
        let port = text[text.index(after: colon)...]
        return (text[..<colon], port.isEmpty ? Substring(defaultPort) : port)
    }

    private static func isValidPort(_ port: Substring) -> Bool {
        guard !port.isEmpty, port.count <= 5, port.allSatisfy({ $0.isASCII && $0.isNumber }),
              let value = Int(port) else { return false }
        return value >= 1 && value <= 65535
    }

    private static func parseURI(scheme: String, rest: Substring, original: String) -> NBDAddress? {
        let tls: Bool, unix: Bool
        switch scheme.lowercased() {
        case "nbd": (tls, unix) = (false, false)
        case "nbds": (tls, unix) = (true, false)
        case "nbd+unix": (tls, unix) = (false, true)
        case "nbds+unix": (tls, unix) = (true, true)
        default: return nil  // nbd+vsock and others: not served
        }
        var remainder = rest
        if let hash = remainder.firstIndex(of: "#") { remainder = remainder[..<hash] }
        var query: Substring = ""
        if let mark = remainder.firstIndex(of: "?") {
            query = remainder[remainder.index(after: mark)...]
            remainder = remainder[..<mark]
        }
        let slash = remainder.firstIndex(of: "/") ?? remainder.endIndex
        var authority = remainder[..<slash]
        let path = remainder[slash...]
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        guard let exportName = percentDecode(path.hasPrefix("/") ? path.dropFirst() : path) else { return nil }

        var socketPath: String?
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let key = percentDecode(parts[0]) else { return nil }
            let value = parts.count == 2 ? percentDecode(parts[1]) : ""
            guard let value else { return nil }
            if key == "socket" { socketPath = value }
        }
        if unix {
            guard authority.isEmpty, let socketPath, !socketPath.isEmpty else { return nil }
            return NBDAddress(transport: .unix(socketPath: socketPath), exportName: exportName, tls: tls, uri: original)
        }
        guard socketPath == nil else { return nil }
        let hostPort: (Substring, Substring)
        if authority.isEmpty {
            hostPort = ("localhost", Substring(defaultPort))
        } else {
            guard let split = splitHostPort(authority) else { return nil }
            hostPort = split
        }
        guard !hostPort.0.isEmpty, isValidPort(hostPort.1), let host = percentDecode(hostPort.0) else { return nil }
        return NBDAddress(transport: .tcp(host: host, port: String(hostPort.1)), exportName: exportName,
                          tls: tls, uri: original)
    }

    /// %XX escapes decoded as UTF-8; nil for a malformed escape or bytes that are not UTF-8.
    private static func percentDecode(_ text: Substring) -> String? {
        var bytes: [UInt8] = []
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else { bytes.append(byte); continue }
            guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else {
                return nil
            }
            bytes.append(high << 4 | low)
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

extension String {
    fileprivate func trimmingWhitespace() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else {
            return ""
        }
        return String(self[first...last])
    }

    fileprivate func range(of needle: String) -> Range<Index>? {
        var index = startIndex
        while index < endIndex {
            if self[index...].hasPrefix(needle) { return index..<self.index(index, offsetBy: needle.count) }
            index = self.index(after: index)
        }
        return nil
    }
}
