/// What the vif driver does with the host side of a vif: a TAP with its
/// interface settings on a real host, an in-memory double in tests and
/// the xenbus fuzz target (which must not create interfaces). Every frame
/// on a queue starts with a 12-byte `VirtioNetHeader`.
public protocol VifInterface: AnyObject {
    var name: String { get }
    var queueCount: Int { get }
    func setMAC(_ mac: [UInt8]) throws(NetworkError)
    func setMTU(_ mtu: Int) throws(NetworkError)
    func setCarrier(_ up: Bool) throws(NetworkError)
    /// See `TapDevice.setOffloads`.
    func setOffloads(csum: Bool, tso4: Bool, tso6: Bool) throws(NetworkError)
    /// See `TapDevice.setQueueAttached`.
    func setQueueAttached(_ index: Int, _ attached: Bool) throws(NetworkError)
    func addToBridge(_ bridge: String) throws(NetworkError)
    func setUp(_ up: Bool) throws(NetworkError)
    /// Queue `index` (0..<queueCount), for the data-plane thread serving it.
    func queue(_ index: Int) -> TapQueue
    /// Removes the interface (and its bridge port). Idempotent; only once
    /// every thread using a queue has stopped.
    func close()
}

/// Creates vif interfaces: `TapInterfaceFactory` on a host.
public protocol VifInterfaceFactory: Sendable {
    /// Interface `name` with `queues` queues, down, carrier on; refuses a
    /// name the kernel would not take or one that exists.
    func create(name: String, queues: Int) throws(NetworkError) -> any VifInterface
}

/// Real TAPs in the calling thread's network namespace.
public struct TapInterfaceFactory: VifInterfaceFactory {
    public init() {}
    public func create(name: String, queues: Int) throws(NetworkError) -> any VifInterface {
        TapInterface(try TapDevice.create(name: name, queues: queues, vnetHeader: true))
    }
}

/// A `TapDevice` configured through `NetworkInterface`.
public final class TapInterface: VifInterface, Sendable {
    public let device: TapDevice
    public init(_ device: TapDevice) { self.device = device }

    public var name: String { device.name }
    public var queueCount: Int { device.queueCount }
    public func setMAC(_ mac: [UInt8]) throws(NetworkError) { try NetworkInterface.setMAC(mac, name: name) }
    public func setMTU(_ mtu: Int) throws(NetworkError) { try NetworkInterface.setMTU(mtu, name: name) }
    public func setCarrier(_ up: Bool) throws(NetworkError) { try device.setCarrier(up) }
    public func setOffloads(csum: Bool, tso4: Bool, tso6: Bool) throws(NetworkError) {
        try device.setOffloads(csum: csum, tso4: tso4, tso6: tso6)
    }
    public func setQueueAttached(_ index: Int, _ attached: Bool) throws(NetworkError) {
        try device.setQueueAttached(index, attached)
    }
    public func addToBridge(_ bridge: String) throws(NetworkError) {
        try NetworkInterface.addToBridge(interface: name, bridge: bridge)
    }
    public func setUp(_ up: Bool) throws(NetworkError) { try NetworkInterface.setUp(up, name: name) }
    public func queue(_ index: Int) -> TapQueue { device.queue(index) }
    public func close() { device.close() }
}
