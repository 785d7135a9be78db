import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing
import XenABI

/// A vbd whose params names an NBD export: the same handshake and ring,
/// with libnbd behind the data plane, against a real nbdkit or nbd-server.
@Suite("blkback on an NBD export", .serialized)
struct NBDDiskTests {
    /// The servers and forms of address the migration and restart tests run
    /// against: nbdkit's memory plugin on a unix socket; nbd-server as Xen
    /// users run it (`nbd-server 127.0.0.1:PORT FILE`, `params` in the old
    /// form `nbd:127.0.0.1 PORT`: no flush, FUA or trim, so the backend
    /// offers neither flush nor discard); nbd-server from a configuration
    /// file with flush, FUA and trim on a unix socket.
    enum Export: String, CaseIterable, CustomStringConvertible, Sendable {
        case nbdkitMemory = "nbdkit memory, unix socket"
        case nbdServerPlain = "nbd-server PORT FILE, nbd:IP PORT"
        case nbdServerFlushTrim = "nbd-server with flush/fua/trim, unix socket"

        var description: String { rawValue }

        /// Whether the verified workload may discard. Not on nbd-server:
        /// 3.24 answers a trim of a file export without punching anything
        /// from the middle of the export on (it punches min(length, size -
        /// 2 × offset) bytes). NBD lets a server ignore a trim, but the
        /// workload's model reads a discarded sector as zeros.
        var workloadDiscards: Bool { self == .nbdkitMemory }

        func start(megabytes: Int) throws -> NBDTestServer {
            switch self {
            case .nbdkitMemory: try NBDTestServer.scratchDisk(.nbdkit, megabytes: megabytes)
            case .nbdServerPlain: try NBDTestServer.scratchDisk(.nbdServer, megabytes: megabytes)
            case .nbdServerFlushTrim:
                try NBDTestServer.scratchDisk(.nbdServer, megabytes: megabytes, transport: .unixSocket, options: .all)
            }
        }
    }

    /// Merged sequential reads whose completions come late (a slow
    /// server) while the next batch merges: each merged operation keeps
    /// its own iovecs until its completion, when NBDStorage scatters the
    /// bounced data into them. A merge area shared by all batches once
    /// sent one batch's data into the next batch's pages (found on Xen).
    @Test("two batches of merged reads in flight at once on a slow server each get their own data")
    func mergedReadsInFlightKeepTheirOwnIovecs() throws {
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "16M", "delay-read=50ms"])
        defer { server.stop() }
        let bed = try TestBed(options: .init(maxQueues: 4))
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.uri))
        fe.requestedQueues = 4
        try fe.connect(ringPageOrder: 1)
        // An export gets one ring: its handle spreads over the connections
        // the server allows, and a server without multi-conn may not make a
        // flush on one connection cover writes done on another.
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/multi-queue-max-queues") == nil)
        #expect(fe.queues.count == 1)
        func byte(_ sector: UInt64, _ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: Int(sector) &* 31 &+ i &* 7 &+ 1) }
        let perRequest = 88   // 11 pages
        for r in 0..<16 {
            let first = UInt64(r * perRequest)
            let data = (0..<perRequest * 512).map { byte(first + UInt64($0 / 512), $0 % 512) }
            #expect(try fe.write(sector: first, data: data) == BlkifStatus.okay)
        }
        var tickets: [(ticket: LoopbackBlockFrontend.Ticket, sector: UInt64)] = []
        for batch in 0..<2 {
            for r in 0..<8 {
                let sector = UInt64((batch * 8 + r) * perRequest)
                tickets.append((try fe.submit(.read(sector: sector, count: perRequest)), sector))
            }
            fe.kick()
            usleep(10_000)   // the backend takes and submits this batch; the next comes while it waits
        }
        var statuses: [UInt64: Int16] = [:]
        for (ticket, _) in tickets where statuses[ticket.id] == nil {
            statuses[ticket.id] = try fe.wait(for: ticket, timeout: 10) { statuses[$0.id] = $0.status }.status
        }
        for (ticket, sector) in tickets {
            #expect(statuses[ticket.id] == BlkifStatus.okay)
            var wrong = 0
            for page in 0..<11 {
                let p = fe.dataPage(slot: ticket.slot, segment: page)
                for i in 0..<4096 where p.load(fromByteOffset: i, as: UInt8.self) != byte(sector + UInt64(page * 8 + i / 512), i % 512) {
                    wrong += 1
                }
            }
            #expect(wrong == 0, "read at sector \(sector): \(wrong) wrong bytes")
        }
    }

    @Test("verified I/O, flush and discard through the ring to nbdkit's memory plugin")
    func servedFromNbdkit() throws {
        let server = try NBDTestServer.nbdkit(["memory", "32M"])
        defer { server.stop() }
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.uri))
        try fe.connect(ringPageOrder: 1)
        #expect(fe.info.sectors == 32 * 2048)
        #expect(fe.info.flush && fe.info.discard && !fe.info.readOnly)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 11, queueDepth: 16, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 30, operations: 2000)
        #expect(s.errors == 0 && s.mismatches == 0)
        #expect(s.writes > 500 && s.reads > 500 && s.discards > 0 && s.flushes > 0)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        try fe.disconnect()
    }

    @Test("migration: the source answers what it took, flushes and lets go; the destination serves the same export; a third client finds every acknowledged write",
          arguments: Export.allCases)
    func migrationBetweenHosts(export: Export) throws {
        let server = try export.start(megabytes: 16)
        defer { server.stop() }
        // Two hosts: each its own loopback hypervisor, xenstored and backend.
        let source = try TestBed()
        defer { source.close() }
        let destination = try TestBed()
        defer { destination.close() }

        let before = try source.host.attachDisk(to: try source.host.createGuest(5), .init(params: server.params))
        try before.connect(ringPageOrder: 1)
        // The mixed workload on the first 12 MiB; a stream of 4 KiB writes
        // on the last 4 MiB that is still running when the guest moves.
        let streamSectors: UInt64 = 4 * 2048
        let workloadSectors = before.info.sectors - streamSectors
        var w = VerifiedWorkload(sectors: workloadSectors, seed: 55, queueDepth: 16,
                                 canDiscard: before.info.discard && export.workloadDiscards, canFlush: before.info.flush)
        var stream = StampedWrites(firstSector: workloadSectors, blocks: Int(streamSectors / 8), depth: 16, seed: 56)
        let first = try w.run(on: before, seconds: 30, operations: 1500)
        #expect(first.errors == 0 && first.mismatches == 0 && first.writes > 300, "\(first)")
        #expect(before.info.discard == (export != .nbdServerPlain) && before.info.flush == (export != .nbdServerPlain))
        try stream.run(on: before, acknowledging: 200)
        try stream.fill(before)
        #expect(stream.inFlightCount == 16)
        // The guest is suspended with writes on its ring: its frontend
        // closes; the source backend answers what it took, flushes and
        // disconnects from the export. What it never took is sent again on
        // the destination, as blkfront does after a migration.
        try closeWithRequestsInFlight(before, writes: &stream)
        let unanswered = stream.abandonInFlight()
        #expect(stream.errors == 0)
        try waitUntil("the source to let the export go") { source.host.blockStatus.first?.diskOpen == false }

        let after = try destination.host.attachDisk(to: try destination.host.createGuest(5), .init(params: server.params))
        try after.connect(ringPageOrder: 1)
        #expect(after.info.sectors == before.info.sectors)
        try stream.resubmit(unanswered, on: after)
        try stream.run(on: after, acknowledging: 200)
        try stream.drain(after)
        #expect(stream.errors == 0)
        let full = try w.verifyAll(on: after)
        #expect(full.mismatches == 0 && full.verified > 1000)
        let second = try w.run(on: after, seconds: 30, operations: 1500)
        #expect(second.errors == 0 && second.mismatches == 0, "\(second)")
        if after.info.flush { #expect(try after.run(.flush) == BlkifStatus.okay) }

        // A third client of the export, not through any ring: every sector
        // the workload knows, every block the stream wrote, by checksum.
        let reader = try NBDReader(uri: server.uri)
        defer { reader.close() }
        let sectors = try verifyWorkload(w, with: reader)
        #expect(sectors.mismatches == 0 && sectors.checked > 5000, "\(sectors)")
        let blocks = try stream.verify(with: reader)
        #expect(blocks.wrong.isEmpty, "blocks not as acknowledged: \(blocks.wrong)")
        #expect(blocks.checked > 200)
        // Checked, not modelled: a discard reaches the server and is answered.
        if after.info.discard { #expect(try after.run(.discard(sector: 0, count: 64)) == BlkifStatus.okay) }
    }

    /// nbdkit's file plugin on a unix socket, and nbd-server over TCP as
    /// Xen users run it; both killed (nbd-server: its daemon and the child
    /// serving each connection) and started again on the same socket or port
    /// over the same file.
    @Test("the NBD server restarted in the middle of I/O: every answer right or an error, never wrong data; I/O resumes",
          arguments: NBDServerKind.allCases)
    func serverRestartsMidIO(kind: NBDServerKind) throws {
        let image = TempDisk(megabytes: 16)
        defer { image.remove() }
        let server = switch kind {
        case .nbdkit: try NBDTestServer.nbdkit(["file", image.path])
        case .nbdServer: try NBDTestServer.nbdServer(exporting: image.path, transport: .tcp)
        }
        defer { server.stop() }
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.params))
        try fe.connect(ringPageOrder: 1)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 77, queueDepth: 8, canDiscard: false, canFlush: fe.info.flush)
        let before = try w.run(on: fe, seconds: 30, operations: 600)
        #expect(before.errors == 0 && before.mismatches == 0)
        // Restart the server while requests keep coming: each is answered,
        // right or with an error, and the model only counts what succeeded.
        let restartFailure = Handoff<String>()   // "" when the server is back
        let restart = try NativeThread {
            usleep(100_000)
            server.stop()
            usleep(300_000)
            do { try server.restart(); restartFailure.put("") } catch { restartFailure.put("\(error)") }
        }
        let during = try w.run(on: fe, seconds: 2)
        restart.join()
        let failure = restartFailure.take()
        try #require(failure.isEmpty, "restart: \(failure)")
        #expect(during.mismatches == 0)
        let after = try w.run(on: fe, seconds: 30, operations: 600)
        #expect(after.errors == 0 && after.mismatches == 0 && after.writes > 100)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        // The last event: the reconnection, or the second connection restored after it.
        let event = bed.host.blockStatus.first?.lastStorageEvent ?? ""
        #expect(event.hasPrefix("reconnected to") || event.contains("restored"), "\(event)")
        // Counted too (status and /metrics): at least one loss and one reconnection.
        let status = try #require(bed.host.blockStatus.first)
        #expect((status.storageConnectionsLost ?? 0) >= 1 && (status.storageReconnects ?? 0) >= 1,
                "\(String(describing: status.storageConnectionsLost)) lost, \(String(describing: status.storageReconnects)) regained")
        // And the export itself, seen by a client that never went through the ring.
        let reader = try NBDReader(uri: server.uri)
        defer { reader.close() }
        let sectors = try verifyWorkload(w, with: reader)
        #expect(sectors.mismatches == 0 && sectors.checked > 1000, "\(sectors)")
    }

    @Test("a read-only export: the backend says so and refuses writes")
    func readOnlyExport() throws {
        let server = try NBDTestServer.nbdkit(["memory", "8M"], readOnly: true)
        defer { server.stop() }
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.uri))
        try fe.connect()
        #expect(fe.info.readOnly)
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
        #expect(try fe.write(sector: 0, data: [UInt8](repeating: 1, count: 512)) == BlkifStatus.error)
    }

    @Test("a dead NBD server: requests are held for the reconnect window, then answered with errors; other guests unaffected")
    func serverDies() throws {
        let server = try NBDTestServer.nbdkit(["memory", "8M"])
        let bed = try TestBed()
        defer { bed.close() }
        let (other, _) = try bed.guestWithDisk(2)
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.uri))
        try fe.connect()
        #expect(try fe.write(sector: 8, data: [UInt8](repeating: 7, count: 4096)) == BlkifStatus.okay)
        server.stop()
        // Once the storage has seen the connection go (a request sent just
        // before that fails at once, with the connection), it holds new
        // requests while it tries to reconnect (10 s by default), then
        // answers them with an error.
        try waitUntil("status to show the lost connection") {
            bed.host.blockStatus.first { $0.address.frontendDomain == 1 }?.lastStorageEvent?.hasPrefix("lost every connection") == true
        }
        let t = try fe.submit(.read(sector: 8, count: 8))
        fe.kick()
        #expect(try fe.wait(for: t, timeout: 20).status == BlkifStatus.error)
        // The operator sees why: in the log and in status.
        try waitUntil("status to show the storage event") {
            bed.host.blockStatus.first { $0.address.frontendDomain == 1 }?.lastStorageEvent?.contains("still unreachable") == true
        }
        #expect(try other.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }
}
