import Glibc
import Hypervisor
import SystemSupport

/// A `HypervisorPlatform` over in-memory guests and an in-memory xenstore,
/// for stepping the control plane (xenbus handshakes, connect, teardown)
/// with no hypervisor: grant tables are `InMemoryGrantTable`s, event
/// channels bind only to the ports a guest declared open and never fire.
/// It counts what is mapped and bound across every handle it opened, so a
/// test can require that a torn-down device left nothing behind.
public final class InMemoryPlatform: HypervisorPlatform, @unchecked Sendable {   // handles are used one thread at a time; the counters are locked
    public let name = "in-memory"
    public let ownDomain: DomID = 0
    private let store: InMemoryXenStore
    private let guests: [InMemoryGuest]
    private let openPorts: [DomID: Set<EventChannelPort>]
    private let lock = PThreadMutex()
    private var tables: [InMemoryGrantTable] = []
    private var boundPorts = 0

    public init(store: InMemoryXenStore, guests: [InMemoryGuest], openPorts: [DomID: Set<EventChannelPort>]) {
        self.store = store
        self.guests = guests
        self.openPorts = openPorts
    }

    public func openGrantTable() throws(HypervisorError) -> any GrantTableHandle {
        let t = InMemoryGrantTable(ownDomain: ownDomain, guests: guests)
        lock.withLock { tables.append(t) }
        return t
    }

    public func openEventChannels() throws(HypervisorError) -> any EventChannelHandle {
        InMemoryEventChannels(platform: self)
    }

    public func openXenStore() throws(XenStoreError) -> any XenStore { store }

    /// Pages mapped through any handle, not yet unmapped.
    public var mappedPages: Int { lock.withLock { tables.reduce(0) { $0 + $1.mappedPages } } }
    /// Ports bound through any handle, not yet unbound.
    public var portsBound: Int { lock.withLock { boundPorts } }

    fileprivate func bind(_ remoteDomain: DomID, _ remotePort: EventChannelPort) throws(HypervisorError) {
        guard openPorts[remoteDomain]?.contains(remotePort) == true else {
            throw HypervisorError("bind interdomain", errno: EINVAL, detail: "dom\(remoteDomain) port \(remotePort) is not open")
        }
        lock.withLock { boundPorts += 1 }
    }

    fileprivate func unbind() { lock.withLock { boundPorts -= 1 } }
}

/// Event channels that bind to declared ports and never fire (no descriptor:
/// a loop waiting on them waits on its other descriptors).
final class InMemoryEventChannels: EventChannelHandle {
    private let platform: InMemoryPlatform
    private var bound: Set<EventChannelPort> = []
    private var nextPort: EventChannelPort = 1
    init(platform: InMemoryPlatform) { self.platform = platform }

    var fileDescriptor: Int32 { -1 }

    func bindInterdomain(remoteDomain: DomID, remotePort: EventChannelPort) throws(HypervisorError) -> EventChannelPort {
        try platform.bind(remoteDomain, remotePort)
        let p = nextPort
        nextPort += 1
        bound.insert(p)
        return p
    }

    func unbind(_ port: EventChannelPort) throws(HypervisorError) {
        guard bound.remove(port) != nil else { throw HypervisorError("unbind", errno: EINVAL) }
        platform.unbind()
    }

    func notify(_ port: EventChannelPort) throws(HypervisorError) {}
    func nextPending() throws(HypervisorError) -> EventChannelPort? { nil }
    func unmask(_ port: EventChannelPort) throws(HypervisorError) {}

    func close() {
        for _ in bound { platform.unbind() }
        bound = []
    }
}
