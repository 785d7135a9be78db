import Hypervisor

/// Where the loopback hypervisor keeps each domain's shared structures,
/// under one root folder (docs/loopback-hypervisor.md is the specification).
public struct LoopbackLayout: Sendable {
    public let root: String
    public init(root: String) { self.root = root }

    public var xenStoreSocket: String { root + "/xenstored.sock" }
    /// Folder of per-domain xenstore sockets (a guest connects as itself there).
    public var xenStoreDomainSockets: String { root + "/xenstore" }
    /// The socket a guest connects to as itself (LoopbackXenStoreServer's naming).
    public func xenStoreDomainSocket(_ d: DomID) -> String { xenStoreDomainSockets + "/domain-\(d).sock" }
    public func domainDirectory(_ d: DomID) -> String { root + "/dom\(d)" }
    /// The domain's memory: page N of the guest is bytes N*4096 ..< (N+1)*4096.
    public func memory(_ d: DomID) -> String { domainDirectory(d) + "/memory" }
    /// The domain's grant table: an array of grant_entry_v1.
    public func grantTable(_ d: DomID) -> String { domainDirectory(d) + "/grant-table" }
    /// The domain's event channel port table.
    public func eventChannels(_ d: DomID) -> String { domainDirectory(d) + "/event-channels" }
    /// The FIFO through which pending ports reach one open event channel handle.
    public func eventChannelFIFO(_ d: DomID, handle: UInt32) -> String {
        domainDirectory(d) + "/evtchn-\(handle).fifo"
    }
}
