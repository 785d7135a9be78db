import Glibc
import NetworkPlumbing
import SystemSupport

/// A `VifInterfaceFactory` that creates no interface on the host: each
/// queue is a SOCK_SEQPACKET socket pair (frame boundaries kept, as on a
/// TAP queue descriptor). It refuses what the kernel would (invalid names,
/// a name that exists, unknown bridges) and counts live interfaces and open
/// descriptors, so a test can require that nothing leaked.
public final class InMemoryInterfaces: VifInterfaceFactory, @unchecked Sendable {   // guarded by `lock`
    /// Bridges that exist (their names are taken, as on a host).
    public let bridges: Set<String>
    private let lock = PThreadMutex()
    private var live: [String: InMemoryInterface] = [:]
    private var descriptors = 0
    private var createdCount = 0

    public init(bridges: Set<String> = ["xenbr0"]) { self.bridges = bridges }

    public func create(name: String, queues: Int) throws(NetworkError) -> any VifInterface {
        try InterfaceName.validate(name)
        guard queues >= 1, queues <= 256 else { throw .invalidArgument("\(queues) queues (1...256)") }
        if lock.withLock({ live[name] != nil }) || bridges.contains(name) { throw .alreadyExists(name) }
        var ours: [Int32] = [], peers: [Int32] = []
        for _ in 0..<queues {
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
                             0, &pair) == 0 else {
                let e = errno
                for fd in ours + peers { Glibc.close(fd) }
                throw .system(call: "socketpair", interface: name, errno: e)
            }
            ours.append(pair[0])
            peers.append(pair[1])
        }
        let interface = InMemoryInterface(name: name, queues: ours, peers: peers, factory: self)
        lock.withLock {
            live[name] = interface
            descriptors += 2 * queues
            createdCount += 1
        }
        return interface
    }

    /// Interfaces created and not closed.
    public var liveInterfaces: Int { lock.withLock { live.count } }
    /// Socket descriptors open across every interface.
    public var openDescriptors: Int { lock.withLock { descriptors } }
    /// Interfaces created so far, closed or not.
    public var created: Int { lock.withLock { createdCount } }
    public func interface(named name: String) -> InMemoryInterface? { lock.withLock { live[name] } }

    fileprivate func closed(_ interface: InMemoryInterface, descriptors n: Int) {
        lock.withLock {
            if live[interface.name] === interface { live[interface.name] = nil }
            descriptors -= n
        }
    }
}

/// One interface of `InMemoryInterfaces`: its settings as recorded, and per
/// queue the backend's socket (`queue(_:)`) and the far end (`peer(_:)`,
/// the host's side: write a frame there for the guest, read what it sent).
public final class InMemoryInterface: VifInterface, @unchecked Sendable {   // settings on the control thread; counts in the factory
    public let name: String
    public private(set) var mac: [UInt8]?
    public private(set) var mtu = 1500
    /// On from creation, as a TAP's.
    public private(set) var carrier = true
    public private(set) var offloads = (csum: false, tso4: false, tso6: false)
    public private(set) var attached: [Bool]
    public private(set) var bridge: String?
    public private(set) var isUp = false
    public private(set) var isClosed = false
    private let queues: [Int32]
    private let peers: [Int32]
    private weak var factory: InMemoryInterfaces?

    fileprivate init(name: String, queues: [Int32], peers: [Int32], factory: InMemoryInterfaces) {
        self.name = name
        self.queues = queues
        self.peers = peers
        self.factory = factory
        attached = Array(repeating: true, count: queues.count)
    }

    deinit { close() }

    public var queueCount: Int { queues.count }
    public func queue(_ index: Int) -> TapQueue { TapQueue(fileDescriptor: queues[index], vnetHeaderSize: VirtioNetHeader.size) }
    public func peer(_ index: Int) -> Int32 { peers[index] }

    private func requireOpen(_ call: String) throws(NetworkError) {
        if isClosed { throw .system(call: call, interface: name, errno: ENODEV) }
    }

    public func setMAC(_ mac: [UInt8]) throws(NetworkError) {
        guard mac.count == 6 else { throw .invalidArgument("a MAC address has 6 bytes, got \(mac.count)") }
        try requireOpen("SIOCSIFHWADDR")
        // The kernel refuses a multicast address for a device.
        if mac[0] & 1 != 0 { throw .system(call: "SIOCSIFHWADDR", interface: name, errno: EADDRNOTAVAIL) }
        self.mac = mac
    }

    public func setMTU(_ mtu: Int) throws(NetworkError) {
        guard mtu > 0, mtu <= Int(Int32.max) else { throw .invalidArgument("MTU \(mtu)") }
        try requireOpen("SIOCSIFMTU")
        guard (68...65535).contains(mtu) else { throw .system(call: "SIOCSIFMTU", interface: name, errno: EINVAL) }
        self.mtu = mtu
    }

    public func setCarrier(_ up: Bool) throws(NetworkError) {
        try requireOpen("TUNSETCARRIER")
        carrier = up
    }

    public func setOffloads(csum: Bool, tso4: Bool, tso6: Bool) throws(NetworkError) {
        guard csum || !(tso4 || tso6) else { throw .invalidArgument("TSO offloads need checksum offload") }
        try requireOpen("TUNSETOFFLOAD")
        offloads = (csum, tso4, tso6)
    }

    public func setQueueAttached(_ index: Int, _ attached: Bool) throws(NetworkError) {
        guard index >= 0, index < queues.count else { throw .invalidArgument("queue \(index) of \(queues.count)") }
        try requireOpen("TUNSETQUEUE")
        guard self.attached[index] != attached else {
            throw .system(call: attached ? "TUNSETQUEUE attach \(index)" : "TUNSETQUEUE detach \(index)", interface: name, errno: EINVAL)
        }
        self.attached[index] = attached
    }

    public func addToBridge(_ bridge: String) throws(NetworkError) {
        try requireOpen("SIOCBRADDIF")
        try InterfaceName.validate(bridge)
        let call = "\(name) on bridge \(bridge)"
        guard factory?.bridges.contains(bridge) == true else { throw .system(call: "SIOCBRADDIF", interface: call, errno: ENODEV) }
        guard self.bridge == nil else { throw .system(call: "SIOCBRADDIF", interface: call, errno: EBUSY) }
        self.bridge = bridge
    }

    public func setUp(_ up: Bool) throws(NetworkError) {
        try requireOpen("SIOCSIFFLAGS")
        isUp = up
    }

    public func close() {
        guard !isClosed else { return }
        isClosed = true
        for fd in queues + peers { Glibc.close(fd) }
        bridge = nil
        isUp = false
        factory?.closed(self, descriptors: queues.count + peers.count)
    }
}
