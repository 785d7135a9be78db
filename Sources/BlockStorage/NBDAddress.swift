import Glibc

/// Where an NBD export is, from a disk's `params`.
///
/// Accepted forms:
/// - the old Xen forms `nbd:HOST:PORT` and `nbd:HOST PORT` (also
///   `nbd:[IPV6]:PORT`; `nbd:HOST` alone means port 10809), default export;
/// - QEMU's legacy forms `nbd:HOST:PORT:exportname=NAME`,
///   `nbd:unix:PATH` and `nbd:unix:PATH:exportname=NAME`;
/// - NBD URIs as libnbd parses them: `nbd://host[:port][/export]`,
///   `nbds://…` (TLS), `nbd+unix:///[export]?socket=PATH`,
///   `nbds+unix:///…?socket=PATH`. The export name is the percent-decoded
///   path without its leading slash; the port defaults to 10809.
///
/// URIs are connected with `nbd_connect_uri` on the original string (so
/// libnbd's own rules, TLS query parameters included, apply); the other
/// forms with `nbd_connect_tcp`/`nbd_connect_unix` and the export name.
public struct NBDAddress: Equatable, Sendable, CustomStringConvertible {
    public enum Transport: Equatable, Sendable {
        case tcp(host: String, port: String)
        case unix(socketPath: String)
    }

    /// Why a text is not an NBD address, in words for an operator.
    public struct Malformed: Error, Equatable, Sendable {
        public var reason: String
        init(_ reason: String) { self.reason = reason }
    }

    public var transport: Transport
    public var exportName: String
    public var tls: Bool
    /// The URI handed to libnbd; nil for the old Xen and QEMU forms.
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
        case .tcp(let host, let port): return exportName.isEmpty ? "nbd:\(host):\(port)" : normalized
        case .unix: return normalized
        }
    }

    /// One spelling per export, whatever form named it: an NBD URI with the
    /// port written out, the host in lower case (IPv6 in brackets), the export
    /// name and socket path percent-encoded, no user or TLS parameters.
    public var normalized: String {
        let scheme = tls ? "nbds" : "nbd"
        switch transport {
        case .tcp(let host, let port):
            let lowered = host.lowercased()
            let shownHost = lowered.contains(":") ? "[\(lowered)]" : lowered
            let path = exportName.isEmpty ? "" : "/" + Self.percentEncode(exportName, keeping: "/")
            return "\(scheme)://\(shownHost):\(Int(port) ?? 0)\(path)"
        case .unix(let socketPath):
            return "\(scheme)+unix:///\(Self.percentEncode(exportName, keeping: "/"))?socket="
                + Self.percentEncode(socketPath, keeping: "/")
        }
    }

    /// Parses `params`; throws EINVAL (with the text) for anything else.
    public static func parse(_ params: String) throws(StorageError) -> NBDAddress {
        do {
            return try parseExplaining(params)
        } catch {
            throw StorageError("parse NBD address (\(error.reason))", errno: EINVAL, path: params)
        }
    }

    /// Parses `params`, saying what is wrong with it when it is not an NBD address.
    public static func parseExplaining(_ params: String) throws(Malformed) -> NBDAddress {
        let text = params.trimmingWhitespace()
        if let schemeEnd = text.range(of: "://") {
            let scheme = String(text[..<schemeEnd.lowerBound])
            return try parseURI(scheme: scheme, rest: text[schemeEnd.upperBound...], original: text)
        }
        guard text.hasPrefix("nbd:") else { throw Malformed("not an NBD address (nbd:…, nbd://…, nbd+unix://…)") }
        let rest = text.dropFirst(4)
        let (address, exportName) = splitExportName(rest)
        if address.hasPrefix("unix:") {
            let path = address.dropFirst(5)
            guard path.hasPrefix("/") else { throw Malformed("nbd:unix: needs an absolute socket path") }
            return NBDAddress(transport: .unix(socketPath: normalizedPath(path)), exportName: exportName)
        }
        var parsed = try parseXenForm(address)
        parsed.exportName = exportName
        return parsed
    }

    /// QEMU's `…:exportname=NAME` suffix (the name is everything after it).
    private static func splitExportName(_ text: Substring) -> (Substring, String) {
        guard let marker = text.range(of: ":exportname=") else { return (text, "") }
        return (text[..<marker.lowerBound], String(text[marker.upperBound...]))
    }

    private static func parseXenForm(_ rest: Substring) throws(Malformed) -> NBDAddress {
        let words = rest.split(whereSeparator: { $0 == " " || $0 == "\t" })
        var host: Substring, port: Substring
        switch words.count {
        case 2:
            host = words[0]; port = words[1]
            if host.hasPrefix("[") && host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        case 1:
            guard let split = splitHostPort(words[0]) else {
                throw Malformed("expected HOST:PORT, HOST PORT or [IPV6]:PORT")
            }
            (host, port) = split
        case 0:
            throw Malformed("no host")
        default:
            throw Malformed("expected HOST:PORT or HOST PORT, found \(words.count) words")
        }
        guard !host.isEmpty else { throw Malformed("no host") }
        guard !host.contains("/") else { throw Malformed("a host has no '/' (a socket is nbd:unix:PATH)") }
        guard isValidPort(port) else { throw Malformed("the port must be a number from 1 to 65535") }
        return NBDAddress(transport: .tcp(host: String(host), port: String(Int(port)!)))
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

    private static func parseURI(scheme: String, rest: Substring, original: String) throws(Malformed) -> NBDAddress {
        let tls: Bool, unix: Bool
        switch scheme.lowercased() {
        case "nbd": (tls, unix) = (false, false)
        case "nbds": (tls, unix) = (true, false)
        case "nbd+unix": (tls, unix) = (false, true)
        case "nbds+unix": (tls, unix) = (true, true)
        case "nbd+tcp", "nbds+tcp":
            throw Malformed("\(scheme):// is QEMU's spelling, which libnbd does not take: write nbd\(scheme.hasPrefix("nbds") ? "s" : "")://HOST:PORT/NAME")
        case "nbd+vsock", "nbds+vsock": throw Malformed("vsock exports are not served")
        default: throw Malformed("unknown scheme \(scheme):// (nbd://, nbds://, nbd+unix://, nbds+unix://)")
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
        guard let exportName = percentDecode(path.hasPrefix("/") ? path.dropFirst() : path) else {
            throw Malformed("a bad %-escape in the export name")
        }

        var socketPath: String?
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let key = percentDecode(parts[0]), let value = parts.count == 2 ? percentDecode(parts[1]) : "" else {
                throw Malformed("a bad %-escape in the query")
            }
            if key == "socket" { socketPath = value }
        }
        if unix {
            guard authority.isEmpty else { throw Malformed("\(scheme):// takes no host: \(scheme):///NAME?socket=PATH") }
            guard let socketPath, !socketPath.isEmpty else { throw Malformed("\(scheme):// needs ?socket=PATH") }
            guard socketPath.hasPrefix("/") else { throw Malformed("the socket path must be absolute") }
            return NBDAddress(transport: .unix(socketPath: normalizedPath(Substring(socketPath))), exportName: exportName,
                              tls: tls, uri: original)
        }
        guard socketPath == nil else { throw Malformed("socket= belongs to nbd+unix:// URIs") }
        let hostPort: (Substring, Substring)
        if authority.isEmpty {
            hostPort = ("localhost", Substring(defaultPort))
        } else {
            guard let split = splitHostPort(authority) else { throw Malformed("expected HOST, HOST:PORT or [IPV6]:PORT") }
            hostPort = split
        }
        guard !hostPort.0.isEmpty else { throw Malformed("no host") }
        guard isValidPort(hostPort.1) else { throw Malformed("the port must be a number from 1 to 65535") }
        guard let host = percentDecode(hostPort.0) else { throw Malformed("a bad %-escape in the host") }
        return NBDAddress(transport: .tcp(host: host, port: String(Int(hostPort.1)!)), exportName: exportName,
                          tls: tls, uri: original)
    }

    /// An absolute path with `//`, `/./` and a trailing `/` folded (`..`
    /// kept: through a symlink it is not the parent).
    static func normalizedPath(_ path: Substring) -> String {
        let parts = path.split(separator: "/").filter { $0 != "." }
        return "/" + parts.joined(separator: "/")
    }

    /// %XX-escapes every byte but unreserved ones and those in `keeping`.
    static func percentEncode(_ text: String, keeping: String = "") -> String {
        var out = ""
        for byte in text.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if (byte < 0x80 && (c.isLetter || c.isNumber)) || "-._~".contains(c) || keeping.contains(c) {
                out.append(c)
            } else {
                out += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return out
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

}

extension StringProtocol {
    fileprivate func range(of needle: String) -> Range<Index>? {
        var index = startIndex
        while index < endIndex {
            if self[index...].hasPrefix(needle) { return index..<self.index(index, offsetBy: needle.count) }
            index = self.index(after: index)
        }
        return nil
    }
}
