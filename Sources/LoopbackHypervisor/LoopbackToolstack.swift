import Hypervisor

/// Plays libxl's part on the loopback hypervisor: writes the xenstore keys
/// and permissions libxl writes for a domain and its devices (as recorded
/// from Xen 4.17 in shared/xenlab), so the backend sees what it would see
/// under `xl create`.
public struct LoopbackToolstack: Sendable {
    public let store: any XenStore
    public let backendDomain: DomID

    public init(store: any XenStore, backendDomain: DomID = 0) {
        self.store = store
        self.backendDomain = backendDomain
    }

    public static func domainPath(_ d: DomID) -> String { "/local/domain/\(d)" }

    /// The domain's home directory, readable by the domain itself.
    public func createDomain(_ d: DomID, name: String) throws(XenStoreError) {
        let home = Self.domainPath(d)
        try store.withTransaction { t throws(XenStoreError) in
            try store.mkdir(home, transaction: t)
            try store.setPermissions(home, [.init(domain: 0, access: .none), .init(domain: UInt32(d), access: .read)], transaction: t)
            try store.write(home + "/name", name, transaction: t)
            try store.write(home + "/domid", String(d), transaction: t)
            try store.mkdir(home + "/device", transaction: t)
            try store.setPermissions(home + "/device", [.init(domain: UInt32(d), access: .none), .init(domain: 0, access: .read)], transaction: t)
        }
    }

    public func destroyDomain(_ d: DomID) throws(XenStoreError) {
        try store.remove(Self.domainPath(backendDomain) + "/backend/vbd/\(d)")
        try store.remove(Self.domainPath(backendDomain) + "/backend/vif/\(d)")
        try store.remove(Self.domainPath(d))
    }

    public struct Disk: Sendable {
        public var devid: UInt32
        public var vdev: String
        public var params: String
        public var readOnly: Bool
        public var script: String?
        /// `discard-enable` (xl's `discard`/`no-discard`).
        public var discard: Bool
        /// `type`: libxl writes `phy`.
        public var type: String
        public init(devid: UInt32 = 51712, vdev: String = "xvda", params: String, readOnly: Bool = false, script: String? = nil,
                    discard: Bool = true, type: String = "phy") {
            self.devid = devid; self.vdev = vdev; self.params = params; self.readOnly = readOnly; self.script = script
            self.discard = discard; self.type = type
        }
    }

    public func backendPath(domain d: DomID, devid: UInt32) -> String {
        Self.domainPath(backendDomain) + "/backend/vbd/\(d)/\(devid)"
    }

    public func frontendPath(domain d: DomID, devid: UInt32) -> String {
        Self.domainPath(d) + "/device/vbd/\(devid)"
    }

    /// Adds a vbd the way libxl does: the backend directory (owned by the
    /// backend domain, readable by the guest) and the frontend directory
    /// (owned by the guest, readable by the backend), both in state 1.
    public func addDisk(domain d: DomID, _ disk: Disk) throws(XenStoreError) {
        let be = backendPath(domain: d, devid: disk.devid)
        let fe = frontendPath(domain: d, devid: disk.devid)
        let bePerms: [XenStorePermission] = [.init(domain: UInt32(backendDomain), access: .none), .init(domain: UInt32(d), access: .read)]
        let fePerms: [XenStorePermission] = [.init(domain: UInt32(d), access: .none), .init(domain: UInt32(backendDomain), access: .read)]
        var backendKeys: [(String, String)] = [
            ("bootable", "1"), ("dev", disk.vdev), ("device-type", "disk"), ("discard-enable", disk.discard ? "1" : "0"),
            ("frontend", fe), ("frontend-id", String(d)), ("mode", disk.readOnly ? "r" : "w"), ("online", "1"),
            ("params", disk.params), ("removable", "0"), ("specification", "xen"), ("state", "1"), ("type", disk.type),
        ]
        if let s = disk.script { backendKeys.append(("script", s)) }
        let frontendKeys: [(String, String)] = [
            ("backend", be), ("backend-id", String(backendDomain)), ("device-type", "disk"),
            ("virtual-device", String(disk.devid)), ("state", "1"), ("trusted", "1"),
        ]
        try store.withTransaction { t throws(XenStoreError) in
            try store.mkdir(fe, transaction: t)
            try store.setPermissions(fe, fePerms, transaction: t)
            for (k, v) in frontendKeys {
                try store.write(fe + "/" + k, v, transaction: t)
                try store.setPermissions(fe + "/" + k, fePerms, transaction: t)
            }
            try store.mkdir(be, transaction: t)
            try store.setPermissions(be, bePerms, transaction: t)
            for (k, v) in backendKeys {
                try store.write(be + "/" + k, v, transaction: t)
                try store.setPermissions(be + "/" + k, bePerms, transaction: t)
            }
        }
    }

    /// Removes a vbd as `xl block-detach` finally does: both directories.
    public func removeDisk(domain d: DomID, devid: UInt32) throws(XenStoreError) {
        try store.remove(backendPath(domain: d, devid: devid))
        try store.remove(frontendPath(domain: d, devid: devid))
    }
}
