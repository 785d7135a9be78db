import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import Hypervisor
import LoopbackHypervisor
import Testing
import XenABI
import XenBus
import SystemSupport

/// The backend half of the xenbus handshake against frontends that publish
/// bad values: each leaves its device Closing with a reason in `error`, and
/// the daemon keeps serving the other guest.
@Suite("xenbus handshake: bad values")
struct HandshakeBadValueTests {
    func expectRefused(_ overrides: [String: String?], reason: String) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (good, _) = try bed.guestWithDisk(2)
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        fe.publishOverrides = overrides
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        // Linux's xenbus_dev_fatal: Closing, and "<errno> <reason>" under the
        // backend domain's error/ tree (the device's own `error` key too).
        #expect(bed.backendState(fe) == .closing)
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error?.contains(reason) == true, "error node: \(error ?? "nil")")
        let linuxPath = fe.backendPath.replacingOccurrences(of: "/local/domain/0/backend/", with: "/local/domain/0/error/backend/")
        let linuxError = try bed.host.toolstack.store.read(linuxPath + "/error")
        #expect(linuxError?.hasPrefix("22 ") == true && linuxError?.contains(reason) == true, "error/ node: \(linuxError ?? "nil")")
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
        try expectRefused(["protocol": "x86_16-abi"], reason: "unsupported protocol")
    }

    @Test("a missing event-channel")
    func missingEventChannel() throws {
        try expectRefused(["event-channel": nil], reason: "missing event-channel")
    }

    @Test("numbers with a sign, a space or trailing bytes", arguments: ["+8", " 8", "8 ", "8\n", "0x8", "-1", ""])
    func laxNumbers(ringRef: String) throws {
        try expectRefused(["ring-ref": ringRef], reason: "malformed ring-ref")
    }

    @Test("without ring-page-order, ring-ref0 does not stand for ring-ref (as Linux blkback)")
    func ringRef0WithoutOrder() throws {
        try expectRefused(["ring-ref0": "8", "ring-ref": nil], reason: "missing ring-ref (no ring-page-order)")
    }

    @Test("with ring-page-order 0, ring-ref0 is read and ring-ref is not (as Linux blkback)")
    func ringRefWithOrderZero() throws {
        try expectRefused(["ring-page-order": "0"], reason: "missing ring-ref0 (ring-page-order is 0)")
    }

    @Test("a backend directory that names no device is ignored and logged; the others are served")
    func malformedDeviceDirectory() throws {
        let log = CapturedLog()
        let bed = try TestBed(log: log)
        defer { bed.close() }
        let store = bed.host.toolstack.store
        try store.write("/local/domain/0/backend/vbd/1-2/51712/frontend", "/local/domain/1/device/vbd/51712")
        try store.write("/local/domain/0/backend/vbd/3/007/frontend", "/local/domain/3/device/vbd/7")
        let (fe, _) = try bed.guestWithDisk(4)
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
        #expect(bed.host.blockStatus.map(\.address.frontendDomain) == [4])
        let refused = log.lines.filter { $0.message == "ignoring a directory that names no device" }.compactMap { $0.metadata["directory"] }
        #expect(Set(refused) == ["/local/domain/0/backend/vbd/1-2", "/local/domain/0/backend/vbd/3/007"])
    }

    @Test("a protocol with control characters: escaped in the error node and in the log line")
    func escapedProtocol() throws {
        let log = CapturedLog()
        let bed = try TestBed(log: log)
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        fe.publishOverrides = ["protocol": "x86_64-abi\n\u{1b}[31m"]
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        let expected = #"unsupported protocol "x86_64-abi\n\x1b[31m""#
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/error") == expected)
        let failed = log.lines.filter { $0.message == "device failed" }
        #expect(failed.count == 1)
        #expect(failed.first?.metadata["reason"] == expected)
        #expect(failed.first?.metadata["device"] == "vbd-1-\(fe.devid)")
        #expect(!log.lines.contains { line in
            (line.message + line.metadata.values.joined()).unicodeScalars.contains { $0.value < 0x20 || $0 == "\u{7f}" }
        })
    }

    @Test("a device type other than phy or file")
    func unknownType() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1) { $0.type = "vbd3" }
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error == "type \"vbd3\" is not served here (phy or file)")
    }

    @Test("a missing disk: Closing at once with the reason (Linux's xenbus_dev_fatal), before any frontend")
    func missingDisk() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: "/nonexistent/disk.img"))
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        #expect(bed.backendState(fe) == .closing)
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error?.contains("/nonexistent/disk.img") == true, "error node: \(error ?? "nil")")
    }
}

@Suite("xenbus handshake: life cycle")
struct HandshakeLifecycleTests {
    @Test("discard-enable=0 (xl's no-discard) withholds feature-discard")
    func discardDisabled() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1) { $0.discard = false }
        try fe.connect()
        #expect(!fe.info.discard)
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/feature-discard") == "0")
        #expect(try fe.run(.discard(sector: 0, count: 8)) == BlkifStatus.notSupported)
    }

    @Test("a frontend that publishes its ring without waiting for InitWait is served")
    func frontendSkipsInitWait() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        try fe.connect(waitForInitWait: false)
        #expect(bed.backendState(fe) == .connected)
        #expect(try fe.write(sector: 8, data: [UInt8](repeating: 0x61, count: 1024)) == BlkifStatus.okay)
        #expect(try fe.read(sector: 8, count: 2).data == [UInt8](repeating: 0x61, count: 1024))
    }

    @Test("watch firings coalesced while the control loop is busy: the backend acts on the state it reads")
    func coalescedWatches() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        // Hold the control loop so that the frontend's Initialising, its
        // ring keys and Initialised all queue up behind one busy turn.
        let started = Handoff<Bool>()
        bed.host.control.post {
            started.put(true)
            usleep(300_000)
        }
        _ = started.take()
        try fe.connect(waitForInitWait: false)
        #expect(bed.backendState(fe) == .connected)
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }

    @Test("a simulated migration: the guest closes, its domain goes, a new domain gets the disk and finds every byte")
    func migrationToANewDomain() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (source, disk) = try bed.guestWithDisk(1, megabytes: 8)
        var w = VerifiedWorkload(sectors: source.info.sectors, seed: 21, queueDepth: 8, canDiscard: true, canFlush: true)
        let before = try w.run(on: source, seconds: 30, operations: 600)
        #expect(before.errors == 0 && before.mismatches == 0)
        #expect(try source.run(.flush) == BlkifStatus.okay)
        try source.disconnect()
        try bed.host.toolstack.store.write(source.backendPath + "/online", "0")
        try bed.host.toolstack.destroyDomain(1)
        let dest = try bed.host.createGuest(2)
        let fe = try bed.host.attachDisk(to: dest, .init(params: disk.path))
        try fe.connect(ringPageOrder: 1)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        let after = try w.run(on: fe, seconds: 30, operations: 600)
        #expect(after.errors == 0 && after.mismatches == 0)
    }

    @Test("online=0 and a closed frontend release the disk; removing the directories forgets the device")
    func unplug() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1)
        let store = bed.host.toolstack.store
        try store.write(fe.backendPath + "/online", "0")
        try fe.disconnect()
        #expect(bed.backendState(fe) == .closed)
        let status = try waitForStatus(bed) { $0.first?.diskOpen == false }
        #expect(status.first?.state == .closed)
        try bed.host.toolstack.removeDisk(domain: 1, devid: fe.devid)
        _ = try waitForStatus(bed) { $0.isEmpty }
    }

    @Test("a closing frontend's writes are flushed and the disk let go before Closed; a reconnect opens it again")
    func closeReleasesDisk() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1)
        let data = [UInt8](repeating: 0x42, count: 4096)
        #expect(try fe.write(sector: 16, data: data) == BlkifStatus.okay)
        try fe.disconnect()
        let status = try waitForStatus(bed) { $0.first?.state == .closed }
        #expect(status.first?.diskOpen == false)
        #expect(disk.sector(16) == Array(data[0..<512]))
        try fe.connect()
        #expect(bed.host.blockStatus.first?.diskOpen == true)
        #expect(try fe.read(sector: 16, count: 8).data == data)
    }

    @Test("the backend directory removed with requests in flight: no crash, other guests unaffected")
    func removalUnderLoad() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 16)
        let (other, _) = try bed.guestWithDisk(2)
        var submitted: Set<UInt64> = []
        for i in 0..<fe.ringSlots {
            submitted.insert(try fe.submit(.read(sector: UInt64(i * 88), count: 88)).id)
        }
        fe.kick()
        try bed.host.toolstack.store.remove(fe.backendPath)
        _ = try waitForStatus(bed) { !$0.contains { $0.address.frontendDomain == 1 } }
        var answered: [BlkifResponse] = []
        _ = try? fe.collect(timeout: 0.5) { answered.append($0) }
        #expect(answered.allSatisfy { submitted.contains($0.id) })
        #expect(try other.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }

    /// Polls the backend's status until `condition` holds (at most 5 s).
    func waitForStatus(_ bed: TestBed, _ condition: ([VbdStatus]) -> Bool) throws -> [VbdStatus] {
        var status: [VbdStatus] = []
        try waitUntil("the expected backend status") {
            status = bed.host.blockStatus
            return condition(status)
        }
        return status
    }
}

/// Linux's state table: a frontend's Closing is answered with Closing and
/// Closed follows the frontend's Closed; a frontend starting over gets
/// InitWait again after a clean close or an error it caused.
@Suite("xenbus handshake: closing and starting over")
struct HandshakeRestartTests {
    func setFrontendState(_ fe: LoopbackBlockFrontend, _ state: XenbusState) throws {
        try fe.store.writeState(fe.frontendPath, state)
    }

    func waitForBackend(_ bed: TestBed, _ fe: LoopbackBlockFrontend, _ state: XenbusState) throws {
        try waitUntil("backend \(state)") { bed.backendState(fe) == state }
    }

    /// Connected, then verified reads and writes on the frontend's disk.
    func expectServes(_ fe: LoopbackBlockFrontend, seed: UInt64) throws {
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: seed, queueDepth: 8, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 30, operations: 200)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 0)
    }

    @Test("Closing is answered with Closing (data plane stopped, disk flushed and let go); Closed follows the frontend's Closed")
    func closingThenClosed() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1)
        let data = [UInt8](repeating: 0x5a, count: 4096)
        #expect(try fe.write(sector: 40, data: data) == BlkifStatus.okay)
        try setFrontendState(fe, .closing)
        try waitForBackend(bed, fe, .closing)
        #expect(bed.host.blockStatus.first?.diskOpen == false)
        #expect(bed.host.blockStatus.first?.ringPages == 0)
        #expect(disk.sector(40) == Array(data[0..<512]))
        usleep(200_000)
        #expect(bed.backendState(fe) == .closing, "Closed before the frontend was")
        try setFrontendState(fe, .closed)
        try waitForBackend(bed, fe, .closed)
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/error") == nil)
        // A clean close, then a reconnect: InitWait again, and served.
        fe.releaseResources()
        try fe.connect()
        #expect(bed.backendState(fe) == .connected)
        #expect(try fe.read(sector: 40, count: 8).data == data)
        try expectServes(fe, seed: 31)
    }

    @Test("a malformed frontend state is logged with the device and counts as Closed")
    func malformedFrontendState() throws {
        let log = CapturedLog()
        let bed = try TestBed(log: log)
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1)
        try fe.store.write(fe.frontendPath + "/state", "4 ")
        try waitForBackend(bed, fe, .closed)
        let refused = log.lines.filter { $0.message == "frontend state refused, counted as Closed" }
        #expect(!refused.isEmpty)   // once per watch firing that reads it
        #expect(refused.allSatisfy { $0.metadata["state"] == #""4 ""# && $0.metadata["device"] == "vbd-1-\(fe.devid)" })
    }

    @Test("a frontend that vanishes while Closing counts as Closed")
    func vanishedWhileClosing() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1)
        try setFrontendState(fe, .closing)
        try waitForBackend(bed, fe, .closing)
        try bed.host.toolstack.store.remove(fe.frontendPath + "/state")
        try waitForBackend(bed, fe, .closed)
    }

    @Test("failed on a frontend's bad key, then Initialising (after Closing and Closed, or straight away): InitWait, reconnect, verified I/O",
          arguments: [true, false])
    func failedThenInitialising(closesFirst: Bool) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1, megabytes: 8)
        fe.publishOverrides = ["ring-ref": "+8"]
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        #expect(bed.backendState(fe) == .closing)
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/error") == #"malformed ring-ref "+8""#)
        #expect(bed.host.blockStatus.first?.diskOpen == false)
        if closesFirst {
            // Linux blkfront's answer to a backend Closing with an error.
            try setFrontendState(fe, .closing)
            try setFrontendState(fe, .closed)
            usleep(100_000)
            #expect(bed.backendState(fe) == .closed)
        }
        fe.releaseResources()
        fe.publishOverrides = [:]
        try fe.connect(timeout: 5)
        #expect(bed.backendState(fe) == .connected)
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/error") == nil)
        #expect(bed.host.blockStatus.first?.diskOpen == true)
        try expectServes(fe, seed: closesFirst ? 41 : 42)
    }

    @Test("a data-plane failure (a ring the guest revoked) is also cured by starting over")
    func ringFailureThenInitialising() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        fe.publishOverrides = ["ring-ref": "7000"]   // not granted: the map fails
        #expect(throws: FrontendError.self) { try fe.connect(timeout: 5) }
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/error")?.contains("cannot map ring") == true)
        fe.releaseResources()
        fe.publishOverrides = [:]
        try fe.connect(timeout: 5)
        try expectServes(fe, seed: 43)
    }

    @Test("bad toolstack keys: the device stays down (Closing; Closed after the frontend's Closed) whatever the frontend does")
    func toolstackFailureStays() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1) { $0.type = "vbd3" }
        let store = bed.host.toolstack.store
        let be = bed.host.toolstack.backendPath(domain: 1, devid: fe.devid)   // fe.backendPath is set by connect
        try waitUntil("backend Closing") { store.readState(be) == .closing }
        try setFrontendState(fe, .closing)
        try setFrontendState(fe, .closed)
        try waitUntil("backend Closed after the frontend's") { store.readState(be) == .closed }
        try setFrontendState(fe, .initialising)
        usleep(200_000)
        #expect(store.readState(be) == .closed)
        #expect(try store.read(be + "/error") == #"type "vbd3" is not served here (phy or file)"#)
    }

    @Test("a one-page ring named by ring-page-order 0 and ring-ref0 is served")
    func ringPageOrderZero() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        fe.ringPageOrderAlways = true
        try fe.connect()
        #expect(try fe.store.read(fe.frontendPath + "/ring-page-order") == "0")
        #expect(try fe.store.read(fe.frontendPath + "/ring-ref") == nil)
        #expect(try bed.connectedBlockStatus().ringPages == 1)
        try expectServes(fe, seed: 44)
    }
}

@Suite("xenbus handshake: hotplug scripts")
struct HandshakeHotplugTests {
    @Test("with a script, the disk is opened only once hotplug-status is connected")
    func waitsForHotplugStatus() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1) { $0.script = "/etc/xen/scripts/xenbackd-block" }
        let store = bed.host.toolstack.store
        let backend = bed.host.toolstack.backendPath(domain: 1, devid: fe.devid)
        // InitWait is reached at once (libxl runs the script only then); the disk stays closed.
        try waitUntil("InitWait") { bed.host.toolstack.store.readState(backend) == .initWait }
        #expect(bed.host.blockStatus.first?.diskOpen == false)
        let script = try NativeThread {
            usleep(300_000)
            try? store.write(backend + "/hotplug-status", "connected")
        }
        defer { script.join() }
        try fe.connect()
        #expect(bed.backendState(fe) == .connected)
        #expect(bed.host.blockStatus.first?.diskOpen == true)
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
    }

    @Test("a failed hotplug script closes the device with its reason")
    func hotplugError() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: "/var/lib/xen/missing.img", script: "/etc/xen/scripts/xenbackd-block"))
        let store = bed.host.toolstack.store
        let backend = bed.host.toolstack.backendPath(domain: 1, devid: fe.devid)
        try waitUntil("InitWait") { store.readState(backend) == .initWait }
        try store.withTransaction { t throws(XenStoreError) in
            try store.write(backend + "/hotplug-error", "/var/lib/xen/missing.img does not exist", transaction: t)
            try store.write(backend + "/hotplug-status", "error", transaction: t)
        }
        try waitUntil("Closing") { store.readState(backend) == .closing }
        let error = try store.read(backend + "/error")
        #expect(error == "hotplug script failed: /var/lib/xen/missing.img does not exist")
        #expect(bed.host.blockStatus.first?.diskOpen == false)
    }
}

@Suite("xenbus handshake: the toolstack as xenstore-utils commands")
struct HandshakeXenstoreUtilsTests {
    @Test("libxl's vbd keys and permissions written by xenstore-write/-chmod: found, served, verified")
    func toolstackByCommands() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let disk = TempDisk(megabytes: 8)
        defer { disk.remove() }
        let guest = try bed.host.createGuest(7)
        let be = "/local/domain/0/backend/vbd/7/51728"
        let fe = "/local/domain/7/device/vbd/51728"
        // Exactly what libxl writes for `disk = ['...,vdev=xvdb,access=rw,target=FILE']` (see shared/xenlab).
        let script = """
        set -e
        xenstore-write \(fe)/backend \(be) \(fe)/backend-id 0 \(fe)/device-type disk \\
            \(fe)/virtual-device 51728 \(fe)/state 1 \(fe)/trusted 1
        xenstore-chmod -r \(fe) n7 r0
        xenstore-write \(be)/bootable 1 \(be)/dev xvdb \(be)/device-type disk \(be)/discard-enable 1 \\
            \(be)/frontend \(fe) \(be)/frontend-id 7 \(be)/mode w \(be)/online 1 \\
            \(be)/params \(disk.path) \(be)/removable 0 \(be)/specification xen \(be)/state 1 \(be)/type phy
        xenstore-chmod -r \(be) n0 r7
        """
        let toolstack = try runProgram("/bin/bash", ["-c", script], environment: ["XENSTORED_PATH": bed.host.xenStoreSocket])
        #expect(toolstack.status == 0)
        let front = LoopbackBlockFrontend(guest: guest, store: try bed.host.guestStore(7), devid: 51728)
        try front.connect()
        #expect(front.info.sectors == 8 * 2048)
        var w = VerifiedWorkload(sectors: front.info.sectors, seed: 3, queueDepth: 8, canDiscard: true, canFlush: true)
        let s = try w.run(on: front, seconds: 30, operations: 300)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 0)
        // The guest could read its backend's keys (r7) but not write them.
        #expect(throws: XenStoreError.self) { try front.store.write(be + "/params", "/etc/shadow") }
        try front.disconnect()
    }
}
