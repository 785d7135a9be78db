import Hypervisor
import Logging
import XenABI
import XenBus

/// Tunables of the block backend.
public struct BlockBackendOptions: Sendable {
    /// See VbdRingConfiguration.pollMicroseconds.
    public var pollMicroseconds: Int
    /// Offer feature-persistent (keep a frontend's reused pages mapped).
    public var persistentGrants: Bool
    public init(pollMicroseconds: Int = 50, persistentGrants: Bool = true) {
        self.pollMicroseconds = pollMicroseconds
        self.persistentGrants = persistentGrants
    }
}

/// The vbd driver: discovers devices under /local/domain/<own>/backend/vbd
/// as the toolstack creates and removes them, and runs one VbdDevice each.
/// Everything here runs on the control loop's thread.
public final class BlockBackendService: @unchecked Sendable {   // confined to the control loop thread
    public static let deviceType = "vbd"
    private let platform: any HypervisorPlatform
    private let loop: XenbusControlLoop
    private let openStorage: StorageOpener
    private let options: BlockBackendOptions
    private let logger: Logger
    private let root: String
    private var devices: [BackendDeviceAddress: VbdDevice] = [:]
    private var watchToken: String?

    public init(platform: any HypervisorPlatform, loop: XenbusControlLoop, openStorage: @escaping StorageOpener,
                options: BlockBackendOptions = .init(), logger: Logger) {
        self.platform = platform
        self.options = options
        self.loop = loop
        self.openStorage = openStorage
        self.logger = logger
        root = XenbusPaths.backendRoot(backendDomain: platform.ownDomain, type: Self.deviceType)
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist. Call on the control loop thread or before it runs.
    public func start() throws(XenStoreError) {
        watchToken = try loop.watch(root) { [weak self] event in self?.backendTreeChanged(event.path) }
    }

    /// Answers every request in flight on every ring and stops the data
    /// planes, leaving xenstore as it is (a restarted daemon resumes).
    public func quiesce() {
        for d in devices.values { d.quiesce() }
    }

    public var status: [VbdStatus] {
        devices.values.map(\.status).sorted { ($0.address.frontendDomain, $0.address.devid) < ($1.address.frontendDomain, $1.address.devid) }
    }

    private func backendTreeChanged(_ path: String) {
        if let address = BackendDeviceAddress.parse(path: path, root: root, type: Self.deviceType) {
            reconcile(address)
        } else {
            rescan()
        }
    }

    /// Full scan: the initial firing, or a change at the domain level.
    private func rescan() {
        var present: Set<BackendDeviceAddress> = []
        for domain in (try? loop.store.directory(root)) ?? nil ?? [] {
            guard let d = DomID(domain) else { continue }
            for dev in (try? loop.store.directory(root + "/\(domain)")) ?? nil ?? [] {
                guard let v = UInt32(dev) else { continue }
                present.insert(BackendDeviceAddress(type: Self.deviceType, frontendDomain: d, devid: v))
            }
        }
        for a in present { reconcile(a) }
        for a in devices.keys where !present.contains(a) { reconcile(a) }
    }

    /// Creates or removes the device at `address` to match xenstore.
    private func reconcile(_ address: BackendDeviceAddress) {
        let path = address.backendPath(backendDomain: platform.ownDomain)
        let exists = ((try? loop.store.read(path + "/frontend")) ?? nil) != nil
        if exists, devices[address] == nil {
            let device = VbdDevice(address: address, platform: platform, loop: loop, openStorage: openStorage,
                                   options: options, logger: logger)
            devices[address] = device
            logger.info("device appeared", metadata: ["device": "\(address)"])
            device.probe()
        } else if !exists, let device = devices.removeValue(forKey: address) {
            logger.info("device removed", metadata: ["device": "\(address)"])
            device.teardown()
        }
    }
}
