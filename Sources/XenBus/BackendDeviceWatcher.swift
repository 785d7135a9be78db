import Hypervisor

/// Finds the devices of one type under /local/domain/<backend>/backend/<type>
/// as the toolstack creates and removes them: a device exists while its
/// `frontend` key does. Each backend service (vbd, vif) runs one. Runs on
/// the control loop's thread.
public final class BackendDeviceWatcher: @unchecked Sendable {   // confined to the control loop thread
    public let type: String
    public let root: String
    private let loop: XenbusControlLoop
    private let appeared: (BackendDeviceAddress) -> Void
    private let removed: (BackendDeviceAddress) -> Void
    private var known: Set<BackendDeviceAddress> = []
    private var token: String?

    public init(loop: XenbusControlLoop, backendDomain: DomID, type: String,
                appeared: @escaping (BackendDeviceAddress) -> Void, removed: @escaping (BackendDeviceAddress) -> Void) {
        self.loop = loop
        self.type = type
        self.root = XenbusPaths.backendRoot(backendDomain: backendDomain, type: type)
        self.appeared = appeared
        self.removed = removed
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist.
    public func start() throws(XenStoreError) {
        token = try loop.watch(root) { [weak self] event in self?.changed(event.path) }
    }

    private func changed(_ path: String) {
        if let address = BackendDeviceAddress.parse(path: path, root: root, type: type) {
            reconcile(address)
        } else {
            rescan()
        }
    }

    /// Full scan: the initial firing, or a change at the domain level.
    private func rescan() {
        var present: Set<BackendDeviceAddress> = []
        for domain in (try? loop.store.directory(root)) ?? nil ?? [] {
            guard let d = XenStoreNumber.parse(domain, as: DomID.self) else { continue }
            for dev in (try? loop.store.directory(root + "/\(domain)")) ?? nil ?? [] {
                guard let v = XenStoreNumber.parse(dev, as: UInt32.self) else { continue }
                present.insert(BackendDeviceAddress(type: type, frontendDomain: d, devid: v))
            }
        }
        for a in present { reconcile(a) }
        for a in known where !present.contains(a) { reconcile(a) }
    }

    private func reconcile(_ address: BackendDeviceAddress) {
        let path = root + "/\(address.frontendDomain)/\(address.devid)"
        let exists = ((try? loop.store.read(path + "/frontend")) ?? nil) != nil
        if exists, !known.contains(address) {
            known.insert(address)
            appeared(address)
        } else if !exists, known.remove(address) != nil {
            removed(address)
        }
    }
}
