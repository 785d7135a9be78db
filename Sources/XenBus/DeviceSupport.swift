import Hypervisor
import XenABI
import Logging

/// Why a backend device cannot work: the message goes to the log and to the
/// device's `error` node, and the device is closed.
public struct DeviceFailure: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Lets a data-plane thread name its device in a task posted to the control
/// loop, without keeping the device alive.
public final class WeakDevice<Device: AnyObject>: @unchecked Sendable {   // only dereferenced on the control loop thread
    public weak var value: Device?
    public init(_ device: Device) { value = device }
}

public extension XenStore {
    /// The backend's `frontend` key, checked as every backend must: present,
    /// under the frontend domain's own `device/` directory, no `..`, and
    /// `frontend-id` (if given) naming the domain of the device's path.
    func readFrontendPath(backendPath: String, address: BackendDeviceAddress) throws -> String {
        guard let fe = try read(backendPath + "/frontend"), !fe.isEmpty else {
            throw DeviceFailure("missing frontend key")
        }
        let expectedPrefix = XenbusPaths.domainPath(address.frontendDomain) + "/device/"
        guard fe.hasPrefix(expectedPrefix), !fe.contains("..") else {
            throw DeviceFailure("frontend path \(GuestText.quoted(fe)) is not under \(expectedPrefix)")
        }
        if let fid = try read(backendPath + "/frontend-id"),
           XenStoreNumber.parse(fid, as: DomID.self) != address.frontendDomain {
            throw DeviceFailure("frontend-id \(GuestText.quoted(fid)) does not match the device path")
        }
        return fe
    }
}

public extension XenStore {
    /// A number key (`ring-ref`, `event-channel`, `mtu`...): nil when
    /// absent; anything but plain decimal digits in the type's range
    /// (`XenStoreNumber`) refuses the device, the value escaped in the reason.
    func readNumber<T: FixedWidthInteger & UnsignedInteger>(_ directory: String, _ key: String, as type: T.Type = T.self) throws -> T? {
        guard let text = try read(directory + "/" + key) else { return nil }
        guard let n = XenStoreNumber.parse(text, as: T.self) else {
            throw DeviceFailure("malformed \(key) \(GuestText.quoted(text))")
        }
        return n
    }

    /// A feature flag (`feature-sg`, `request-rx-copy`...): `default` when
    /// absent; "0" or "1", anything else refuses the device.
    func readFlag(_ directory: String, _ key: String, default value: Bool) throws -> Bool {
        guard let text = try read(directory + "/" + key) else { return value }
        switch text {
        case "1": return true
        case "0": return false
        default: throw DeviceFailure("\(key) \(GuestText.quoted(text)) is neither 0 nor 1")
        }
    }
}

/// What a backend service runs for each device it finds.
public protocol BackendDevice: AnyObject {
    var address: BackendDeviceAddress { get }
    /// The device appeared: read the toolstack's keys, offer the device.
    func probe()
    /// The device's directory is gone (or the service ends): free everything.
    func teardown()
    /// The daemon stops: stop serving, leave xenstore as it is.
    func quiesce()
    /// The device cannot work: log, `error` node, Closed. Not `permanent`:
    /// the frontend starting over gets the device again.
    func fail(_ message: String, permanent: Bool)
}

public extension BackendDevice {
    /// Runs one step of the handshake; what it throws closes the device
    /// (a `DeviceFailure`'s message as it is, anything else after `what`).
    func failing(_ what: String, permanent: Bool = false, _ step: () throws -> Void) {
        do { try step() } catch let e as DeviceFailure {
            fail(e.message, permanent: permanent)
        } catch {
            fail("\(what) failed: \(error)", permanent: permanent)
        }
    }
}

public extension XenStore {
    /// The frontend's `state` for `FrontendStateReaction`: nil when the
    /// node is gone; a value that is not a state in plain decimal is
    /// logged and counts as gone (Closed), as Linux's xenbus takes it.
    func readFrontendState(_ frontendPath: String, logger: Logger) -> XenbusState? {
        guard let text = (try? read(frontendPath + "/state")) ?? nil else { return nil }
        guard let n = XenStoreNumber.parse(text, as: UInt32.self), let state = XenbusState(rawValue: n) else {
            logger.warning("frontend state refused, counted as Closed", metadata: [
                "state": "\(GuestText.quoted(text))", "reason": "not a xenbus state in decimal"])
            return nil
        }
        return state
    }

    /// Removes `path` if it exists (xenstored answers ENOENT otherwise).
    func removeIfPresent(_ path: String) throws(XenStoreError) {
        if try read(path) != nil { try remove(path) }
    }
}

/// The devices of one backend type: created and probed as the toolstack
/// adds them, torn down as it removes them (a `BackendDeviceWatcher`).
/// Confined to the control loop's thread, like the devices.
public final class BackendDeviceTable<Device: BackendDevice>: @unchecked Sendable {   // confined to the control loop thread
    private let make: (BackendDeviceAddress) -> Device
    private let logger: Logger
    private var devices: [BackendDeviceAddress: Device] = [:]
    private var watcher: BackendDeviceWatcher?

    public init(logger: Logger, make: @escaping (BackendDeviceAddress) -> Device) {
        self.logger = logger
        self.make = make
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist. Call on the control loop thread or before it runs.
    public func start(loop: XenbusControlLoop, backendDomain: DomID, type: String) throws(XenStoreError) {
        let w = BackendDeviceWatcher(loop: loop, backendDomain: backendDomain, type: type, logger: logger,
                                     appeared: { [weak self] in self?.add($0) }, removed: { [weak self] in self?.remove($0) })
        watcher = w
        try w.start()
    }

    /// Every device, in (domain, devid) order.
    public var all: [Device] {
        devices.values.sorted { ($0.address.frontendDomain, $0.address.devid) < ($1.address.frontendDomain, $1.address.devid) }
    }

    public func quiesceAll() { for d in devices.values { d.quiesce() } }

    public func teardownAll() {
        for d in devices.values { d.teardown() }
        devices.removeAll()
    }

    private func add(_ address: BackendDeviceAddress) {
        let device = make(address)
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
