import Glibc

/// What probing a disk target found: what the daemon would see on opening it.
public struct DiskReport: Sendable {
    public enum Kind: String, Sendable {
        case file
        case blockDevice = "block-device"
        case nbd
        case rbd
    }

    /// What an RBD image's header says.
    public struct RBDFacts: Sendable {
        public var features: [String]
        public var objectSize: UInt64
        /// Who holds its exclusive lock now (empty: nobody; nil: unknown, a
        /// snapshot or a user who may only read).
        public var lockOwners: [String]?
    }

    public var target: DiskTarget
    public var kind: Kind
    /// The path with every symlink resolved (files and block devices).
    public var resolvedPath: String?
    /// Major and minor numbers of a block device.
    public var device: (major: UInt32, minor: UInt32)?
    /// The file behind a loop device.
    public var backingFile: String?
    /// Size, sector sizes, read-only, discard, as the daemon would publish them.
    public var geometry: StorageGeometry
    /// O_DIRECT works on it (files and block devices).
    public var directIO: Bool?
    /// `DiskIdentity.keys`: what a sharing check compares.
    public var identities: [String]
    /// Where it is mounted in this domain.
    public var mounts: [DiskMount]
    /// An RBD image's features, object size and lock holders.
    public var rbd: RBDFacts? = nil
}

/// How a target is to be used.
public struct DiskAccess: Equatable, Sendable {
    public var writable: Bool
    /// Refuse a disk mounted in this domain in a conflicting way (any mount
    /// for writing, a writable mount for reading). Xen's `w!` mode skips it.
    public var refuseMounted: Bool
    public init(writable: Bool, refuseMounted: Bool = true) {
        self.writable = writable; self.refuseMounted = refuseMounted
    }
}

extension DiskTarget {
    /// Opens the target the way the daemon would (a file or block device:
    /// open, O_DIRECT probe, geometry; an NBD export: the handshake, within
    /// `timeout` seconds) and closes it again.
    public func probe(_ access: DiskAccess, timeout: Double = 10) throws(DiskTargetError) -> DiskReport {
        switch location {
        case .path(let path): return try probeLocal(path, access)
        case .nbd(let address): return try probeNBD(address, access, timeout: timeout)
        case .rbd(let address): return try probeRBD(address, access, timeout: timeout)
        }
    }

    private func probeLocal(_ path: String, _ access: DiskAccess) throws(DiskTargetError) -> DiskReport {
        var status = stat()
        guard stat(path, &status) == 0 else {
            if errno == ENOENT || errno == ENOTDIR { throw .missing(path: path) }
            throw .cannotOpen(path: path, operation: "stat", errno: errno)
        }
        let isBlock: Bool
        switch status.st_mode & S_IFMT {
        case S_IFREG:
            isBlock = false
            if status.st_size == 0 { throw .emptyFile(path: path) }
        case S_IFBLK:
            isBlock = true
        default:
            throw .notFileOrBlockDevice(path: path)
        }
        var device: (major: UInt32, minor: UInt32)?
        var backing: String?
        if isBlock {
            let numbers = DiskIdentity.numbers(status.st_rdev)
            device = numbers
            backing = DiskIdentity.loopBackingFile(major: numbers.0, minor: numbers.1)
            // BLKROSET, `losetup -r`: writes would fail later with EPERM; say so now.
            if access.writable, DiskProbe.readSysfsNumber("/sys/dev/block/\(numbers.0):\(numbers.1)/ro") == 1 {
                throw .readOnly(what: "block device \(path)")
            }
        }
        let opened: OpenedDisk
        do {
            opened = try DiskProbe.openDisk(path: path, readOnly: !access.writable, direct: .auto)
        } catch {
            let code = error.errno
            if isBlock && (code == ENXIO || code == ENOMEDIUM) { throw .noMedium(device: path) }
            if isBlock && code == EROFS { throw .readOnly(what: "block device \(path)") }
            if access.writable && (code == EROFS || code == EACCES || code == EPERM) {
                throw .notWritable(path: path, errno: code)
            }
            throw .cannotOpen(path: path, operation: error.operation, errno: code)
        }
        Glibc.close(opened.fd)
        // An unattached loop device or an empty drive opens with size 0.
        if isBlock && opened.geometry.sizeBytes == 0 { throw .noMedium(device: path) }
        let identities = DiskIdentity.keys(of: self)
        let mounts = DiskMount.mounts(sharing: identities)
        if access.refuseMounted, let conflict = mounts.first(where: { access.writable || !$0.readOnly }) {
            throw .mounted(path: path, mountpoint: conflict.mountpoint)
        }
        return DiskReport(target: self, kind: isBlock ? .blockDevice : .file, resolvedPath: Self.realPath(path),
                          device: device, backingFile: backing, geometry: opened.geometry, directIO: opened.directIO,
                          identities: identities, mounts: mounts)
    }

    private func probeNBD(_ address: NBDAddress, _ access: DiskAccess,
                          timeout: Double) throws(DiskTargetError) -> DiskReport {
        let features = try NBDProbe.handshake(address, timeout: timeout)
        if access.writable && features.readOnly { throw .readOnly(what: "NBD export \(address.normalized)") }
        return DiskReport(target: self, kind: .nbd, resolvedPath: nil, device: nil, backingFile: nil,
                          geometry: NBDStorage.geometry(for: features, readOnly: !access.writable), directIO: nil,
                          identities: DiskIdentity.keys(of: self), mounts: [])
    }

    /// Opens the image and reads its header: read-write when it is not a
    /// snapshot, since librbd tells a lock's holders only to a handle that
    /// could write (opening takes no lock and writes nothing), read-only if
    /// the user may not write; then the holders are unknown.
    private func probeRBD(_ address: RBDImageAddress, _ access: DiskAccess,
                          timeout: Double) throws(DiskTargetError) -> DiskReport {
        if access.writable && address.snapshot != nil { throw .readOnly(what: "RBD snapshot \(address.normalized)") }
        let seconds = Int(timeout.rounded(.up))
        let storage: RBDStorage
        do {
            if address.snapshot == nil, let writable = try? RBDStorage.open(address, readOnly: false, queueDepth: 1,
                                                                               timeoutSeconds: seconds) {
                storage = writable
            } else {
                storage = try RBDStorage.open(address, readOnly: true, queueDepth: 1, timeoutSeconds: seconds)
            }
        } catch {
            throw .rbdUnavailable(image: address.normalized, detail: error.detail ?? error.description)
        }
        defer { storage.close() }
        if access.writable && storage.geometry.readOnly { throw .readOnly(what: "RBD image \(address.normalized) for this user") }
        var geometry = storage.geometry
        geometry.readOnly = !access.writable
        geometry.discard = access.writable ? RBDStorage.discardSupport(objectSize: storage.objectSize) : nil
        var report = DiskReport(target: self, kind: .rbd, resolvedPath: nil, device: nil, backingFile: nil,
                                geometry: geometry, directIO: nil, identities: DiskIdentity.keys(of: self), mounts: [])
        let owners = storage.geometry.readOnly ? nil : try? storage.lockOwners()
        report.rbd = .init(features: storage.featureNames, objectSize: storage.objectSize, lockOwners: owners)
        return report
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
