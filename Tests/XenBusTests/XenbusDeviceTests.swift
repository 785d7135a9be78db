import EngineDoubles
import Glibc
import Hypervisor
import Logging
import Testing
import XenABI
import XenBus

/// A device type that records what the framework asks of it, for stepping
/// `XenbusDevice` row by row on an in-memory xenstore, on one thread.
final class RecordingDriver: XenbusDriver {
    final class Resource {
        let serial: Int
        init(_ serial: Int) { self.serial = serial }
    }
    typealias Connection = Int

    let connectsAtInitialised: Bool
    let opensBeforeInitWait: Bool
    let releasesOnClose: Bool
    var calls: [String] = []
    var failOpen: String?
    var failConnect: String?
    var lastContext: XenbusDeviceContext?
    private var opened = 0
    private var connections = 0

    init(connectsAtInitialised: Bool = true, opensBeforeInitWait: Bool = false, releasesOnClose: Bool = true) {
        self.connectsAtInitialised = connectsAtInitialised
        self.opensBeforeInitWait = opensBeforeInitWait
        self.releasesOnClose = releasesOnClose
    }

    func readToolstackKeys(_ d: XenbusDeviceContext) throws {
        calls.append("keys")
        if let p = try d.store.read(d.backendPath + "/params"), p == "bad" { throw DeviceFailure("params \"bad\" refused") }
    }
    func offerKeys(_ d: XenbusDeviceContext) -> [(key: String, value: String?)] { [("feature-x", "1"), ("stale", nil)] }
    func open(_ d: XenbusDeviceContext, resuming: Bool) throws -> Resource {
        calls.append(resuming ? "open(resuming)" : "open")
        if let failOpen { throw DeviceFailure(failOpen) }
        opened += 1
        return Resource(opened)
    }
    func connect(_ d: XenbusDeviceContext, resource: Resource, resuming: Bool) throws
        -> (connection: Int, keys: [(key: String, value: String)]) {
        calls.append(resuming ? "connect(resuming)" : "connect")
        lastContext = d
        if let failConnect { throw DeviceFailure(failConnect) }
        connections += 1
        return (connections, [("sectors", "8")])
    }
    func disconnect(_ d: XenbusDeviceContext, resource: Resource, connection: Int) { calls.append("disconnect") }
    func close(_ d: XenbusDeviceContext, resource: Resource, flush: Bool) { calls.append(flush ? "close(flush)" : "close") }
    func retired(_ connection: Int) { calls.append("retired") }
}

/// One device of type "fake" (domain 1, devid 0), its table, loop and store.
final class FrameworkHarness {
    let store = InMemoryXenStore()
    let loop: XenbusControlLoop
    let driver: RecordingDriver
    let table: XenbusDeviceTable<RecordingDriver>
    let be = "/local/domain/0/backend/fake/1/0"
    let fe = "/local/domain/1/device/fake/0"
    var errorTree: String { "/local/domain/0/error/backend/fake/1/0" }

    init(_ driver: RecordingDriver = RecordingDriver()) throws {
        self.driver = driver
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        loop = XenbusControlLoop(store: store, logger: logger, workers: .inline)
        table = XenbusDeviceTable(loop: loop, backendDomain: 0, type: "fake", logger: logger) { _, _ in driver }
        try table.start()
        settle()
    }

    /// The toolstack's keys, as libxl writes them; the frontend at Initialising.
    func add(script: Bool = false, params: String = "disk", backendState: XenbusState = .initialising,
             frontendState: XenbusState = .initialising) throws {
        try store.write(fe + "/state", frontendState.xenstoreValue)
        for (k, v) in [("frontend-id", "1"), ("online", "1"), ("params", params), ("state", backendState.xenstoreValue),
                       ("stale", "x")] {
            try store.write(be + "/" + k, v)
        }
        if script { try store.write(be + "/script", "/etc/xen/scripts/block") }
        try store.write(be + "/frontend", fe)   // last: the device exists once this key does
        settle()
    }

    func settle() {
        for _ in 0..<64 {
            loop.runPending()
            if store.pendingEvents == 0 && !loop.hasPendingTasks { return }
        }
        Issue.record("the control plane never settled")
    }

    func frontend(_ s: XenbusState) throws {
        try store.write(fe + "/state", s.xenstoreValue)
        settle()
    }

    var backend: XenbusState? { store.readState(be) }
    func read(_ path: String) -> String? { (try? store.read(path)) ?? nil }
    var device: XenbusDevice<RecordingDriver>? { table.all.first }
}

@Suite("the xenbus framework, state by state (XenbusDevice on an in-memory xenstore)")
struct XenbusDeviceTests {
    /// Online resize's path through the framework: changed keys and
    /// state=Connected written again, `published` only once they are.
    @Test("republishIfChanged: keys and Connected written again while serving; a refused write is not published; nothing while not serving")
    func republishChangedKeys() throws {
        let h = try FrameworkHarness()
        try h.add()
        let device = try #require(h.device)
        var asked = 0, published: [Int] = []
        let change: (RecordingDriver.Resource, Int) -> [(key: String, value: String)]? = { _, _ in
            asked += 1
            return [("sectors", "16")]
        }
        #expect(h.backend == .initWait)
        #expect(device.republishIfChanged(change, published: { published.append($0) }) == nil && asked == 0,
                "InitWait: not serving, not even asked")
        try h.frontend(.initialised)
        #expect(h.backend == .connected && h.read(h.be + "/sectors") == "8")
        #expect(asked == 0)

        h.store.refusesWritesUnder = h.be
        #expect(device.republishIfChanged(change, published: { published.append($0) }) == nil)
        #expect(asked == 1 && published.isEmpty && h.read(h.be + "/sectors") == "8", "a refused write is not published")

        h.store.refusesWritesUnder = nil
        let stateWatch = "republish-test"
        try h.store.watch(h.be + "/state", token: stateWatch)
        while let e = try h.store.nextWatchEvent(), e.token != stateWatch {}   // the watch's first firing
        let written = device.republishIfChanged(change, published: { published.append($0) })
        #expect(written?.map(\.key) == ["sectors"] && asked == 2 && published == [1])
        #expect(h.read(h.be + "/sectors") == "16" && h.backend == .connected)
        var fired = false
        while let e = try h.store.nextWatchEvent() { if e.token == stateWatch { fired = true } }
        #expect(fired, "state written again: the frontend's watch on it fires")

        try h.frontend(.closing)
        #expect(device.republishIfChanged(change, published: { published.append($0) }) == nil && asked == 2,
                "not serving: not even asked")
    }

    @Test("InitWait as soon as the toolstack's keys are there; the resource opened once hotplug is done")
    func initWaitThenHotplug() throws {
        let h = try FrameworkHarness()
        try h.add(script: true)
        #expect(h.backend == .initWait)
        #expect(h.read(h.be + "/feature-x") == "1")
        #expect(h.read(h.be + "/stale") == nil)
        #expect(h.driver.calls == ["keys"])
        try h.frontend(.initialised)
        #expect(h.backend == .initWait, "no connect before the hotplug script is done")
        #expect(h.device?.handshakeSeconds == nil)
        usleep(50_000)
        try h.store.write(h.be + "/hotplug-status", "connected")
        h.settle()
        #expect(h.driver.calls == ["keys", "open", "connect"])
        #expect(h.backend == .connected)
        #expect(h.read(h.be + "/sectors") == "8")
        // InitWait to Connected, the wait for the hotplug script included.
        let seconds = try #require(h.device?.handshakeSeconds)
        #expect(seconds >= 0.05 && seconds < 5, "\(seconds)")
        #expect(h.device?.resumed == false)
    }

    @Test("a type that needs Connected (netback) ignores Initialised; one that opens before InitWait does")
    func vifLike() throws {
        let h = try FrameworkHarness(RecordingDriver(connectsAtInitialised: false, opensBeforeInitWait: true, releasesOnClose: false))
        try h.add()
        #expect(h.driver.calls == ["keys", "open"])
        #expect(h.backend == .initWait)
        try h.frontend(.initialised)
        #expect(h.backend == .initWait)
        try h.frontend(.connected)
        #expect(h.backend == .connected)
        // Closing keeps the resource (a TAP) and starting over does not open it again.
        try h.frontend(.closing)
        #expect(h.backend == .closing)
        try h.frontend(.closed)
        try h.frontend(.initialising)
        #expect(h.backend == .initWait)
        try h.frontend(.connected)
        #expect(h.driver.calls == ["keys", "open", "connect", "disconnect", "retired", "connect"])
    }

    @Test("Closing is answered with Closing (drained, flushed, let go), Closed after the frontend's Closed, InitWait after Initialising")
    func closeAndStartOver() throws {
        let h = try FrameworkHarness()
        try h.add()
        try h.frontend(.initialised)
        #expect(h.backend == .connected)
        try h.frontend(.closing)
        #expect(h.backend == .closing)
        #expect(h.driver.calls.suffix(3) == ["disconnect", "close(flush)", "retired"])
        try h.frontend(.closed)
        #expect(h.backend == .closed)
        try h.frontend(.initialising)
        #expect(h.backend == .initWait)
        #expect(h.driver.calls.last == "open", "the disk opened again for the new connection")
        try h.frontend(.initialised)
        #expect(h.backend == .connected)
    }

    @Test("a frontend gone Closed (or its state node removed) while Connected gets Closed")
    func closedStraightAway() throws {
        let h = try FrameworkHarness()
        try h.add()
        try h.frontend(.connected)
        try h.store.remove(h.fe + "/state")
        h.settle()
        #expect(h.backend == .closed)
        #expect(h.driver.calls.suffix(3) == ["disconnect", "close(flush)", "retired"])
    }

    @Test("a failure the frontend caused: Closing, errors where Linux puts them; Closed, Initialising: InitWait, errors gone")
    func frontendFailureIsNotFinal() throws {
        let h = try FrameworkHarness()
        h.driver.failConnect = "malformed ring-ref \"+8\""
        try h.add()
        try h.frontend(.initialised)
        #expect(h.backend == .closing)
        #expect(h.read(h.be + "/error") == "malformed ring-ref \"+8\"")
        #expect(h.read(h.errorTree + "/error") == "22 malformed ring-ref \"+8\"")
        #expect(h.device?.lastError == "malformed ring-ref \"+8\"")
        #expect(h.driver.calls.last == "close(flush)", "the disk let go at the failure")
        try h.frontend(.closed)
        #expect(h.backend == .closed)
        h.driver.failConnect = nil
        try h.frontend(.initialising)
        #expect(h.backend == .initWait)
        #expect(h.read(h.be + "/error") == nil && h.read(h.errorTree) == nil)
        try h.frontend(.initialised)
        #expect(h.backend == .connected)
    }

    @Test("a failure the toolstack caused is final: a failed hotplug script, or a refused key")
    func toolstackFailureIsFinal() throws {
        let h = try FrameworkHarness()
        try h.add(script: true)
        try h.store.write(h.be + "/hotplug-error", "no such disk")
        try h.store.write(h.be + "/hotplug-status", "error")
        h.settle()
        #expect(h.backend == .closing)
        #expect(h.read(h.be + "/error") == "hotplug script failed: no such disk")
        try h.frontend(.closed)
        #expect(h.backend == .closed)
        try h.frontend(.initialising)
        #expect(h.backend == .closed, "not offered again")

        let k = try FrameworkHarness()
        try k.add(params: "bad")
        #expect(k.backend == .closing)
        #expect(k.read(k.errorTree + "/error") == "22 params \"bad\" refused")
        #expect(k.driver.calls == ["keys"])
    }

    @Test("online=0: an unconnected frontend gets Closed at once and nothing is offered again; a connected one closes as usual")
    func onlineZero() throws {
        let h = try FrameworkHarness()
        try h.add()
        #expect(h.backend == .initWait)
        try h.store.write(h.be + "/online", "0")
        h.settle()
        #expect(h.backend == .closed)
        try h.frontend(.initialising)
        #expect(h.backend == .closed)

        let c = try FrameworkHarness()
        try c.add()
        try c.frontend(.connected)
        try c.store.write(c.be + "/online", "0")
        c.settle()
        #expect(c.backend == .connected)
        try c.frontend(.closing)
        #expect(c.backend == .closing)
        try c.frontend(.closed)
        #expect(c.backend == .closed)
        try c.frontend(.initialising)
        #expect(c.backend == .closed)
    }

    @Test("a data plane's failure (posted from its thread) closes the device like any other")
    func dataPlaneFailure() throws {
        let h = try FrameworkHarness()
        try h.add()
        try h.frontend(.connected)
        h.driver.lastContext?.fail("the frontend broke the ring protocol")
        h.settle()
        #expect(h.backend == .closing)
        #expect(h.driver.calls.suffix(3) == ["disconnect", "close(flush)", "retired"])
        #expect(h.read(h.be + "/error") == "the frontend broke the ring protocol")
    }

    @Test("both ends Connected at probe (a restarted daemon): resumed, nothing written")
    func resume() throws {
        let h = try FrameworkHarness()
        try h.add(backendState: .connected, frontendState: .connected)
        #expect(h.driver.calls == ["keys", "open(resuming)", "connect(resuming)"])
        #expect(h.device?.state == .connected)
        #expect(h.read(h.be + "/feature-x") == nil && h.read(h.be + "/sectors") == nil)
        #expect(h.device?.resumed == true && h.device?.handshakeSeconds == nil, "no handshake: taken over")
        // The guest starts over: a handshake of this daemon's, no longer a resumed connection.
        try h.frontend(.closing)
        #expect(h.device?.resumed == false)
        try h.frontend(.closed)
        try h.frontend(.initialising)
        try h.frontend(.initialised)
        #expect(h.backend == .connected && h.device?.resumed == false && h.device?.handshakeSeconds != nil)
    }

    @Test("the directory removed: disconnected, let go without a flush, error node removed, the device gone")
    func removal() throws {
        let h = try FrameworkHarness()
        h.driver.failConnect = "bad"
        try h.add()
        try h.frontend(.connected)
        #expect(h.read(h.errorTree + "/error") != nil)
        h.driver.failConnect = nil
        try h.frontend(.closed)
        try h.frontend(.initialising)
        try h.frontend(.connected)
        try h.store.remove(h.be)
        h.settle()
        #expect(h.driver.calls.suffix(3) == ["disconnect", "close", "retired"])
        #expect(h.table.all.isEmpty)
        #expect(h.read(h.errorTree) == nil && h.read(h.be) == nil)
    }
}
