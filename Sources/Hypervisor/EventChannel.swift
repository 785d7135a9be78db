/// One open of the event channel device (/dev/xen/evtchn on Xen). Ports bound
/// through a handle deliver to that handle's file descriptor. After a port
/// fires it stays masked until `unmask` is called, as with the Linux driver.
/// One handle is used by one thread at a time.
public protocol EventChannelHandle: AnyObject {
    /// Readable when at least one bound port is pending.
    var fileDescriptor: Int32 { get }
    /// Binds to the unbound port `remotePort` that `remoteDomain` allocated for us.
    func bindInterdomain(remoteDomain: DomID, remotePort: EventChannelPort) throws(HypervisorError) -> EventChannelPort
    func unbind(_ port: EventChannelPort) throws(HypervisorError)
    /// Signals the remote end of a bound local port.
    func notify(_ port: EventChannelPort) throws(HypervisorError)
    /// Returns the next pending port, or nil when none is pending (never blocks).
    func nextPending() throws(HypervisorError) -> EventChannelPort?
    func unmask(_ port: EventChannelPort) throws(HypervisorError)
    func close()
}
