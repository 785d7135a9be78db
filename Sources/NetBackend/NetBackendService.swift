import Glibc
import Hypervisor
import Logging
import NetworkPlumbing
import XenBus

/// Tunables of the net backend.
public struct NetBackendOptions: Sendable {
    /// See NetQueueConfiguration.rxStallMilliseconds.
    public var rxStallMilliseconds: Int
    /// `multi-queue-max-queues`: ring pairs (and threads) a vif may use.
    /// As netback: one per CPU, here at most 8.
    public var maxQueues: Int
    /// Where vifs' interfaces come from: real TAPs, or a double in tests.
    public var interfaces: any VifInterfaceFactory
    public init(rxStallMilliseconds: Int = 1000, maxQueues: Int = NetBackendOptions.onlineCPUs,
                interfaces: any VifInterfaceFactory = TapInterfaceFactory()) {
        self.rxStallMilliseconds = rxStallMilliseconds
        self.maxQueues = min(max(maxQueues, 1), 8)
        self.interfaces = interfaces
    }
    public static var onlineCPUs: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}

/// The vif backend: a `XenbusDeviceTable` of `VifDriver`s under
/// /local/domain/<own>/backend/vif. Devices' interfaces are created on the
/// framework's workers, in the daemon's network namespace.
public final class NetBackendService: @unchecked Sendable {   // confined to the control loop thread
    public static let deviceType = "vif"
    private let devices: XenbusDeviceTable<VifDriver>

    public init(platform: any HypervisorPlatform, loop: XenbusControlLoop, options: NetBackendOptions = .init(),
                logger: Logger) {
        devices = XenbusDeviceTable(loop: loop, backendDomain: platform.ownDomain, type: Self.deviceType,
                                    logger: logger) { [platform, options] address, _ in
            VifDriver(address: address, platform: platform, options: options)
        }
    }

    public func start() throws(XenStoreError) { try devices.start() }

    /// Stops every data plane, leaving xenstore as it is.
    public func quiesce() { devices.quiesceAll() }

    /// Stops everything and removes every interface (daemon exit).
    public func shutdown() { devices.teardownAll() }

    public var status: [VifStatus] { devices.all.map { $0.driver.status(of: $0) } }
}
