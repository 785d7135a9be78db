import Hypervisor
import Logging
import Synchronization

/// What one device type (vbd, vif) supplies to the xenbus framework
/// (`XenbusDevice`): its own keys, the thing it serves, and its data plane.
/// The framework owns everything else: the watches, the state machine, the
/// hotplug gate, `online`, errors and teardown.
///
/// Threads: methods marked "control" run on the control loop's thread;
/// "worker" ones on a worker (`XenbusWorkers`), never two at once for one
/// device, and never while a control method of the same device runs. A
/// driver's own mutable state is touched by control methods only; worker
/// methods work on their arguments and on what `readToolstackKeys` read.
/// (`SendableMetatype`: a job that calls the driver runs on a worker.)
public protocol XenbusDriver: AnyObject, SendableMetatype {
    /// What the device serves: an open disk, a TAP.
    associatedtype Resource
    /// A running data plane.
    associatedtype Connection

    /// blkfront publishes its ring at Initialised; netfront only at
    /// Connected (Linux netback waits for it too).
    var connectsAtInitialised: Bool { get }
    /// The resource is opened before InitWait (a TAP, which the vif hotplug
    /// script expects to exist) rather than once hotplug is done (a disk the
    /// block script prepares).
    var opensBeforeInitWait: Bool { get }
    /// A close also lets the resource go (a disk: a migrating guest's
    /// destination opens it next); else it lives until the device goes.
    var releasesOnClose: Bool { get }

    /// Control. The toolstack's keys; a throw fails the device for good.
    func readToolstackKeys(_ device: XenbusDeviceContext) throws
    /// Control. Keys written before every InitWait (nil: removed).
    func offerKeys(_ device: XenbusDeviceContext) -> [(key: String, value: String?)]
    /// Worker. Opens the resource; `resuming`: a previous daemon's
    /// connection goes on (a TAP is plumbed again, say).
    func open(_ device: XenbusDeviceContext, resuming: Bool) throws -> Resource
    /// Worker. Reads the frontend's keys, maps and starts the data plane.
    /// Returns the keys to publish with Connected, in one transaction
    /// (ignored when `resuming`: the guest must see a pause, not a reconnect).
    func connect(_ device: XenbusDeviceContext, resource: Resource, resuming: Bool) throws
        -> (connection: Connection, keys: [(key: String, value: String)])
    /// Worker. Stops serving: every request in flight answered, rings
    /// unmapped, event channels unbound.
    func disconnect(_ device: XenbusDeviceContext, resource: Resource, connection: Connection)
    /// Worker. Lets the resource go; `flush`: what the guest wrote reaches
    /// the disk first.
    func close(_ device: XenbusDeviceContext, resource: Resource, flush: Bool)
    /// Control. A connection ended (its statistics become history).
    func retired(_ connection: Connection)
    /// The frontend may change settings under a connection (Reconfiguring,
    /// as netfront for XDP); false: Reconfiguring is ignored, as blkback does.
    var reconfigures: Bool { get }
    /// Control. The frontend went Reconfiguring, or changed one of
    /// `reconfiguringKeys` under a connection: read what it changed and
    /// apply it to the running connection. A throw fails the device.
    func reconfigure(_ device: XenbusDeviceContext, connection: Connection) throws
    /// Frontend keys watched while connected: Linux netfront switches to
    /// Reconfiguring before it writes `xdp-headroom`, so the key may change
    /// after the state did.
    var reconfiguringKeys: [String] { get }
}

public extension XenbusDriver {
    func retired(_ connection: Connection) {}
    var reconfigures: Bool { false }
    func reconfigure(_ device: XenbusDeviceContext, connection: Connection) throws {}
    var reconfiguringKeys: [String] { [] }
}

/// What a driver learns about its device from the framework.
public struct XenbusDeviceContext: @unchecked Sendable {   // the store is thread-safe; the rest is immutable
    public let address: BackendDeviceAddress
    public let backendPath: String
    /// The toolstack's `frontend` key, checked (`readFrontendPath`).
    public let frontendPath: String
    public let store: any XenStore
    public let logger: Logger
    /// The toolstack gave a hotplug `script`.
    public let hasScript: Bool
    /// Runs `task` on the control loop's thread (a data plane's or a
    /// storage's report).
    public let post: @Sendable (@escaping @Sendable () -> Void) -> Void
    /// Fails the device from any thread (a data plane that found the guest
    /// broken): posted to the control loop.
    public let fail: @Sendable (String) -> Void
    /// True once the device is being removed or the daemon stops: a job
    /// that waits (a disk's writer lock) gives up instead of holding both.
    public let isAbandoned: @Sendable () -> Bool
}

/// Set once, read from any thread: a device's `isAbandoned`.
final class AbandonedFlag: Sendable {
    private let raised = Atomic<Bool>(false)
    func raise() { raised.store(true, ordering: .releasing) }
    var isRaised: Bool { raised.load(ordering: .acquiring) }
}
