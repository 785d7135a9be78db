import BlockBackend
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing
import XenABI

/// A vbd whose params names a Ceph RBD image, against a one-node cluster of
/// the test's own (CephCluster): verified I/O through the ring checked with
/// `rbd export`, a snapshot served read-only, the handover of the image's
/// exclusive lock between two hosts' backends during a migration, a dead
/// holder's lock broken only by the operator's command, an OSD killed and
/// restarted under I/O, and a cluster that stays away.
@Suite("blkback on an RBD image", .serialized)
struct RBDDiskTests {
    static func params(_ cluster: CephCluster, _ image: String, _ extra: String = "") -> String {
        "rbd:\(cluster.pool)/\(image):conf=\(cluster.configPath)" + extra
    }

    static func requireRoot() throws {
        guard getuid() == 0 else { throw CephClusterError("the Ceph tests need root") }
    }

    /// `xenbackd ARGS`, built next to this test bundle: its exit status,
    /// its standard output, and its standard error (the reason of a failure).
    static func xenbackd(_ arguments: [String]) throws -> (status: Int32, output: String, error: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try DaemonRestartTests.World.builtBinary())
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let output = out.fileHandleForReading.readDataToEndOfFile()
        let error = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: output, as: UTF8.self), String(decoding: error, as: UTF8.self))
    }

    @Test("verified I/O, flush and discard through the ring, checked with rbd export; check-disk sees the lock; a snapshot is served read-only with its own bytes")
    func servedFromRBD() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 32)
        let params = Self.params(cluster, "guest")
        let bed = try TestBed()
        defer { bed.close() }
        let fe = try bed.host.attachDisk(to: try bed.host.createGuest(1), .init(params: params))
        try fe.connect(ringPageOrder: 1)
        #expect(fe.info.sectors == 32 * 2048)
        #expect(fe.info.flush && fe.info.discard && !fe.info.readOnly)
        #expect(try fe.store.read(fe.backendPath + "/discard-granularity") == String(4 << 20))
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 16, queueDepth: 16, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 60, operations: 2000)
        #expect(s.errors == 0 && s.mismatches == 0, "\(s)")
        #expect(s.writes > 500 && s.reads > 500 && s.discards > 0 && s.flushes > 0, "\(s)")
        let status = try bed.connectedBlockStatus()
        #expect(status.ioEngine == "librbd" && status.queues == 1)

        // The lock is this backend's, and the name it holds it under is kept for a restart.
        let owner = try #require(try fe.store.read(fe.backendPath + "/xenbackd-lock-owner"))
        let check = try Self.xenbackd(["check-disk", "--mode", "w", params])
        #expect(check.status == 0, "\(check.error)")
        #expect(check.output.contains("kind: rbd") && check.output.contains("locked: yes, by \(owner)"), "\(check.output)")
        #expect(check.output.contains("features: layering exclusive-lock"), "\(check.output)")
        #expect(check.output.contains("target: rbd:rbd/guest\n"), "\(check.output)")

        // What reached the cluster, seen by Ceph's own tool.
        let export = try RBDExportReader(cluster: cluster, image: "guest")
        let sectors = try verifyWorkload(w, with: export)
        #expect(sectors.mismatches == 0 && sectors.checked > 5000, "\(sectors)")

        // A snapshot now; the guest writes on; a second guest sees the snapshot's bytes, read-only.
        try cluster.rbd(["snap", "create", "\(cluster.pool)/guest@before"])
        let atSnapshot = w
        let more = try w.run(on: fe, seconds: 30, operations: 500)
        #expect(more.errors == 0 && more.mismatches == 0 && more.writes > 100, "\(more)")
        let snap = try bed.host.attachDisk(to: try bed.host.createGuest(2), .init(params: "rbd:\(cluster.pool)/guest@before:conf=\(cluster.configPath)"))
        try snap.connect()
        #expect(snap.info.readOnly && !snap.info.discard)
        let old = try atSnapshot.verifyAll(on: snap)
        #expect(old.mismatches == 0 && old.verified > 5000, "\(old)")
        #expect(try snap.write(sector: 0, data: [UInt8](repeating: 1, count: 512)) == BlkifStatus.error)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 5000)
        // `rbd resize` under the running guest reaches it as online resize.
        try cluster.rbd(["resize", "--size", "48M", "\(cluster.pool)/guest"])
        try waitUntil("the new size to be published", seconds: 10) {
            (try? fe.store.read(fe.backendPath + "/sectors")) == String(48 * 2048)
        }
        try fe.disconnect()
        try waitUntil("the lock to be released") {
            (try? Self.xenbackd(["check-disk", params]).output.contains("locked: no")) == true
        }
    }

    @Test("migration: the destination waits for the source to let the image's lock go, then serves it; every acknowledged write is there; the source can no longer write")
    func migrationHandover() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let params = Self.params(cluster, "guest")
        let source = try TestBed()
        defer { source.close() }
        let destination = try TestBed(options: .init(writerLockWaitSeconds: 60))
        defer { destination.close() }

        let before = try source.host.attachDisk(to: try source.host.createGuest(5), .init(params: params))
        try before.connect(ringPageOrder: 1)
        let streamSectors: UInt64 = 4 * 2048
        let workloadSectors = before.info.sectors - streamSectors
        var w = VerifiedWorkload(sectors: workloadSectors, seed: 57, queueDepth: 16, canDiscard: true, canFlush: true)
        var stream = StampedWrites(firstSector: workloadSectors, blocks: Int(streamSectors / 8), depth: 16, seed: 58)
        let first = try w.run(on: before, seconds: 60, operations: 1000)
        #expect(first.errors == 0 && first.mismatches == 0 && first.writes > 200, "\(first)")
        try stream.run(on: before, acknowledging: 200)
        try stream.fill(before)

        // The destination's guest connects while the source still serves:
        // its backend waits for the lock (the frontend sees no Connected).
        let after = try destination.host.attachDisk(to: try destination.host.createGuest(5), .init(params: params))
        let connected = Handoff<String>()
        let connecting = try NativeThread {
            do { try after.connect(ringPageOrder: 1, timeout: 60); connected.put("") } catch { connected.put("\(error)") }
        }
        usleep(2_000_000)
        #expect(after.store.readState(after.backendPath) != .connected, "the destination connected beside a writer")
        #expect(source.host.blockStatus.first?.state == .connected)

        // The guest leaves the source with writes on its ring: the source
        // answers what it took, flushes, releases the lock; the destination takes it.
        try closeWithRequestsInFlight(before, writes: &stream)
        let unanswered = stream.abandonInFlight()
        #expect(stream.errors == 0)
        connecting.join()
        let failure = connected.take()
        try #require(failure.isEmpty, "destination: \(failure)")
        try stream.resubmit(unanswered, on: after)
        try stream.run(on: after, acknowledging: 200)
        try stream.drain(after)
        #expect(stream.errors == 0)
        let full = try w.verifyAll(on: after)
        #expect(full.mismatches == 0 && full.verified > 1000)
        let second = try w.run(on: after, seconds: 60, operations: 800)
        #expect(second.errors == 0 && second.mismatches == 0, "\(second)")

        // The source host, if it came back to life and opened the image
        // again, could not write beside the destination: librbd asks the
        // holder for the lock, which refuses; nor could it take the lock.
        let stale = try RBDStorage.open(RBDImageAddress.parse(params), readOnly: false, queueDepth: 4)
        defer { stale.close() }
        var block = [UInt8](repeating: 0xEE, count: 4096)
        let staleWrite = block.withUnsafeMutableBytes { b -> Int64 in
            var v = iovec(iov_base: b.baseAddress, iov_len: b.count)
            return withUnsafeMutablePointer(to: &v) { Self.runOne(stale, StorageOperation(tag: 9, kind: .write, offset: 0, iovecs: $0, iovecCount: 1)) }
        }
        #expect(staleWrite == -Int64(EROFS), "a second writer's write: \(staleWrite)")
        #expect(throws: StorageError.self) { try stale.takeWriterLock(waitingUpTo: 1, breakingPreviousOwner: nil) }

        // Every acknowledged write, seen by Ceph's own tool.
        try after.disconnect()
        let export = try RBDExportReader(cluster: cluster, image: "guest")
        let sectors = try verifyWorkload(w, with: export)
        #expect(sectors.mismatches == 0 && sectors.checked > 1000, "\(sectors)")
        let blocks = try stream.verify(with: export)
        #expect(blocks.wrong.isEmpty, "blocks not as acknowledged: \(blocks.wrong)")
        #expect(blocks.checked > 200)
    }

    /// The same handover between two xenbackd processes, each on its own
    /// loopback root with its own xenstored: what two hosts' daemons do.
    @Test("migration between two xenbackd daemons on two loopback roots: the destination's daemon waits for the lock, every acknowledged write is on the image")
    func migrationBetweenTwoDaemons() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let params = Self.params(cluster, "guest")
        let source = try DaemonRestartTests.World()
        defer { source.close() }
        let destination = try DaemonRestartTests.World()
        defer { destination.close() }
        #expect(source.root != destination.root)
        let (before, sourceStore) = try DaemonRestartTests().connectGuest(source, params: params)
        var stream = StampedWrites(firstSector: 0, blocks: Int(before.info.sectors / 8), depth: 16, seed: 171)
        try stream.run(on: before, acknowledging: 300)
        try stream.fill(before)
        let sourceOwner = try #require(try sourceStore.read(before.backendPath + "/xenbackd-lock-owner"))

        // The destination's guest connects while the source serves; its daemon waits for the lock.
        let outcome = Handoff<(frontend: LoopbackBlockFrontend?, failure: String)>()
        let world = TestOnlyBox(destination)   // used by that thread alone until it is joined
        let connecting = try NativeThread {
            do {
                outcome.put((try DaemonRestartTests().connectGuest(world.value, params: params).0, ""))
            } catch {
                outcome.put((nil, "\(error)"))
            }
        }
        usleep(2_000_000)
        #expect(try Self.xenbackd(["rbd-lock", "show", params]).output == sourceOwner + "\n")
        // Its vbd waits in InitWait (the connect job holds it): not Connected beside the source.
        let waiting = try destination.output(["status", "--json", "--control-socket", destination.controlSocket])
        #expect(waiting.contains("InitWait") && !waiting.contains("Connected"), "\(waiting)")
        try closeWithRequestsInFlight(before, writes: &stream)
        let unanswered = stream.abandonInFlight()
        #expect(stream.errors == 0)
        connecting.join()
        let connected = outcome.take()
        let after = try #require(connected.frontend, "destination: \(connected.failure)")
        try stream.resubmit(unanswered, on: after)
        try stream.run(on: after, acknowledging: 300)
        try stream.drain(after)
        #expect(stream.errors == 0)
        let owner = try Self.xenbackd(["rbd-lock", "show", params]).output
        #expect(!owner.isEmpty && owner != sourceOwner + "\n", "\(owner)")
        try after.disconnect()
        let export = try RBDExportReader(cluster: cluster, image: "guest")
        let blocks = try stream.verify(with: export)
        #expect(blocks.wrong.isEmpty, "blocks not as acknowledged: \(blocks.wrong)")
        #expect(blocks.checked > 500)
    }

    @Test("a holder that died keeps the lock: the backend waits its bounded time and fails with the holder's name; `xenbackd rbd-lock break` frees it, and the disk connects")
    func deadHolderNeedsTheOperator() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let params = Self.params(cluster, "guest")
        // A client that takes the lock by writing (librbd's automatic lock), then dies.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/rbd")
        holder.arguments = ["-c", cluster.configPath, "bench", "--io-type", "write", "--io-total", "100G",
                            "\(cluster.pool)/guest"]
        holder.standardOutput = FileHandle.nullDevice
        holder.standardError = FileHandle.nullDevice
        try holder.run()
        var owner = ""
        try waitUntil("rbd bench to hold the lock", seconds: 30) {
            owner = (try? Self.xenbackd(["rbd-lock", "show", params]).output) ?? ""
            return !owner.isEmpty
        }
        kill(holder.processIdentifier, SIGKILL)
        holder.waitUntilExit()
        owner = owner.trimmingCharacters(in: .whitespacesAndNewlines)

        let bed = try TestBed(options: .init(writerLockWaitSeconds: 3))
        defer { bed.close() }
        let fe = try bed.host.attachDisk(to: try bed.host.createGuest(1), .init(params: params))
        let started = MonotonicClock.seconds()
        let outcome = Handoff<String>()
        let connecting = try NativeThread {
            do { try fe.connect(timeout: 30); outcome.put("connected") } catch { outcome.put("\(error)") }
        }
        var error = ""
        var trace: [String] = []
        try waitUntil("the backend to give up", seconds: 30) {
            trace.append("\(MonotonicClock.seconds() - started): \(String(describing: fe.store.readState(fe.backendPath)))")
            error = ((try? fe.store.read(fe.backendPath + "/error")) ?? nil) ?? ""
            return !error.isEmpty
        }
        let waited = MonotonicClock.seconds() - started
        connecting.join()
        #expect(outcome.take().contains("backend closed the device"))
        #expect(waited >= 3 && waited < 15, "waited \(waited) s: \(trace.suffix(20))")
        #expect(error.contains("held by \(owner)") && error.contains("`xenbackd rbd-lock break \(params)`"), "\(error)")
        #expect(try Self.xenbackd(["rbd-lock", "show", params]).output.contains(owner), "still held: nothing broke it")

        // A device removed while it waits gives up at once, not after its wait.
        let patient = try TestBed(options: .init(writerLockWaitSeconds: 60))
        defer { patient.close() }
        let removed = try patient.host.attachDisk(to: try patient.host.createGuest(3), .init(params: params))
        let waiter = try NativeThread { _ = try? removed.connect(timeout: 5) }
        try waitUntil("the vbd to wait for the lock", seconds: 10) {
            (try? removed.store.read(removed.backendPath + "/state")) == "2"
                && removed.store.readState(removed.frontendPath) == .initialised
        }
        usleep(500_000)
        let removing = MonotonicClock.seconds()
        try patient.host.toolstack.removeDisk(domain: 3, devid: 51712)
        try waitUntil("the waiting vbd to go", seconds: 10) { patient.host.blockStatus.isEmpty }
        #expect(MonotonicClock.seconds() - removing < 3)
        waiter.join()

        let broken = try Self.xenbackd(["rbd-lock", "break", params])
        #expect(broken.status == 0 && broken.output == "broken: \(owner)\n", "\(broken)")
        #expect(try Self.xenbackd(["rbd-lock", "show", params]).output.isEmpty)
        let second = try bed.host.attachDisk(to: try bed.host.createGuest(2), .init(params: params))
        try second.connect()
        var w = VerifiedWorkload(sectors: second.info.sectors, seed: 3, queueDepth: 8, canDiscard: false, canFlush: true)
        let s = try w.run(on: second, seconds: 30, operations: 300)
        #expect(s.errors == 0 && s.mismatches == 0 && s.writes > 50, "\(s)")
        try second.disconnect()
    }

    @Test("an OSD killed and restarted under verified I/O (bluestore): no error, no wrong byte, nothing lost")
    func osdRestartUnderIO() throws {
        try Self.underVerifiedIO(store: .bluestore, seed: 21) { cluster in
            cluster.killOSD()
            usleep(2_000_000)
            try cluster.startOSD()
            try cluster.waitForOSD(deadline: MonotonicClock.seconds() + 90)
        }
    }

    @Test("the monitor killed and restarted under verified I/O: the OSD keeps serving, no error, no wrong byte")
    func monitorRestartUnderIO() throws {
        try Self.underVerifiedIO(store: .memstore, seed: 31) { cluster in
            cluster.killMonitor()
            usleep(3_000_000)
            try cluster.startMonitor(deadline: MonotonicClock.seconds() + 60)
        }
    }

    /// A guest doing verified I/O on an RBD disk while `fault` runs: it
    /// must see no error and no wrong byte, and the whole disk checks out.
    static func underVerifiedIO(store: CephCluster.Store, seed: UInt64, _ fault: (CephCluster) throws -> Void) throws {
        try requireRoot()
        let cluster = try CephCluster(store: store)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let bed = try TestBed()
        defer { bed.close() }
        let fe = try bed.host.attachDisk(to: try bed.host.createGuest(1), .init(params: params(cluster, "guest")))
        try fe.connect(ringPageOrder: 1)
        let load = BystanderGuest(frontend: fe, seed: seed, queueDepth: 8, verifyAtEnd: true)
        var finished = false
        defer { if !finished { _ = load.finish() } }   // the guest's thread stops before the host goes
        usleep(1_500_000)
        try fault(cluster)
        usleep(2_000_000)
        finished = true
        let (summary, failure) = load.finish()
        #expect(failure == nil)
        #expect(summary.errors == 0 && summary.mismatches == 0, "\(summary)")
        #expect(summary.reads + summary.writes > 200, "\(summary)")
        #expect(load.fullCheck?.mismatches == 0 && (load.fullCheck?.verified ?? 0) > 1000)
        #expect(bed.host.blockStatus.first?.statistics.errors == 0)
    }

    @Test("a cluster that stays away: requests fail with BLKIF_RSP_ERROR after the operation timeout, status says so, other guests go on")
    func clusterAway() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let bed = try TestBed()
        defer { bed.close() }
        let (other, _) = try bed.guestWithDisk(2)
        // The timeouts as an operator would shorten them: librados settings in params.
        let params = Self.params(cluster, "guest", ":rados_osd_op_timeout=4:rados_mon_op_timeout=4")
        let fe = try bed.host.attachDisk(to: try bed.host.createGuest(1), .init(params: params))
        try fe.connect()
        #expect(try fe.write(sector: 8, data: [UInt8](repeating: 7, count: 4096)) == BlkifStatus.okay)
        try alongsideVerifiedGuest(other) {
            cluster.killOSD()
            let started = MonotonicClock.seconds()
            let answer = try fe.write(sector: 16, data: [UInt8](repeating: 8, count: 4096))
            #expect(answer == BlkifStatus.error)
            let took = MonotonicClock.seconds() - started
            #expect(took >= 3 && took < 20, "answered after \(took) s")
        }
        let status = try #require(bed.host.blockStatus.first { $0.address.frontendDomain == 1 })
        #expect(status.statistics.errors >= 1)
        #expect(status.lastStorageEvent?.contains("did not answer within the operation timeout") == true,
                "\(String(describing: status.lastStorageEvent))")
    }

    @Test("SIGKILL of the daemon in the middle of writes: the next one breaks its predecessor's lock (that one only), answers every request once, and every acknowledged write is on the image; twice")
    func killAndRestart() throws {
        try Self.requireRoot()
        let cluster = try CephCluster(store: .memstore)
        defer { cluster.stop() }
        try cluster.createImage("guest", sizeMiB: 16)
        let params = Self.params(cluster, "guest")
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, dom0) = try DaemonRestartTests().connectGuest(w, params: params)
        let ownerKey = fe.backendPath + "/xenbackd-lock-owner"
        var writes = StampedWrites(firstSector: 0, blocks: Int(fe.info.sectors / 8), depth: 8, seed: 161)
        var owners: [String] = []
        for round in 0..<2 {
            let owner = try #require(try dom0.read(ownerKey))
            #expect(!owners.contains(owner))
            owners.append(owner)
            // A flush first: librbd's cache, were it on, would turn to
            // write-back after it, and the writes acknowledged next would
            // die with the daemon.
            try writes.run(on: fe, acknowledging: 100)
            try writes.drain(fe)
            #expect(try fe.run(.flush) == BlkifStatus.okay)
            try writes.run(on: fe, acknowledging: 300)
            try writes.fill(fe)
            kill(w.daemon!.processIdentifier, SIGKILL)
            _ = w.waitExit(w.daemon!, seconds: 5)
            // The dead daemon's lock stays until somebody breaks it.
            #expect(try Self.xenbackd(["rbd-lock", "show", params]).output == owner + "\n", "round \(round)")
            w.daemon = try w.startDaemon()
            try writes.drain(fe)
            #expect(writes.errors == 0, "round \(round)")
        }
        try writes.run(on: fe, acknowledging: 300)
        try writes.drain(fe)
        #expect(writes.errors == 0 && writes.acknowledgedCount >= 1100)
        let last = try #require(try dom0.read(ownerKey))
        #expect(!owners.contains(last))
        #expect(try Self.xenbackd(["rbd-lock", "show", params]).output == last + "\n")
        #expect(dom0.readState(fe.backendPath) == .connected)
        let export = try RBDExportReader(cluster: cluster, image: "guest")
        let blocks = try writes.verify(with: export)
        #expect(blocks.wrong.isEmpty, "\(blocks.wrong.count) blocks do not hold what was acknowledged: \(blocks.wrong)")
        #expect(blocks.checked >= 500)
    }

    /// One operation to its end (submit, wait, reap); its result.
    static func runOne(_ storage: RBDStorage, _ operation: StorageOperation) -> Int64 {
        var op = operation
        _ = withUnsafeMutablePointer(to: &op) { storage.submit(UnsafeMutableBufferPointer(start: $0, count: 1)) }
        var result: Int64?
        let deadline = MonotonicClock.seconds() + 60
        while result == nil && MonotonicClock.seconds() < deadline {
            var pfd = pollfd(fd: storage.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 500)
            _ = storage.reapCompletions { result = $0.result }
        }
        return result ?? -Int64(ETIMEDOUT)
    }
}

/// Hands a value to one other thread that alone uses it until joined.
private final class TestOnlyBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
