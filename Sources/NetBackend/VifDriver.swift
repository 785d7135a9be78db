import Hypervisor
import Logging
import NetworkPlumbing
import XenABI
import XenBus

/// A snapshot of one vif for `xenbackd status`, tests and the demo.
public struct VifStatus: Sendable {
    public var address: BackendDeviceAddress
    public var state: XenbusState
    /// The TAP's name (vifD.N), empty before it exists.
    public var interface: String
    public var bridge: String?
    /// Queues (ring pairs, threads) in use; 0 when not connected.
    public var queues: Int
    public var splitEventChannels: Bool
    public var statistics: NetStatistics
    public var lastError: String?
    /// When `lastError` was set (seconds since the Unix epoch).
    public var lastErrorTime: Double?
    /// The frontend's features in use (nil: not connected).
    public var frontendFeatures: FrontendNetFeatures?
    /// The connection was taken over from a previous daemon.
    public var resumed = false
    /// Seconds from InitWait to Connected, the last handshake this daemon made.
    public var handshakeSeconds: Double?
    /// Multicast frames are filtered (the guest asked, request-multicast-control),
    /// and the addresses its filter holds.
    public var multicastFiltering = false
    public var multicastAddresses = 0
    /// The guest gave a control ring (feature-ctrl-ring).
    public var controlRing = false
    /// What it set there for receive-side hashing (nil: no control ring).
    public var receiveHash: VifHashSettings.State?
    /// Bytes kept free before each received frame (`xdp-headroom`; 0: none).
    public var rxHeadroom = 0
}

/// A vif's interface and the TAP queues the kernel steers frames to (the
/// rest are detached). Touched by one thread at a time (the framework's jobs).
final class VifPort {
    let tap: any VifInterface
    var attachedQueues: Int
    init(tap: any VifInterface, attachedQueues: Int) { self.tap = tap; self.attachedQueues = attachedQueues }
}

/// A connected vif: one data plane per queue (queue i serves TAP queue i).
struct VifConnection {
    var planes: [NetDataPlane]
    var splitEventChannels: Bool
    var frontendFeatures: FrontendNetFeatures
    var multicastFilter: VifMulticastFilter
    /// The guest's receive-hash settings, when it gave a control ring.
    var hashSettings: VifHashSettings?
    /// Where queues hand frames the guest's table sends elsewhere.
    var inboxes: RxSteeringInboxes?
    /// The room the guest keeps before received frames (`xdp-headroom`).
    var rxHeadroom: VifRxHeadroom
    /// Taken over from a previous daemon, which had the guest's multicast
    /// list: filtering stays off for this connection, whatever the guest
    /// says later, since the list it would filter by is gone.
    var multicastListLost = false
}

/// The vif type for the xenbus framework (`XenbusDevice`): its toolstack
/// keys (vifname, bridge, mtu, rate), the TAP it creates before InitWait
/// (the vif hotplug script expects vifD.N to exist), and the queues it
/// serves (xen/io/netif.h). The state machine, watches and errors are the
/// framework's.
final class VifDriver: XenbusDriver {
    typealias Resource = VifPort
    typealias Connection = VifConnection

    /// Xen's scripts give every vif this address: the largest unicast
    /// one, so a bridge never adopts it as its own (the guest's MAC is the
    /// frontend's, in the `mac` key).
    static let backendMAC: [UInt8] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]

    let connectsAtInitialised = false
    let opensBeforeInitWait = true
    let releasesOnClose = false
    /// Linux netfront goes Reconfiguring to change `xdp-headroom`, and
    /// writes the key just after the state.
    let reconfigures = true
    let reconfiguringKeys = ["xdp-headroom", "request-multicast-control"]

    private let address: BackendDeviceAddress
    private let platform: any HypervisorPlatform
    private let options: NetBackendOptions

    // Read at probe (control thread), before any job: workers only read them.
    private(set) var interfaceName = ""
    private(set) var bridge: String?
    private var mtu: Int?
    private var rate: (bytes: UInt64, microseconds: UInt64)?

    // Control thread only.
    private var retiredStatistics = NetStatistics()

    init(address: BackendDeviceAddress, platform: any HypervisorPlatform, options: NetBackendOptions) {
        self.address = address
        self.platform = platform
        self.options = options
    }

    func status(of device: XenbusDevice<VifDriver>) -> VifStatus {
        var s = retiredStatistics
        for plane in device.connection?.planes ?? [] { s = s.adding(plane.statistics) }
        var status = VifStatus(address: address, state: device.state,
                               interface: device.resource == nil ? "" : interfaceName,
                               bridge: bridge, queues: device.connection?.planes.count ?? 0,
                               splitEventChannels: device.connection?.splitEventChannels ?? false, statistics: s,
                               lastError: device.lastError, lastErrorTime: device.lastErrorTime,
                               frontendFeatures: device.connection?.frontendFeatures)
        status.resumed = device.resumed
        status.handshakeSeconds = device.handshakeSeconds
        if let filter = device.connection?.multicastFilter {
            status.multicastFiltering = filter.enabled
            status.multicastAddresses = filter.count
        }
        if let settings = device.connection?.hashSettings {
            status.controlRing = true
            status.receiveHash = settings.state
        }
        status.rxHeadroom = device.connection?.rxHeadroom.bytes ?? 0
        return status
    }

    // MARK: toolstack keys, InitWait

    func readToolstackKeys(_ d: XenbusDeviceContext) throws {
        let store = d.store, path = d.backendPath
        if let name = try store.read(path + "/vifname"), !name.isEmpty {
            interfaceName = name
        } else {
            interfaceName = "vif\(address.frontendDomain).\(address.devid)"
        }
        try validate(interfaceName, as: "interface name")
        if let b = try store.read(path + "/bridge"), !b.isEmpty {
            try validate(b, as: "bridge")
            bridge = b
        }
        if let m = try store.read(path + "/mtu"), !m.isEmpty {
            guard let v = XenStoreNumber.parse(m, as: UInt32.self), (68...65535).contains(v) else {
                throw DeviceFailure("mtu \(GuestText.quoted(m)) is not 68...65535")
            }
            mtu = Int(v)
        }
        if let r = try store.read(path + "/rate"), !r.isEmpty {
            guard let parsed = CreditScheduler.parseRate(r) else {
                throw DeviceFailure("rate \(GuestText.quoted(r)) is not BYTES,USEC")
            }
            rate = parsed
        }
    }

    /// What this backend serves, as netback advertises it.
    func offerKeys(_ d: XenbusDeviceContext) -> [(key: String, value: String?)] {
        [("feature-rx-copy", "1"), ("feature-rx-flip", "0"), ("feature-sg", "1"),
         ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1"),
         ("feature-split-event-channels", "1"), ("multi-queue-max-queues", String(options.maxQueues)),
         ("feature-multicast-control", "1"), ("feature-dynamic-multicast-control", "1"), ("feature-ctrl-ring", "1"),
         ("feature-xdp-headroom", "1")]
    }

    /// The interface's name in a message or a log line: the toolstack's
    /// `vifname` may hold control bytes the kernel takes (only white space,
    /// '/' and ':' are refused).
    private var shownName: String { GuestText.escaped(interfaceName) }

    /// A lower layer's error, which may quote the interface's name.
    private func shown(_ error: any Error) -> String { GuestText.escaped("\(error)", limit: 256) }

    /// Refuses a name the kernel would not take, showing it escaped (the
    /// validator's own message holds the raw bytes).
    private func validate(_ name: String, as what: String) throws {
        do { try InterfaceName.validate(name) } catch {
            guard case .invalidName(_, let reason) = error else { throw DeviceFailure("\(what) \(GuestText.quoted(name)): \(error)") }
            throw DeviceFailure("\(what) \(GuestText.quoted(name)): \(reason)")
        }
    }

    // MARK: the interface

    /// Creates vifD.N with Xen's backend MAC and the MTU, carrier off until
    /// the frontend connects. With no hotplug script to do it, or for a
    /// restarted daemon whose script ran for the old interface, it also
    /// joins the bridge and comes up, as vif-bridge would.
    func open(_ d: XenbusDeviceContext, resuming: Bool) throws -> VifPort {
        let t: any VifInterface
        do {
            t = try options.interfaces.create(name: interfaceName, queues: options.maxQueues)
        } catch {
            throw DeviceFailure("cannot create \(shownName): \(shown(error))")
        }
        do {
            try t.setMAC(Self.backendMAC)
            if let mtu { try t.setMTU(mtu) }
            try t.setCarrier(false)
        } catch {
            t.close()
            throw DeviceFailure("cannot configure \(shownName): \(shown(error))")
        }
        let port = VifPort(tap: t, attachedQueues: options.maxQueues)
        guard !d.hasScript || resuming else { return port }
        do {
            if let bridge { try t.addToBridge(bridge) }
            try t.setUp(true)
        } catch {
            let why = "cannot put \(shownName) on bridge \(GuestText.escaped(bridge ?? "-")): \(shown(error))"
            try? d.store.write(d.backendPath + "/hotplug-error", why)
            try? d.store.write(d.backendPath + "/hotplug-status", "error")
            t.close()
            throw DeviceFailure(why)
        }
        if !d.hasScript { try d.store.write(d.backendPath + "/hotplug-status", "connected") }
        d.logger.info("interface up", metadata: ["interface": "\(shownName)", "bridge": "\(GuestText.escaped(bridge ?? "-"))"])
        return port
    }

    /// Closing the last queue deletes the interface (and its bridge port).
    func close(_ d: XenbusDeviceContext, resource port: VifPort, flush: Bool) {
        port.tap.close()
        d.logger.info("interface removed", metadata: ["interface": "\(shownName)"])
    }

    // MARK: the queues

    func connect(_ d: XenbusDeviceContext, resource port: VifPort, resuming: Bool) throws
        -> (connection: VifConnection, keys: [(key: String, value: String)]) {
        let tap = port.tap
        var configs = try readFrontendKeys(d)
        let f = configs[0].frontend
        // Read at Connected, and again whenever the guest changes it
        // (feature-dynamic-multicast-control: `reconfigure`). A restarted
        // daemon has lost the guest's list, which the guest will not send
        // again: it floods multicast to the guest rather than drop what the
        // guest asked for.
        let wantsFilter = try d.store.readFlag(d.frontendPath, "request-multicast-control", default: false)
        if wantsFilter && resuming {
            d.logger.notice("multicast filter lost with the previous daemon: flooding multicast to the guest")
        }
        let filter = VifMulticastFilter(enabled: wantsFilter && !resuming)
        let headroom = VifRxHeadroom(try readXDPHeadroom(d))
        for i in configs.indices {
            configs[i].multicastFilter = filter
            configs[i].queueIndex = i
            configs[i].rxHeadroom = headroom
        }
        // The control ring (optional): receive-side hashing, shared by the queues.
        var control: NetDataPlane.ControlRing?
        var inboxes: RxSteeringInboxes?
        if let ring = try readControlRing(d) {
            let settings = VifHashSettings(queues: configs.count)
            for i in configs.indices { configs[i].hashSettings = settings }
            control = NetDataPlane.ControlRing(ringRef: ring.ref, remotePort: ring.port, settings: settings)
            if resuming {
                // Like the multicast list: the guest will not send it again.
                d.logger.notice("receive-hash settings lost with the previous daemon: frames are not hashed until the guest sets them again")
            }
            if configs.count > 1 {
                do { inboxes = try RxSteeringInboxes(queues: configs.count) } catch {
                    throw DeviceFailure("cannot make the queues' steering inboxes: \(error)")
                }
            }
        }
        do {
            try tap.setOffloads(csum: f.checksumOffload,
                                tso4: f.checksumOffload && f.scatterGather && f.gsoTCPv4,
                                tso6: f.checksumOffload && f.scatterGather && f.gsoTCPv6)
            try attachQueues(port, configs.count)
        } catch {
            throw DeviceFailure("cannot set up \(shownName)'s queues: \(shown(error))")
        }
        var planes: [NetDataPlane] = []
        do {
            for (i, config) in configs.enumerated() {
                let plane: NetDataPlane
                do {
                    plane = try NetDataPlane(name: "\(address.frontendDomain).\(address.devid)-q\(i)", platform: platform,
                                             tap: tap.queue(i), configuration: config, control: i == 0 ? control : nil,
                                             steering: inboxes?.queue(i), logger: d.logger, onFatal: d.fail)
                } catch {
                    throw DeviceFailure("queue \(i): cannot map rings or bind event channels: \(error)")
                }
                planes.append(plane)
                do { try plane.start() } catch { throw DeviceFailure("queue \(i): cannot start the data plane: \(error)") }
            }
        } catch {
            for plane in planes { plane.stop() }
            throw error
        }
        let split = configs[0].splitEventChannels
        do { try tap.setCarrier(true) } catch { d.logger.warning("carrier on failed", metadata: ["error": "\(error)"]) }
        d.logger.info("connected", metadata: ["interface": "\(shownName)", "queues": "\(configs.count)",
                                              "split": "\(split)", "sg": "\(f.scatterGather)",
                                              "gso": "\(f.gsoTCPv4)/\(f.gsoTCPv6)", "ctrl": "\(control != nil)"])
        return (VifConnection(planes: planes, splitEventChannels: split, frontendFeatures: f, multicastFilter: filter,
                              hashSettings: control?.settings, inboxes: inboxes, rxHeadroom: headroom,
                              multicastListLost: resuming), [])
    }

    /// Carrier off, every queue stopped.
    func disconnect(_ d: XenbusDeviceContext, resource port: VifPort, connection: VifConnection) {
        try? port.tap.setCarrier(false)
        for plane in connection.planes { plane.stop() }
    }

    func retired(_ connection: VifConnection) {
        for plane in connection.planes { retiredStatistics = retiredStatistics.adding(plane.statistics) }
    }

    /// Leaves the first `count` TAP queues attached and detaches the rest,
    /// so the kernel never steers a frame to a queue nobody reads.
    private func attachQueues(_ port: VifPort, _ count: Int) throws(NetworkError) {
        guard count != port.attachedQueues else { return }
        for i in 0..<options.maxQueues {
            let wasAttached = i < port.attachedQueues, shouldBe = i < count
            if wasAttached != shouldBe { try port.tap.setQueueAttached(i, shouldBe) }
        }
        port.attachedQueues = count
    }

    /// Reconfiguring: the frontend changed `xdp-headroom` (Linux netfront,
    /// attaching or removing an XDP program); the queues use the new room
    /// from their next pass, and each frame's XDP extra says which it got.
    /// `request-multicast-control` may change too (feature-dynamic-multicast-control):
    /// the filter is applied, or not, from the next frame.
    func reconfigure(_ d: XenbusDeviceContext, connection: VifConnection) throws {
        let bytes = try readXDPHeadroom(d)
        if bytes != connection.rxHeadroom.bytes {
            connection.rxHeadroom.set(bytes)
            d.logger.info("rx headroom", metadata: ["bytes": "\(bytes)"])
        }
        let filtering = try d.store.readFlag(d.frontendPath, "request-multicast-control", default: false)
        if !connection.multicastListLost, filtering != connection.multicastFilter.enabled {
            connection.multicastFilter.setEnabled(filtering)
            d.logger.info("multicast filter", metadata: ["on": "\(filtering)"])
        }
    }

    /// `xdp-headroom`: absent is 0; more than this backend leaves (half a
    /// page; XDP asks for 256) or malformed refuses the device.
    private func readXDPHeadroom(_ d: XenbusDeviceContext) throws -> Int {
        guard let n = try d.store.readNumber(d.frontendPath, "xdp-headroom", as: UInt32.self) else { return 0 }
        guard n <= UInt32(VifRxHeadroom.maximum) else {
            throw DeviceFailure("xdp-headroom \(n) is more than \(VifRxHeadroom.maximum)")
        }
        return Int(n)
    }

    /// `ctrl-ring-ref` and `event-channel-ctrl`: both, or neither (no control ring).
    private func readControlRing(_ d: XenbusDeviceContext) throws -> (ref: GrantRef, port: EventChannelPort)? {
        let ref = try d.store.readNumber(d.frontendPath, "ctrl-ring-ref", as: UInt32.self)
        let port = try d.store.readNumber(d.frontendPath, "event-channel-ctrl", as: UInt32.self)
        switch (ref, port) {
        case (nil, nil): return nil
        case let (ref?, port?): return (ref, port)
        case (_?, nil): throw DeviceFailure("ctrl-ring-ref without event-channel-ctrl")
        case (nil, _?): throw DeviceFailure("event-channel-ctrl without ctrl-ring-ref")
        }
    }

    /// The frontend's keys: shared ones at the top, each queue's rings and
    /// ports at the top (one queue) or under `queue-N/` (several).
    private func readFrontendKeys(_ d: XenbusDeviceContext) throws -> [NetQueueConfiguration] {
        func flag(_ key: String, default value: Bool) throws -> Bool {
            try d.store.readFlag(d.frontendPath, key, default: value)
        }
        func number(_ key: String) throws -> UInt32? { try d.store.readNumber(d.frontendPath, key, as: UInt32.self) }
        let queues = Int(try number("multi-queue-num-queues") ?? 1)
        guard queues >= 1, queues <= options.maxQueues else {
            throw DeviceFailure("multi-queue-num-queues \(queues) is not 1...\(options.maxQueues)")
        }
        guard try flag("request-rx-copy", default: false) else {
            throw DeviceFailure("frontend does not request rx-copy (rx-flip is not supported)")
        }
        guard try flag("feature-rx-notify", default: false) else {
            throw DeviceFailure("frontend lacks feature-rx-notify")
        }
        let features = FrontendNetFeatures(
            scatterGather: try flag("feature-sg", default: false),
            gsoTCPv4: try flag("feature-gso-tcpv4", default: false),
            gsoTCPv6: try flag("feature-gso-tcpv6", default: false),
            checksumOffload: !(try flag("feature-no-csum-offload", default: false)),
            ipv6ChecksumOffload: try flag("feature-ipv6-csum-offload", default: false))
        var configs: [NetQueueConfiguration] = []
        for q in 0..<queues {
            let prefix = queues == 1 ? "" : "queue-\(q)/"
            guard let tx = try number(prefix + "tx-ring-ref") else { throw DeviceFailure("missing \(prefix)tx-ring-ref") }
            guard let rx = try number(prefix + "rx-ring-ref") else { throw DeviceFailure("missing \(prefix)rx-ring-ref") }
            let txPort: EventChannelPort, rxPort: EventChannelPort
            if let shared = try number(prefix + "event-channel") {
                txPort = shared; rxPort = shared
            } else if let t = try number(prefix + "event-channel-tx"), let r = try number(prefix + "event-channel-rx") {
                guard t != r else { throw DeviceFailure("\(prefix)event-channel-tx and -rx are the same port \(t)") }
                txPort = t; rxPort = r
            } else {
                throw DeviceFailure("missing \(prefix)event-channel (or event-channel-tx and event-channel-rx)")
            }
            configs.append(NetQueueConfiguration(frontendDomain: address.frontendDomain, txRingRef: tx, rxRingRef: rx,
                                                 txRemotePort: txPort, rxRemotePort: rxPort, frontend: features, rate: rate,
                                                 rxStallMilliseconds: options.rxStallMilliseconds))
        }
        return configs
    }
}
