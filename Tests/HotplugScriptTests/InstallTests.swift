import Foundation
import Glibc
import SystemSupport
import Testing

/// A temporary folder, removed by `remove()` (defer).
final class TempDirectory {
    let path: String
    init() throws {
        path = "/tmp/xbhp-inst-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }

    /// Every regular file and symlink below the folder, relative, sorted.
    func files() -> [String] {
        guard let e = FileManager.default.enumerator(atPath: path) else { return [] }
        var out: [String] = []
        while let rel = e.nextObject() as? String {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: path + "/" + rel, isDirectory: &isDir), !isDir.boolValue {
                out.append("/" + rel)
            }
        }
        return out.sorted()
    }

    func write(_ name: String, _ text: String, mode: mode_t = 0o644) throws {
        try text.write(toFile: path + "/" + name, atomically: true, encoding: .utf8)
        chmod(path + "/" + name, mode)
    }
}

func fileMode(_ path: String) -> mode_t? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return st.st_mode & 0o7777
}

/// scripts/install and scripts/uninstall into a DESTDIR, with a stub binary
/// (XENBACKD_INSTALL_BIN) so no release build is needed.
@Suite struct InstallTests {
    static func expectedFiles(prefix: String) -> [String] {
        [
            "/etc/default/xenbackd",
            "/etc/modprobe.d/xenbackd.conf",
            "/etc/systemd/system/xenbackd.service",
            "/etc/udev/rules.d/90-xenbackd.rules",
            "\(prefix)/lib/xenbackd/xenbackd-block",
            "\(prefix)/lib/xenbackd/xenbackd-daemon",
            "\(prefix)/lib/xenbackd/xenbackd-hotplug-common.sh",
            "\(prefix)/lib/xenbackd/xenbackd-udev",
            "\(prefix)/lib/xenbackd/xenbackd-vif-bridge",
            "\(prefix)/sbin/xenbackd",
        ].sorted()
    }

    func run(_ script: String, destdir: String, prefix: String, stub: String) throws -> ProcessResult {
        try runProcess([repoRoot + "/scripts/" + script],
                       environment: ["PATH": basePath, "DESTDIR": destdir, "PREFIX": prefix, "XENBACKD_INSTALL_BIN": stub])
    }

    @Test(arguments: ["/usr/local", "/opt/xenbackd"])
    func installThenUninstall(prefix: String) throws {
        let tmp = try TempDirectory()
        defer { tmp.remove() }
        try tmp.write("xenbackd-stub", "#!/bin/sh\necho stub\n", mode: 0o755)
        let stub = tmp.path + "/xenbackd-stub"
        let root = try TempDirectory()   // the DESTDIR's view as a folder of its own
        defer { root.remove() }

        let first = try run("install", destdir: root.path, prefix: prefix, stub: stub)
        #expect(first.status == 0, "\(first)")
        #expect(root.files() == Self.expectedFiles(prefix: prefix))

        // Contents: the stub binary, the scripts as they are, the rules and
        // the unit pointing at PREFIX, the modprobe traps.
        let r = root.path
        #expect(try String(contentsOfFile: r + prefix + "/sbin/xenbackd", encoding: .utf8) == "#!/bin/sh\necho stub\n")
        for script in ["xenbackd-block", "xenbackd-vif-bridge", "xenbackd-udev", "xenbackd-daemon"] {
            let installed = r + prefix + "/lib/xenbackd/" + script
            #expect(FileManager.default.contentsEqual(atPath: installed, andPath: scriptPath(script)))
            #expect(fileMode(installed) == 0o755)
        }
        // Sourced, not run: beside the scripts, not executable.
        let common = r + prefix + "/lib/xenbackd/xenbackd-hotplug-common.sh"
        #expect(FileManager.default.contentsEqual(atPath: common, andPath: scriptPath("xenbackd-hotplug-common.sh")))
        #expect(fileMode(common) == 0o644)
        let rules = try String(contentsOfFile: r + "/etc/udev/rules.d/90-xenbackd.rules", encoding: .utf8)
        #expect(rules.contains("RUN+=\"\(prefix)/lib/xenbackd/xenbackd-udev\""))
        #expect(try UdevRuleParser.parse(rules).count == 4)
        let unit = try String(contentsOfFile: r + "/etc/systemd/system/xenbackd.service", encoding: .utf8)
        #expect(unit.contains("ExecStart=\(prefix)/sbin/xenbackd run $XENBACKD_ARGS\n"))
        #expect(unit.contains("Type=simple\n") && unit.contains("Restart=on-failure\n") && unit.contains("KillSignal=SIGTERM\n"))
        let modprobe = try String(contentsOfFile: r + "/etc/modprobe.d/xenbackd.conf", encoding: .utf8)
        for line in ["blacklist xen_blkback", "blacklist xen_netback", "install xen_blkback /bin/false", "install xen_netback /bin/false"] {
            #expect(modprobe.contains(line + "\n"))
        }
        #expect(fileMode(r + "/etc/modprobe.d/xenbackd.conf") == 0o644)
        #expect(try String(contentsOfFile: r + "/etc/default/xenbackd", encoding: .utf8).contains("XENBACKD_UDEV_HOTPLUG=0\n"))

        // Idempotent: a second run changes nothing.
        let second = try run("install", destdir: root.path, prefix: prefix, stub: stub)
        #expect(second.status == 0, "\(second)")
        #expect(!second.stdout.contains("install: installed"), "\(second.stdout)")
        #expect(root.files() == Self.expectedFiles(prefix: prefix))

        let removed = try run("uninstall", destdir: root.path, prefix: prefix, stub: stub)
        #expect(removed.status == 0, "\(removed)")
        #expect(root.files() == [])
        #expect((try? FileManager.default.contentsOfDirectory(atPath: root.path)) == [])
        // And again: nothing left to do, no error.
        #expect(try run("uninstall", destdir: root.path, prefix: prefix, stub: stub).status == 0)
    }

    /// The settings file belongs to the admin once edited: kept, and said so.
    @Test func editedSettingsFileIsKept() throws {
        let tmp = try TempDirectory()
        defer { tmp.remove() }
        try tmp.write("xenbackd-stub", "#!/bin/sh\n", mode: 0o755)
        let root = tmp.path + "/root"
        let stub = tmp.path + "/xenbackd-stub"
        #expect(try run("install", destdir: root, prefix: "/usr/local", stub: stub).status == 0)
        try "XENBACKD_UDEV_HOTPLUG=1\n".write(toFile: root + "/etc/default/xenbackd", atomically: true, encoding: .utf8)
        #expect(try run("install", destdir: root, prefix: "/usr/local", stub: stub).status == 0)
        #expect(try String(contentsOfFile: root + "/etc/default/xenbackd", encoding: .utf8) == "XENBACKD_UDEV_HOTPLUG=1\n")
        let removed = try run("uninstall", destdir: root, prefix: "/usr/local", stub: stub)
        #expect(removed.stdout.contains("kept \(root)/etc/default/xenbackd (edited"))
        #expect(FileManager.default.fileExists(atPath: root + "/etc/default/xenbackd"))
        #expect(!FileManager.default.fileExists(atPath: root + "/usr/local/sbin/xenbackd"))
    }
}

/// scripts/xenbackd-daemon with a stub daemon that, like xenbackd, exits on
/// SIGTERM.
@Suite struct DaemonScriptTests {
    @Test func startStatusStop() throws {
        let tmp = try TempDirectory()
        defer { tmp.remove() }
        try tmp.write("xenbackd", """
            #!/bin/bash
            trap 'echo "stopping on TERM"; exit 0' TERM
            echo "stub started: $*"
            while :; do sleep 0.1; done
            """, mode: 0o755)
        let env = [
            "PATH": basePath, "XENBACKD_BIN": tmp.path + "/xenbackd", "XENBACKD_PIDFILE": tmp.path + "/run/xenbackd.pid",
            "XENBACKD_DAEMON_LOG": tmp.path + "/daemon.log", "XENBACKD_DEFAULTS": tmp.path + "/defaults",
            "XENBACKD_ARGS": "--log-level debug",
        ]
        let daemon = scriptPath("xenbackd-daemon")
        #expect(try runProcess([daemon, "status"], environment: env).status == 3)
        let start = try runProcess([daemon, "start"], environment: env)
        #expect(start.status == 0, "\(start)")
        let pid = try #require(Int32(try String(contentsOfFile: tmp.path + "/run/xenbackd.pid", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        defer { kill(pid, SIGKILL) }
        #expect(kill(pid, 0) == 0)
        // start-stop-daemon's double fork: a session of its own, led by the
        // first child (gone), so the daemon can never take a terminal.
        #expect(getsid(pid) != getsid(0), "the daemon runs in a session of its own")
        #expect(getsid(pid) != pid)
        let again = try runProcess([daemon, "start"], environment: env)
        #expect(again.stdout.contains("already running (pid \(pid))"))
        #expect(try runProcess([daemon, "status"], environment: env).status == 0)

        let stop = try runProcess([daemon, "stop"], environment: env)
        #expect(stop.status == 0, "\(stop)")
        #expect(try runProcess([daemon, "status"], environment: env).status == 3)
        let log = try String(contentsOfFile: tmp.path + "/daemon.log", encoding: .utf8)
        #expect(log.contains("stub started: run --log-level debug"))
        #expect(log.contains("stopping on TERM"))
        #expect(!FileManager.default.fileExists(atPath: tmp.path + "/run/xenbackd.pid"))
    }

    /// When systemd runs the unit, every command is systemctl's (a stub here).
    @Test func underSystemdTheUnitIsUsed() throws {
        let tmp = try TempDirectory()
        defer { tmp.remove() }
        try tmp.write("systemctl", """
            #!/bin/sh
            echo "$*" >> \(tmp.path)/systemctl.calls
            case "$1" in is-active) exit 0 ;; show) echo 4242 ;; esac
            """, mode: 0o755)
        let env = ["PATH": tmp.path + ":" + basePath, "XENBACKD_INIT": "systemd", "XENBACKD_DEFAULTS": "/nonexistent"]
        let daemon = scriptPath("xenbackd-daemon")
        #expect(try runProcess([daemon, "start"], environment: env).status == 0)
        let status = try runProcess([daemon, "status"], environment: env)
        #expect(status.status == 0 && status.stdout.contains("running (pid 4242)"), "\(status)")
        #expect(try runProcess([daemon, "stop"], environment: env).status == 0)
        #expect(try String(contentsOfFile: tmp.path + "/systemctl.calls", encoding: .utf8) == """
            start xenbackd.service
            is-active --quiet xenbackd.service
            show --property MainPID --value xenbackd.service
            stop xenbackd.service

            """)
    }

    /// A stale pidfile (a pid that is not xenbackd) is not taken for the daemon.
    @Test func stalePidfileIsIgnored() throws {
        let tmp = try TempDirectory()
        defer { tmp.remove() }
        try FileManager.default.createDirectory(atPath: tmp.path + "/run", withIntermediateDirectories: false)
        try "1\n".write(toFile: tmp.path + "/run/xenbackd.pid", atomically: true, encoding: .utf8)
        let env = ["PATH": basePath, "XENBACKD_BIN": "/nonexistent/xenbackd", "XENBACKD_PIDFILE": tmp.path + "/run/xenbackd.pid",
                   "XENBACKD_DEFAULTS": "/nonexistent"]
        #expect(try runProcess([scriptPath("xenbackd-daemon"), "status"], environment: env).status == 3)
        #expect(try runProcess([scriptPath("xenbackd-daemon"), "stop"], environment: env).status == 0)
    }
}

/// Every bash script of ours is shellcheck-clean (domu-init is busybox sh).
@Suite struct ShellcheckTests {
    @Test func scriptsAreShellcheckClean() throws {
        guard commandExists("shellcheck") else { try Test.cancel("shellcheck is not installed (apt-get install shellcheck)") }
        let scripts = ["xenbackd-block", "xenbackd-vif-bridge", "xenbackd-udev", "xenbackd-daemon", "xenbackd-hotplug-common.sh",
                       "install", "uninstall", "setup", "test", "test-xen", "demo", "fuzz", "fuzz-live", "oxenstored-sandbox",
                       "package", "test-package"]
            .map(scriptPath)
        // -x: the hotplug scripts source xenbackd-hotplug-common.sh.
        let result = try runProcess(["shellcheck", "-x", "--shell=bash"] + scripts, environment: ["PATH": basePath])
        #expect(result.status == 0, "\(result.stdout)")
        // dom0's scripts in the xenlab image source dom0-common (-x follows it).
        let dom0 = ["xenlab/dom0-common", "xenlab/dom0-test", "xenlab/dom0-bench"].map(scriptPath)
        let lab = try runProcess(["shellcheck", "-x", "--shell=bash"] + dom0, environment: ["PATH": basePath])
        #expect(lab.status == 0, "\(lab.stdout)")
        // The .deb's maintainer scripts are POSIX sh (their #! line says so).
        let deb = ["deb/postinst", "deb/prerm", "deb/postrm"].map(scriptPath)
        let maintainer = try runProcess(["shellcheck"] + deb, environment: ["PATH": basePath])
        #expect(maintainer.status == 0, "\(maintainer.stdout)")
    }
}
