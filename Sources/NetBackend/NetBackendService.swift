import Glibc
import Hypervisor
import Logging
import XenBus

/// Tunables of the net backend.
public struct NetBackendOptions: Sendable {
    /// See NetQueueConfiguration.rxStallMilliseconds.
    public var rxStallMilliseconds: Int
    /// `multi-queue-max-queues`: ring pairs (and threads) a vif may use.
    /// As netback: one per CPU, here at most 8.
    public var maxQueues: Int
    public init(rxStallMilliseconds: Int = 1000, maxQueues: Int = NetBackendOptions.onlineCPUs) {
        self.rxStallMilliseconds = rxStallMilliseconds
        self.maxQueues = min(max(maxQueues, 1), 8)
    }
    public static var onlineCPUs: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}

/// The vif driver: runs one VifDevice per device the toolstack creates
/// under backend/vif. Everything here runs on the control loop's thread,
/// so interfaces are created in that thread's network namespace.
public final class NetBackendService: @unchecked Sendable {   // confined to the control loop thread
    public static let deviceType = "vif"
    private let platform: any HypervisorPlatform
    private let loop: XenbusControlLoop
    private let options: NetBackendOptions
    private let logger: Logger
    private var devices: [BackendDeviceAddress: VifDevice] = [:]
    private var watcher: BackendDeviceWatcher?

    public init(platform: any HypervisorPlatform, loop: XenbusControlLoop, options: NetBackendOptions = .init(),
                logger: Logger) {
        self.platform = platform
        self.loop = loop
        self.options = options
        self.logger = logger
    }

    public func start() throws(XenStoreError) {
        let w = BackendDeviceWatcher(loop: loop, backendDomain: platform.ownDomain, type: Self.deviceType,
                                     appeared: { [weak self] in self?.add($0) }, removed: { [weak self] in self?.remove($0) })
        watcher = w
        try w.start()
    }

    /// Stops every data plane, leaving xenstore as it is.
    public func quiesce() {
        for d in devices.values { d.quiesce() }
    }

    /// Stops everything and removes every interface (daemon exit).
    public func shutdown() {
        for d in devices.values { d.teardown() }
        devices.removeAll()
    }

    public var status: [VifStatus] {
        devices.values.map(\.status).sorted { ($0.address.frontendDomain, $0.address.devid) < ($1.address.frontendDomain, $1.address.devid) }
    }

    private func add(_ address: BackendDeviceAddress) {
        let device = VifDevice(address: address, platform: platform, loop: loop, options: options, logger: logger)
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
