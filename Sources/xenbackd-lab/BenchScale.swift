import ArgumentParser
import BlockBackend
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import LoopbackHypervisor
import SystemSupport
import XenStoreClient

/// `xenbackd-lab bench scale`: one daemon for a whole host. The real daemon
/// (`xenbackd run`, a process of its own, in a "dom0" namespace with the
/// bridge) and the loopback xenstored; this process is the toolstack and
/// the guests (a thread each). N guests, each with a vbd on a sparse file
/// and a vif, are started at the same moment, connect, do a little
/// verified I/O and ping dom0, then the daemon is measured connected and
/// idle, and all guests are destroyed at once.
struct BenchScale: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "scale",
                                                    abstract: "Start, measure and destroy N guests at once against one daemon.")

    @Option(help: "Guests, each with one vbd and one vif.")
    var guests = 10
    @Option(help: "Seconds the daemon is watched idle with all guests connected.")
    var idleSeconds = 30.0
    @Option(help: "Size of each guest's sparse disk, MiB.")
    var diskMiB = 32
    @Option(help: "Verified requests each guest makes (reads are checked against what was written).")
    var operations = 64
    @Option(help: "Seconds a guest waits for the backend at each step.")
    var timeout = 60.0
    @Option(help: "Folder for the disks' temp folder.")
    var diskDirectory = "/var/tmp"
    @Flag(help: "With all connected: every guest does verified I/O while the daemon is killed (SIGKILL) and restarted; all must go on without an error.")
    var killRestart = false
    @Option(help: "Seconds of I/O after the restart (--kill-restart).")
    var afterRestartSeconds = 3.0
    @Option(help: ArgumentHelp("After the teardown, write the world's namespace, root, daemon pid and its fds before the guests to this file, and wait until it is removed (so that a test can look for leftovers itself).", visibility: .hidden))
    var pauseAfterTeardown: String?

    func validate() throws {
        guard (1...4000).contains(guests) else { throw ValidationError("--guests must be 1 to 4000") }
        guard idleSeconds >= 0 else { throw ValidationError("--idle-seconds must be 0 or more") }
    }

    func run() throws {
        guard geteuid() == 0 else { throw ValidationError("bench scale needs root (a network namespace, TAPs, a bridge)") }
        let n = guests
        warnIfAIOEventsShort(vbds: n)
        note("starting xenstored and the daemon (a namespace with xenbr0)")
        let world = try ScaleWorld(diskBase: diskDirectory)
        defer { world.tearDown() }
        let baseline = DaemonProcess(pid: world.daemonPID)
        let baselineFDs = baseline.descriptorTargets.count, baselineThreads = baseline.threads

        note("preparing \(n) guests: memory, grant tables, \(diskMiB) MiB sparse disks")
        let guestList = try (1...n).map { d -> ScaleGuest in
            let disk = world.diskDirectory + "/disk\(d).img"
            let fd = open(disk, O_CREAT | O_RDWR, 0o600)
            guard fd >= 0, ftruncate(fd, off_t(diskMiB) << 20) == 0 else { throw ScaleError("cannot create \(disk): errno \(errno)") }
            close(fd)
            return try ScaleGuest(domid: d, layout: world.layout, disk: disk)
        }
        try world.addNeighbours(Array(1...n))
        let dom0 = try XenStoreSocketClient(socketPath: world.layout.xenStoreSocket)
        defer { dom0.close() }
        let toolstack = LoopbackToolstack(store: dom0)
        let monitor = try StateMonitor(socket: world.layout.xenStoreSocket)
        defer { monitor.stop() }

        note("starting \(n) guests at once (\(2 * n) devices)")
        let layout = world.layout
        let (operations, timeout) = (self.operations, self.timeout)
        let busy = StartCPU(world: world)
        let start = try runAtOnce(n, name: "guest", progress: { done in note("\(done)/\(n) guests through start, I/O and ping") }) { i in
            guestList[i].start(toolstack: toolstack, dom0: dom0, layout: layout, operations: operations, timeout: timeout)
        }
        let startCPU = busy.since()
        let timings = StartTimings(guests: guestList, monitor: monitor)
        let ready = guestList.count { $0.isReady }
        for g in guestList where !g.isReady { note(g.failure ?? "dom\(g.domid): not ready") }
        if ready < n { note("the daemon's log ends with:\n" + world.daemonLogTail()) }

        let probe = DaemonProcess(pid: world.daemonPID)
        let memory = probe.memory
        let threads = probe.threads, fds = probe.descriptorTargets.count
        say("xenbackd-lab bench scale: \(n) guests, \(n) vbds (\(diskMiB) MiB sparse files) and \(n) vifs (xenbr0), "
            + "started at once; the daemon is pid \(world.daemonPID)")
        say("all started, connected, verified and pinged in \(fixed(start.finished - start.released, 2)) s")
        say("keys -> InitWait:         vbd \(timings.vbdInitWait.summary); vif \(timings.vifInitWait.summary)")
        say("Initialised -> Connected: vbd \(timings.vbdConnected.summary); vif \(timings.vifConnected.summary)")
        say("CPU while starting: the daemon \(fixed(startCPU.daemon, 2)) s (its control thread \(fixed(startCPU.control, 2)) s, "
            + "which slept \(startCPU.controlSleeps) times), xenstored \(fixed(startCPU.xenstored, 2)) s, in \(fixed(startCPU.wall, 2)) s")
        say("  all devices: InitWait \(timings.initWait.summary); Connected \(timings.connected.summary); "
            + "past libxl's 10 s InitWait limit: \(timings.initWait.values.count { $0 > 10 })")
        let verified = guestList.reduce(UInt64(0)) { $0 + $1.io.sectorsVerified }
        say("ready \(ready)/\(n): both devices Connected, \(guestList.reduce(0) { $0 + $1.io.reads + $1.io.writes }) requests "
            + "(\(verified) sectors read back and verified), \(guestList.count { $0.pinged }) pings of dom0 answered")
        say("daemon with all connected: RSS \(memory.residentKB / 1024) MiB (anonymous \(memory.anonymousKB / 1024), "
            + "shared guest pages \(memory.sharedKB / 1024)), threads \(threads) (\(baselineThreads) before), "
            + "fds \(fds) (\(baselineFDs) before)")

        let idle = measureIdle(probe)
        say("idle \(fixed(idleSeconds, 0)) s with all connected: CPU \(fixed(idle.cpuPercent, 2)) % of one core, "
            + "\(fixed(idle.wakeupsPerSecond, 1)) wake-ups/s (voluntary context switches of all its threads)")

        var wentOn: Int?
        if killRestart {
            wentOn = try KillRestartPhase(world: world, store: dom0, guests: guestList.filter(\.isReady), afterRestart: afterRestartSeconds).run()
        }

        note("destroying \(n) guests at once")
        let teardown = try destroyAll(guestList, toolstack: toolstack, dom0: dom0, world: world,
                                      baseline: (baselineFDs, baselineThreads))
        say("teardown: all destroyed in \(fixed(teardown.seconds, 2)) s; left behind: \(teardown.leftovers.description)")
        for path in teardown.leftovers.nodePaths { say("  left in xenstore: \(path)") }
        if let pauseAfterTeardown { pause(pauseAfterTeardown, world: world, baselineFDs: baselineFDs) }
        if let wentOn {
            say("kill -9 under I/O: \(wentOn)/\(ready) guests went on without an error"
                + (wentOn == ready && ready == n ? " (all went on)" : " (NOT all went on)"))
        }
        say("scale \(n) guests: ready \(ready)/\(n), connected p99 \(ms(timings.connected.percentile(0.99))) ms, "
            + "max \(ms(timings.connected.max)) ms, RSS \(memory.residentKB / 1024) MiB, threads \(threads), fds \(fds), "
            + "idle CPU \(fixed(idle.cpuPercent, 2)) %, teardown \(fixed(teardown.seconds, 2)) s, leftovers \(teardown.leftovers.total)")
        if ready < n || teardown.leftovers.total > 0 || (wentOn.map { $0 < n } ?? false) {
            let kept = "/tmp/xenbackd-scale-\(getpid()).log"
            if world.keepDaemonLog(at: kept) { note("the daemon's log is kept in \(kept)") }
            throw ExitCode.failure
        }
    }

    /// Hands the world to an outside checker until it removes `file` (at most 5 minutes).
    private func pause(_ file: String, world: ScaleWorld, baselineFDs: Int) {
        let text = "namespace=\(world.namespace)\nroot=\(world.root)\ndaemon=\(world.daemonPID)\nbaseline-fds=\(baselineFDs)\n"
        try? text.write(toFile: file + ".tmp", atomically: false, encoding: .utf8)
        rename(file + ".tmp", file)
        let deadline = MonotonicClock.seconds() + 300
        while access(file, F_OK) == 0 && MonotonicClock.seconds() < deadline { usleep(50_000) }
    }

    /// With libaio (the daemon's default engine), each vbd's storage
    /// reserves `storageQueueDepth` aio events (io_setup); past
    /// fs.aio-max-nr the next disk cannot be opened. Said up front.
    private func warnIfAIOEventsShort(vbds: Int) {
        func number(_ file: String) -> Int? {
            (try? String(contentsOfProcFile: file)).flatMap { Int($0.filter(\.isNumber)) }
        }
        guard let limit = number("/proc/sys/fs/aio-max-nr"), let used = number("/proc/sys/fs/aio-nr") else { return }
        let each = BlockBackendOptions.storageQueueDepth
        let fit = (limit - used) / each
        if fit < vbds {
            note("fs.aio-max-nr is \(limit) (\(used) in use): room for \(fit) vbds of \(each) aio events each, "
                 + "so the other \(vbds - fit) disks will fail to open (sysctl fs.aio-max-nr=1048576 makes room)")
        }
    }

    /// The daemon's CPU time and wake-ups over the idle window.
    private func measureIdle(_ probe: DaemonProcess) -> (cpuPercent: Double, wakeupsPerSecond: Double) {
        guard idleSeconds > 0 else { return (0, 0) }
        note("watching the daemon idle for \(fixed(idleSeconds, 0)) s")
        let cpu0 = probe.cpuSeconds, t0 = MonotonicClock.seconds()
        let byThread0 = probe.wakeupsByThread
        var next = t0 + 10
        while MonotonicClock.seconds() - t0 < idleSeconds {
            usleep(useconds_t(min(0.2, max(0.001, t0 + idleSeconds - MonotonicClock.seconds())) * 1e6))
            if MonotonicClock.seconds() >= next {
                note("idle: \(Int(MonotonicClock.seconds() - t0)) s")
                next += 10
            }
        }
        let elapsed = MonotonicClock.seconds() - t0
        // Which threads woke, by name (a data plane's name carries its device).
        // Threads alive at the end, from the window's start (from zero if
        // they started in it); one that ended in the window (an idle xenbus
        // worker leaving) is not counted: a process-wide sum would go down.
        var woke: [String: Int] = [:]
        var total = 0
        let byThread1 = probe.wakeupsByThread
        for (tid, now) in byThread1 {
            let delta = now.count - (byThread0[tid]?.count ?? 0)
            if delta > 0 { woke[now.name, default: 0] += delta; total += delta }
        }
        if !woke.isEmpty {
            let top = woke.sorted { $0.value > $1.value }.prefix(8).map { "\($0.key) \($0.value)" }
            say("  wake-ups while idle, by thread: " + top.joined(separator: ", ") + (woke.count > 8 ? " (\(woke.count) threads)" : ""))
        }
        return ((probe.cpuSeconds - cpu0) / elapsed * 100, Double(total) / elapsed)
    }

    /// Destroys every guest at the same moment, then waits until the
    /// daemon holds nothing of them (or 60 s): the time, and what is left.
    private func destroyAll(_ guests: [ScaleGuest], toolstack: LoopbackToolstack, dom0: XenStoreSocketClient, world: ScaleWorld,
                            baseline: (fds: Int, threads: Int)) throws -> (seconds: Double, leftovers: Leftovers) {
        let destroyed = try runAtOnce(guests.count, name: "destroy") { i in guests[i].destroy(toolstack: toolstack, dom0: dom0) }
        var left = Leftovers.look(world: world, store: dom0, baseline: baseline)
        var lastNote = MonotonicClock.seconds()
        while left.total > 0 && MonotonicClock.seconds() - destroyed.released < 60 {
            usleep(20_000)
            left = Leftovers.look(world: world, store: dom0, baseline: baseline)
            if MonotonicClock.seconds() - lastNote >= 2 {
                note("teardown: waiting for \(left.description)")
                lastNote = MonotonicClock.seconds()
            }
        }
        return (MonotonicClock.seconds() - destroyed.released, left)
    }
}

/// Progress, on stderr (stdout has the results).
func note(_ s: String) {
    let line = "scale: " + s + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// CPU time the daemon, its control thread and xenstored used from now on:
/// whether a slow start was work on the control thread, or waiting.
struct StartCPU {
    let daemon: DaemonProcess, xenstored: DaemonProcess
    let start: (daemon: Double, control: Double, controlSleeps: Int, xenstored: Double, wall: Double)

    init(world: ScaleWorld) {
        daemon = DaemonProcess(pid: world.daemonPID)
        xenstored = DaemonProcess(pid: world.xenstoredPID)
        start = (daemon.cpuSeconds, daemon.mainThreadCPUSeconds, daemon.mainThreadSleeps, xenstored.cpuSeconds,
                 MonotonicClock.seconds())
    }

    func since() -> (daemon: Double, control: Double, controlSleeps: Int, xenstored: Double, wall: Double) {
        (daemon.cpuSeconds - start.daemon, daemon.mainThreadCPUSeconds - start.control, daemon.mainThreadSleeps - start.controlSleeps,
         xenstored.cpuSeconds - start.xenstored, MonotonicClock.seconds() - start.wall)
    }
}
