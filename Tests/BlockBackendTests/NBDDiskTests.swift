import BlockBackend
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import SystemSupport
import Testing
import XenABI

/// A vbd whose params names an NBD export: the same handshake and ring,
/// with libnbd behind the data plane, against a real nbdkit.
@Suite("blkback on an NBD export", .serialized)
struct NBDDiskTests {
    /// The server of a test that restarts it on another thread (read after join).
    final class ServerBox: @unchecked Sendable {
        var server: Nbdkit
        init(_ s: Nbdkit) { server = s }
    }

    /// `nbdkit -f memory SIZE` on a fresh unix socket, killed by PID at the end.
    final class Nbdkit {
        let process = Process()
        let socket: String
        init(_ arguments: [String], socket path: String? = nil) throws {
            guard access("/usr/bin/nbdkit", X_OK) == 0 else { throw FrontendError("nbdkit is not installed") }
            socket = path ?? "/tmp/xenbackd-nbd-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
            unlink(socket)
            process.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
            process.arguments = ["-f", "--exit-with-parent", "-U", socket] + arguments
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            try waitUntil("nbdkit to listen") { access(socket, F_OK) == 0 }
        }
        var uri: String { "nbd+unix:///?socket=\(socket)" }
        func stop() {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            unlink(socket)
        }
    }

    @Test("verified I/O, flush and discard through the ring to nbdkit's memory plugin")
    func servedFromNbdkit() throws {
        guard access("/usr/bin/nbdkit", X_OK) == 0 else { try Test.cancel("nbdkit is not installed (scripts/setup installs it)") }
        let server = try Nbdkit(["memory", "32M"])
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

    @Test("migration: the source drains, flushes and lets go; the destination serves the same export; a third client finds every acknowledged write")
    func migrationBetweenHosts() throws {
        guard access("/usr/bin/nbdkit", X_OK) == 0 else { try Test.cancel("nbdkit is not installed (scripts/setup installs it)") }
        let server = try Nbdkit(["memory", "16M"])
        defer { server.stop() }
        // Two hosts: each its own loopback hypervisor, xenstored and backend.
        let source = try TestBed()
        defer { source.close() }
        let destination = try TestBed()
        defer { destination.close() }

        let before = try source.host.attachDisk(to: try source.host.createGuest(5), .init(params: server.uri))
        try before.connect(ringPageOrder: 1)
        var w = VerifiedWorkload(sectors: before.info.sectors, seed: 55, queueDepth: 16, canDiscard: true, canFlush: true)
        let first = try w.run(on: before, seconds: 30, operations: 1500)
        #expect(first.errors == 0 && first.mismatches == 0 && first.writes > 300)
        // The guest is suspended: its frontend closes; the source backend
        // answers what is in flight, flushes and disconnects from the export.
        try before.disconnect()
        try waitUntil("the source to let the export go") { source.host.blockStatus.first?.diskOpen == false }

        let after = try destination.host.attachDisk(to: try destination.host.createGuest(5), .init(params: server.uri))
        try after.connect(ringPageOrder: 1)
        let full = try w.verifyAll(on: after)
        #expect(full.mismatches == 0 && full.verified > 1000)
        let second = try w.run(on: after, seconds: 30, operations: 1500)
        #expect(second.errors == 0 && second.mismatches == 0)
        #expect(try after.run(.flush) == BlkifStatus.okay)

        // A third client of the export, not through any ring.
        let reader = try NBDStorage.open(uri: server.uri, readOnly: true, queueDepth: 4)
        defer { reader.close() }
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: 512, alignment: 16)
        defer { page.deallocate(); expected.deallocate() }
        var checked = 0
        for sector in stride(from: UInt64(0), to: after.info.sectors, by: 37) where w.expectedSector(sector, into: expected) {
            var io = iovec(iov_base: page, iov_len: 512)
            var op = StorageOperation(tag: sector, kind: .read, offset: sector * 512, length: 512, iovecs: &io, iovecCount: 1)
            #expect(withUnsafeMutablePointer(to: &op) { reader.submit(UnsafeMutableBufferPointer(start: $0, count: 1)) } == 1)
            var result: Int64?
            while result == nil {
                var pfd = pollfd(fd: reader.completionFileDescriptor, events: Int16(POLLIN), revents: 0)
                _ = poll(&pfd, 1, 1000)
                _ = reader.reapCompletions { result = $0.result }
            }
            #expect(result == 512)
            #expect(memcmp(page, expected, 512) == 0, "sector \(sector)")
            checked += 1
        }
        #expect(checked > 200)
    }

    @Test("the NBD server restarted in the middle of I/O: every answer right or an error, never wrong data; I/O resumes")
    func serverRestartsMidIO() throws {
        guard access("/usr/bin/nbdkit", X_OK) == 0 else { try Test.cancel("nbdkit is not installed (scripts/setup installs it)") }
        let image = TempDisk(megabytes: 16)
        defer { image.remove() }
        let box = ServerBox(try Nbdkit(["file", image.path]))
        let socket = box.server.socket
        defer { box.server.stop() }
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: box.server.uri))
        try fe.connect(ringPageOrder: 1)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 77, queueDepth: 8, canDiscard: false, canFlush: true)
        let before = try w.run(on: fe, seconds: 30, operations: 600)
        #expect(before.errors == 0 && before.mismatches == 0)
        // Restart the server while requests keep coming: each is answered,
        // right or with an error, and the model only counts what succeeded.
        let restart = try NativeThread {
            usleep(100_000)
            box.server.stop()
            usleep(300_000)
            box.server = try! Nbdkit(["file", image.path], socket: socket)
        }
        let during = try w.run(on: fe, seconds: 2)
        restart.join()
        #expect(during.mismatches == 0)
        let after = try w.run(on: fe, seconds: 30, operations: 600)
        #expect(after.errors == 0 && after.mismatches == 0 && after.writes > 100)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        // The last event: the reconnection, or the second connection restored after it.
        let event = bed.host.blockStatus.first?.lastStorageEvent ?? ""
        #expect(event.hasPrefix("reconnected to") || event.contains("restored"), "\(event)")
    }

    @Test("a read-only export: the backend says so and refuses writes")
    func readOnlyExport() throws {
        guard access("/usr/bin/nbdkit", X_OK) == 0 else { try Test.cancel("nbdkit is not installed (scripts/setup installs it)") }
        let server = try Nbdkit(["-r", "memory", "8M"])
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
        guard access("/usr/bin/nbdkit", X_OK) == 0 else { try Test.cancel("nbdkit is not installed (scripts/setup installs it)") }
        let server = try Nbdkit(["memory", "8M"])
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
