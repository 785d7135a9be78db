import Glibc
import Hypervisor
import LibXenStore

/// Real Xen as a backend platform: grant tables over libxengnttab
/// (/dev/xen/gntdev), event channels over libxenevtchn (/dev/xen/evtchn),
/// xenstore over libxenstore's default connection (xenstored's socket, or
/// /dev/xen/xenbus). Runs in dom0 (or a driver domain) as root.
public final class XenHypervisorPlatform: HypervisorPlatform {
    public let ownDomain: DomID
    public var name: String { "xen" }

    public static let grantDevice = "/dev/xen/gntdev"
    public static let eventChannelDevice = "/dev/xen/evtchn"
    /// Where libxenstore's xs_open(0) looks, in its order (XENSTORED_PATH overrides all).
    public static let xenStorePaths = ["/run/xenstored/socket", "/var/run/xenstored/socket",
                                       "/dev/xen/xenbus", "/proc/xen/xenbus"]

    /// Checks, before anything is opened, that this is a Xen domain with the
    /// devices a backend needs; throws one error naming everything missing.
    /// `ownDomain` is the domain this process runs in (0: dom0).
    public init(ownDomain: DomID = 0) throws(HypervisorError) {
        if let problem = Self.missingFacilities(
            exists: { access($0, F_OK) == 0 },
            accessible: { access($0, R_OK | W_OK) == 0 },
            xenStoredPath: getenv("XENSTORED_PATH").map { String(cString: $0) }) {
            throw HypervisorError("open the Xen platform", errno: problem.errno, detail: problem.message)
        }
        self.ownDomain = ownDomain
    }

    /// What keeps this machine from serving as a Xen backend, as one
    /// message, or nil when nothing does. Pure (the file checks are passed
    /// in) so that it can be tested on any machine.
    static func missingFacilities(exists: (String) -> Bool, accessible: (String) -> Bool,
                                  xenStoredPath: String?) -> (errno: Int32, message: String)? {
        guard exists("/dev/xen") else {
            return (ENOENT, "\(grantDevice) is missing, as is all of /dev/xen: this is not a Xen dom0; use --platform loopback")
        }
        var missing: [String] = []
        for device in [grantDevice, eventChannelDevice] where !exists(device) { missing.append(device) }
        if !missing.isEmpty {
            let what = missing.joined(separator: " and ") + (missing.count == 1 ? " is missing" : " are missing")
            return (ENOENT, "\(what): this is not a Xen dom0, or xen-gntdev/xen-evtchn are not loaded (modprobe xen-gntdev xen-evtchn); use --platform loopback")
        }
        let xenStoreFound = if let xenStoredPath { exists(xenStoredPath) } else { xenStorePaths.contains(where: exists) }
        if !xenStoreFound {
            let looked = xenStoredPath.map { "XENSTORED_PATH=\($0)" } ?? xenStorePaths.joined(separator: ", ")
            return (ENOENT, "no xenstore (none of \(looked) exists): is xenstored running? (/etc/init.d/xen start)")
        }
        let denied = [grantDevice, eventChannelDevice].filter { !accessible($0) }
        if !denied.isEmpty {
            return (EACCES, denied.joined(separator: " and ") + " cannot be opened for reading and writing: run as root")
        }
        return nil
    }

    public func openGrantTable() throws(HypervisorError) -> any GrantTableHandle {
        try XenGrantTable()
    }

    public func openEventChannels() throws(HypervisorError) -> any EventChannelHandle {
        try XenEventChannels()
    }

    public func openXenStore() throws(XenStoreError) -> any XenStore {
        try LibXenStoreConnection(socketPath: nil)
    }
}
