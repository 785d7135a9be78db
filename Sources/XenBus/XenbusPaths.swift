import Hypervisor
import XenABI

/// A backend device as xenstore names it: backend/<type>/<frontend domid>/<devid>.
public struct BackendDeviceAddress: Hashable, Sendable, CustomStringConvertible {
    public var type: String
    public var frontendDomain: DomID
    public var devid: UInt32
    public init(type: String, frontendDomain: DomID, devid: UInt32) {
        self.type = type; self.frontendDomain = frontendDomain; self.devid = devid
    }
    public var description: String { "\(type)-\(frontendDomain)-\(devid)" }

    /// The backend directory under `/local/domain/<backend>/backend`.
    public func backendPath(backendDomain: DomID) -> String {
        XenbusPaths.backendRoot(backendDomain: backendDomain, type: type) + "/\(frontendDomain)/\(devid)"
    }

    /// Parses the device a path under `root` (backend/<type>) belongs to:
    /// "<root>/5/51712/state" -> (5, 51712). Nil for the root itself, a
    /// domain directory, or anything malformed.
    public static func parse(path: String, root: String, type: String) -> BackendDeviceAddress? {
        guard path.hasPrefix(root + "/") else { return nil }
        let rest = path.dropFirst(root.count + 1).split(separator: "/", omittingEmptySubsequences: false)
        guard rest.count >= 2, let d = XenStoreNumber.parseName(rest[0], as: DomID.self),
              let v = XenStoreNumber.parseName(rest[1], as: UInt32.self) else { return nil }
        return BackendDeviceAddress(type: type, frontendDomain: d, devid: v)
    }
}

public enum XenbusPaths {
    public static func domainPath(_ d: DomID) -> String { "/local/domain/\(d)" }
    public static func backendRoot(backendDomain: DomID, type: String) -> String {
        domainPath(backendDomain) + "/backend/\(type)"
    }
}

public extension XenStore {
    /// Reads a xenbus `state` node; nil when missing or malformed (strictly
    /// decimal: " 4" or "4\n" is malformed).
    func readState(_ directory: String) -> XenbusState? {
        guard let s = try? read(directory + "/state"), let n = XenStoreNumber.parseName(s, as: UInt32.self) else { return nil }
        return XenbusState(rawValue: n)
    }

    func writeState(_ directory: String, _ state: XenbusState, transaction: XenStoreTransaction = .none) throws(XenStoreError) {
        try write(directory + "/state", state.xenstoreValue, transaction: transaction)
    }
}
