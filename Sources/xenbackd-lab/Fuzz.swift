import DaemonCLI
import ArgumentParser
import BlockFrontend
import Foundation
import Glibc
import Hypervisor
import LoopbackHypervisor
import NetFrontend
import SystemSupport
import XenStoreClient

/// `xenbackd-lab fuzz`: a hostile guest against a running daemon on the
/// loopback hypervisor (real files, libaio), next to a bystander guest
/// doing verified I/O, with the invariants checked from outside after
/// every round (HostileBlkfront, HostileRound): the daemon still answers
/// `status`, the bystander's device is Connected with no error, and the
/// bystander never sees an error or a wrong byte.
struct Fuzz: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Play a hostile blkfront against a running daemon next to a verified bystander guest.")

    @Option(help: "Loopback hypervisor root folder.")
    var root: String = "/run/xenbackd/loopback"
    @Option(help: "The daemon's control socket (its status is checked after every round).")
    var controlSocket: String = ControlProtocol.defaultSocket
    @Option(help: "Seconds of hostile rounds.")
    var seconds: Double = 60
    @Option(help: "Stop after this many rounds (to reproduce a failure of round R: R).")
    var rounds: Int = .max
    @Option(help: "Seed (printed; round R plays with a seed derived from it and R). Default: from the clock.")
    var seed: UInt64?
    @Option(help: "The hostile guest's domain id.")
    var domid: UInt16 = 7
    @Option(help: "The bystander guest's domain id.")
    var bystanderDomid: UInt16 = 8
    @Option(help: "The hostile guest's disk image (default: a new file, removed at the end).")
    var disk: String?
    @Option(help: "The bystander's disk image (default: a new file, removed at the end).")
    var bystanderDisk: String?
    @Option(help: "Size of the disk images created, in MiB.")
    var diskMegabytes = 32
    @Flag(help: "A device that stays Closed when the hostile guest starts over after breaking the ring is a failure.")
    var expectReconnect = false
    @Option(help: "Seconds to wait for InitWait after the hostile guest goes back to Initialising.")
    var reconnectTimeout = 1.0
    @Option(help: "Seconds between progress lines.")
    var progressSeconds = 5.0
    @Flag(help: "Add the net side: a hostile netfront (a vif of the hostile guest) and a bystander with two vifs passing verified frames, all on --bridge. The daemon must run in a network namespace of its own that has that bridge (scripts/fuzz-live --net makes one).")
    var net = false
    @Option(help: "The hostile netfront's domain id (with --net): a guest of its own, so that the hostile blkfront's grants never reuse a reference it revoked.")
    var netDomid: UInt16 = 9
    @Option(help: "The bridge, in the daemon's network namespace, the NICs join (with --net).")
    var bridge = "xenbr0"
    @Option(help: "Bystander frames that may be lost, in percent of those sent (with --net; a corrupted frame is always a failure).")
    var maxLossPercent = 2.0

    static let devid: UInt32 = 51712

    func validate() throws {
        guard domid != bystanderDomid, domid > 0, bystanderDomid > 0 else {
            throw ValidationError("--domid and --bystander-domid must be two different guest domains")
        }
        guard diskMegabytes >= 1, seconds >= 0, rounds > 0 else { throw ValidationError("sizes and counts must be positive") }
        guard !net || (netDomid > 0 && netDomid != domid && netDomid != bystanderDomid) else {
            throw ValidationError("--net-domid must be a guest domain of its own")
        }
        guard netDomid < 256, bystanderDomid < 256 else { throw ValidationError("domain ids above 255 do not fit the NICs' MACs") }
    }

    func run() throws {
        let seed = self.seed ?? UInt64(MonotonicClock.nanoseconds()) ^ UInt64(getpid())
        say("fuzz: seed \(seed) (reproduce: xenbackd-lab fuzz --seed \(seed) ...), hostile dom\(domid), bystander dom\(bystanderDomid)"
            + (net ? ", hostile netfront dom\(netDomid)" : ""))
        let images = try DiskImages(given: [disk, bystanderDisk], megabytes: diskMegabytes)
        defer { images.remove() }
        let layout = LoopbackLayout(root: root)
        let dom0 = try XenStoreSocketClient(socketPath: layout.xenStoreSocket)
        let daemon = DaemonProbe(socket: controlSocket)
        _ = try daemon.devices()   // a daemon is there before any guest is made

        let bystanderDomain = try SimulatedDomain(layout: layout, dom0: dom0, domid: bystanderDomid, name: "fuzz-bystander")
        defer { bystanderDomain.close() }
        let hostileDomain = try SimulatedDomain(layout: layout, dom0: dom0, domid: domid, name: "fuzz-hostile")
        defer { hostileDomain.close() }

        try bystanderDomain.addDisk(images.paths[1])
        let quiet = try bystanderDomain.blockFrontend()
        quiet.maxIndirectSegments = 32
        try quiet.connect(ringPageOrder: 1)
        let bystander = BystanderGuest(frontend: quiet, seed: seed ^ 0xB157_A2DE, queueDepth: 8, verifyAtEnd: true)
        var bystanderJoined = false
        defer { if !bystanderJoined { _ = bystander.finish() } }

        try hostileDomain.addDisk(images.paths[0])
        var options = HostileBlkfront.Options(seed: seed)
        options.expectReconnect = expectReconnect
        options.reconnectTimeout = reconnectTimeout
        let hostileName = "vbd-\(domid)-\(Self.devid)"
        let hostile = try HostileBlkfront(frontend: try hostileDomain.blockFrontend(), options: options) {
            // The backend will not offer the device again: the toolstack makes it anew.
            try hostileDomain.removeDisk()
            try daemon.waitUntilGone(hostileName)
            try hostileDomain.addDisk(images.paths[0])
        }
        try hostile.connect()
        say("fuzz: hostile ring \(hostile.fe.ringSlots) slots, requests up to \(hostile.fe.segmentsPerRequest) pages, "
            + "persistent grants \(hostile.fe.persistentGrants), "
            + "flush=\(hostile.fe.info.flush) barrier=\(hostile.fe.info.barrier) discard=\(hostile.fe.info.discard); "
            + "bystander verifying \(quiet.info.sectors) sectors")

        var netSide: NetSide?
        let netDomain = net ? try SimulatedDomain(layout: layout, dom0: dom0, domid: netDomid, name: "fuzz-hostile-net") : nil
        defer { netDomain?.close() }
        if let netDomain {
            netSide = try NetSide(fuzz: self, seed: seed, hostileDomain: netDomain, bystanderDomain: bystanderDomain, daemon: daemon)
            say("fuzz: net: hostile vif \(netDomid).0, bystander vifs \(bystanderDomid).0 and \(bystanderDomid).1 on \(bridge), "
                + "split event channels: \(netSide!.hostile.fe.negotiated.splitEventChannels)")
        }
        defer { netSide?.abandon() }

        let daemonPID = try DaemonFootprint.daemonPID(socket: controlSocket)
        let baseline = DaemonFootprint(pid: daemonPID)
        say("fuzz: daemon (pid \(daemonPID)) holds \(baseline.map(\.description) ?? "?") with both guests connected")
        var watch = Watch(daemon: daemon, bystander: bystander, bystanderDevice: "vbd-\(bystanderDomid)-\(Self.devid)")
        let start = MonotonicClock.seconds()
        var nextProgress = start + progressSeconds
        var fatal: String?
        while MonotonicClock.seconds() - start < seconds && hostile.counters.rounds < rounds {
            do { try hostile.playRound() } catch {
                fatal = "round \(hostile.counters.rounds): the hostile guest could not go on: \(error)"
                break
            }
            if let n = netSide {
                do { try n.hostile.playRound() } catch {
                    fatal = "net round \(n.hostile.counters.rounds): the hostile netfront could not go on: \(error)"
                    break
                }
            }
            if let f = watch.check(round: hostile.counters.rounds, seed: seed) {
                fatal = f
                break
            }
            if let f = netSide?.check(round: hostile.counters.rounds, seed: seed) {
                fatal = f
                break
            }
            if hostile.failures.count + watch.failures.count + (netSide?.failureCount ?? 0) > 200 { break }
            let now = MonotonicClock.seconds()
            if now >= nextProgress {
                nextProgress = now + progressSeconds
                say("fuzz \(fixed(now - start, 0))/\(fixed(seconds, 0)) s: " + report(hostile.counters, now - start)
                    + "; bystander: " + bystanderLine(bystander.progress.summary)
                    + "; daemon: " + (DaemonFootprint(pid: daemonPID)?.description ?? "?")
                    + "; \(hostile.failures.count + watch.failures.count + (netSide?.failureCount ?? 0)) failures")
                if let n = netSide { say("fuzz \(fixed(now - start, 0))/\(fixed(seconds, 0)) s: net: " + n.report()) }
            }
        }
        let elapsed = MonotonicClock.seconds() - start

        var endFailures: [String] = []
        if fatal == nil, let before = baseline, let after = DaemonFootprint(pid: daemonPID) {
            // The same two devices connected as at the start: nothing may have piled up.
            say("fuzz: daemon holds \(after) (at the start: \(before))")
            if after.descriptors > before.descriptors + 8 || after.threads > before.threads + 2 {
                endFailures.append("the daemon holds \(after.descriptors) descriptors and \(after.threads) threads, "
                                   + "\(before.descriptors) and \(before.threads) at the start with the same devices connected")
            }
            // Two rings, each thread's io-wq capped at 4 bounded and 4 unbounded workers (CLibURing).
            if after.ioUringWorkers > 2 * 2 * 4 {
                endFailures.append("the daemon has \(after.ioUringWorkers) io_uring workers for two disks")
            }
        }
        if fatal == nil {
            do { try hostile.verifyDisk() } catch { endFailures.append("final check of the hostile disk: \(error)") }
            if let f = watch.check(round: hostile.counters.rounds, seed: seed) { fatal = f }
        }
        if fatal == nil || !watch.bystanderStalled {
            let (summary, failure) = bystander.finish()
            bystanderJoined = true
            if let failure { endFailures.append("bystander: \(failure)") }
            if summary.errors > 0 || summary.mismatches > 0 {
                endFailures.append("bystander: \(summary.errors) errors, \(summary.mismatches) mismatches")
            }
            if let full = bystander.fullCheck {
                say("fuzz: bystander's full-disk check: \(full.verified) sectors compared, \(full.mismatches) mismatches")
                if full.mismatches > 0 { endFailures.append("bystander's full-disk check: \(full.mismatches) mismatches") }
            } else if failure == nil {
                endFailures.append("bystander's full-disk check did not run")
            }
            say("fuzz: bystander: " + bystanderLine(summary))
        } else {
            bystanderJoined = true   // stuck in a wait that will not end: left to the exit
        }
        if fatal == nil { hostile.close() }
        var netFailures: [String] = []
        if let n = netSide {
            netFailures = n.finish(maxLossPercent: maxLossPercent, closeHostile: fatal == nil)
        }
        if let devices = try? daemon.devices() {
            let names = [hostileName, "vbd-\(bystanderDomid)-\(Self.devid)"] + (net ? ["vif-\(netDomid)-0", "vif-\(bystanderDomid)-0", "vif-\(bystanderDomid)-1"] : [])
            for d in devices where names.contains(d.device) {
                say("fuzz: daemon's view of \(d.device): \(d.state), \(d.requests) requests, \(d.errors) errors"
                    + (d.rejected.map { ", refused: " + $0.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") } ?? ""))
            }
        }

        var all = hostile.failures.map(\.description) + watch.failures + endFailures + netFailures
        if let fatal { all.append(fatal) }
        for f in all.prefix(8) { say("FAILURE: \(f)") }
        if all.count > 8 { say("... and \(all.count - 8) more failures") }
        say("fuzz: seed \(seed), \(fixed(elapsed)) s: " + report(hostile.counters, elapsed)
            + "; hostile disk: \(hostile.counters.sectorsVerified) sectors verified, \(hostile.knownSectors) known at the end"
            + (netSide.map { "; net: " + $0.report() } ?? "")
            + "; \(all.count) failures: " + (all.isEmpty ? "PASS" : "FAIL (reproduce: --seed \(seed))"))
        if !all.isEmpty {
            if watch.bystanderStalled { Glibc.exit(1) }   // the bystander's thread cannot be joined
            throw ExitCode.failure
        }
    }

    private func report(_ c: HostileBlkfront.Counters, _ elapsed: Double) -> String {
        "\(c.rounds) rounds, \(c.requests) requests (\(c.wellFormed) well-formed, \(c.hostile) hostile; "
            + "\(fixed(Double(c.requests) / max(elapsed, 1e-9), 0))/s), \(c.responses) responses "
            + "(\(c.okay) OKAY, \(c.error) ERROR, \(c.notSupported) EOPNOTSUPP\(c.otherStatus > 0 ? ", \(c.otherStatus) other" : "")), "
            + "\(c.breaches) ring breaches, \(c.closes) closes, \(c.spuriousStates) spurious states, "
            + "\(c.reconnects) reconnects, \(c.refusedReconnects) refused reconnects (\(c.recreated) devices re-created), "
            + "\(c.unansweredAtClose) unanswered at close"
    }

    private func bystanderLine(_ s: VerifiedWorkload.Summary) -> String {
        "\(s.writes) writes, \(s.reads) reads, \(s.flushes) flushes, \(s.discards) discards, "
            + "\(s.sectorsVerified) sectors verified, \(s.errors) errors, \(s.mismatches) mismatches"
    }
}

/// What is checked from outside after every round: the daemon answers
/// `status`, the bystander's device is Connected with no error, the
/// bystander has seen no error or wrong byte and is not stalled.
struct Watch {
    let daemon: DaemonProbe
    let bystander: BystanderGuest
    let bystanderDevice: String
    private(set) var failures: [String] = []
    private(set) var bystanderStalled = false
    private var seenErrors = 0, seenMismatches = 0

    init(daemon: DaemonProbe, bystander: BystanderGuest, bystanderDevice: String) {
        self.daemon = daemon
        self.bystander = bystander
        self.bystanderDevice = bystanderDevice
    }

    /// A failure that ends the run, if any; others are kept in `failures`.
    mutating func check(round: Int, seed: UInt64) -> String? {
        let tag = "round \(round) (seed \(seed))"
        let devices: [DeviceReport]
        do { devices = try daemon.devices() } catch {
            return "\(tag): the daemon does not answer status: \(error)"
        }
        guard let quiet = devices.first(where: { $0.device == bystanderDevice }) else {
            return "\(tag): the daemon no longer lists the bystander's device \(bystanderDevice)"
        }
        if quiet.state != "Connected" || quiet.errors > 0 {
            return "\(tag): the bystander's device is \(quiet.state) with \(quiet.errors) errors"
                + (quiet.lastError.map { " (\($0))" } ?? "")
        }
        let p = bystander.progress
        if let f = p.failure { return "\(tag): the bystander failed: \(f)" }
        if p.summary.errors > seenErrors || p.summary.mismatches > seenMismatches {
            failures.append("\(tag): the bystander saw \(p.summary.errors - seenErrors) errors and "
                            + "\(p.summary.mismatches - seenMismatches) mismatches")
            seenErrors = p.summary.errors
            seenMismatches = p.summary.mismatches
        }
        if MonotonicClock.seconds() - p.lastProgress > 15 {
            bystanderStalled = true
            return "\(tag): the bystander has completed nothing for 15 s"
        }
        return nil
    }
}

/// `xenbackd status` from inside: the daemon's devices.
struct DaemonProbe {
    let socket: String

    func devices() throws -> [DeviceReport] {
        try ControlProtocol.devices(socket: socket)
    }

    /// Until the daemon no longer serves `device` (it saw the toolstack remove it).
    func waitUntilGone(_ device: String, seconds: Double = 5) throws {
        let deadline = MonotonicClock.seconds() + seconds
        while try devices().contains(where: { $0.device == device }) {
            guard MonotonicClock.seconds() < deadline else {
                throw ValidationError("the daemon still serves \(device) \(fixed(seconds, 0)) s after the toolstack removed it")
            }
            usleep(10_000)
        }
    }
}

/// The disk images: the ones given, or new sparse files in a folder of
/// their own, removed at the end.
struct DiskImages {
    let paths: [String]
    private let folder: String?

    init(given: [String?], megabytes: Int) throws {
        guard given.contains(where: { $0 == nil }) else {
            paths = given.map { $0! }
            folder = nil
            return
        }
        var template = Array("/tmp/xenbackd-fuzz-XXXXXX".utf8CString)
        guard let dir = mkdtemp(&template) else { throw ValidationError("mkdtemp: \(String(cString: strerror(errno)))") }
        let folder = String(cString: dir)
        self.folder = folder
        paths = given.enumerated().map { i, path in path ?? "\(folder)/disk\(i).img" }
        for (i, path) in paths.enumerated() where given[i] == nil {
            let fd = open(path, O_CREAT | O_RDWR, 0o600)
            guard fd >= 0, ftruncate(fd, off_t(megabytes) << 20) == 0 else {
                throw ValidationError("cannot create \(path): \(String(cString: strerror(errno)))")
            }
            close(fd)
        }
    }

    func remove() {
        guard let folder else { return }
        for p in paths where p.hasPrefix(folder + "/") { unlink(p) }
        rmdir(folder)
    }
}
