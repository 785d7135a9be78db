import Glibc
import Hypervisor
import LibXenStore
import SystemSupport

/// The loopback hypervisor as a backend platform: dom0's grant table and
/// event channels over the shared files under `layout.root`, and xenstore
/// through Xen's own libxenstore pointed at the loopback xenstored.
public final class LoopbackPlatform: HypervisorPlatform, @unchecked Sendable {   // immutable
    public let layout: LoopbackLayout
    public let ownDomain: DomID
    public var name: String { "loopback" }

    /// The xenstored this platform's backend talks to.
    public let xenStoreSocket: String

    /// `xenStoreSocket`: another xenstored than the loopback one under `root`.
    public init(root: String, ownDomain: DomID = 0, xenStoreSocket: String? = nil) throws(HypervisorError) {
        layout = LoopbackLayout(root: root)
        self.ownDomain = ownDomain
        self.xenStoreSocket = xenStoreSocket ?? layout.xenStoreSocket
        do {
            try makeDirectories(layout.domainDirectory(ownDomain), mode: 0o700)
        } catch {
            throw HypervisorError("create loopback root", errno: error.code, detail: error.call)
        }
        _ = try EventChannelTable(path: layout.eventChannels(ownDomain), create: true)
    }

    public func openGrantTable() throws(HypervisorError) -> any GrantTableHandle {
        LoopbackGrantTable(layout: layout, ownDomain: ownDomain)
    }

    public func openEventChannels() throws(HypervisorError) -> any EventChannelHandle {
        try LoopbackEventChannels(layout: layout, domain: ownDomain)
    }

    public func openXenStore() throws(XenStoreError) -> any XenStore {
        try LibXenStoreConnection(socketPath: xenStoreSocket)
    }
}
