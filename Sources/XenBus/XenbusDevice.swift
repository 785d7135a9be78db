import Glibc
import Hypervisor
import Logging
import SystemSupport
import XenABI

/// One backend device of any type: the backend half of the xenbus
/// handshake (xen/io/xenbus.h) with Linux's blkback/netback semantics, as
/// docs/ARCHITECTURE.md's state table gives them. Its `Driver` supplies
/// what is the type's own (keys, the resource, the data plane).
///
/// Lives on the control loop's thread. Blocking work (open, connect,
/// drain, flush, close) runs as a job on a worker; while a job runs the
/// device is `busy`, and what changed meanwhile is looked at when it ends,
/// so one device's slow disk never delays another's handshake.
public final class XenbusDevice<Driver: XenbusDriver>: @unchecked Sendable {   // confined to the control loop thread; jobs get their inputs boxed
    public let address: BackendDeviceAddress
    public let backendPath: String
    public let driver: Driver
    public private(set) var state: XenbusState = .initialising
    public private(set) var lastError: String?
    /// When `lastError` was set, in seconds since the Unix epoch.
    public private(set) var lastErrorTime: Double?
    public private(set) var resource: Driver.Resource?
    public private(set) var connection: Driver.Connection?
    /// The connection was taken over from a previous daemon (a restart, an
    /// upgrade, a kill -9) rather than made by a handshake of this one.
    public private(set) var resumed = false
    /// The last handshake this daemon made: seconds from our InitWait to
    /// our Connected (the frontend's own steps included).
    public private(set) var handshakeSeconds: Double?

    private let loop: XenbusControlLoop
    private let store: any XenStore
    private let backendDomain: DomID
    private let logger: Logger
    private var context: XenbusDeviceContext?
    private var hotplugDone = false
    private var online = true
    private var mayOfferAgain = true
    private var openedOnce = false
    private var busy = false
    private var changedWhileBusy = false
    private var reconfiguringKeyChangedWhileBusy = false
    private var failureWhileBusy: (message: String, permanent: Bool)?
    private var removal: (() -> Void)?
    private var removing = false
    private var quiescing = false
    /// Watch firings before the probe is done are not acted on.
    private var probed = false
    private var watches: [(path: String, token: String)] = []
    private var offeredAt: Double?

    init(address: BackendDeviceAddress, backendDomain: DomID, driver: Driver, loop: XenbusControlLoop, logger: Logger) {
        self.address = address
        self.backendDomain = backendDomain
        self.backendPath = address.backendPath(backendDomain: backendDomain)
        self.driver = driver
        self.loop = loop
        self.store = loop.store
        self.logger = logger
    }

    /// Where Linux's xenbus_dev_error/xenbus_dev_fatal report this device's
    /// errors: the backend domain's `error/` tree, mirroring the device path.
    public var errorPath: String {
        XenbusPaths.domainPath(backendDomain) + "/error/backend/\(address.type)/\(address.frontendDomain)/\(address.devid)"
    }

    // MARK: probe -> InitWait

    /// The device appeared: reads the toolstack's keys, watches, and offers
    /// the device (or takes over a ring a previous daemon left connected).
    func probe() {
        let ctx: XenbusDeviceContext
        do {
            let frontendPath = try store.readFrontendPath(backendPath: backendPath, address: address)
            let hasScript = !((try store.read(backendPath + "/script")) ?? "").isEmpty
            ctx = makeContext(frontendPath: frontendPath, hasScript: hasScript)
            context = ctx
            // Watched before the keys are read: a device refused for its keys
            // still answers its frontend's Closed with Closed.
            try watch(frontendPath + "/state") { [weak self] in self?.evaluate() }
            try watch(backendPath + "/online") { [weak self] in self?.onlineChanged() }
            if hasScript { try watch(backendPath + "/hotplug-status") { [weak self] in self?.hotplugStatusChanged() } }
            for key in driver.reconfiguringKeys {
                try watch(frontendPath + "/" + key) { [weak self] in self?.reconfiguringKeyChanged() }
            }
            online = readOnline()
            hotplugDone = try !hasScript || store.read(backendPath + "/hotplug-status") == "connected"
            try driver.readToolstackKeys(ctx)
        } catch {
            // What fails here is the toolstack's or the host's: final.
            probed = true
            fail(Self.reason(error, doing: "probe"), permanent: true)
            return
        }
        probed = true   // from here on, watch firings are acted on
        if isRunningConnection(ctx) {
            resume(ctx)
        } else if driver.opensBeforeInitWait {
            runJob("opening", { [driver] in try driver.open(ctx, resuming: false) }) { [self] result in
                switch result {
                case .success(let r):
                    resource = r
                    openedOnce = true
                    offer(permanent: true)
                case .failure(let e):
                    fail(Self.reason(e, doing: "opening"), permanent: true)
                }
            }
        } else {
            offer(permanent: true)
        }
    }

    private func makeContext(frontendPath: String, hasScript: Bool) -> XenbusDeviceContext {
        let device = WeakDevice(self)
        return XenbusDeviceContext(
            address: address, backendPath: backendPath, frontendPath: frontendPath, store: store,
            logger: logger, hasScript: hasScript,
            post: { [loop] task in loop.post(task) },
            fail: { [loop] reason in loop.post { device.value?.fail(reason) } },
            isAbandoned: { [abandoned] in abandoned.isRaised })
    }

    /// Both ends Connected when we find the device (or a vif's frontend in
    /// the middle of a reconfiguration): a restarted daemon (an upgrade, a
    /// kill -9) finding a guest that kept running on its rings.
    private func isRunningConnection(_ ctx: XenbusDeviceContext) -> Bool {
        guard let be = store.readState(backendPath), be == .connected || (be == .reconfigured && driver.reconfigures) else {
            return false
        }
        let fe = store.readState(ctx.frontendPath)
        return fe == .connected || (fe == .initialised && driver.connectsAtInitialised)
            || (fe == .reconfiguring && driver.reconfigures)
    }

    /// Takes the rings over where the previous daemon left them. Nothing
    /// is written to xenstore: the guest sees a pause, not a reconnect.
    private func resume(_ ctx: XenbusDeviceContext) {
        // Reconfigured: the frontend's Connected still to come is answered.
        state = store.readState(backendPath) == .reconfigured ? .reconfigured : .connected
        runJob("resuming", { [driver] in
            let r = try driver.open(ctx, resuming: true)
            do {
                return (r, try driver.connect(ctx, resource: r, resuming: true).connection)
            } catch {
                driver.close(ctx, resource: r, flush: false)
                throw error
            }
        }) { [self] result in
            switch result {
            case .success(let (r, c)):
                resource = r
                connection = c
                openedOnce = true
                resumed = true
                logger.notice("resumed a connected device")
            case .failure(let e):
                fail(Self.reason(e, doing: "resuming"))
            }
        }
    }

    /// Publishes what the driver offers, clears a previous failure's
    /// errors and goes InitWait; `permanent`: a failure here is final.
    private func offer(permanent: Bool) {
        guard let ctx = context else { return }
        let path = backendPath, keys = driver.offerKeys(ctx)
        do {
            // One transaction, skipped if the toolstack removed the directory meanwhile.
            let offered = try store.withTransaction { t throws(XenStoreError) -> Bool in
                guard try store.read(path + "/state", transaction: t) != nil else { return false }
                for (key, value) in keys {
                    if let value {
                        try store.write(path + "/" + key, value, transaction: t)
                    } else if try store.read(path + "/" + key, transaction: t) != nil {
                        try store.remove(path + "/" + key, transaction: t)
                    }
                }
                if try store.read(path + "/error", transaction: t) != nil { try store.remove(path + "/error", transaction: t) }
                try store.writeState(path, .initWait, transaction: t)
                return true
            }
            guard offered else { return }
            try store.removeIfPresent(errorPath)
            lastError = nil
            lastErrorTime = nil
            state = .initWait
            offeredAt = MonotonicClock.seconds()
        } catch {
            fail(Self.reason(error, doing: "offering the device"), permanent: permanent)
            return
        }
        evaluate()   // open once hotplug is done; connect if the frontend is ready
    }

    // MARK: the state machine

    /// Looks at the frontend's state (and hotplug, online) and takes the
    /// next step. Called on every watch firing and after every job.
    func evaluate() {
        guard let ctx = context, probed, !removing, !quiescing else { return }
        if busy {
            changedWhileBusy = true
            return
        }
        if resource == nil, !driver.opensBeforeInitWait, hotplugDone, state == .initWait, online {
            let permanent = !openedOnce
            runJob("opening", { [driver] in try driver.open(ctx, resuming: false) }) { [self] result in
                switch result {
                case .success(let r):
                    resource = r
                    openedOnce = true
                    evaluate()
                case .failure(let e):
                    fail(Self.reason(e, doing: "opening"), permanent: permanent)
                }
            }
            return
        }
        let fe = store.readFrontendState(ctx.frontendPath, logger: logger)   // nil counts as Closed
        switch FrontendStateReaction(frontend: fe, backend: state, mayOfferAgain: mayOfferAgain,
                                     connectsAtInitialised: driver.connectsAtInitialised, online: online,
                                     reconfigures: driver.reconfigures) {
        case .none:
            break
        case .connect:
            if let r = resource, hotplugDone { connect(ctx, r) }   // else once hotplug is done
        case .close(let next):
            close(to: next)
        case .offerAgain:
            if driver.opensBeforeInitWait && resource == nil { return }   // its resource failed for good
            logger.info("offering the device again")
            offer(permanent: false)
        case .reconfigure:
            guard let c = connection else { return }
            do {
                try driver.reconfigure(ctx, connection: c)
                try setState(.reconfigured)
                logger.info("reconfigured")
            } catch {
                fail(Self.reason(error, doing: "reconfiguring"))
            }
        case .endReconfigure:
            do { try setState(.connected) } catch { fail(Self.reason(error, doing: "publishing Connected")) }
        }
    }

    /// Connects on a worker and publishes Connected there too (its
    /// transaction is a dozen xenstore round trips: the control thread,
    /// which every device shares, does not wait for them).
    private func connect(_ ctx: XenbusDeviceContext, _ r: Driver.Resource) {
        let input = Unchecked(r)
        let store = store, path = backendPath
        runJob("connecting", { [driver] in
            let c = try driver.connect(ctx, resource: input.value, resuming: false)
            let published = Result { () throws(XenStoreError) -> Bool in try Self.publishConnected(c.keys, at: path, in: store) }
            return (c.connection, published)
        }) { [self] result in
            switch result {
            case .success(let (c, published)):
                connection = c
                resumed = false
                switch published {
                case .success(true):
                    state = .connected
                    handshakeSeconds = offeredAt.map { MonotonicClock.seconds() - $0 }
                    logger.debug("state", metadata: ["state": "\(XenbusState.connected)"])
                case .success(false):
                    break   // the directory is gone: its removal follows
                case .failure(let e):
                    fail(Self.reason(e, doing: "publishing Connected"))
                }
            case .failure(let e):
                fail(Self.reason(e, doing: "connecting"))
            }
        }
    }

    /// For a device serving its frontend (Connected, no job running, not
    /// going away): asks `change` for keys whose values changed under the
    /// connection (a disk grown), and writes them with state=Connected
    /// again in one transaction, as Linux's blkback tells blkfront of a new
    /// size: the frontend's watch on our state fires and it reads them
    /// again. Once they are written, `published` runs (the driver records
    /// what the frontend now has). Returns the keys written; nil when
    /// nothing changed, the device is not serving, or the write failed
    /// (logged: the next call finds the same change and tries again).
    @discardableResult
    public func republishIfChanged(
        _ change: (Driver.Resource, Driver.Connection) -> [(key: String, value: String)]?,
        published: (Driver.Connection) -> Void
    ) -> [(key: String, value: String)]? {
        guard state == .connected, !busy, !removing, !quiescing, let r = resource, let c = connection,
              let keys = change(r, c), !keys.isEmpty else { return nil }
        do {
            guard try Self.publishConnected(keys, at: backendPath, in: store) else { return nil }   // removal follows
        } catch {
            logger.warning("cannot publish changed keys", metadata: ["keys": "\(keys.map(\.key))", "error": "\(error)"])
            return nil
        }
        published(c)
        return keys
    }

    /// The driver's keys and state=Connected in one transaction (retried
    /// when it ends in EAGAIN, as Linux's blkback does); false, and nothing
    /// written, if the toolstack removed the directory meanwhile.
    private static func publishConnected(_ keys: [(key: String, value: String)], at path: String,
                                         in store: any XenStore) throws(XenStoreError) -> Bool {
        try store.withTransaction { t throws(XenStoreError) -> Bool in
            guard try store.read(path + "/state", transaction: t) != nil else { return false }
            for (key, value) in keys { try store.write(path + "/" + key, value, transaction: t) }
            try store.writeState(path, .connected, transaction: t)
            return true
        }
    }

    /// Stops serving (every request answered, what was written flushed
    /// and the resource let go if the driver does), then writes `next`.
    private func close(to next: XenbusState) {
        stopServing { [self] in
            do { try setState(next) } catch {
                logger.warning("cannot write the backend state", metadata: ["state": "\(next)", "error": "\(error)"])
            }
        }
    }

    /// Disconnects and (if the driver lets its resource go at a close)
    /// flushes and closes it, on a worker; then `done` on the control thread.
    private func stopServing(release: Bool? = nil, flush: Bool = true, then done: @escaping () -> Void) {
        guard let ctx = context else { done(); return }
        let c = connection.map(Unchecked.init)
        let r = resource.map(Unchecked.init)
        let releasing = (release ?? driver.releasesOnClose) && r != nil
        guard c != nil || releasing else { done(); return }
        runJob("closing", { [driver] in
            if let c, let r { driver.disconnect(ctx, resource: r.value, connection: c.value) }
            if releasing, let r { driver.close(ctx, resource: r.value, flush: flush) }
        }) { [self] _ in
            if let c {
                driver.retired(c.value)
                connection = nil
                resumed = false
                logger.info("disconnected")
            }
            if releasing { resource = nil }
            done()
        }
    }

    /// A key the driver reads on Reconfiguring changed: applied to a
    /// running connection at once (the state may have changed before it).
    private func reconfiguringKeyChanged() {
        if busy {
            // A connect running may have read the key before it changed.
            reconfiguringKeyChangedWhileBusy = true
            return
        }
        guard let ctx = context, probed, !removing, !quiescing, let c = connection,
              state == .connected || state == .reconfigured else { return }
        do { try driver.reconfigure(ctx, connection: c) } catch { fail(Self.reason(error, doing: "reconfiguring")) }
    }

    private func hotplugStatusChanged() {
        guard !hotplugDone, let s = (try? store.read(backendPath + "/hotplug-status")) ?? nil else { return }
        if s == "connected" {
            hotplugDone = true
            evaluate()
        } else if s == "error" {
            let why = (try? store.read(backendPath + "/hotplug-error")) ?? nil
            fail("hotplug script failed: \(why.map { GuestText.escaped($0, limit: 256) } ?? "no hotplug-error given")",
                 permanent: true)
        }
    }

    private func onlineChanged() {
        let now = readOnline()
        guard now != online else { return }
        online = now
        logger.info("online", metadata: ["online": "\(online)"])
        evaluate()
    }

    /// The toolstack's `online` key: absent counts as 1 (older toolstacks).
    private func readOnline() -> Bool {
        ((try? store.read(backendPath + "/online")) ?? nil) != "0"
    }

    // MARK: failures

    /// Records why the device cannot work — in the log with the device
    /// named, in the backend domain's `error/` tree as Linux's
    /// xenbus_dev_fatal does ("<errno> <message>"), and in the device's
    /// `error` key — stops serving, and goes Closing (Closed if the
    /// frontend is gone). `message` holds guest bytes only escaped
    /// (`GuestText`). A frontend starting over (Closed, then Initialising)
    /// gets the device again unless the failure is `permanent`.
    public func fail(_ message: String, permanent: Bool = false) {
        guard !removing, !quiescing else { return }
        if busy {
            if failureWhileBusy == nil || permanent { failureWhileBusy = (message, permanent) }
            return
        }
        logger.error("device failed", metadata: ["reason": "\(message)", "final": "\(permanent)"])
        lastError = message
        lastErrorTime = WallClock.seconds()
        if permanent { mayOfferAgain = false }
        // Not into a directory the toolstack already removed (a write would create it again).
        if ((try? store.read(backendPath + "/frontend")) ?? nil) != nil {
            // EINVAL, as Linux's backends give for what a peer or toolstack wrote.
            try? store.write(errorPath + "/error", "\(EINVAL) \(message)")
            try? store.write(backendPath + "/error", message)
        }
        stopServing { [self] in
            // Closed at once only for a frontend known to be gone (not one
            // whose path the toolstack's keys did not give).
            var next = XenbusState.closing
            if let ctx = context {
                let fe = store.readFrontendState(ctx.frontendPath, logger: logger) ?? .closed
                if fe == .closed || fe == .unknown { next = .closed }
            }
            if state != next && state != .closed { try? setState(next) }
        }
    }

    // MARK: removal, daemon stop

    /// The device's directory is gone: stop serving, free everything, drop
    /// the watches and the error node, then `done` (on the control thread).
    func remove(then done: @escaping () -> Void) {
        removal = done
        abandoned.raise()
        if !busy { startRemoval() }
    }

    private func startRemoval() {
        guard let done = removal, !removing else { return }
        removing = true
        for w in watches { loop.unwatch(w.path, token: w.token) }
        watches.removeAll()
        stopServing(release: true, flush: false) { [self] in
            try? store.removeIfPresent(errorPath)
            logger.info("device released")
            done()
        }
    }

    /// The daemon stops: no further step is taken; what a job was doing is
    /// recorded when it ends (`XenbusDeviceTable` waits for the workers).
    func beginQuiesce() {
        quiescing = true
        abandoned.raise()
    }

    /// Raised on removal and on the daemon's stop (`XenbusDeviceContext.isAbandoned`).
    private let abandoned = AbandonedFlag()

    /// After `beginQuiesce` and the workers' end: the connection to stop,
    /// leaving xenstore as it is (a restarted daemon resumes), or the
    /// resource too (`release`).
    func takeForShutdown(release: Bool) -> (() -> Void)? {
        guard let ctx = context else { return nil }
        let c = connection.map(Unchecked.init)
        let r = resource.map(Unchecked.init)
        if let c { driver.retired(c.value) }
        connection = nil
        if release { resource = nil }
        let d = Unchecked(driver)
        guard c != nil || (release && r != nil) else { return nil }
        return {
            if let c, let r { d.value.disconnect(ctx, resource: r.value, connection: c.value) }
            if release, let r { d.value.close(ctx, resource: r.value, flush: false) }
        }
    }

    // MARK: jobs

    /// Runs `work` on a worker (inline under `XenbusWorkers.inline`), then
    /// `done` with its result on the control thread. The device is busy
    /// in between; what changed meanwhile is looked at after `done`.
    private func runJob<T>(_ what: String, _ work: @escaping () throws -> T,
                           then done: @escaping (Result<T, any Error>) -> Void) {
        busy = true
        let job = Unchecked(work)
        let finish = Unchecked(done)
        do {
            try loop.jobs.submit { [loop, self] in
                let result = Unchecked(Result { try job.value() })
                loop.post { self.finish(result.value, finish.value) }
            }
        } catch {
            busy = false
            done(.failure(DeviceFailure("cannot start a worker for \(what): \(error)")))
        }
    }

    private func finish<T>(_ result: Result<T, any Error>, _ done: (Result<T, any Error>) -> Void) {
        busy = false
        done(result)
        guard !busy else { return }
        if removal != nil && !removing {
            startRemoval()
        } else if let f = failureWhileBusy {
            failureWhileBusy = nil
            fail(f.message, permanent: f.permanent)
        } else if changedWhileBusy {
            changedWhileBusy = false
            evaluate()
        }
        if !busy && reconfiguringKeyChangedWhileBusy {
            reconfiguringKeyChangedWhileBusy = false
            reconfiguringKeyChanged()
        }
    }

    // MARK: helpers

    /// Writes the backend's `state`, as Linux's xenbus_switch_state does:
    /// in a transaction that first checks the node is still there, so a
    /// device whose directory the toolstack removed is not created again.
    private func setState(_ s: XenbusState) throws(XenStoreError) {
        let path = backendPath
        let written = try store.withTransaction { t throws(XenStoreError) -> Bool in
            guard try store.read(path + "/state", transaction: t) != nil else { return false }
            try store.writeState(path, s, transaction: t)
            return true
        }
        state = s
        guard written else { return }
        logger.debug("state", metadata: ["state": "\(s)"])
    }

    private func watch(_ path: String, _ handler: @escaping () -> Void) throws(XenStoreError) {
        let token = try loop.watch(path) { _ in handler() }
        watches.append((path, token))
    }

    /// A failure's text: a `DeviceFailure`'s message as it is, anything
    /// else after what was being done.
    static func reason(_ error: any Error, doing what: String) -> String {
        if let e = error as? DeviceFailure { return e.message }
        return "\(what) failed: \(error)"
    }
}

/// A value moved between the control thread and a worker: the framework
/// hands each one to exactly one thread at a time.
struct Unchecked<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
