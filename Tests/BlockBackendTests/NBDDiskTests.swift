import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import Testing
import XenABI

/// A vbd whose params names an NBD export: the same handshake and ring,
/// with libnbd behind the data plane, against a real nbdkit.
@Suite("blkback on an NBD export", .serialized)
struct NBDDiskTests {
    /// `nbdkit -f memory SIZE` on a fresh unix socket, killed by PID at the end.
    final class Nbdkit {
        let process = Process()
        let socket: String
        init(_ arguments: [String]) throws {
            guard access("/usr/bin/nbdkit", X_OK) == 0 else { throw FrontendError("nbdkit is not installed") }
            socket = "/tmp/xenbackd-nbd-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
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

    @Test("a dead NBD server: requests are answered with errors, never left hanging; other guests unaffected")
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
        let (status, _) = try fe.read(sector: 8, count: 8)
        #expect(status == BlkifStatus.error)
        #expect(try other.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }
}
