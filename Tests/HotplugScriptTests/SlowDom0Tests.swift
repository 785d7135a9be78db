import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// The block script on a slow dom0: every xenstore tool answers late (a
/// shim earlier in PATH sleeps before running the real one), four disks
/// are added at once (as one `xl create` does), and a deadline that really
/// passes says what was waited for.
@Suite struct SlowDom0Tests {
    static let xenstoreTools = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-exists", "xenstore-rm"]

    /// A folder of xenstore-* shims: each sleeps XB_SHIM_DELAY seconds when
    /// its name is in XB_SHIM_SLOW (all of them by default), then runs the
    /// real tool. `-h` (the scripts' look at the tool's options) is not slowed.
    func makeShims(in f: HotplugFixture) throws -> String {
        let folder = f.directory + "/slow-bin"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
        for tool in Self.xenstoreTools {
            let real = try #require(sh(["sh", "-c", "command -v \(tool)"]))
            try """
                #!/bin/sh
                if [ "$1" != -h ]; then
                    case " ${XB_SHIM_SLOW:-\(Self.xenstoreTools.joined(separator: " "))} " in
                    *" \(tool) "*) sleep "${XB_SHIM_DELAY:-1}" ;;
                    esac
                fi
                exec \(real) "$@"
                """.write(toFile: folder + "/" + tool, atomically: true, encoding: .utf8)
            chmod(folder + "/" + tool, 0o755)
        }
        return folder
    }

    func slowEnvironment(_ f: HotplugFixture, domid: Int, shims: String, extra: [String: String]) -> [String: String] {
        var env = f.environment(xenbusPath: "backend/vbd/\(domid)/51712", type: "vbd", extra: extra)
        env["PATH"] = shims + ":" + basePath
        return env
    }

    /// Four disks (three files and an NBD export) at once, each xenstore
    /// answer 1.5 s late: the lock queues the scripts, and every one still
    /// connects within its deadline.
    @Test func fourDisksAtOnceOnASlowDom0() throws {
        let server = try NBDTestServer.nbdkit(["memory", "4M"], transport: .tcp)
        try withFixture { f in
            let shims = try makeShims(in: f)
            var params: [Int: String] = [:]
            for domid in 1...3 { params[domid] = try makeFile(f.directory + "/disk\(domid).img", size: 1 << 20) }
            params[4] = "nbd:127.0.0.1:\(server.port!)"
            for (domid, target) in params { try f.addVbd(domid: domid, params: target, mode: "w") }

            let results = Locked([Int: ProcessResult]())
            let threads = params.keys.map { domid in
                let env = slowEnvironment(f, domid: domid, shims: shims, extra: ["XB_SHIM_DELAY": "1.5"])
                return TestThread {
                    let result = try? runProcess([scriptPath("xenbackd-block"), "add"], environment: env, timeout: 60)
                    results.withLock { $0[domid] = result }
                }
            }
            threads.forEach { $0.join() }
            let finished = results.withLock { $0 }
            for domid in params.keys.sorted() {
                let result = try #require(finished[domid])
                #expect(result.status == 0, "domain \(domid): \(result)\n\(f.log)")
                #expect(result.seconds < 35, "domain \(domid) took \(result.seconds) s")
                #expect(try f.hotplugKeys(domid: domid)["hotplug-status"] == "connected")
            }
            // They really were slowed and queued: the last waited for the others.
            let slowest = finished.values.map(\.seconds).max() ?? 0
            #expect(slowest > 9, "slowest \(slowest) s")
            #expect(f.log.components(separatedBy: "lock taken after").count == 5)
        }
    }

    /// The vif script on the same slow dom0 (1.5 s a call), in a private
    /// network namespace where the test plays xenbackd (the tap) and the
    /// admin (the bridge).
    @Test func vifOnASlowDom0() throws {
        if !isRoot() { try Test.cancel("needs root (ip netns)") }
        guard let ns = NetNamespace() else { try Test.cancel("ip netns add failed") }
        defer { ns.delete() }
        try withFixture { f in
            let shims = try makeShims(in: f)
            #expect(ns.run(["ip", "link", "add", "xenbr0", "type", "bridge"]) != nil)
            #expect(ns.run(["ip", "tuntap", "add", "dev", "vif7.0", "mode", "tap"]) != nil)
            try f.addVif(domid: 7, bridge: "xenbr0")
            var env = f.environment(xenbusPath: "backend/vif/7/0", type: "vif", extra: ["XB_SHIM_DELAY": "1.5"])
            env["PATH"] = shims + ":" + basePath
            let result = try runProcess(["ip", "netns", "exec", ns.name, scriptPath("xenbackd-vif-bridge"), "online", "type_if=vif"],
                                        environment: env, timeout: 60)
            #expect(result.status == 0, "\(result)\n\(f.log)")
            #expect(result.seconds > 2.9 && result.seconds < 35, "\(result.seconds) s")
            #expect(ns.link("vif7.0")?.contains("master xenbr0 ") == true)
            #expect(try f.hotplugKeys(type: "vif", domid: 7, devid: 0) == ["hotplug-status": "connected"])
        }
    }

    /// xenstore-ls never answers within a 2 s deadline: the run fails at
    /// the deadline and hotplug-error says what it waited for (the report
    /// itself goes through the fast tools).
    @Test func deadlineThatPassesNamesWhatWasWaitedFor() throws {
        try withFixture { f in
            let shims = try makeShims(in: f)
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 1, params: disk)
            let env = slowEnvironment(f, domid: 1, shims: shims, extra: [
                "XB_SHIM_SLOW": "xenstore-ls", "XB_SHIM_DELAY": "10", "XENBACKD_HOTPLUG_DEADLINE": "2",
            ])
            let result = try runProcess([scriptPath("xenbackd-block"), "add"], environment: env, timeout: 30)
            #expect(result.status == 1, "\(result)")
            #expect(result.seconds < 6, "\(result)")
            let keys = try f.hotplugKeys(domid: 1)
            #expect(keys["hotplug-status"] == "error")
            let error = keys["hotplug-error"] ?? ""
            let waited = " s waiting for xenstore-ls -f /local/domain/0/backend (the hotplug deadline, 2 s of libxl's 40 s, has passed)"
            #expect(error.hasPrefix("timed out after ") && error.hasSuffix(waited), "\(error)")
            #expect(f.log.contains("error: " + error))
            #expect(result.stderr.contains(error))
            #expect(!error.contains("exit 124"))
        }
    }

    /// Another hotplug script holds the lock past the deadline.
    @Test func lockHeldPastTheDeadline() throws {
        try withFixture { f in
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 1, params: disk)
            try FileManager.default.createDirectory(atPath: f.directory + "/run", withIntermediateDirectories: false)
            let fd = open(f.lockPath, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
            #expect(fd >= 0 && flock(fd, LOCK_EX) == 0)
            defer { close(fd) }
            let result = try f.runBlockScript("add", domid: 1, extra: ["XENBACKD_HOTPLUG_DEADLINE": "2"])
            #expect(result.status == 1, "\(result)")
            let error = try f.hotplugKeys(domid: 1)["hotplug-error"] ?? ""
            #expect(error.hasPrefix("timed out after "), "\(error)")
            #expect(error.hasSuffix(" s waiting for the hotplug lock \(f.lockPath) (held by another hotplug script)"
                + " (the hotplug deadline, 2 s of libxl's 40 s, has passed)"), "\(error)")
        }
    }
}
