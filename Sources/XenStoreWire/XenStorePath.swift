import Hypervisor
import XenABI

/// xenstore path syntax: absolute "/a/b", relative "a/b" (taken below the
/// caller's /local/domain/<domid>), and the two special watch paths.
public enum XenStorePath {
    public static let introduceDomain = "@introduceDomain"
    public static let releaseDomain = "@releaseDomain"
    public static let root = "/"

    /// "/local/domain/<domid>": the base of a domain's relative paths.
    public static func domainPath(of domid: DomID) -> String { "/local/domain/\(domid)" }

    public static func isSpecial(_ path: String) -> Bool {
        path == introduceDomain || path == releaseDomain
    }

    /// The absolute path `path` names for `domain`, or nil if `path` is not
    /// valid: empty, a character outside [A-Za-z0-9/_@-.], "//", a trailing
    /// "/" (except the root), longer than 3072 (absolute) or 2048 (relative)
    /// bytes, or an "@" path other than the two special ones (and those only
    /// when `allowSpecial`).
    public static func resolve(_ path: String, domain: DomID, allowSpecial: Bool = false) -> String? {
        let utf8 = path.utf8
        guard let first = utf8.first else { return nil }
        if first == UInt8(ascii: "@") {
            return allowSpecial && isSpecial(path) ? path : nil
        }
        guard utf8.allSatisfy(isAllowed) else { return nil }
        guard !hasEmptyComponent(utf8) else { return nil }
        if first == UInt8(ascii: "/") {
            return utf8.count <= XenStoreLimits.absolutePathMax ? path : nil
        }
        guard utf8.count <= XenStoreLimits.relativePathMax else { return nil }
        return domainPath(of: domain) + "/" + path
    }

    /// True for a valid absolute path (the form a server stores).
    public static func isValidAbsolute(_ path: String) -> Bool {
        path.utf8.first == UInt8(ascii: "/") && resolve(path, domain: 0) == path
    }

    /// The parent path; nil for the root.
    public static func parent(of path: String) -> String? {
        guard path != root, let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) else { return nil }
        return slash == path.utf8.startIndex ? root : String(path[..<slash])
    }

    /// The last component ("/a/b" -> "b"); the root's is "".
    public static func lastComponent(of path: String) -> String {
        guard let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) else { return path }
        return String(path[path.utf8.index(after: slash)...])
    }

    /// The path of child `name` of `parent`.
    public static func child(_ name: String, of parent: String) -> String {
        parent == root ? "/" + name : parent + "/" + name
    }

    /// True if `path` is `ancestor` or lies below it; everything lies below the root.
    /// (xenstored's is_child: the rule for matching an event path to a watch.)
    public static func isSubpath(_ path: String, of ancestor: String) -> Bool {
        if ancestor == root { return path.utf8.first == UInt8(ascii: "/") }
        guard path.utf8.starts(with: ancestor.utf8) else { return false }
        let rest = path.utf8.dropFirst(ancestor.utf8.count)
        return rest.isEmpty || rest.first == UInt8(ascii: "/")
    }

    /// `path` relative to `domain`'s base path ("/local/domain/3/x" -> "x"),
    /// or nil if it is not below it.
    public static func relative(_ path: String, toDomain domain: DomID) -> String? {
        let base = domainPath(of: domain) + "/"
        guard path.utf8.starts(with: base.utf8), path.utf8.count > base.utf8.count else { return nil }
        return String(path[path.utf8.index(path.utf8.startIndex, offsetBy: base.utf8.count)...])
    }

    private static func isAllowed(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "/"), UInt8(ascii: "_"), UInt8(ascii: "@"), UInt8(ascii: "-"), UInt8(ascii: "."):
            return true
        default:
            return false
        }
    }

    /// "//" anywhere or a trailing "/" (other than the root itself).
    private static func hasEmptyComponent(_ utf8: String.UTF8View) -> Bool {
        if utf8.count > 1 && utf8.last == UInt8(ascii: "/") { return true }
        var previousWasSlash = false
        for c in utf8 {
            let isSlash = c == UInt8(ascii: "/")
            if isSlash && previousWasSlash { return true }
            previousWasSlash = isSlash
        }
        return false
    }
}
