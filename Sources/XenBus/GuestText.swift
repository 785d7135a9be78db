/// Makes bytes a guest (or the toolstack) chose safe to put in a log line
/// or a xenstore `error` node: every byte outside printable ASCII becomes a
/// visible escape, and long values are cut.
///
/// - printable ASCII stays, except `\` → `\\` and `"` → `\"`;
/// - newline, carriage return, tab → `\n`, `\r`, `\t`; other control bytes
///   and DEL → `\xNN`;
/// - a valid non-ASCII character → `\u{XXXX}` (no bidirectional override or
///   look-alike reaches a terminal);
/// - a byte that is not valid UTF-8 → `\xNN`. Our xenstore clients hand
///   values over as `String`, which has already replaced such bytes by
///   U+FFFD: that shows as `\u{FFFD}`.
/// - after `limit` bytes of input (whole characters only), "…".
public enum GuestText {
    public static let defaultLimit = 64

    public static func escaped(_ text: some StringProtocol, limit: Int = defaultLimit) -> String {
        escaped(bytes: Array(text.utf8), limit: limit)
    }

    /// `escaped` in double quotes, for a value inside a sentence.
    public static func quoted(_ text: some StringProtocol, limit: Int = defaultLimit) -> String {
        "\"" + escaped(text, limit: limit) + "\""
    }

    public static func escaped(bytes: [UInt8], limit: Int = defaultLimit) -> String {
        var out = ""
        var parser = Unicode.UTF8.ForwardParser()
        var input = bytes.makeIterator()
        var position = 0
        while true {
            let length: Int
            var scalar: Unicode.Scalar?
            switch parser.parseScalar(from: &input) {
            case .valid(let encoded):
                length = encoded.count
                scalar = Unicode.UTF8.decode(encoded)
            case .error(let n):
                length = n
            case .emptyInput:
                return out
            }
            if position + length > limit { return out + "…" }
            if let scalar {
                append(scalar, to: &out)
            } else {
                for b in bytes[position..<position + length] { out += hex(b) }
            }
            position += length
        }
    }

    private static func append(_ s: Unicode.Scalar, to out: inout String) {
        switch s {
        case "\\": out += "\\\\"
        case "\"": out += "\\\""
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case " "..."~": out.unicodeScalars.append(s)
        case _ where s.value < 0x80: out += hex(UInt8(s.value))
        default: out += "\\u{" + String(s.value, radix: 16, uppercase: true) + "}"
        }
    }

    private static func hex(_ b: UInt8) -> String {
        (b < 16 ? "\\x0" : "\\x") + String(b, radix: 16)
    }
}
