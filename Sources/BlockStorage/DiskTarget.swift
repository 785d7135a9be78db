/// A disk's `params` as xenbackd understands it: the one parser for the
/// daemon's opener and for `xenbackd check-disk`, which the block hotplug
/// script runs, so that what the script accepts the daemon serves.
///
/// Forms (docs/hotplug.md, "Disk targets"), each optionally behind any of
/// the qdisk-style prefixes `aio:`, `file:`, `raw:`, `phy:`:
/// - an absolute path: a regular file, a block device, an LVM volume
///   (`/dev/VG/LV`, `/dev/mapper/VG-LV`);
/// - an NBD export in any form `NBDAddress` takes;
/// - a Ceph RBD image, `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:OPTION=VALUE]...` (`RBDImageAddress`).
public struct DiskTarget: Equatable, Sendable, CustomStringConvertible {
    public enum Location: Equatable, Sendable {
        /// Absolute, with `//`, `/./` and a trailing `/` folded.
        case path(String)
        case nbd(NBDAddress)
        case rbd(RBDImageAddress)
    }

    /// An LVM volume's names, as `lvchange` takes them (`VG/LV`).
    public struct LogicalVolume: Equatable, Sendable, CustomStringConvertible {
        public var group: String
        public var volume: String
        public var description: String { "\(group)/\(volume)" }
    }

    /// The text as given.
    public let params: String
    public let location: Location

    public static let formatPrefixes = ["aio:", "file:", "raw:", "phy:"]

    public init(params: String, location: Location) {
        self.params = params; self.location = location
    }

    /// One spelling per target, whatever form named it: the folded path, or
    /// `NBDAddress.normalized`. What sharing checks compare and what is printed.
    public var normalized: String {
        switch location {
        case .path(let path): path
        case .nbd(let address): address.normalized
        case .rbd(let address): address.normalized
        }
    }

    /// `params` fit for a log line or status: an RBD image's secrets (`key=`) replaced.
    public static func redacted(_ params: String) -> String { RBDImageAddress.redacted(params) }

    public var description: String { normalized }

    public var path: String? {
        if case .path(let path) = location { return path }
        return nil
    }

    /// `params` without its format prefixes, taken off in any order and number.
    public static func strippingFormatPrefixes(_ params: String) -> String {
        var text = Substring(params)
        while let prefix = formatPrefixes.first(where: { text.hasPrefix($0) }) { text = text.dropFirst(prefix.count) }
        return String(text)
    }

    public static func parse(_ params: String) throws(DiskTargetError) -> DiskTarget {
        let text = strippingFormatPrefixes(trimmed(params))
        if text.isEmpty { throw .empty }
        if RBDImageAddress.isRBD(text) {
            do {
                return DiskTarget(params: params, location: .rbd(try RBDImageAddress.parse(text)))
            } catch {
                throw .malformedRBD(params: redacted(params), reason: error.reason)
            }
        }
        if NBDAddress.isNBD(text) || looksLikeURI(text) {
            do {
                return DiskTarget(params: params, location: .nbd(try NBDAddress.parseExplaining(text)))
            } catch {
                throw .malformedNBD(params: params, reason: error.reason)
            }
        }
        guard text.hasPrefix("/") else { throw .notAbsolute(params: params) }
        return DiskTarget(params: params, location: .path(NBDAddress.normalizedPath(Substring(text))))
    }

    /// `/dev/VG/LV` or `/dev/mapper/VG-LV` (device-mapper doubles a dash
    /// inside either name); nil for other paths and for NBD exports.
    public var logicalVolume: LogicalVolume? {
        guard let path, path.hasPrefix("/dev/") else { return nil }
        let parts = path.dropFirst(5).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { return nil }
        if parts[0] != "mapper" { return LogicalVolume(group: String(parts[0]), volume: String(parts[1])) }
        // The first single dash separates the names; "--" is a dash inside one.
        let name = Array(parts[1])
        var index = 0
        while index < name.count {
            if name[index] == "-" {
                if index + 1 < name.count && name[index + 1] == "-" { index += 2; continue }
                let group = String(name[..<index]).replacingDoubleDashes()
                let volume = String(name[(index + 1)...]).replacingDoubleDashes()
                guard !group.isEmpty, !volume.isEmpty else { return nil }
                return LogicalVolume(group: group, volume: volume)
            }
            index += 1
        }
        return nil
    }

    /// Opens the target as the daemon serves it (`ioEngine`: for files and block devices).
    public func open(readOnly: Bool, queueDepth: Int, nbdConnections: Int,
                     ioEngine: IOEngineChoice = .auto) throws(StorageError) -> any BlockStorage {
        switch location {
        case .path(let path):
            return try FileStorage.open(path: path, readOnly: readOnly, queueDepth: queueDepth, engine: ioEngine)
        case .nbd(let address):
            return try NBDStorage.open(address: address, readOnly: readOnly, queueDepth: queueDepth,
                                       connections: nbdConnections)
        case .rbd(let address):
            return try RBDStorage.open(address, readOnly: readOnly, queueDepth: queueDepth)
        }
    }

    /// `scheme://…` for a scheme of the NBD family, so that a misspelt one
    /// (`nbd+tcp://`) gets its reason instead of "not an absolute path".
    private static func looksLikeURI(_ text: String) -> Bool {
        guard let colon = text.firstIndex(of: ":") else { return false }
        return text[..<colon].lowercased().hasPrefix("nbd") && text[colon...].hasPrefix("://")
    }

    private static func trimmed(_ text: String) -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = text.firstIndex(where: { !isSpace($0) }),
              let last = text.lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(text[first...last])
    }
}

extension String {
    fileprivate func replacingDoubleDashes() -> String {
        var out = ""
        var previousDash = false
        for c in self {
            if c == "-" && previousDash { previousDash = false; continue }
            previousDash = c == "-"
            out.append(c)
        }
        return out
    }
}
