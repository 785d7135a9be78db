import Glibc
import Hypervisor
import LoopbackHypervisor
import NetworkPlumbing
import SystemSupport
import XenABI
import XenBus

/// A netfront of our own for the loopback hypervisor (as Linux xen-netfront
/// is for Xen): a simulated guest's network driver. It does the frontend
/// half of the vif handshake, grants its tx and rx rings and buffer pages
/// to the backend and, given a TAP, runs a pump thread that joins the rings
/// to it: with the TAP inside a network namespace, that namespace's IP
/// stack is the guest, and ping or iperf3 there go through the backend.
///
/// Without a TAP there is no pump, and the raw hooks (NetFrontendRaw.swift)
/// let a test write ring slots itself and read what comes back (on queue 0).
///
/// Multi-queue (netif.h "Multi-queue support"), as Linux netfront does it:
/// given `options.queues` > 1 and a backend's `multi-queue-max-queues` > 1,
/// min of the two ring pairs, each with its own event channel(s), published
/// under `queue-N/` with `multi-queue-num-queues`; one pump per queue joins
/// ring pair i to TAP queue i. The namespace's kernel steers each flow to a
/// TAP queue by its hash, so a flow stays on one ring pair.
///
/// Control ring (netif.h "Control ring"): given `options.controlRing` and
/// the backend's `feature-ctrl-ring`, one more ring page, a data page and
/// an event channel, published as `ctrl-ring-ref` and `event-channel-ctrl`;
/// `controlRequest` and its helpers (NetFrontendControl.swift) set the
/// backend's receive-side hashing, and every hash extra received (by a
/// pump or the raw hooks) is checked against what was set.
///
/// `connect`, `disconnect`, the control requests and the raw hooks are
/// called from one thread at a time; `statistics` from any thread. The
/// xenstore connection should be the guest's own: waiting for the
/// backend's state consumes its watch events.
public final class LoopbackNetFrontend: @unchecked Sendable {  // control from one thread at a time; statistics locked
    public let guest: LoopbackGuestDomain
    public let store: any XenStore
    public let devid: UInt32
    public let tap: TapDevice?
    public let options: NetFrontendOptions
    public let frontendPath: String
    public private(set) var backendPath = ""
    public private(set) var backendDomain: DomID = 0
    /// The frontend directory's `mac` (the toolstack's choice for the guest's NIC).
    public private(set) var mac: String?
    public private(set) var backendFeatures = BackendNetFeatures()
    public private(set) var negotiated = NetFrontendNegotiated()
    /// Keys to publish instead of ours (nil removes the key), written last
    /// in the same transaction: how tests play a frontend with bad values.
    public var publishOverrides: [String: String?] = [:]
    /// The backend's `error` when it last refused this frontend: still
    /// there when `connect` starts over, it is stale (the backend removes
    /// it when it offers the device again), not a new refusal.
    private var refusal: String?
    public private(set) var isConnected = false

    /// The ring pairs, queue 0 first (empty when not connected).
    var queues: [NetFrontendQueue] = []
    /// One per queue, when there is a TAP.
    var pumps: [NetFrontendPump] = []
    /// TAP queues beyond the negotiated count, detached while connected
    /// (else the kernel would steer flows to queues nobody reads).
    private var detachedTapQueues: [Int] = []
    let statisticsBox = StatisticsBox()
    /// The control ring, when negotiated (nil when not connected).
    var control: NetFrontendControlRing?
    /// The hash settings the backend accepted, for the queues' checks.
    let hashCheck = ReceiveHashCheck()
    /// Set once we ask for rx headroom: the queues then take XDP extras.
    let headroomAsked = HeadroomAsked()

    public init(guest: LoopbackGuestDomain, store: any XenStore, devid: UInt32 = 0, tap: TapDevice?,
                options: NetFrontendOptions = .init()) {
        self.guest = guest
        self.store = store
        self.devid = devid
        self.tap = tap
        self.options = options
        frontendPath = "/local/domain/\(guest.domain)/device/vif/\(devid)"
    }

    deinit {
        for p in pumps { p.stop() }
        for q in queues { q.release() }
        control?.release()
        reattachTapQueues()
    }

    /// A snapshot of the counters (as of the pumps' last passes), summed over queues.
    public var statistics: NetFrontendStatistics { statisticsBox.snapshot }

    /// Each queue's counters, queue 0 first (one element before the first connect).
    public var queueStatistics: [NetFrontendStatistics] { statisticsBox.perQueue }

    /// Queues (ring pairs) of the connection: min(options.queues, the
    /// backend's maximum) once connected (kept after disconnect); 1 before.
    public var queueCount: Int { negotiated.queues }

    /// The backend's `state` (nil before connect, or when missing or malformed).
    public var backendState: XenbusState? { backendPath.isEmpty ? nil : store.readState(backendPath) }

    /// Slots of each ring (256 for one page), 0 when not connected.
    public var txRingSlots: Int { queues.first?.txSlots ?? 0 }
    public var rxRingSlots: Int { queues.first?.rxSlots ?? 0 }

    /// Queue 0's event channel port(s): the same port twice unless split.
    public var eventChannelPorts: (tx: EventChannelPort, rx: EventChannelPort)? {
        queues.first.map { ($0.txPort, $0.rxPort) }
    }

    /// Queue 0's grant references (published as `tx-ring-ref` and `rx-ring-ref`,
    /// or under `queue-0/`).
    public var ringGrants: (tx: GrantRef, rx: GrantRef)? { queues.first.map { ($0.txRingGrant, $0.rxRingGrant) } }

    /// Every queue's ports, queue 0 first (empty when not connected).
    public var queueEventChannelPorts: [(tx: EventChannelPort, rx: EventChannelPort)] {
        queues.map { ($0.txPort, $0.rxPort) }
    }

    /// Every queue's ring grants, queue 0 first (empty when not connected).
    public var queueRingGrants: [(tx: GrantRef, rx: GrantRef)] { queues.map { ($0.txRingGrant, $0.rxRingGrant) } }

    // MARK: handshake

    /// The frontend half of the handshake, as Linux netfront does it:
    /// Initialising; wait for the backend's InitWait (a backend Closed with
    /// an `error` key fails at once); read its features (no
    /// `feature-rx-copy=1`: refused, and nothing is allocated or published);
    /// choose the queue count (with a TAP of fewer queues: refused before
    /// anything is allocated; TAP queues beyond it are detached); set up
    /// each queue's rings, buffers and event channel(s); post the rx
    /// buffers; publish every key and state Connected in one transaction;
    /// wait for the backend's Connected. Then, with a TAP, set its offloads
    /// and start one pump per queue. `timeout` bounds the whole handshake.
    public func connect(timeout: Double = 10) throws {
        guard queues.isEmpty else { throw NetFrontendError.alreadyConnected }
        let deadline = MonotonicClock.seconds() + timeout
        guard let be = try store.read(frontendPath + "/backend") else {
            throw NetFrontendError.noBackend(frontendPath: frontendPath)
        }
        backendPath = be
        backendDomain = DomID(try store.read(frontendPath + "/backend-id") ?? "0") ?? 0
        mac = try store.read(frontendPath + "/mac")
        try store.writeState(frontendPath, .initialising)

        try waitForBackend(deadline: deadline, what: "backend InitWait") { state -> Bool? in
            switch state {
            case .initWait, .connected: return true
            // Closed with a reason: the backend gave up on this device.
            case .closed:
                if let why = backendKey("error"), why != refusal { throw refused(why) }
                return nil
            default: return nil
            }
        }
        readBackendFeatures()
        guard backendFeatures.rxCopy else { throw NetFrontendError.backendLacks(feature: "feature-rx-copy") }
        negotiate()
        let count = negotiated.queues
        if let tap, tap.queueCount < count {
            throw NetFrontendError.tapHasTooFewQueues(tap: tap.name, has: tap.queueCount, needs: count)
        }
        statisticsBox.reset(queues: count)
        hashCheck.reset()

        do {
            if let tap { try detachTapQueues(tap, beyond: count) }
            for _ in 0..<count { queues.append(try makeQueue()) }
            if negotiated.controlRing {
                control = try NetFrontendControlRing(guest: guest, backendDomain: backendDomain)
            }
            // Buffers first, as netfront does: the backend may deliver as
            // soon as it connects.
            if options.postRxBuffers { for q in queues { q.postRx() } }
            try publish()
            try waitForBackend(deadline: deadline, what: "backend Connected") { state -> Bool? in
                switch state {
                case .connected: return true
                case .closing, .closed:
                    throw refused(backendKey("error") ?? "backend went \(state!)")
                default: return nil
                }
            }
            for (i, q) in queues.enumerated() {
                // A first kick on each port (netfront's xennet_connect does it too).
                q.notify(q.txPort)
                if q.rxPort != q.txPort { q.notify(q.rxPort) }
                statisticsBox.publish(q.stats, queue: i)
            }
            if let tap { try startPumps(tap: tap) }
        } catch {
            for p in pumps { p.stop() }
            pumps = []
            for q in queues { q.release() }
            queues = []
            control?.release()
            control = nil
            reattachTapQueues()
            throw error
        }
        isConnected = true
        refusal = nil
    }

    /// One queue: its own event channel handle (so its pump sleeps on its
    /// own FIFO), port(s), rings and buffers.
    private func makeQueue() throws -> NetFrontendQueue {
        let events = try guest.openEventChannels()
        let q: NetFrontendQueue
        do {
            let txPort = try events.allocateUnbound(remoteDomain: backendDomain)
            let rxPort = negotiated.splitEventChannels ? try events.allocateUnbound(remoteDomain: backendDomain) : txPort
            q = try NetFrontendQueue(guest: guest, backendDomain: backendDomain, events: events, txPort: txPort, rxPort: rxPort)
        } catch {
            events.close()
            throw error
        }
        q.trackTxIDs = tap != nil
        q.hashVerifier = ReceiveHashVerifier(check: hashCheck)
        q.headroomAsked = headroomAsked
        return q
    }

    /// The backend closed the device: remembers its reason (see `refusal`).
    func refused(_ why: String) -> NetFrontendError {
        refusal = why
        return .backendClosed(reason: why)
    }

    private func backendKey(_ key: String) -> String? { (try? store.read(backendPath + "/" + key)) ?? nil }

    /// A boolean feature key: any non-zero number is on (xenbus_read_unsigned).
    private func backendFlag(_ key: String) -> Bool { (backendKey(key).flatMap { UInt64($0) } ?? 0) != 0 }

    private func readBackendFeatures() {
        var f = BackendNetFeatures()
        f.rxCopy = backendFlag("feature-rx-copy")
        f.scatterGather = backendFlag("feature-sg")
        f.gsoTCPv4 = backendFlag("feature-gso-tcpv4")
        f.gsoTCPv6 = backendFlag("feature-gso-tcpv6")
        f.ipv6ChecksumOffload = backendFlag("feature-ipv6-csum-offload")
        f.splitEventChannels = backendFlag("feature-split-event-channels")
        let maxQueues = backendKey("multi-queue-max-queues")
        f.multiQueue = maxQueues != nil
        f.maxQueues = max(maxQueues.flatMap { Int($0) } ?? 1, 1)
        f.controlRing = backendFlag("feature-ctrl-ring")
        f.xdpHeadroom = backendFlag("feature-xdp-headroom")
        backendFeatures = f
    }

    /// What we will send. TSO needs scatter-gather on both ends (a super-
    /// frame spans pages) and a virtio header on the TAP; TSO6 needs the
    /// backend to take IPv6 partial checksums too (the kernel drops TSO6
    /// without IPv6 checksum offload as well).
    private func negotiate() {
        let be = backendFeatures
        var n = NetFrontendNegotiated()
        n.splitEventChannels = options.splitEventChannels && be.splitEventChannels
        n.txScatterGather = options.scatterGather && be.scatterGather
        let tso = options.gso && n.txScatterGather && (tap?.vnetHeaderSize ?? 0) > 0
        n.txGSOTCPv4 = tso && be.gsoTCPv4
        n.txGSOTCPv6 = tso && be.gsoTCPv6 && be.ipv6ChecksumOffload
        n.txIPv6ChecksumOffload = be.ipv6ChecksumOffload
        n.queues = max(1, min(options.queues, be.maxQueues))
        n.controlRing = options.controlRing && be.controlRing
        negotiated = n
    }

    /// Every key of ours and state Connected, in one transaction. One
    /// queue: its ring and event channel keys top-level (and
    /// `multi-queue-num-queues` = 1 when the backend offers multi-queue, as
    /// Linux writes it). Several: `multi-queue-num-queues` and each queue's
    /// keys under `queue-N/`; the shared keys stay top-level. Keys of another
    /// layout (the other event channel keys, top-level ring keys, `queue-N/`
    /// directories), left by an earlier connection, go. The control ring's
    /// `ctrl-ring-ref` and `event-channel-ctrl`: both or neither.
    private func publish() throws(XenStoreError) {
        let fe = frontendPath
        let split = negotiated.splitEventChannels
        func ringKeys(_ q: NetFrontendQueue, _ prefix: String) -> [(String, String)] {
            var keys = [(prefix + "tx-ring-ref", String(q.txRingGrant)), (prefix + "rx-ring-ref", String(q.rxRingGrant))]
            if split {
                keys += [(prefix + "event-channel-tx", String(q.txPort)), (prefix + "event-channel-rx", String(q.rxPort))]
            } else {
                keys.append((prefix + "event-channel", String(q.txPort)))
            }
            return keys
        }
        var keys: [(String, String)]
        var stale: [String]
        if queues.count == 1 {
            keys = ringKeys(queues[0], "")
            stale = split ? ["event-channel"] : ["event-channel-tx", "event-channel-rx"]
            if backendFeatures.multiQueue {
                keys.append(("multi-queue-num-queues", "1"))
            } else {
                stale.append("multi-queue-num-queues")
            }
        } else {
            keys = [("multi-queue-num-queues", String(queues.count))]
            for (i, q) in queues.enumerated() { keys += ringKeys(q, "queue-\(i)/") }
            stale = ["tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx"]
        }
        if let control {
            keys += [("ctrl-ring-ref", String(control.ringGrant)), ("event-channel-ctrl", String(control.port))]
        } else {
            stale += ["ctrl-ring-ref", "event-channel-ctrl"]
        }
        keys += [
            ("request-rx-copy", "1"),
            ("feature-rx-notify", "1"),
            ("feature-sg", options.scatterGather ? "1" : "0"),
            ("feature-gso-tcpv4", options.gso ? "1" : "0"),
            ("feature-gso-tcpv6", options.gso ? "1" : "0"),
            ("feature-ipv6-csum-offload", "1"),
            ("feature-no-csum-offload", "0"),
        ]
        let overrides = publishOverrides
        try store.withTransaction { t throws(XenStoreError) in
            for child in try store.directory(fe, transaction: t) ?? [] where child.hasPrefix("queue-") {
                try store.remove(fe + "/" + child, transaction: t)
            }
            for k in stale { try store.remove(fe + "/" + k, transaction: t) }
            for (k, v) in keys { try store.write(fe + "/" + k, v, transaction: t) }
            for (k, v) in overrides {
                if let v { try store.write(fe + "/" + k, v, transaction: t) } else {
                    try store.remove(fe + "/" + k, transaction: t)
                }
            }
            try store.writeState(fe, .connected, transaction: t)
        }
    }

    private func startPumps(tap: TapDevice) throws {
        if tap.vnetHeaderSize > 0 {
            // What the namespace's kernel may hand us: partial checksums
            // always (we finish those the backend cannot take), TSO when the
            // backend segments it.
            try tap.setOffloads(csum: true, tso4: negotiated.txGSOTCPv4, tso6: negotiated.txGSOTCPv6)
        }
        for (i, q) in queues.enumerated() {
            let name = queues.count == 1 ? "netfront-\(guest.domain).\(devid)" : "netfront-\(guest.domain).\(devid)q\(i)"
            let p = try NetFrontendPump(queue: q, tap: tap.queue(i), negotiated: negotiated, postRx: options.postRxBuffers,
                                        statistics: statisticsBox, index: i, name: name)
            try p.start()
            pumps.append(p)
        }
    }

    /// Detaches the TAP's queues from `count` on (TUNSETQUEUE: the kernel
    /// then steers no flow to them); `reattachTapQueues` undoes it.
    private func detachTapQueues(_ tap: TapDevice, beyond count: Int) throws {
        for i in count..<max(count, tap.queueCount) {
            try tap.setQueueAttached(i, false)
            detachedTapQueues.append(i)
        }
    }

    private func reattachTapQueues() {
        for i in detachedTapQueues { try? tap?.setQueueAttached(i, true) }
        detachedTapQueues = []
    }

    /// Waits until `condition` (given the backend's state, nil when missing)
    /// returns a value or throws; re-evaluated on each watch event.
    @discardableResult
    func waitForBackend<T>(deadline: Double, what: String, _ condition: (XenbusState?) throws -> T?) throws -> T {
        let path = backendPath + "/state"
        let token = "netfront-\(devid)-\(UInt32.random(in: 0...UInt32.max))"
        try store.watch(path, token: token)
        defer { try? store.unwatch(path, token: token) }
        while true {
            if let v = try condition(store.readState(backendPath)) { return v }
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 { throw NetFrontendError.timeout(what + " (backend state \(backendState.map { "\($0)" } ?? "missing"))") }
            var pfd = pollfd(fd: store.watchFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, Int32(min(left, 0.2) * 1000) + 1)
            while let _ = try store.nextWatchEvent() {}
        }
    }

    // MARK: unplug

    /// Closes the device as netfront does: Closing; wait for the backend
    /// to be Closing or Closed (or gone); Closed; wait for the backend's
    /// Closed (or gone). Then stops the pumps, revokes every grant, frees
    /// every page and closes the event channels, even when the wait timed
    /// out (the error is thrown afterwards; state is then left at Closing).
    public func disconnect(timeout: Double = 10) throws {
        guard !queues.isEmpty else { return }
        let deadline = MonotonicClock.seconds() + timeout
        var failure: (any Error)?
        do {
            try store.writeState(frontendPath, .closing)
            let closed = try waitForBackend(deadline: deadline, what: "backend Closing") { state -> Bool? in
                switch state {
                case nil, .closed?, .unknown?: return true
                case .closing?: return false
                default: return nil
                }
            }
            try store.writeState(frontendPath, .closed)
            if !closed {
                try waitForBackend(deadline: deadline, what: "backend Closed") { state -> Bool? in
                    state == nil || state == .closed || state == .unknown ? true : nil
                }
            }
        } catch {
            failure = error
        }
        releaseResources()
        if let failure { throw failure }
    }

    /// Drops the connection without the handshake (a crashed guest): stops
    /// the pumps, revokes the grants (the control ring's too), frees the
    /// pages, closes the ports, attaches again the TAP queues `connect`
    /// detached.
    public func releaseResources() {
        for p in pumps { p.stop() }
        pumps = []
        for (i, q) in queues.enumerated() {
            statisticsBox.publish(q.stats, queue: i)
            q.release()
        }
        queues = []
        control?.release()
        control = nil
        reattachTapQueues()
        isConnected = false
    }
}
