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

    /// The default opener: libaio file storage.
    public static let fileStorageOpener: StorageOpener = { params, readOnly, queueDepth in
        let path = path(of: params)
        guard path.hasPrefix("/") else { throw StorageError("open", errno: 22, path: params) }
        return try FileStorage.open(path: path, readOnly: readOnly, queueDepth: queueDepth)
    }
}
