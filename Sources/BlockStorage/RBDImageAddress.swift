/// Where an RBD image is and who opens it, from a disk's `params`, in
/// QEMU's form (what libvirt and XenServer users already write):
///
///     rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:OPTION=VALUE]...
///
/// A backslash takes the next character literally (`\:` in a value, `\@`
/// in a name). Options: `id` (the cephx user, without `client.`), `conf`
/// (a ceph.conf; librados's default search otherwise), and any other
/// librados setting, applied in order with `rados_conf_set` (`keyring`,
/// `mon_host`, `key`...). There is no `rbd://` form: neither QEMU nor
/// libvirt has one, so none is guessed at.
public struct RBDImageAddress: Equatable, Sendable, CustomStringConvertible {
    public var pool: String
    /// A RADOS namespace inside the pool ("" for none).
    public var namespace: String
    public var image: String
    /// A snapshot: served read-only.
    public var snapshot: String?
    /// The cephx user, without "client." (admin when nil).
    public var user: String?
    /// ceph.conf (librados's default search when nil: CEPH_CONF, /etc/ceph/ceph.conf, ...).
    public var configPath: String?
    /// Further librados settings, in the order given.
    public var settings: [(name: String, value: String)]

    public static let scheme = "rbd:"
    /// Settings whose value is a secret: never printed.
    public static let secretSettings: Set<String> = ["key"]

    public init(pool: String, namespace: String = "", image: String, snapshot: String? = nil, user: String? = nil,
                configPath: String? = nil, settings: [(name: String, value: String)] = []) {
        self.pool = pool; self.namespace = namespace; self.image = image; self.snapshot = snapshot
        self.user = user; self.configPath = configPath; self.settings = settings
    }

    public static func == (a: RBDImageAddress, b: RBDImageAddress) -> Bool {
        a.pool == b.pool && a.namespace == b.namespace && a.image == b.image && a.snapshot == b.snapshot
            && a.user == b.user && a.configPath == b.configPath
            && a.settings.map(\.name) == b.settings.map(\.name) && a.settings.map(\.value) == b.settings.map(\.value)
    }

    public struct Malformed: Error, Equatable, Sendable {
        public var reason: String
        init(_ reason: String) { self.reason = reason }
    }

    public static func isRBD(_ text: String) -> Bool { text.hasPrefix(scheme) }

    /// The image's one spelling: pool, namespace, image and snapshot, with
    /// the characters the form gives a meaning to escaped; no options (so
    /// no secret). What sharing checks compare and what logs print.
    public var normalized: String {
        var text = Self.scheme + Self.escape(pool) + "/"
        if !namespace.isEmpty { text += Self.escape(namespace) + "/" }
        text += Self.escape(image)
        if let snapshot { text += "@" + Self.escape(snapshot) }
        return text
    }

    public var description: String { normalized }

    /// The normalised image with the options that say how to reach it
    /// (`id`, `conf`, librados settings) but no secret: what an operator
    /// pastes into `xenbackd rbd-lock`.
    public var withoutSecrets: String {
        var text = normalized
        if let user { text += ":id=" + Self.escapeValue(user) }
        if let configPath { text += ":conf=" + Self.escapeValue(configPath) }
        for setting in settings where !Self.secretSettings.contains(setting.name) {
            text += ":" + setting.name + "=" + Self.escapeValue(setting.value)
        }
        return text
    }

    /// `params` with every secret's value replaced, for logs and status.
    public static func redacted(_ params: String) -> String {
        // The scheme's end: after any format prefixes (`aio:`…) and spaces.
        var rest = Substring(params)
        while !rest.hasPrefix(scheme), let colon = rest.firstIndex(of: ":") { rest = rest[rest.index(after: colon)...] }
        guard rest.hasPrefix(scheme) else { return params }
        let body = rest.dropFirst(scheme.count)
        var out = String(params[..<body.startIndex])
        let fields = split(String(body), on: ":")
        for (index, field) in fields.enumerated() {
            if index > 0 { out += ":" }
            if index > 0, let equals = field.raw.firstIndex(of: "="),
               secretSettings.contains(String(field.raw[..<equals])) {
                out += field.raw[...equals] + "<redacted>"
            } else {
                out += field.raw
            }
        }
        return out
    }

    public static func parse(_ text: String) throws(Malformed) -> RBDImageAddress {
        guard text.hasPrefix(scheme) else { throw Malformed("an RBD image starts with rbd:") }
        let fields = split(String(text.dropFirst(scheme.count)), on: ":")
        let location = fields[0]
        // POOL/[NAMESPACE/]IMAGE[@SNAP]
        let at = location.unescapedSplit(on: "@")
        guard at.count <= 2 else { throw Malformed("more than one @ (a literal one is written \\@)") }
        let names = split(at[0].raw, on: "/")
        guard names.count == 2 || names.count == 3 else {
            throw Malformed("the image is named POOL/IMAGE or POOL/NAMESPACE/IMAGE")
        }
        let pool = names[0].value, image = names[names.count - 1].value
        let namespace = names.count == 3 ? names[1].value : ""
        guard !pool.isEmpty else { throw Malformed("no pool before /") }
        guard !image.isEmpty else { throw Malformed("no image name") }
        if names.count == 3 && namespace.isEmpty { throw Malformed("an empty namespace") }
        var address = RBDImageAddress(pool: pool, namespace: namespace, image: image)
        if at.count == 2 {
            guard !at[1].value.isEmpty else { throw Malformed("no snapshot name after @") }
            address.snapshot = at[1].value
        }
        for option in fields.dropFirst() {
            guard let equals = option.raw.firstIndex(of: "=") else {
                throw Malformed("option \(option.raw.debugDescription) is not NAME=VALUE")
            }
            let name = String(option.raw[..<equals])
            let value = unescape(String(option.raw[option.raw.index(after: equals)...]))
            guard !name.isEmpty, name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" }) else {
                throw Malformed("option name \(name.debugDescription) is not a ceph setting's name")
            }
            switch name {
            case "id":
                guard !value.isEmpty else { throw Malformed("id= is empty") }
                address.user = value.hasPrefix("client.") ? String(value.dropFirst(7)) : value
            case "conf":
                guard value.hasPrefix("/") else { throw Malformed("conf= is not an absolute path") }
                address.configPath = value
            default:
                address.settings.append((name, value))
            }
        }
        return address
    }

    // MARK: escapes

    /// A field as written (escapes kept) and as meant (escapes taken off).
    struct Field {
        var raw: String
        var value: String { RBDImageAddress.unescape(raw) }
        func unescapedSplit(on separator: Character) -> [Field] { RBDImageAddress.split(raw, on: separator) }
    }

    /// Splits on `separator` where it is not behind a backslash.
    static func split(_ text: String, on separator: Character) -> [Field] {
        var fields: [Field] = []
        var current = ""
        var escaped = false
        for c in text {
            if escaped { current.append(c); escaped = false; continue }
            if c == "\\" { current.append(c); escaped = true; continue }
            if c == separator { fields.append(Field(raw: current)); current = ""; continue }
            current.append(c)
        }
        fields.append(Field(raw: current))
        return fields
    }

    static func unescape(_ text: String) -> String {
        var out = ""
        var escaped = false
        for c in text {
            if escaped { out.append(c); escaped = false } else if c == "\\" { escaped = true } else { out.append(c) }
        }
        return out
    }

    /// An option's value: only `:` (and the backslash) mean something there.
    static func escapeValue(_ text: String) -> String {
        var out = ""
        for c in text {
            if c == "\\" || c == ":" { out.append("\\") }
            out.append(c)
        }
        return out
    }

    static func escape(_ text: String) -> String {
        var out = ""
        for c in text {
            if c == "\\" || c == ":" || c == "@" || c == "/" { out.append("\\") }
            out.append(c)
        }
        return out
    }
}
