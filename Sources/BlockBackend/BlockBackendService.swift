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
    private var devices: [BackendDeviceAddress: VbdDevice] = [:]
    private var watcher: BackendDeviceWatcher?

    public init(platform: any HypervisorPlatform, loop: XenbusControlLoop, openStorage: @escaping StorageOpener,
                options: BlockBackendOptions = .init(), logger: Logger) {
        self.platform = platform
        self.options = options
        self.loop = loop
        self.openStorage = openStorage
        self.logger = logger
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist. Call on the control loop thread or before it runs.
    public func start() throws(XenStoreError) {
        let w = BackendDeviceWatcher(loop: loop, backendDomain: platform.ownDomain, type: Self.deviceType,
                                     appeared: { [weak self] in self?.add($0) }, removed: { [weak self] in self?.remove($0) })
        watcher = w
        try w.start()
    }

    /// Answers every request in flight on every ring and stops the data
    /// planes, leaving xenstore as it is (a restarted daemon resumes).
    public func quiesce() {
        for d in devices.values { d.quiesce() }
    }

    public var status: [VbdStatus] {
        devices.values.map(\.status).sorted { ($0.address.frontendDomain, $0.address.devid) < ($1.address.frontendDomain, $1.address.devid) }
    }

    private func add(_ address: BackendDeviceAddress) {
        let device = VbdDevice(address: address, platform: platform, loop: loop, openStorage: openStorage,
                               options: options, logger: logger)
        devices[address] = device
        logger.info("device appeared", metadata: ["device": "\(address)"])
        device.probe()
    }

    private func remove(_ address: BackendDeviceAddress) {
        guard let device = devices.removeValue(forKey: address) else { return }
        logger.info("device removed", metadata: ["device": "\(address)"])
        device.teardown()
    }
}
