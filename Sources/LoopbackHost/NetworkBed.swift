import Glibc
import Hypervisor
import Logging
import LoopbackHypervisor
import NetBackend
import NetFrontend
import NetworkPlumbing
import SystemSupport
import XenBus

// A little Xen network of namespaces, for the net tests and `xenbackd-lab bench
// net`:
//
//   namespace <id>d ("dom0"): the bridge xenbr0, the backend's vifD.0 TAPs
//                              (created by the control thread, which lives here)
//   namespace <id>g<D> (guest D): a TAP "eth0" that our netfront joins to
//                              guest D's rings; the kernel's stack there is the guest
//
// so ping, TCP and iperf3 between guests cross: guest stack -> eth0 ->
// netfront -> tx ring -> backend -> vifD.0 -> xenbr0 -> vifE.0 -> backend ->
// rx ring -> netfront -> eth0 -> guest stack. Traffic stays inside these
// namespaces, and `tearDown` deletes them (with every interface in them).

/// Creates a TAP in namespace `namespace` from a short-lived thread that
/// enters it (the descriptor keeps the TAP in that namespace); with
/// `queues` > 1 a multi-queue TAP (one descriptor per queue).
public func createTap(inNamespace namespace: String, name: String, queues: Int = 1) throws -> TapDevice {
    let result = Handoff<Result<TapDevice, NetworkError>>()
    let thread = try NativeThread(name: "mktap") {
        do throws(NetworkError) {
            try NetworkNamespace.enter(named: namespace, mountSysfs: false)
            result.put(.success(try TapDevice.create(name: name, queues: queues)))
        } catch {
            result.put(.failure(error))
        }
    }
    let r = result.take()
    thread.join()
    return try r.get()
}

/// One guest of the bed: its domain, namespace, TAP and netfront.
public final class BedGuest: @unchecked Sendable {   // used from the test's thread only
    public let domid: DomID
    public let namespace: String
    public let address: String
    public let mac: String
    public let domain: LoopbackGuestDomain
    public let frontend: LoopbackNetFrontend
    public let tap: TapDevice?
    public var vifName: String { "vif\(domid).0" }

    public init(domid: DomID, namespace: String, address: String, mac: String, domain: LoopbackGuestDomain,
         frontend: LoopbackNetFrontend, tap: TapDevice?) {
        self.domid = domid; self.namespace = namespace; self.address = address; self.mac = mac
        self.domain = domain; self.frontend = frontend; self.tap = tap
    }

    /// Runs a command inside the guest's namespace.
    @discardableResult
    public func run(_ arguments: [String], timeout: Int = 60) throws -> String {
        try sh(["ip", "netns", "exec", namespace] + arguments, timeout: timeout)
    }
}

public final class NetworkBed: @unchecked Sendable {   // used from the test's thread only
    public let id: String
    public let dom0Namespace: String
    public let bridge = "xenbr0"
    public let host: LoopbackHost
    public private(set) var guests: [BedGuest] = []
    private var namespaces: [String] = []

    public init(netOptions: NetBackendOptions = .init(), logger: Logger = Logger(label: "xenbackd")) throws {
        id = "xbn" + String(UInt32.random(in: 0...0xff_ffff), radix: 16)
        dom0Namespace = id + "d"
        try sh(["ip", "netns", "add", dom0Namespace])
        namespaces.append(dom0Namespace)
        do {
            try sh(["ip", "-n", dom0Namespace, "link", "set", "lo", "up"])
            try sh(["ip", "-n", dom0Namespace, "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            try sh(["ip", "-n", dom0Namespace, "link", "set", bridge, "up"])
            host = try LoopbackHost(logger: logger, netOptions: netOptions, networkNamespace: dom0Namespace)
        } catch {
            for n in namespaces { _ = try? sh(["ip", "netns", "delete", n]) }
            throw error
        }
    }

    public static func address(_ domid: DomID) -> String { "10.99.0.\(domid)" }

    /// Creates guest `domid` with a vif on the bridge; connects it unless
    /// `connect` is false. With `withTap` false the netfront is driven by
    /// hand (raw ring access for hostile-frontend tests). `tapQueues`: the
    /// guest TAP's queues (a multi-queue netfront needs one per queue).
    @discardableResult
    public func addGuest(_ domid: DomID, options: NetFrontendOptions = .init(), nic: LoopbackToolstack.Nic? = nil,
                  withTap: Bool = true, connect: Bool = true, tapQueues: Int = 1) throws -> BedGuest {
        let namespace = id + "g\(domid)"
        try sh(["ip", "netns", "add", namespace])
        namespaces.append(namespace)
        let mac = "00:16:3e:00:00:" + (domid < 16 ? "0" : "") + String(domid, radix: 16)
        let domain = try host.createGuest(domid)
        var tap: TapDevice?
        if withTap {
            tap = try createTap(inNamespace: namespace, name: "eth0", queues: tapQueues)
            try sh(["ip", "-n", namespace, "link", "set", "lo", "up"])
            try sh(["ip", "-n", namespace, "link", "set", "eth0", "address", mac])
            try sh(["ip", "-n", namespace, "addr", "add", Self.address(domid) + "/24", "dev", "eth0"])
            try sh(["ip", "-n", namespace, "link", "set", "eth0", "up"])
        }
        var n = nic ?? LoopbackToolstack.Nic(devid: 0, mac: mac, bridge: bridge)
        n.mac = mac
        let frontend = try host.attachNic(to: domain, n, tap: tap, options: options)
        let g = BedGuest(domid: domid, namespace: namespace, address: Self.address(domid), mac: mac,
                         domain: domain, frontend: frontend, tap: tap)
        guests.append(g)
        if connect { try frontend.connect(timeout: 10) }
        return g
    }

    /// A namespace outside Xen, joined to the bridge by a veth pair: "the
    /// physical network" as a guest on xenbr0 sees it.
    public func addOutsideHost(address: String) throws -> String {
        let namespace = id + "o"
        try sh(["ip", "netns", "add", namespace])
        namespaces.append(namespace)
        try sh(["ip", "-n", dom0Namespace, "link", "add", "vout", "type", "veth", "peer", "name", "eth0", "netns", namespace])
        try sh(["ip", "-n", dom0Namespace, "link", "set", "vout", "master", bridge, "up"])
        try sh(["ip", "-n", namespace, "link", "set", "lo", "up"])
        try sh(["ip", "-n", namespace, "addr", "add", address + "/24", "dev", "eth0"])
        try sh(["ip", "-n", namespace, "link", "set", "eth0", "up"])
        return namespace
    }

    /// `ip -o link show` of an interface in dom0's namespace; nil if absent.
    public func dom0Link(_ name: String) -> String? {
        try? sh(["ip", "-n", dom0Namespace, "-o", "link", "show", name])
    }

    public func backendPath(_ g: BedGuest) -> String { host.toolstack.nicBackendPath(domain: g.domid, devid: 0) }

    public func vifStatus(_ g: BedGuest) -> VifStatus? {
        host.netStatus.first { $0.address.frontendDomain == g.domid }
    }

    /// Waits until `condition` holds (polling), up to `seconds`.
    public func waitUntil(_ seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.seconds() + seconds
        while MonotonicClock.seconds() < deadline {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    public func tearDown() {
        for g in guests where g.frontend.isConnected { try? g.frontend.disconnect(timeout: 5) }
        host.shutdown()
        for g in guests { g.tap?.close() }
        for n in namespaces.reversed() { _ = try? sh(["ip", "netns", "delete", n]) }
    }
}

