import BlockFrontend
import Foundation
import Glibc
import Hypervisor
import LoopbackHypervisor
import NBDTestSupport
import Testing
import XenABI
import XenBus
import XenStoreClient

/// The daemon as separate processes (`xenbackd-lab xenstored`, `xenbackd run`)
/// and a guest in this process, as on a host: restarting the daemon under
/// a guest doing I/O must cost the guest a pause, never an error.
@Suite("daemon restart under a running guest", .serialized)
struct DaemonRestartTests {
    final class World {
        let root: String
        let layout: LoopbackLayout
        let binary: String
        /// xenbackd-lab, for the loopback xenstored and the live fuzzer.
        let lab: String
        var xenstored: Process?
        var daemon: Process?
        let disk: TempDisk
        /// Runs the daemon in this network namespace (its vif TAPs go there).
        let networkNamespace: String?

        init(networkNamespace: String? = nil) throws {
            self.networkNamespace = networkNamespace
            var template = Array("/dev/shm/xenbackd-restart-XXXXXX".utf8CString)
            root = String(cString: mkdtemp(&template)!)
            layout = LoopbackLayout(root: root)
            disk = TempDisk(megabytes: 16)
            binary = try World.builtBinary()
            lab = try World.builtBinary("xenbackd-lab")
            xenstored = try start(["xenstored", "--root", root, "--log-level", "warning"], program: lab)
            try waitFor(path: layout.xenStoreSocket)
            daemon = try startDaemon()
        }

        /// `name` (xenbackd, xenbackd-lab) built next to this test bundle.
        static func builtBinary(_ name: String = "xenbackd") throws -> String {
            let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
            let path = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent(name).path
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw FrontendError("no \(name) binary at \(path): build the package (swift build --build-tests)")
            }
            return path
        }

        func start(_ arguments: [String], program: String? = nil) throws -> Process {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: program ?? binary)
            p.arguments = arguments
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            return p
        }

        var controlSocket: String { root + "/control.sock" }

        func startDaemon(_ extraArguments: [String] = []) throws -> Process {
            if let ns = networkNamespace {
                // `ip netns exec` execs the daemon: the process is the daemon itself.
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
                p.arguments = ["netns", "exec", ns, binary, "run", "--platform", "loopback", "--root", root,
                               "--control-socket", controlSocket, "--log-level", "warning"] + extraArguments
                p.standardOutput = FileHandle.nullDevice
                p.standardError = FileHandle.nullDevice
                try p.run()
                return p
            }
            return try start(["run", "--platform", "loopback", "--root", root, "--control-socket", controlSocket,
                       "--log-level", "warning"] + extraArguments)
        }

        /// Runs `xenbackd ARGS` to the end and returns its standard output.
        func output(_ arguments: [String]) throws -> String { try runProgram(binary, arguments).output }

        func waitFor(path: String) throws {
            try waitUntil("\(path) to appear") { access(path, F_OK) == 0 }
        }

        /// Waits for a process to exit, up to `seconds`; its status, or nil.
        func waitExit(_ p: Process, seconds: Double) -> Int32? {
            let deadline = Date().addingTimeInterval(seconds)
            while p.isRunning && Date() < deadline { usleep(20_000) }
            return p.isRunning ? nil : p.terminationStatus
        }

        func close() {
            for p in [daemon, xenstored].compactMap({ $0 }) where p.isRunning {
                p.terminate()
                _ = waitExit(p, seconds: 5)
            }
            disk.remove()
            _ = try? FileManager.default.removeItem(atPath: root)
        }
    }

    /// dom1 with one connected vbd on the world's disk. `indirectSegments`:
    /// the frontend's max_indirect_segments (0: direct requests only).
    func connectGuest(_ w: World, params: String? = nil, indirectSegments: Int = 0,
                      queues: Int = 1, ringProtocol: BlkifProtocol = .x86_64) throws -> (LoopbackBlockFrontend, any XenStore) {
        let dom0 = try XenStoreSocketClient(socketPath: w.layout.xenStoreSocket)
        let toolstack = LoopbackToolstack(store: dom0)
        let guest = indirectSegments > 0
            ? try LoopbackGuestDomain(layout: w.layout, domain: 1, memoryPages: 40960, grantEntries: 40960)
            : try LoopbackGuestDomain(layout: w.layout, domain: 1)
        try toolstack.createDomain(1, name: "guest1")
        try dom0.introduceDomain(1)
        try toolstack.addDisk(domain: 1, .init(params: params ?? w.disk.path))
        let fe = LoopbackBlockFrontend(guest: guest, store: try XenStoreSocketClient(socketPath: w.layout.xenStoreDomainSocket(1)))
        fe.maxIndirectSegments = indirectSegments
        fe.requestedQueues = queues
        fe.ringProtocol = ringProtocol
        try fe.connect(ringPageOrder: 1)
        return (fe, dom0)
    }

    /// Each ring keeps a journal of its own (`vbd-D-N.journal`, `vbd-D-N.q1.journal`):
    /// a kill on a multi-queue disk loses no answer on any ring.
    @Test("SIGKILL under verified I/O on two rings at once: every request answered once, every byte right, on both")
    func killWithTwoRings() throws {
        let w = try World()
        defer { w.close() }
        w.daemon!.terminate()
        _ = w.waitExit(w.daemon!, seconds: 10)
        w.daemon = try w.startDaemon(["--max-queues", "2"])
        let (fe, dom0) = try connectGuest(w, queues: 2)
        #expect(fe.queues.count == 2)
        let half = fe.info.sectors / 2
        let loads = fe.queues.enumerated().map { index, ring in
            BystanderGuest(ring: ring, disk: fe.info, firstSector: UInt64(index) * half, sectors: half,
                           seed: UInt64(70 + index), verifyAtEnd: true)
        }
        usleep(400_000)
        #expect(FileManager.default.fileExists(atPath: w.root + "/rings/vbd-1-51712.q1.journal"))
        kill(w.daemon!.processIdentifier, SIGKILL)
        _ = w.waitExit(w.daemon!, seconds: 5)
        w.daemon = try w.startDaemon(["--max-queues", "2"])
        usleep(600_000)
        for (index, load) in loads.enumerated() {
            let (summary, failure) = load.finish()
            #expect(failure == nil, "ring \(index)")
            #expect(summary.errors == 0 && summary.mismatches == 0, "ring \(index): \(summary)")
            #expect(summary.reads + summary.writes > 50, "ring \(index): \(summary)")
            #expect(load.fullCheck?.mismatches == 0 && (load.fullCheck?.verified ?? 0) > 0, "ring \(index)")
        }
        #expect(dom0.readState(fe.backendPath) == .connected)
        let status = try w.output(["status", "--control-socket", w.controlSocket])
        #expect(status.contains("2px2"), "two rings of two pages: \(status)")
    }

    @Test("SIGTERM with I/O in flight, then a new daemon: every request answered, every byte right, no reconnect")
    func restartUnderLoad() throws {
        let w = try World()
        defer { w.close() }
        let (fe, dom0) = try connectGuest(w)
        let load = BystanderGuest(frontend: fe)
        usleep(400_000)
        w.daemon!.terminate()   // SIGTERM
        #expect(w.waitExit(w.daemon!, seconds: 10) == 0, "the daemon exits cleanly after answering what was in flight")
        #expect(dom0.readState(fe.backendPath) == .connected, "xenstore is left as it was")
        w.daemon = try w.startDaemon()
        usleep(600_000)
        let (summary, failure) = load.finish()
        #expect(failure == nil)
        #expect(summary.errors == 0)
        #expect(summary.mismatches == 0)
        #expect(summary.reads + summary.writes > 100)
        #expect(dom0.readState(fe.backendPath) == .connected)
        // The new daemon serves the same ring: more I/O, and a full check.
        #expect(try fe.run(.flush) == BlkifStatus.okay)
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
        // And reports it.
        let status = try w.output(["status", "--control-socket", w.controlSocket])
        let row = status.split(separator: "\n").first { $0.hasPrefix("vbd-1-51712") }
        #expect(row?.contains("Connected") == true, "status: \(status)")
        #expect(row?.contains("2p") == true, "a 2-page ring: \(status)")
        let json = try w.output(["status", "--control-socket", w.controlSocket, "--json"])
        #expect(json.contains("\"state\":\"Connected\""), "json: \(json)")
    }

    /// Against nbdkit's memory plugin and nbd-server exporting a file
    /// (`nbd-server 127.0.0.1:PORT FILE`, `nbd:127.0.0.1 PORT`).
    @Test("SIGKILL in the middle of writes to an NBD export: every acknowledged write is on the export",
          arguments: NBDServerKind.allCases)
    func killDuringNBDWrites(kind: NBDServerKind) throws {
        let server = try NBDTestServer.scratchDisk(kind, megabytes: 16)
        defer { server.stop() }
        let w = try World()
        defer { w.close() }
        let (fe, _) = try connectGuest(w, params: server.params)
        // 4 KiB writes of distinct patterns, 8 in flight; the daemon is
        // killed once 300 are acknowledged, with 8 more in flight.
        var writes = StampedWrites(firstSector: 0, blocks: Int(fe.info.sectors / 8), depth: 8, seed: 131)
        try writes.run(on: fe, acknowledging: 300)
        try writes.fill(fe)
        kill(w.daemon!.processIdentifier, SIGKILL)
        while try writes.collect(fe, timeout: 1) > 0 {}   // the dead daemon answers no more
        _ = writes.abandonInFlight()
        #expect(writes.errors == 0)
        #expect(writes.acknowledgedCount >= 300)
        // A client of the export that never went through the daemon.
        let reader = try NBDReader(uri: server.uri)
        defer { reader.close() }
        let blocks = try writes.verify(with: reader)
        #expect(blocks.wrong.isEmpty, "\(blocks.wrong.count) blocks do not hold what was acknowledged: \(blocks.wrong)")
        #expect(blocks.checked >= 250)
    }

    /// Responses go out in completion order: a slow discard in flight while
    /// later writes are answered leaves rsp_prod past requests that are not
    /// answered. Resuming at rsp_prod ran the last answered write again
    /// (with the page the guest had reused) and never answered the discard;
    /// the ring's journal must say exactly what was answered.
    @Test("SIGKILL with a slow discard in flight and later writes answered: after the restart the discard is answered once, no write runs again, every acknowledged write holds")
    func killWithAnswersOutOfOrder() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "16M", "delay-trim=2"])
        defer { server.stop() }
        let w = try World()
        defer { w.close() }
        let (fe, _) = try connectGuest(w, params: server.params)
        #expect(fe.info.discard)
        let slow = try fe.submit(.discard(sector: 4096, count: 8))
        fe.kick()
        var writes: [(ticket: LoopbackBlockFrontend.Ticket, sector: UInt64, byte: UInt8)] = []
        for i in 0..<8 {
            let slot = try #require(fe.nextFreeSlot)
            let byte = UInt8(0x10 + i)
            fe.dataPage(slot: slot, segment: 0).initializeMemory(as: UInt8.self, repeating: byte, count: 4096)
            writes.append((try fe.submit(.write(sector: UInt64(i * 64), count: 8)), UInt64(i * 64), byte))
        }
        fe.kick()
        var answers: [UInt64: Int] = [:]
        var statuses: [UInt64: Int16] = [:]
        func note(_ r: BlkifResponse) { answers[r.id, default: 0] += 1; statuses[r.id] = r.status }
        for (ticket, _, _) in writes where answers[ticket.id] == nil {
            _ = try fe.wait(for: ticket, timeout: 10, other: note)
            answers[ticket.id, default: 0] += 1
            statuses[ticket.id] = BlkifStatus.okay
        }
        #expect(answers[slow.id] == nil, "the discard is still in flight at the server")
        #expect(writes.allSatisfy { statuses[$0.ticket.id] == BlkifStatus.okay })
        // The guest reuses the answered writes' pages, as it may.
        for (ticket, _, _) in writes {
            fe.dataPage(slot: ticket.slot, segment: 0).initializeMemory(as: UInt8.self, repeating: 0xEE, count: 4096)
        }
        kill(w.daemon!.processIdentifier, SIGKILL)
        _ = w.waitExit(w.daemon!, seconds: 5)
        w.daemon = try w.startDaemon()
        let answer = try fe.wait(for: slow, timeout: 20, other: note)
        note(answer)
        #expect(answer.status == BlkifStatus.okay)
        _ = try fe.collect(timeout: 1, note)
        #expect(answers.filter { $0.value != 1 }.isEmpty, "answered more than once: \(answers.filter { $0.value != 1 })")
        #expect(answers.count == writes.count + 1)
        let reader = try NBDReader(uri: server.uri)
        defer { reader.close() }
        for (_, sector, byte) in writes {
            #expect(try reader.read(offset: sector * 512, length: 4096) == [UInt8](repeating: byte, count: 4096),
                    "sector \(sector) does not hold its acknowledged write")
        }
        // The ring goes on.
        #expect(try fe.read(sector: 0, count: 8).data == [UInt8](repeating: 0x10, count: 4096))
    }

    @Test("SIGKILL of an idle daemon: the next one takes the ring and the event channel over")
    func restartAfterKill() throws {
        let w = try World()
        defer { w.close() }
        let (fe, dom0) = try connectGuest(w)
        let pattern = [UInt8](repeating: 0x3C, count: 4096)
        #expect(try fe.write(sector: 64, data: pattern) == BlkifStatus.okay)
        kill(w.daemon!.processIdentifier, SIGKILL)
        _ = w.waitExit(w.daemon!, seconds: 5)
        w.daemon = try w.startDaemon()
        // Requests made while no daemon runs wait, then complete.
        let (status, data) = try fe.read(sector: 64, count: 8)
        #expect(status == BlkifStatus.okay)
        #expect(data == pattern)
        #expect(try fe.write(sector: 72, data: pattern) == BlkifStatus.okay)
        #expect(dom0.readState(fe.backendPath) == .connected)
    }

    /// The guest agreed on indirect requests with the daemon that went
    /// away; the next one resumes the ring without a handshake, so it must
    /// keep serving them whatever its own option says.
    @Test("a daemon restarted with --max-indirect-segments 0 still serves the indirect requests its predecessor offered, and offers none at the next handshake")
    func restartKeepsIndirectOffer() throws {
        let w = try World()
        defer { w.close() }
        let (fe, dom0) = try connectGuest(w, indirectSegments: 128)
        #expect(fe.segmentsPerRequest == 128)
        let load = BystanderGuest(frontend: fe)
        usleep(300_000)
        w.daemon!.terminate()
        #expect(w.waitExit(w.daemon!, seconds: 10) == 0)
        w.daemon = try w.startDaemon(["--max-indirect-segments", "0"])
        usleep(500_000)
        let (summary, failure) = load.finish()
        #expect(failure == nil)
        #expect(summary.errors == 0 && summary.mismatches == 0)
        #expect(summary.reads + summary.writes > 50)
        let before = fe.indirectRequestsSent
        let (status, _) = try fe.read(sector: 0, count: fe.maxSectorsPerRequest)
        #expect(status == BlkifStatus.okay)
        #expect(fe.indirectRequestsSent == before + 1)
        #expect(try dom0.read(fe.backendPath + "/feature-max-indirect-segments") == "128")
        #expect(dom0.readState(fe.backendPath) == .connected)
        // A new handshake with this daemon: its own offer (none), direct requests.
        try fe.disconnect()
        try fe.connect(ringPageOrder: 1)
        #expect(try dom0.read(fe.backendPath + "/feature-max-indirect-segments") == nil)
        #expect(fe.segmentsPerRequest == Blkif.maxSegmentsPerRequest)
        var workload = VerifiedWorkload(sectors: fe.info.sectors, seed: 3, queueDepth: 8, canDiscard: true, canFlush: true)
        let s = try workload.run(on: fe, seconds: 10, operations: 300)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 0)
        #expect(fe.indirectRequestsSent == 0)
    }
}
