import DaemonCLI
import Foundation
import Glibc
import LoopbackHypervisor
import SystemSupport
import Testing
import XenABI
import XenStoreClient

/// `xenbackd status` against a running daemon: the versioned JSON document
/// of docs/status.md, one device in full, and a failed device's error with
/// its time.
@Suite("xenbackd status")
struct StatusCommandTests {
    private func document(_ w: DaemonRestartTests.World, _ extra: [String] = []) throws -> StatusDocument {
        let json = try w.output(["status", "--control-socket", w.controlSocket, "--json"] + extra)
        return try JSONDecoder().decode(StatusDocument.self, from: Data(json.utf8))
    }

    @Test("--json: schema 1, the connected vbd's disk and ring terms as the frontend has them; DEVICE: the same in full")
    func connectedVbdInFull() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, _) = try DaemonRestartTests().connectGuest(w)
        // The worker publishes Connected before the control thread records
        // the connection: wait until status has it.
        var vbd: DeviceReport.VbdTerms?
        try waitUntil("the vbd's terms in status") {
            vbd = (try? document(w))?.devices.first { $0.device == "vbd-1-51712" }?.vbd
            return vbd != nil
        }
        let doc = try document(w)
        #expect(doc.schemaVersion == 1)
        let device = try #require(doc.devices.first)
        #expect(doc.devices.count == 1 && device.type == "vbd" && device.domain == 1 && device.devid == 51712)
        #expect(device.state == "Connected" && device.params == w.disk.path)
        #expect(device.lastError == nil && device.lastErrorTime == nil)
        let terms = try #require(vbd)
        #expect(terms.sectors == fe.info.sectors && terms.sectors == 16 * 2048)
        #expect(terms.sectorSize == 512 && terms.readOnly == false && terms.flush == fe.info.flush)
        #expect(terms.discard == fe.info.discard && terms.persistentGrants == fe.persistentGrants)
        #expect(terms.ringPages == 2 && terms.queues == 1 && terms.protocol == "x86_64-abi")
        #expect(device.vif == nil)

        #expect(device.resumed == false && device.inFlight == 0)
        #expect((device.handshakeSeconds ?? -1) >= 0)
        // Four reads carried out: timed, p50 and p99 named by their buckets.
        for i in 0..<4 { #expect(try fe.read(sector: UInt64(i * 8), count: 8).status == BlkifStatus.okay) }
        var latency: DeviceReport.LatencyHistogram?
        try waitUntil("the reads timed in status") {
            latency = (try? document(w))?.devices.first?.latency
            return latency.map { $0.counts.reduce(0, +) } == 4
        }
        #expect(latency?.counts.count == 14 && latency?.upperBoundsSeconds.count == 13)
        #expect(latency?.upperBoundsSeconds.first == 0.00005 && latency?.upperBoundsSeconds.last == 1)

        let full = try w.output(["status", "--control-socket", w.controlSocket, "vbd-1-51712"])
        let lines = full.split(separator: "\n").map(String.init)
        #expect(lines.first == "vbd-1-51712", "\(full)")
        #expect(lines.contains { $0.hasPrefix("connection") && $0.contains("handshake of") }, "\(full)")
        #expect(lines.contains { $0.hasPrefix("latency") && $0.contains("p50 ≤ ") && $0.contains("(4 requests timed)") },
                "\(full)")
        #expect(lines.contains { $0.hasPrefix("disk") && $0.contains("32768 sectors of 512 bytes") && $0.contains("read-write") },
                "\(full)")
        #expect(lines.contains { $0.hasPrefix("ring") && $0.contains("2 pages × 1 ring") && $0.contains("x86_64-abi") },
                "\(full)")
        // One device in JSON is the same document with that device alone.
        #expect(try document(w, ["vbd-1-51712"]).devices.map(\.device) == ["vbd-1-51712"])
        let unknown = try runProgram(w.binary, ["status", "--control-socket", w.controlSocket, "vbd-9-1"])
        #expect(unknown.status == 1 && unknown.output.isEmpty, "docs/status.md: exit status 1, nothing on stdout")
    }

    @Test("a missing disk: the device's error and when it happened, in JSON and in full")
    func failedDeviceHasItsErrorTime() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let dom0 = try XenStoreSocketClient(socketPath: w.layout.xenStoreSocket)
        let toolstack = LoopbackToolstack(store: dom0)
        try toolstack.createDomain(1, name: "guest1")
        try dom0.introduceDomain(1)
        let before = WallClock.seconds()
        try toolstack.addDisk(domain: 1, .init(params: "/nonexistent/disk.img"))
        var device: DeviceReport?
        try waitUntil("the failure in status") {
            device = (try? document(w))?.devices.first { $0.lastError != nil }
            return device != nil
        }
        let d = try #require(device)
        #expect(d.lastError?.contains("/nonexistent/disk.img") == true, "\(d)")
        let time = try #require(d.lastErrorTime)
        #expect(time >= before.rounded(.down) && time <= WallClock.seconds() + 1, "\(time) against \(before)")
        #expect(d.vbd == nil, "not connected: no terms")
        let full = try w.output(["status", "--control-socket", w.controlSocket, d.device])
        let stamp = full.split(separator: "\n").first { $0.hasPrefix("last error") }
        // "last error      2026-12-07T01:02:03Z: cannot open ..."
        #expect(stamp?.contains("Z: ") == true && stamp?.contains("/nonexistent/disk.img") == true, "\(full)")
    }

    /// The control socket is root's alone: `rescan` acts, and `status`
    /// names every guest's disks.
    @Test("the control socket is mode 0600: an unprivileged user can neither ask status nor rescan")
    func controlSocketIsRootsAlone() throws {
        guard getuid() == 0 else { try Test.cancel("needs root to run a command as nobody") }
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        _ = try DaemonRestartTests().connectGuest(w)
        var info = stat()
        #expect(stat(w.controlSocket, &info) == 0 && info.st_mode & 0o777 == 0o600 && info.st_uid == 0)
        // The folder is the test's (0700): opened so that only the socket's own mode stands in the way.
        #expect(chmod(w.root, 0o755) == 0)
        for command in [["status"], ["rescan", "vbd-1-51712"]] {
            let r = try runProcess(["/usr/sbin/runuser", "-u", "nobody", "--", w.binary] + command
                                   + ["--control-socket", w.controlSocket],
                                   environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], timeout: 20)
            #expect(r.status == 64 && r.stderr.contains("Permission denied") && r.stdout.isEmpty, "\(command): \(r)")
        }
        // root still can.
        #expect(try w.output(["status", "--control-socket", w.controlSocket]).contains("vbd-1-51712"))
    }
}
