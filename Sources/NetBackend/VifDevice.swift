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
}

/// The control plane of one vif: the backend half of the xenbus handshake
/// (xen/io/netif.h), the TAP it serves, and the data plane. Lives on the
/// control loop's thread only.
final class VifDevice: BackendDevice, @unchecked Sendable {   // confined to the control loop thread; only posted back to it
    /// Xen's scripts give every vif this address: the largest unicast
    /// one, so a bridge never adopts it as its own (the guest's MAC is the
    /// frontend's, in the `mac` key).
    static let backendMAC: [UInt8] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]

    let address: BackendDeviceAddress
    let backendPath: String
    private let platform: any HypervisorPlatform
    private let store: any XenStore
    private let loop: XenbusControlLoop
    private let options: NetBackendOptions
    private var logger: Logger

    private var frontendPath = ""
    private var interfaceName = ""
    private var bridge: String?
    private var mtu: Int?
    private var rate: (bytes: UInt64, microseconds: UInt64)?
    private var hasScript = false
    private var tap: (any VifInterface)?
    /// One per queue the frontend connected (queue i serves TAP queue i).
    private var dataPlanes: [NetDataPlane] = []
    /// TAP queues the kernel steers frames to (the rest are detached).
    private var attachedQueues = 0
    private var split = false
    private(set) var state: XenbusState = .initialising
    private var lastError: String?
    /// False once the device failed for a reason a frontend cannot fix (the
    /// toolstack's keys, the interface): it stays Closed.
    private var mayOfferAgain = true
    private var watches: [(path: String, token: String)] = []
    private var retiredStatistics = NetStatistics()

    init(address: BackendDeviceAddress, platform: any HypervisorPlatform, loop: XenbusControlLoop,
         options: NetBackendOptions, logger: Logger) {
        self.address = address
        self.platform = platform
        self.loop = loop
        self.store = loop.store
        self.options = options
        self.backendPath = address.backendPath(backendDomain: platform.ownDomain)
        var l = logger
        l[metadataKey: "device"] = "\(address)"
        self.logger = l
    }

    var status: VifStatus {
        var s = retiredStatistics
        for plane in dataPlanes { s = s.adding(plane.statistics) }
        return VifStatus(address: address, state: state, interface: tap == nil ? "" : interfaceName, bridge: bridge,
                         queues: dataPlanes.count, splitEventChannels: split, statistics: s, lastError: lastError)
    }

    // MARK: probe -> InitWait

    /// Reads the toolstack's keys, creates the interface, publishes our
    /// features and goes to InitWait: libxl runs the vif script only then,
    /// and the script expects vifD.N to exist already.
    func probe() {
        // What fails here is the toolstack's or the host's: final.
        failing("probe", permanent: true) {
            try readToolstackKeys()
            let resuming = isRunningConnection()
            try createInterface(plumb: !hasScript || resuming)
            if resuming {
                state = .connected
                try watchNode(frontendPath + "/state") { [weak self] _ in self?.frontendStateChanged() }
                connect(resuming: true)
                logger.notice("resumed a connected vif", metadata: ["interface": "\(shownName)"])
                return
            }
            try publishFeatures()
            try store.removeIfPresent(backendPath + "/error")   // a predecessor's: Closed no more
            try setState(.initWait)
            try watchNode(frontendPath + "/state") { [weak self] _ in self?.frontendStateChanged() }
        }
    }

    /// Both ends Connected when we find the device: a restarted daemon.
    private func isRunningConnection() -> Bool {
        store.readState(backendPath) == .connected && store.readState(frontendPath) == .connected
    }

    private func readToolstackKeys() throws {
        frontendPath = try store.readFrontendPath(backendPath: backendPath, address: address)
        if let name = try store.read(backendPath + "/vifname"), !name.isEmpty {
            interfaceName = name
        } else {
            interfaceName = "vif\(address.frontendDomain).\(address.devid)"
        }
        try validate(interfaceName, as: "interface name")
        if let b = try store.read(backendPath + "/bridge"), !b.isEmpty {
            try validate(b, as: "bridge")
            bridge = b
        }
        if let m = try store.read(backendPath + "/mtu"), !m.isEmpty {
            guard let v = XenStoreNumber.parse(m, as: UInt32.self), (68...65535).contains(v) else {
                throw DeviceFailure("mtu \(GuestText.quoted(m)) is not 68...65535")
            }
            mtu = Int(v)
        }
        if let r = try store.read(backendPath + "/rate"), !r.isEmpty {
            guard let parsed = CreditScheduler.parseRate(r) else {
                throw DeviceFailure("rate \(GuestText.quoted(r)) is not BYTES,USEC")
            }
            rate = parsed
        }
        if let s = try store.read(backendPath + "/script"), !s.isEmpty { hasScript = true }
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

    /// Creates vifD.N with Xen's backend MAC and the MTU, carrier off until
    /// the frontend connects. With `plumb` (no hotplug script will do it, or
    /// a restarted daemon whose script ran for the old interface) it also
    /// joins the bridge and comes up, as vif-bridge would.
    private func createInterface(plumb: Bool) throws {
        let t: any VifInterface
        do {
            t = try options.interfaces.create(name: interfaceName, queues: options.maxQueues)
        } catch {
            throw DeviceFailure("cannot create \(shownName): \(shown(error))")
        }
        tap = t
        attachedQueues = options.maxQueues
        do {
            try t.setMAC(Self.backendMAC)
            if let mtu { try t.setMTU(mtu) }
            try t.setCarrier(false)
        } catch {
            throw DeviceFailure("cannot configure \(shownName): \(shown(error))")
        }
        guard plumb else { return }
        do {
            if let bridge { try t.addToBridge(bridge) }
            try t.setUp(true)
        } catch {
            let why = "cannot put \(shownName) on bridge \(GuestText.escaped(bridge ?? "-")): \(shown(error))"
            try? store.write(backendPath + "/hotplug-error", why)
            try? store.write(backendPath + "/hotplug-status", "error")
            throw DeviceFailure(why)
        }
        if !hasScript { try store.write(backendPath + "/hotplug-status", "connected") }
        logger.info("interface up", metadata: ["interface": "\(shownName)", "bridge": "\(GuestText.escaped(bridge ?? "-"))"])
    }

    /// What this backend serves, as netback advertises it.
    private func publishFeatures() throws {
        let path = backendPath
        try store.withTransaction { t throws(XenStoreError) in
            for (key, value) in [
                ("feature-rx-copy", "1"), ("feature-rx-flip", "0"), ("feature-sg", "1"),
                ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1"),
                ("feature-split-event-channels", "1"), ("multi-queue-max-queues", String(options.maxQueues)),
            ] {
                try store.write(path + "/" + key, value, transaction: t)
            }
        }
    }

    // MARK: frontend transitions

    func frontendStateChanged() {
        let fe = store.readFrontendState(frontendPath, logger: logger)   // nil counts as Closed
        switch FrontendStateReaction(frontend: fe, backend: state, mayOfferAgain: mayOfferAgain) {
        case .none:
            break
        case .connect:
            connect()
        case .close(let next):
            disconnect()   // carrier off, every queue stopped
            try? setState(next)
        case .offerAgain:
            offerAgain()
        }
    }

    /// A frontend starting over (reconnect, kexec, after an error it
    /// caused): the interface is still there; offer the features again and
    /// go InitWait. The `error` node goes: the device is no longer Closed.
    private func offerAgain() {
        failing("offering the device again") {
            try publishFeatures()
            try store.removeIfPresent(backendPath + "/error")
            try setState(.initWait)
            logger.info("offered again")
        }
    }

    private func connect(resuming: Bool = false) {
        guard let tap else { return }
        do {
            let configs = try readFrontendKeys()
            let f = configs[0].frontend
            do {
                try tap.setOffloads(csum: f.checksumOffload,
                                    tso4: f.checksumOffload && f.scatterGather && f.gsoTCPv4,
                                    tso6: f.checksumOffload && f.scatterGather && f.gsoTCPv6)
                try attachQueues(configs.count)
            } catch {
                throw DeviceFailure("cannot set up \(shownName)'s queues: \(shown(error))")
            }
            let device = WeakDevice(self)
            for (i, config) in configs.enumerated() {
                let plane: NetDataPlane
                do {
                    plane = try NetDataPlane(name: "\(address.frontendDomain).\(address.devid)-q\(i)", platform: platform,
                                             tap: tap.queue(i), configuration: config, logger: logger) { [loop] reason in
                        loop.post { device.value?.fail(reason) }
                    }
                } catch {
                    throw DeviceFailure("queue \(i): cannot map rings or bind event channels: \(error)")
                }
                do { try plane.start() } catch { throw DeviceFailure("queue \(i): cannot start the data plane: \(error)") }
                dataPlanes.append(plane)
            }
            split = configs[0].splitEventChannels
            do { try tap.setCarrier(true) } catch { logger.warning("carrier on failed", metadata: ["error": "\(error)"]) }
            if !resuming { try setState(.connected) }
            logger.info("connected", metadata: ["interface": "\(shownName)", "queues": "\(configs.count)",
                                                "split": "\(split)", "sg": "\(f.scatterGather)",
                                                "gso": "\(f.gsoTCPv4)/\(f.gsoTCPv6)"])
        } catch let e as DeviceFailure {
            fail(e.message)
        } catch {
            fail("connect failed: \(error)")
        }
    }

    /// Leaves the first `count` TAP queues attached and detaches the rest,
    /// so the kernel never steers a frame to a queue nobody reads.
    private func attachQueues(_ count: Int) throws(NetworkError) {
        guard let tap, count != attachedQueues else { return }
        for i in 0..<options.maxQueues {
            let wasAttached = i < attachedQueues, shouldBe = i < count
            if wasAttached != shouldBe { try tap.setQueueAttached(i, shouldBe) }
        }
        attachedQueues = count
    }

    /// The frontend's keys: shared ones at the top, each queue's rings and
    /// ports at the top (one queue) or under `queue-N/` (several).
    private func readFrontendKeys() throws -> [NetQueueConfiguration] {
        func flag(_ key: String, default value: Bool) throws -> Bool {
            try store.readFlag(frontendPath, key, default: value)
        }
        func number(_ key: String) throws -> UInt32? { try store.readNumber(frontendPath, key, as: UInt32.self) }
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

    // MARK: teardown

    private func disconnect() {
        guard !dataPlanes.isEmpty else { return }
        try? tap?.setCarrier(false)
        for plane in dataPlanes {
            plane.stop()
            retiredStatistics = retiredStatistics.adding(plane.statistics)
        }
        dataPlanes.removeAll()
        logger.info("disconnected")
    }

    /// The backend directory is gone: stop, and remove the interface.
    func teardown() {
        disconnect()
        for w in watches { loop.unwatch(w.path, token: w.token) }
        watches.removeAll()
        if let tap {
            // Closing the last queue deletes the interface (and its bridge port).
            tap.close()
            self.tap = nil
            logger.info("interface removed", metadata: ["interface": "\(shownName)"])
        }
    }

    /// Daemon shutdown: stop serving, leave xenstore as it is.
    func quiesce() { disconnect() }

    /// Records why the device cannot work and closes it. `message` holds
    /// guest bytes only escaped (`GuestText`). A frontend starting over
    /// gets the device again unless the failure is `permanent`.
    func fail(_ message: String, permanent: Bool = false) {
        logger.error("device failed", metadata: ["reason": "\(message)", "final": "\(permanent)"])
        lastError = message
        if permanent { mayOfferAgain = false }
        disconnect()
        try? store.write(backendPath + "/error", message)
        try? setState(.closed)
    }

    private func setState(_ s: XenbusState) throws {
        try store.writeState(backendPath, s)
        state = s
    }

    private func watchNode(_ path: String, _ handler: @escaping XenbusControlLoop.WatchHandler) throws {
        let token = try loop.watch(path, handler: handler)
        watches.append((path, token))
    }
}
