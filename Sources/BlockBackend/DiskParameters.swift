import BlockStorage

/// The `params` forms this backend serves from files and block devices:
/// a path ("/var/lib/xen/disk.img", "/dev/vg0/guest"), optionally with a
/// qdisk-style format prefix ("aio:", "file:", "raw:", "phy:").
public enum DiskParameters {
    public static let prefixes = ["aio:", "file:", "raw:", "phy:"]

    public static func path(of params: String) -> String {
        var p = Substring(params)
        for prefix in prefixes where p.hasPrefix(prefix) { p = p.dropFirst(prefix.count) }
        return String(p)
    }

    /// The default opener: an NBD export (libnbd) for `nbd:` and NBD URIs,
    /// libaio file storage for paths.
    public static let fileStorageOpener: StorageOpener = { params, readOnly, queueDepth in
        if NBDAddress.isNBD(params) {
            return try NBDStorage.open(uri: params, readOnly: readOnly, queueDepth: queueDepth, connections: nbdConnections)
        }
        let path = path(of: params)
        guard path.hasPrefix("/") else { throw StorageError("open", errno: 22, path: params) }
        return try FileStorage.open(path: path, readOnly: readOnly, queueDepth: queueDepth)
    }

    /// Connections per NBD disk when the server allows multi-conn.
    public static let nbdConnections = 2
}
