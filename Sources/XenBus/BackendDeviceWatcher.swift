import Hypervisor
import Logging

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
    private let logger: Logger
    /// Directory names refused once (logged once, not at every rescan).
    private var refusedNames: Set<String> = []
    private var token: String?

    public init(loop: XenbusControlLoop, backendDomain: DomID, type: String, logger: Logger,
                appeared: @escaping (BackendDeviceAddress) -> Void, removed: @escaping (BackendDeviceAddress) -> Void) {
        self.loop = loop
        self.logger = logger
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
            guard let d = XenStoreNumber.parseName(domain, as: DomID.self) else { refuse(domain); continue }
            for dev in (try? loop.store.directory(root + "/\(domain)")) ?? nil ?? [] {
                guard let v = XenStoreNumber.parseName(dev, as: UInt32.self) else { refuse(domain + "/" + dev); continue }
                present.insert(BackendDeviceAddress(type: type, frontendDomain: d, devid: v))
            }
        }
        for a in present { reconcile(a) }
        for a in known where !present.contains(a) { reconcile(a) }
    }

    /// A directory that names no device (not a decimal domain id or devid):
    /// ignored, and said so once.
    private func refuse(_ name: String) {
        guard refusedNames.insert(name).inserted else { return }
        logger.warning("ignoring a directory that names no device", metadata: [
            "directory": "\(root)/\(GuestText.escaped(name))",
            "reason": "not <domain id>/<devid> in decimal"])
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
