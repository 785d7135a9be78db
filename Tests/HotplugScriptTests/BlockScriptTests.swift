import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// scripts/xenbackd-block run as libxl runs it (`add` / `remove` with
/// XENBUS_PATH relative, XENBUS_TYPE=vbd) against a loopback xenstored whose
/// vbd directories are written the way libxl writes them.
@Suite struct BlockScriptTests {
    @Test(arguments: ["", "aio:", "file:", "raw:", "phy:", "aio:raw:"])
    func goodFileConnects(prefix: String) throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 1, params: prefix + disk)
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 0, "\(result)\n\(f.log)")
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "connected", "physical-device-path": disk])
            #expect(result.seconds < 10)
            #expect(f.log.contains("hotplug-status=connected"))
        }
    }

    @Test func missingFileIsAnError() throws {
        try withFixture { f in
            let disk = f.directory + "/no-such-disk.img"
            try f.addVbd(domid: 1, params: "aio:" + disk)
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 1, "\(result)")
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "error", "hotplug-error": "disk \(disk) does not exist"])
            #expect(result.stderr.contains(disk))
        }
    }

    @Test func emptyFileIsAnError() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/empty.img", size: 0)
            try f.addVbd(domid: 1, params: disk)
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "error", "hotplug-error": "disk file \(disk) is empty"])
        }
    }

    @Test func relativePathOrDirectoryIsAnError() throws {
        try withFixture { f in
            try f.addVbd(domid: 1, params: "disk.img")
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            #expect(try f.hotplugKeys(domid: 1)["hotplug-error"] == "params 'disk.img' is neither an absolute path, an NBD export nor an RBD image")
            try f.addVbd(domid: 2, params: f.directory)
            #expect(try f.runBlockScript("add", domid: 2).status == 1)
            #expect(try f.hotplugKeys(domid: 2)["hotplug-error"] == "disk \(f.directory) is neither a regular file nor a block device")
        }
    }

    @Test func emptyCDROMDriveConnects() throws {
        try withFixture { f in
            try f.addVbd(domid: 1, params: "", mode: "r", deviceType: "cdrom")
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "connected"])
        }
    }

    @Test func retryAfterAnErrorClearsTheReason() throws {
        try withFixture { f in
            let disk = f.directory + "/late.img"
            try f.addVbd(domid: 1, params: disk)
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            try makeFile(disk, size: 4096)
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "connected", "physical-device-path": disk])
        }
    }

    // MARK: sharing

    /// Guest 1 holds the disk (its script succeeded); guest 2 asks for it.
    /// Xen's rule: a writable disk must be in use nowhere else, a read-only
    /// one may be shared with other readers only.
    @Test(arguments: [
        ("w", "w", false), ("w", "r", false), ("r", "w", false), ("r", "r", true),
        ("w!", "w", true), ("w", "w!", true),
    ])
    func sharingBetweenGuests(first: String, second: String, allowed: Bool) throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/shared.img", size: 1 << 20)
            try f.addVbd(domid: 1, params: disk, mode: first)
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            // The second guest names the same file another way.
            try f.addVbd(domid: 2, params: "aio:" + f.directory + "/./shared.img", mode: second)
            let result = try f.runBlockScript("add", domid: 2)
            if allowed {
                #expect(result.status == 0, "\(result)\n\(f.log)")
                #expect(try f.hotplugKeys(domid: 2)["hotplug-status"] == "connected")
            } else {
                #expect(result.status == 1, "\(result)\n\(f.log)")
                let expected = first == "w"
                    ? "disk aio:\(f.directory)/./shared.img is already in use writable by domain 1 (backend/vbd/1/51712)"
                    : "disk aio:\(f.directory)/./shared.img is in use read-only by domain 1 (backend/vbd/1/51712) and cannot be given writable"
                #expect(try f.hotplugKeys(domid: 2) == ["hotplug-status": "error", "hotplug-error": expected])
            }
            // Guest 1 keeps what it had.
            #expect(try f.hotplugKeys(domid: 1)["hotplug-status"] == "connected")
        }
    }

    @Test func sameGuestMayHaveADiskTwice() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/d.img", size: 4096)
            try f.addVbd(domid: 1, devid: 51712, params: disk)
            try f.addVbd(domid: 1, devid: 51728, params: disk)
            #expect(try f.runBlockScript("add", domid: 1, devid: 51712).status == 0)
            #expect(try f.runBlockScript("add", domid: 1, devid: 51728).status == 0)
        }
    }

    /// `xl migrate` to this host (or a restore overlapping the saved domain)
    /// runs two domains of one VM at once: they share its writable disk, as
    /// Xen's `same_vm` rule allows; another VM still may not.
    @Test func twoDomainsOfOneVMMayShareAWritableDisk() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/d.img", size: 4096)
            try f.addVbd(domid: 1, params: disk)
            try f.store.write("/local/domain/1/vm", "/vm/6a1c1c5e-0000-4000-8000-000000000001")
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            try f.addVbd(domid: 2, params: disk)
            try f.store.write("/local/domain/2/vm", "/vm/6a1c1c5e-0000-4000-8000-000000000001")
            let incoming = try f.runBlockScript("add", domid: 2)
            #expect(incoming.status == 0, "\(incoming)\n\(f.log)")
            #expect(f.log.contains("sharing with domain 1 allowed: the same VM (/vm/6a1c1c5e-0000-4000-8000-000000000001)"))
            try f.addVbd(domid: 3, params: disk)
            try f.store.write("/local/domain/3/vm", "/vm/6a1c1c5e-0000-4000-8000-000000000003")
            #expect(try f.runBlockScript("add", domid: 3).status == 1)
            // Domain 1 or 2, whichever the script looks at first.
            let error = try f.hotplugKeys(domid: 3)["hotplug-error"] ?? ""
            #expect(error.hasPrefix("disk \(disk) is already in use writable by domain "), "\(error)")
        }
    }

    /// Only a backend whose script succeeded owns its disk; one left by a
    /// guest that is gone does not count either.
    @Test func unconnectedOrStaleBackendsDoNotBlock() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/d.img", size: 4096)
            try f.addVbd(domid: 1, params: disk)           // its script has not run yet
            try f.addVbd(domid: 3, params: disk)
            try f.store.write(f.backendPath(domid: 3, devid: 51712) + "/hotplug-status", "connected")
            try f.store.remove("/local/domain/3")          // domain 3 is gone
            try f.addVbd(domid: 2, params: disk)
            let result = try f.runBlockScript("add", domid: 2)
            #expect(result.status == 0, "\(result)\n\(f.log)")
            #expect(f.log.contains("ignoring stale backend vbd:3/51712 (domain 3 is gone)"))
        }
    }

    /// The lock serialises two adds of one writable disk: exactly one wins.
    @Test func concurrentAddsOfOneDiskOnlyOneWins() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/race.img", size: 4096)
            try f.addVbd(domid: 1, params: disk)
            try f.addVbd(domid: 2, params: disk)
            let statuses = Locked([Int32]())
            let threads = [1, 2].map { domid in
                let env = f.environment(xenbusPath: "backend/vbd/\(domid)/51712", type: "vbd")
                return TestThread {
                    let status = (try? runProcess([scriptPath("xenbackd-block"), "add"], environment: env))?.status ?? -1
                    statuses.withLock { $0.append(status) }
                }
            }
            threads.forEach { $0.join() }
            #expect(statuses.withLock { $0.sorted() } == [0, 1])
            let states = try [1, 2].map { try f.hotplugKeys(domid: $0)["hotplug-status"] ?? "-" }
            #expect(states.sorted() == ["connected", "error"])
        }
    }

    // MARK: NBD

    @Test(arguments: [
        ("nbd:127.0.0.1:PORT", "nbd://127.0.0.1:PORT"), ("nbd:127.0.0.1 PORT", "nbd://127.0.0.1:PORT"),
        ("nbd://127.0.0.1:PORT/export", "nbd://127.0.0.1:PORT/export"),
        ("nbd:127.0.0.1:PORT:exportname=x", "nbd://127.0.0.1:PORT/x"),
    ])
    func nbdExportNobodyListensOnIsAnError(form: String, normalized: String) throws {
        try withFixture { f in
            let port = try TCPPort(listening: false)
            defer { port.close() }
            let params = form.replacingOccurrences(of: "PORT", with: String(port.port))
            try f.addVbd(domid: 1, params: params)
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 1, "\(result)")
            let keys = try f.hotplugKeys(domid: 1)
            #expect(keys["hotplug-status"] == "error")
            let error = keys["hotplug-error"] ?? ""
            let export = normalized.replacingOccurrences(of: "PORT", with: String(port.port))
            #expect(error.hasPrefix("NBD export \(export) cannot be reached: "), "\(error)")
            #expect(error.contains("Connection refused"), "\(error)")
        }
    }

    /// nbdkit's memory plugin serves any export name, so every TCP form reaches it.
    @Test(arguments: ["nbd:127.0.0.1:PORT", "nbd:127.0.0.1 PORT", "nbd://127.0.0.1:PORT/export",
                      "nbd:127.0.0.1:PORT:exportname=x"])
    func nbdExportThatAnswersConnects(form: String) throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"], transport: .tcp)
        try withFixture { f in
            try f.addVbd(domid: 1, params: form.replacingOccurrences(of: "PORT", with: String(server.port!)))
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 0, "\(result)\n\(f.log)")
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "connected"])
        }
    }

    /// A server that accepts and never answers holds the script until its
    /// deadline (here 3 s), and the reason says what was waited for.
    @Test func nbdServerThatNeverAnswersFailsWithinTheDeadline() throws {
        try withFixture { f in
            let port = try TCPPort(listening: true)
            defer { port.close() }
            try f.addVbd(domid: 1, params: "nbd:127.0.0.1:\(port.port)")
            let result = try f.runBlockScript("add", domid: 1, extra: ["XENBACKD_HOTPLUG_DEADLINE": "3"])
            #expect(result.status == 1, "\(result)")
            #expect(result.seconds < 6, "\(result)")
            let error = try f.hotplugKeys(domid: 1)["hotplug-error"] ?? ""
            #expect(error.hasPrefix("NBD export nbd://127.0.0.1:\(port.port) did not complete its handshake within "), "\(error)")
        }
    }

    @Test func nbdUnixSocketExport() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"])
        let socketPath = try #require(server.socketPath)
        try withFixture { f in
            let missing = f.directory + "/nbd.sock"
            try f.addVbd(domid: 1, params: "nbd+unix:///disk?socket=" + missing)
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            let error = try f.hotplugKeys(domid: 1)["hotplug-error"] ?? ""
            #expect(error.hasPrefix("NBD export nbd+unix:///disk?socket=\(missing) cannot be reached: "), "\(error)")
            try f.addVbd(domid: 2, params: "nbd+unix:///disk?socket=" + socketPath)
            #expect(try f.runBlockScript("add", domid: 2).status == 0, "\(f.log)")
            #expect(try f.hotplugKeys(domid: 2) == ["hotplug-status": "connected"])
        }
    }

    /// The same export named two ways is one disk.
    @Test func nbdExportWritableElsewhereIsRefused() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"], transport: .tcp)
        let port = try #require(server.port)
        try withFixture { f in
            try f.addVbd(domid: 1, params: "nbd:127.0.0.1:\(port)")
            #expect(try f.runBlockScript("add", domid: 1).status == 0, "\(f.log)")
            try f.addVbd(domid: 2, params: "nbd://127.0.0.1:\(port)/")
            #expect(try f.runBlockScript("add", domid: 2).status == 1)
            #expect(try f.hotplugKeys(domid: 2)["hotplug-error"]
                == "disk nbd://127.0.0.1:\(port)/ is already in use writable by domain 1 (backend/vbd/1/51712)")
        }
    }

    // MARK: remove, odd calls

    @Test func removeWritesNothing() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/d.img", size: 4096)
            try f.addVbd(domid: 1, params: disk)
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            let before = try f.hotplugKeys(domid: 1)
            #expect(try f.runBlockScript("remove", domid: 1).status == 0)
            #expect(try f.hotplugKeys(domid: 1) == before)
            // libxl usually removed the directory already: still exit 0, nothing recreated.
            try f.store.remove(f.backendPath(domid: 1, devid: 51712))
            #expect(try f.runBlockScript("remove", domid: 1).status == 0)
            #expect(try f.read(f.backendPath(domid: 1, devid: 51712)) == nil)
        }
    }

    @Test func addForAVanishedDirectoryRecreatesNothing() throws {
        try withFixture { f in
            let result = try f.runBlockScript("add", domid: 9)
            #expect(result.status == 1)
            #expect(try f.read("/local/domain/0/backend/vbd/9") == nil)
        }
    }

    @Test func badCallsExit1() throws {
        try withFixture { f in
            var env = f.environment(xenbusPath: "backend/vbd/1/51712", type: "vbd")
            #expect(try runProcess([scriptPath("xenbackd-block"), "frobnicate"], environment: env).status == 1)
            env["XENBUS_PATH"] = nil
            let result = try runProcess([scriptPath("xenbackd-block"), "add"], environment: env)
            #expect(result.status == 1)
            #expect(result.stderr.contains("XENBUS_PATH is not set"))
        }
    }

    @Test func absoluteXenbusPathWorksToo() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/d.img", size: 4096)
            try f.addVbd(domid: 1, params: disk)
            let env = f.environment(xenbusPath: f.backendPath(domid: 1, devid: 51712), type: "vbd")
            #expect(try runProcess([scriptPath("xenbackd-block"), "add"], environment: env).status == 0)
            #expect(try f.hotplugKeys(domid: 1)["hotplug-status"] == "connected")
        }
    }
}

/// Block devices: loop devices, a mount, an LVM volume activated on demand.
/// Root only; serialised (loop devices are a host-wide resource); every
/// loop device is detached.
@Suite(.serialized) struct BlockDeviceScriptTests {
    func requireRoot() throws {
        if !isRoot() { try Test.cancel("needs root (losetup)") }
    }

    func loopDevice(over file: String) throws -> LoopDevice {
        guard let loop = LoopDevice(backing: file) else { try Test.cancel("losetup -f --show failed (no loop devices here)") }
        return loop
    }

    @Test func loopDeviceConnectsWithPhysicalDevice() throws {
        try requireRoot()
        try withFixture { f in
            let file = try makeFile(f.directory + "/backing.img", size: 4 << 20)
            let loop = try loopDevice(over: file)
            defer { loop.detach() }
            try f.addVbd(domid: 1, params: "phy:" + loop.path)
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 0, "\(result)\n\(f.log)")
            let numbers = try #require(hexDeviceNumbers(loop.path))
            #expect(numbers.hasPrefix("7:"))
            #expect(try f.hotplugKeys(domid: 1) == [
                "hotplug-status": "connected", "physical-device": numbers, "physical-device-path": loop.path,
            ])
        }
    }

    /// A read-only device (losetup -r) serves a read-only disk, not a writable one.
    @Test func readOnlyDeviceRefusesWritableMode() throws {
        try requireRoot()
        try withFixture { f in
            let file = try makeFile(f.directory + "/ro.img", size: 4 << 20)
            guard let device = sh(["losetup", "-r", "-f", "--show", file]), device.hasPrefix("/dev/loop") else {
                try Test.cancel("losetup -r -f --show failed")
            }
            defer { sh(["losetup", "-d", device]) }
            try f.addVbd(domid: 1, params: device, mode: "w")
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            #expect(try f.hotplugKeys(domid: 1) == ["hotplug-status": "error", "hotplug-error": "block device \(device) is read-only"])
            try f.addVbd(domid: 2, params: device, mode: "r")
            #expect(try f.runBlockScript("add", domid: 2).status == 0)
            #expect(try f.hotplugKeys(domid: 2)["physical-device-path"] == device)
        }
    }

    /// A loop device and the file behind it are one disk.
    @Test func fileBehindAWritableLoopDeviceIsRefused() throws {
        try requireRoot()
        try withFixture { f in
            let file = try makeFile(f.directory + "/backing.img", size: 4 << 20)
            let loop = try loopDevice(over: file)
            defer { loop.detach() }
            try f.addVbd(domid: 1, params: loop.path)
            #expect(try f.runBlockScript("add", domid: 1).status == 0)
            try f.addVbd(domid: 2, params: file)
            #expect(try f.runBlockScript("add", domid: 2).status == 1)
            #expect(try f.hotplugKeys(domid: 2)["hotplug-error"] == "disk \(file) is already in use writable by domain 1 (backend/vbd/1/51712)")
        }
    }

    @Test func unattachedLoopDeviceHasNoMedium() throws {
        try requireRoot()
        try withFixture { f in
            // A loop device far above the ones `losetup -f` hands out, so no
            // test running in parallel can attach it while this one looks.
            let minor = 200 + Int.random(in: 0..<50)
            let free = "/dev/loop\(minor)"
            var created = false
            if access(free, F_OK) != 0 {
                // dev_t of (7, minor) for minors below 256, as makedev() would make it.
                guard mknod(free, S_IFBLK | 0o660, dev_t(UInt64(minor) | 7 << 8)) == 0 else {
                    try Test.cancel("cannot create \(free): errno \(errno)")
                }
                created = true
            }
            defer { if created { unlink(free) } }
            if sh(["losetup", free]) != nil { try Test.cancel("\(free) is attached on this machine") }
            try f.addVbd(domid: 1, params: free)
            let result = try f.runBlockScript("add", domid: 1)
            #expect(result.status == 1)
            let error = try f.hotplugKeys(domid: 1)["hotplug-error"] ?? ""
            // Opening an unattached loop device fails (ENXIO) or shows size 0: either way, no medium.
            #expect(error == "block device \(free) has no medium", "\(error)")
        }
    }

    @Test func deviceMountedInDom0IsRefused() throws {
        try requireRoot()
        guard commandExists("mkfs.ext4") else { try Test.cancel("mkfs.ext4 missing") }
        try withFixture { f in
            let file = try makeFile(f.directory + "/fs.img", size: 8 << 20)
            let loop = try loopDevice(over: file)
            defer { loop.detach() }
            guard sh(["mkfs.ext4", "-q", loop.path]) != nil else { try Test.cancel("mkfs.ext4 failed") }
            let mountpoint = f.directory + "/mnt"
            try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: false)
            guard sh(["mount", "-o", "ro", loop.path, mountpoint]) != nil else { try Test.cancel("mount failed") }
            defer { sh(["umount", mountpoint]) }
            // Mounted read-only in dom0: a guest may read it, not write it.
            try f.addVbd(domid: 1, params: loop.path, mode: "w")
            #expect(try f.runBlockScript("add", domid: 1).status == 1)
            #expect(try f.hotplugKeys(domid: 1)["hotplug-error"] == "disk \(loop.path) is mounted in this domain at \(mountpoint)")
            try f.addVbd(domid: 2, params: loop.path, mode: "r")
            #expect(try f.runBlockScript("add", domid: 2).status == 0)
        }
    }

    /// /dev/VG/LV and /dev/mapper/VG-LV that do not exist yet: the script
    /// runs `lvchange -ay VG/LV` (a stub here, first in PATH, that makes the
    /// node appear as LVM's udev rules would) and waits for the node.
    @Test(arguments: [("xbt-vg", "lv-1", false), ("xbt-vg", "lv-1", true)])
    func inactiveLogicalVolumeIsActivated(vg: String, lv: String, mapperForm: Bool) throws {
        try requireRoot()
        try withFixture { f in
            let file = try makeFile(f.directory + "/lv.img", size: 4 << 20)
            let loop = try loopDevice(over: file)
            defer { loop.detach() }
            let tag = String(UInt32.random(in: 0...UInt32.max), radix: 16)
            let vgName = vg + tag
            let node = mapperForm
                ? "/dev/mapper/" + vgName.replacingOccurrences(of: "-", with: "--") + "-" + lv.replacingOccurrences(of: "-", with: "--")
                : "/dev/\(vgName)/\(lv)"
            defer {
                try? FileManager.default.removeItem(atPath: node)
                if !mapperForm { try? FileManager.default.removeItem(atPath: "/dev/\(vgName)") }
            }
            let stubs = f.directory + "/bin"
            try FileManager.default.createDirectory(atPath: stubs, withIntermediateDirectories: false)
            let calls = f.directory + "/lvchange.calls"
            try """
            #!/bin/sh
            echo "$*" >> \(calls)
            mkdir -p "$(dirname \(node))" && ln -s \(loop.path) \(node)
            """.write(toFile: stubs + "/lvchange", atomically: true, encoding: .utf8)
            chmod(stubs + "/lvchange", 0o755)
            try f.addVbd(domid: 1, params: node)
            let result = try f.runBlockScript("add", domid: 1, extra: ["PATH": stubs + ":" + basePath])
            #expect(result.status == 0, "\(result)\n\(f.log)")
            #expect(try String(contentsOfFile: calls, encoding: .utf8) == "-ay \(vgName)/\(lv)\n")
            #expect(try f.hotplugKeys(domid: 1) == [
                "hotplug-status": "connected", "physical-device": try #require(hexDeviceNumbers(loop.path)),
                "physical-device-path": node,
            ])
        }
    }
}
