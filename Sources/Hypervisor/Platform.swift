/// A hypervisor a backend can run on: real Xen, or the loopback hypervisor.
/// Each data-plane thread opens its own grant and event channel handles.
public protocol HypervisorPlatform: AnyObject, Sendable {
    var name: String { get }
    /// The domain this process serves from (0 for dom0).
    var ownDomain: DomID { get }
    func openGrantTable() throws(HypervisorError) -> any GrantTableHandle
    func openEventChannels() throws(HypervisorError) -> any EventChannelHandle
    func openXenStore() throws(XenStoreError) -> any XenStore
}
