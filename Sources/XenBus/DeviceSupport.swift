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
/// adds them, removed as it takes them away (a `BackendDeviceWatcher`).
/// A device whose directory comes back while the old one is still being
/// released is probed once the release ends (a TAP's name, a disk's lock
/// are free again by then). Confined to the control loop's thread.
public final class XenbusDeviceTable<Driver: XenbusDriver>: @unchecked Sendable {   // confined to the control loop thread
    public typealias Device = XenbusDevice<Driver>
    private let loop: XenbusControlLoop
    private let backendDomain: DomID
    private let type: String
    private let makeDriver: (BackendDeviceAddress, Logger) -> Driver
    private let logger: Logger
    private var devices: [BackendDeviceAddress: Device] = [:]
    /// Devices being released, and whether their directory came back since.
    private var releasing: [BackendDeviceAddress: Bool] = [:]
    private var watcher: BackendDeviceWatcher?

    public init(loop: XenbusControlLoop, backendDomain: DomID, type: String, logger: Logger,
                makeDriver: @escaping (BackendDeviceAddress, Logger) -> Driver) {
        self.loop = loop
        self.backendDomain = backendDomain
        self.type = type
        self.logger = logger
        self.makeDriver = makeDriver
    }

    /// Starts watching; the watch's initial firing finds devices that
    /// already exist. Call on the control loop thread or before it runs.
    public func start() throws(XenStoreError) {
        let w = BackendDeviceWatcher(loop: loop, backendDomain: backendDomain, type: type, logger: logger,
                                     appeared: { [weak self] in self?.add($0) }, removed: { [weak self] in self?.remove($0) })
        watcher = w
        try w.start()
    }

    /// Every device, in (domain, devid) order.
    public var all: [Device] {
        devices.values.sorted { ($0.address.frontendDomain, $0.address.devid) < ($1.address.frontendDomain, $1.address.devid) }
    }

    /// Daemon stop: every data plane stopped after answering what is in
    /// flight (side by side, on the workers), xenstore left as it is so
    /// that a restarted daemon resumes.
    public func quiesceAll() { shutdownAll(release: false) }

    /// Daemon exit that takes everything down (resources released too).
    public func teardownAll() {
        shutdownAll(release: true)
        devices.removeAll()
    }

    private func shutdownAll(release: Bool) {
        for d in devices.values { d.beginQuiesce() }
        // Jobs in flight end and report (their reports only record now).
        loop.jobs.waitUntilIdle()
        loop.runPostedTasks()
        let stops = devices.values.compactMap { $0.takeForShutdown(release: release) }.map(Unchecked.init)
        for stop in stops {
            do { try loop.jobs.submit { stop.value() } } catch { stop.value() }
        }
        loop.jobs.waitUntilIdle()
    }

    private func add(_ address: BackendDeviceAddress) {
        if releasing[address] != nil {
            releasing[address] = true   // probed once the old one is released
            return
        }
        var l = logger
        l[metadataKey: "device"] = "\(address)"
        let device = Device(address: address, backendDomain: backendDomain, driver: makeDriver(address, l), loop: loop, logger: l)
        devices[address] = device
        logger.info("device appeared", metadata: ["device": "\(address)"])
        device.probe()
    }

    private func remove(_ address: BackendDeviceAddress) {
        guard let device = devices.removeValue(forKey: address) else {
            if releasing[address] != nil { releasing[address] = false }   // came back and went again
            return
        }
        logger.info("device removed", metadata: ["device": "\(address)"])
        releasing[address] = false
        device.remove { [weak self] in
            guard let self, let cameBack = self.releasing.removeValue(forKey: address) else { return }
            if cameBack { self.add(address) }
        }
    }
}
