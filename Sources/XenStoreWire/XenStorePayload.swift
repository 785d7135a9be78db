import Hypervisor
import XenABI

/// Payload helpers: xenstore payloads are mostly NUL-terminated strings
/// ("path\0token\0"), with binary values after a path for WRITE.
public enum XenStorePayload {
    /// The reply of every request that returns nothing else.
    public static let ok: [UInt8] = terminated("OK")

    /// `text` followed by one NUL.
    public static func terminated(_ text: String) -> [UInt8] {
        Array(text.utf8) + [0]
    }

    /// Each string followed by a NUL ("a\0b\0").
    public static func terminated(_ strings: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        for s in strings {
            bytes.append(contentsOf: s.utf8)
            bytes.append(0)
        }
        return bytes
    }

    /// The NUL-terminated strings of `payload`, in order. Bytes after the last
    /// NUL do not form a string and are ignored (as xenstored's get_strings does).
    public static func strings(_ payload: [UInt8]) -> [String] {
        var result: [String] = []
        var from = 0
        for i in payload.indices where payload[i] == 0 {
            result.append(String(decoding: payload[from..<i], as: UTF8.self))
            from = i + 1
        }
        return result
    }

    /// The payload read as exactly one string with its NUL at the very end
    /// (xenstored's `onearg`); nil for anything else.
    public static func singleString(_ payload: [UInt8]) -> String? {
        guard let nul = payload.firstIndex(of: 0), nul == payload.count - 1 else { return nil }
        return String(decoding: payload[..<nul], as: UTF8.self)
    }

    /// The first NUL-terminated string and every byte after its NUL (WRITE's path and value).
    public static func splitFirstString(_ payload: [UInt8]) -> (String, [UInt8])? {
        guard let nul = payload.firstIndex(of: 0) else { return nil }
        return (String(decoding: payload[..<nul], as: UTF8.self), Array(payload[(nul + 1)...]))
    }

    /// A reply's text without its trailing NUL, if it has one ("OK\0" -> "OK").
    public static func text(_ payload: [UInt8]) -> String {
        let end = payload.last == 0 ? payload.count - 1 : payload.count
        return String(decoding: payload[..<end], as: UTF8.self)
    }

    /// The payload of an XS_ERROR reply: the errno's name and a NUL ("ENOENT\0").
    /// An errno without a xenstore name is sent as EINVAL, as xenstored does.
    public static func errorReply(errno: Int32) -> [UInt8] {
        terminated(XenStoreErrorName.name(of: errno))
    }

    /// The errno an XS_ERROR payload names; EINVAL for an unknown name (as libxenstore).
    public static func errno(fromErrorReply payload: [UInt8]) -> Int32 {
        XenStoreErrorName.errno(named: text(payload)) ?? XenStoreError.invalid
    }
}
