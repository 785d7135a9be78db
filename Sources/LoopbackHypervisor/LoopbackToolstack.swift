import Glibc
import Hypervisor

/// Plays libxl's part on the loopback hypervisor: writes the xenstore keys
/// and permissions libxl writes for a domain and its devices (as recorded
/// from Xen 4.17 in shared/xenlab), so the backend sees what it would see
/// under `xl create`.
public struct LoopbackToolstack: Sendable {
    public let store: any XenStore
    public let backendDomain: DomID
    /// Where a transaction that was given up on is reported (stderr by default).
    public let log: @Sendable (String) -> Void
    /// How long a transaction that keeps ending in EAGAIN is tried again
    /// before the toolstack gives up (libxl retries without a bound; ours
    /// stops, with a log, so that a store that never lets it through fails).
    public var retrySeconds = 30.0

    public init(store: any XenStore, backendDomain: DomID = 0,
                log: @escaping @Sendable (String) -> Void = LoopbackToolstack.logToStandardError) {
        self.store = store
        self.backendDomain = backendDomain
        self.log = log
    }

    public static let logToStandardError: @Sendable (String) -> Void = { message in
        let line = "toolstack: " + message + "\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
    }

    public static func domainPath(_ d: DomID) -> String { "/local/domain/\(d)" }

    /// The domain's home directory, readable by the domain itself.
    public func createDomain(_ d: DomID, name: String) throws(XenStoreError) {
        let home = Self.domainPath(d)
        try retryingTransaction("create domain \(d)") { t throws(XenStoreError) in
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
        try writeDevice(domain: d, backend: be, backendKeys: backendKeys, frontend: fe, frontendKeys: frontendKeys)
    }

    /// Removes a vbd as `xl block-detach` finally does: both directories.
    public func removeDisk(domain d: DomID, devid: UInt32) throws(XenStoreError) {
        try store.remove(backendPath(domain: d, devid: devid))
        try store.remove(frontendPath(domain: d, devid: devid))
    }

    /// A vif as an `xl` vif line describes it.
    public struct Nic: Sendable {
        public var devid: UInt32
        /// The guest's MAC (the frontend's; the backend's TAP uses fe:ff:ff:ff:ff:ff).
        public var mac: String
        public var bridge: String?
        /// libxl's `script`; nil: xenbackd puts the vif on its bridge itself.
        public var script: String?
        public var mtu: Int?
        /// libxl's `rate` key, "bytes,usec".
        public var rate: String?
        /// Written last into the backend directory (tests: values no libxl would write).
        public var extraBackendKeys: [String: String]
        public init(devid: UInt32 = 0, mac: String = "00:16:3e:00:00:01", bridge: String? = "xenbr0",
                    script: String? = nil, mtu: Int? = nil, rate: String? = nil, extraBackendKeys: [String: String] = [:]) {
            self.devid = devid; self.mac = mac; self.bridge = bridge; self.script = script; self.mtu = mtu; self.rate = rate
            self.extraBackendKeys = extraBackendKeys
        }
    }

    public func nicBackendPath(domain d: DomID, devid: UInt32) -> String {
        Self.domainPath(backendDomain) + "/backend/vif/\(d)/\(devid)"
    }

    public func nicFrontendPath(domain d: DomID, devid: UInt32) -> String {
        Self.domainPath(d) + "/device/vif/\(devid)"
    }

    /// Adds a vif the way libxl does (the keys recorded in shared/xenlab).
    public func addNic(domain d: DomID, _ nic: Nic) throws(XenStoreError) {
        let be = nicBackendPath(domain: d, devid: nic.devid)
        let fe = nicFrontendPath(domain: d, devid: nic.devid)
        var backendKeys: [(String, String)] = [
            ("frontend", fe), ("frontend-id", String(d)), ("handle", String(nic.devid)), ("mac", nic.mac),
            ("online", "1"), ("state", "1"), ("type", "vif"),
        ]
        if let b = nic.bridge { backendKeys.append(("bridge", b)) }
        if let s = nic.script { backendKeys.append(("script", s)); backendKeys.append(("hotplug-status", "")) }
        if let m = nic.mtu { backendKeys.append(("mtu", String(m))) }
        if let r = nic.rate { backendKeys.append(("rate", r)) }
        for (k, v) in nic.extraBackendKeys.sorted(by: { $0.key < $1.key }) {
            backendKeys.removeAll { $0.0 == k }
            backendKeys.append((k, v))
        }
        let frontendKeys: [(String, String)] = [
            ("backend", be), ("backend-id", String(backendDomain)), ("handle", String(nic.devid)),
            ("mac", nic.mac), ("state", "1"), ("trusted", "1"),
        ]
        try writeDevice(domain: d, backend: be, backendKeys: backendKeys, frontend: fe, frontendKeys: frontendKeys)
    }

    /// Removes a vif as `xl network-detach` finally does.
    public func removeNic(domain d: DomID, devid: UInt32) throws(XenStoreError) {
        try store.remove(nicBackendPath(domain: d, devid: devid))
        try store.remove(nicFrontendPath(domain: d, devid: devid))
    }

    private func writeDevice(domain d: DomID, backend be: String, backendKeys: [(String, String)],
                             frontend fe: String, frontendKeys: [(String, String)]) throws(XenStoreError) {
        let bePerms: [XenStorePermission] = [.init(domain: UInt32(backendDomain), access: .none), .init(domain: UInt32(d), access: .read)]
        let fePerms: [XenStorePermission] = [.init(domain: UInt32(d), access: .none), .init(domain: UInt32(backendDomain), access: .read)]
        try retryingTransaction("add device \(be)") { t throws(XenStoreError) in
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
}
