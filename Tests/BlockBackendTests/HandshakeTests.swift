import BlockBackend
import BlockFrontend
import Glibc
import Hypervisor
import LoopbackHypervisor
import Testing
import XenABI
import XenBus

/// The backend half of the xenbus handshake against frontends that publish
/// bad values: each leaves its device Closed with a reason in `error`, and
/// the daemon keeps serving the other guest.
@Suite("xenbus handshake: bad values")
struct HandshakeBadValueTests {
    func expectRefused(_ overrides: [String: String?], reason: String) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (good, _) = try bed.guestWithDisk(2)
        let disk = TempDisk(megabytes: 4)
        defer { disk.remove() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: disk.path))
        fe.publishOverrides = overrides
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        #expect(bed.backendState(fe) == .closed)
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error?.contains(reason) == true, "error node: \(error ?? "nil")")
        #expect(try good.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }

    @Test("a ring-page-order above max-ring-page-order")
    func ringOrderTooLarge() throws {
        try expectRefused(["ring-page-order": "5", "ring-ref0": "8", "ring-ref": nil], reason: "above max-ring-page-order")
    }

    @Test("a malformed ring-ref")
    func malformedRingRef() throws {
        try expectRefused(["ring-ref": "0x1z"], reason: "malformed ring-ref")
    }

    @Test("a ring-ref that is not granted")
    func ungrantedRingRef() throws {
        try expectRefused(["ring-ref": "7000"], reason: "cannot map ring")
    }

    @Test("an unknown protocol")
    func unknownProtocol() throws {
        try expectRefused(["protocol": "x86_32-abi"], reason: "unsupported protocol")
    }

    @Test("a missing event-channel")
    func missingEventChannel() throws {
        try expectRefused(["event-channel": nil], reason: "missing event-channel")
    }

    @Test("a missing disk: Closed at once with the reason, before any frontend")
    func missingDisk() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: "/nonexistent/disk.img"))
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        #expect(bed.backendState(fe) == .closed)
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error?.contains("/nonexistent/disk.img") == true, "error node: \(error ?? "nil")")
    }
}
