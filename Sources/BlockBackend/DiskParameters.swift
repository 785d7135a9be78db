import BlockStorage

/// The daemon's side of `params`: `DiskTarget` parses it (the same parser
/// `xenbackd check-disk`, and through it the block hotplug script, uses),
/// and opens a file or block device with io_uring or libaio, an NBD export with libnbd.
public enum DiskParameters {
    public static let prefixes = DiskTarget.formatPrefixes

    /// `params` without its format prefixes ("aio:raw:/x" is "/x").
    public static func path(of params: String) -> String {
        DiskTarget.strippingFormatPrefixes(params)
    }

    /// The default opener (libaio, the daemon's default `--io-engine`). A
    /// target that does not parse fails with `DiskTargetError`'s one-line reason.
    public static let fileStorageOpener: StorageOpener = storageOpener(ioEngine: .libaio)

    /// The opener with files and block devices on `ioEngine` (`--io-engine`).
    public static func storageOpener(ioEngine: IOEngineChoice) -> StorageOpener {
        { params, readOnly, queueDepth in
            try DiskTarget.parse(params).open(readOnly: readOnly, queueDepth: queueDepth,
                                              nbdConnections: nbdConnections, ioEngine: ioEngine)
        }
    }

    /// Connections per NBD disk when the server allows multi-conn.
    public static let nbdConnections = 2
}
