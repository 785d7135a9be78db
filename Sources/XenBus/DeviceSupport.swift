import Hypervisor

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
            throw DeviceFailure("frontend path \(fe) is not under \(expectedPrefix)")
        }
        if let fid = try read(backendPath + "/frontend-id"), DomID(fid) != address.frontendDomain {
            throw DeviceFailure("frontend-id \(fid) does not match the device path")
        }
        return fe
    }
}
