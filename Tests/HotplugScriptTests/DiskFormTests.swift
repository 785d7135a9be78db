import BlockBackend
import BlockStorage
import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// The first column of docs/hotplug.md's "Disk targets" table.
func documentedDiskForms() throws -> [String] {
    let text = try String(contentsOfFile: repoRoot + "/docs/hotplug.md", encoding: .utf8)
    let header = "| form | what it names | normalised |"
    guard let start = text.range(of: header) else { throw SystemError("no disk target table in docs/hotplug.md", errno: ENOENT) }
    var forms: [String] = []
    for line in text[start.upperBound...].split(separator: "\n").dropFirst() {
        if line.hasPrefix("|---") { continue }
        guard line.hasPrefix("| `"), let end = line.dropFirst(3).firstIndex(of: "`") else { break }
        forms.append(String(line[line.index(line.startIndex, offsetBy: 3)..<end]))
    }
    return forms
}

/// Every disk form docs/hotplug.md lists goes through the block script (as
/// libxl runs it, against a loopback xenstored) and through the daemon's
/// opener (DiskParameters.fileStorageOpener, DiskTarget inside): both
/// accept it with the same normalised target. Forms the docs refuse are
/// refused by both, for the same reason where the parser refuses them.
@Suite(.serialized) struct DiskFormTests {
    /// Everything the documented forms name: a file, a loop device (also
    /// shown as an active LVM volume under both its names), and nbdkit
    /// exports over TCP and a unix socket, in the clear and with TLS.
    final class World {
        let directory: String
        let file: String
        let loop: LoopDevice
        let group: String
        let tcp: NBDTestServer
        let unix: NBDTestServer
        let tlsTCP: NBDTestServer
        let tlsUnix: NBDTestServer
        let keys: String
        let links: [String]
        /// A one-node Ceph cluster with an image `disk`, its snapshot `s1`,
        /// and an image `disk` in the namespace `ns1`.
        let ceph: CephCluster

        init() throws {
            ceph = try CephCluster(store: .memstore)
            do {
                try ceph.createImage("disk", sizeMiB: 4)
                try ceph.rbd(["snap", "create", "\(ceph.pool)/disk@s1"])
                try ceph.rbd(["namespace", "create", "\(ceph.pool)/ns1"])
                try ceph.rbd(["create", "--size", "4M", "\(ceph.pool)/ns1/disk"])
            } catch {
                ceph.stop()
                throw error
            }
            // Servers first: each stops itself when released.
            directory = "/tmp/xbforms-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
            keys = directory + "/psk.keys"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
            let tls = ["--tls=require", "--tls-psk=\(keys)", "memory", "4M"]
            do {
                try "alice:00112233445566778899aabbccddeeff\n".write(toFile: keys, atomically: true, encoding: .utf8)
                tcp = try NBDTestServer.nbdkit(["memory", "4M"], transport: .tcp)
                unix = try NBDTestServer.nbdkit(["memory", "4M"])
                tlsTCP = try NBDTestServer.nbdkit(tls, transport: .tcp)
                tlsUnix = try NBDTestServer.nbdkit(tls)
                file = try makeFile(directory + "/disk.img", size: 1 << 20)
            } catch {
                try? FileManager.default.removeItem(atPath: directory)
                ceph.stop()
                throw error
            }
            let backing = directory + "/backing.img"
            guard (try? makeFile(backing, size: 4 << 20)) != nil, let loop = LoopDevice(backing: backing) else {
                try? FileManager.default.removeItem(atPath: directory)
                ceph.stop()
                throw SystemError("losetup -f --show \(backing)", errno: ENODEV)
            }
            self.loop = loop
            group = "xbvg" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
            // What LVM shows for an active volume: two links to its device.
            links = ["/dev/\(group)/lv", "/dev/mapper/\(group)-lv"]
            mkdir("/dev/\(group)", 0o755)
            // Absent until device-mapper's module is loaded (a fresh machine).
            mkdir("/dev/mapper", 0o755)
            for link in links where symlink(loop.path, link) != 0 {
                let code = errno
                cleanUp()
                throw SystemError("symlink \(link)", errno: code)
            }
        }

        private func cleanUp() {
            for link in links { unlink(link) }
            rmdir("/dev/\(group)")
            loop.detach()
            try? FileManager.default.removeItem(atPath: directory)
            ceph.stop()
        }

        deinit { cleanUp() }

        /// Concrete params for each documented form (placeholders filled in).
        func examples(of form: String) -> [String]? {
            let port = tcp.port!, socket = unix.socketPath!, tlsPort = tlsTCP.port!, tlsSocket = tlsUnix.socketPath!
            switch form {
            case "/PATH/FILE": return [file, "aio:" + file, "raw:file:" + directory + "/./disk.img"]
            case "/dev/NAME": return [loop.path, "phy:" + loop.path]
            case "/dev/VG/LV": return ["/dev/\(group)/lv"]
            case "/dev/mapper/VG-LV": return ["/dev/mapper/\(group)-lv"]
            case "nbd:HOST:PORT": return ["nbd:127.0.0.1:\(port)", "nbd:[::ffff:127.0.0.1]:\(port)"]
            case "nbd:HOST PORT": return ["nbd:127.0.0.1 \(port)"]
            case "nbd:HOST:PORT:exportname=NAME": return ["nbd:127.0.0.1:\(port):exportname=disk"]
            case "nbd:unix:PATH": return ["nbd:unix:\(socket)"]
            case "nbd:unix:PATH:exportname=NAME": return ["nbd:unix:\(socket):exportname=disk"]
            case "nbd://HOST[:PORT][/NAME]": return ["nbd://127.0.0.1:\(port)/disk", "nbd://127.0.0.1:\(port)"]
            case "nbd+unix:///NAME?socket=PATH": return ["nbd+unix:///disk?socket=\(socket)"]
            case "nbds://HOST[:PORT][/NAME]": return ["nbds://alice@127.0.0.1:\(tlsPort)/disk?tls-psk-file=\(keys)"]
            case "nbds+unix:///NAME?socket=PATH": return ["nbds+unix://alice@/disk?socket=\(tlsSocket)&tls-psk-file=\(keys)"]
            case "rbd:POOL/IMAGE[:OPTION=VALUE]...":
                return ["rbd:\(ceph.pool)/disk:conf=\(ceph.configPath)",
                        "aio:rbd:\(ceph.pool)/disk:id=admin:conf=\(ceph.configPath):rados_osd_op_timeout=20"]
            case "rbd:POOL/NAMESPACE/IMAGE[:OPTION=VALUE]...": return ["rbd:\(ceph.pool)/ns1/disk:conf=\(ceph.configPath)"]
            case "rbd:POOL/IMAGE@SNAP[:OPTION=VALUE]...": return ["rbd:\(ceph.pool)/disk@s1:conf=\(ceph.configPath)"]
            default: return nil
            }
        }

        /// Forms docs/hotplug.md says are refused, and others that must be.
        var refused: [String] {
            ["disk.img", "nbd+tcp://127.0.0.1:\(tcp.port!)/disk", "nbd+vsock:///disk", "nbd:127.0.0.1:0",
             "nbd:unix:relative.sock", "nbd+unix:///disk", "nbd://127.0.0.1:\(tcp.port!)/x?socket=/s",
             directory + "/missing.img", directory, "nbd:127.0.0.1:\(tlsTCP.port!)",
             "rbd://\(ceph.pool)/disk", "rbd:\(ceph.pool)/missing:conf=\(ceph.configPath)", "rbd:\(ceph.pool)/disk:conf=relative.conf"]
        }
    }

    struct ScriptOutcome {
        var status: Int32
        var normalized: String?
        var error: String?
    }

    /// A snapshot is attached read-only (xl's `access=ro`); everything else writable.
    static func mode(of params: String) -> String { params.contains("rbd:") && params.contains("@") ? "r" : "w" }

    /// The block script on `params` in a fresh xenstored; what it logged as the target.
    func runScript(_ params: String) throws -> ScriptOutcome {
        var outcome = ScriptOutcome(status: -1)
        try withFixture { f in
            try f.addVbd(domid: 1, params: params, mode: Self.mode(of: params))
            outcome.status = try f.runBlockScript("add", domid: 1).status
            outcome.error = try f.hotplugKeys(domid: 1)["hotplug-error"]
            if let line = f.log.split(separator: "\n").first(where: { $0.contains(": disk target: ") }),
               let range = line.range(of: ": disk target: ") {
                let rest = line[range.upperBound...]
                outcome.normalized = String(rest[..<(rest.range(of: " (")?.lowerBound ?? rest.endIndex)])
            }
        }
        return outcome
    }

    /// The daemon's side: its parser's normalised form and whether its opener opens it.
    func runDaemon(_ params: String) -> (normalized: String?, opened: Bool, reason: String?) {
        let normalized = try? DiskTarget.parse(params).normalized
        do {
            let storage = try DiskParameters.fileStorageOpener(params, Self.mode(of: params) == "r", 4)
            storage.close()
            return (normalized, true, nil)
        } catch {
            return (normalized, false, "\(error)")
        }
    }

    @Test func everyDocumentedFormAgrees() throws {
        if !isRoot() { try Test.cancel("needs root (losetup, /dev links)") }
        let world = try World()
        let forms = try documentedDiskForms()
        #expect(forms.count == 16, "\(forms)")
        for form in forms {
            guard let examples = world.examples(of: form) else {
                Issue.record("docs/hotplug.md lists \(form), which this test does not know: add an example")
                continue
            }
            for params in examples {
                let script = try runScript(params)
                let daemon = runDaemon(params)
                #expect(script.status == 0, "\(form): the script refused \(params): \(script.error ?? "?")")
                #expect(daemon.opened, "\(form): the daemon cannot open \(params): \(daemon.reason ?? "?")")
                #expect(script.normalized != nil && script.normalized == daemon.normalized,
                        "\(form): \(params) is \(script.normalized ?? "nothing") to the script, \(daemon.normalized ?? "nothing") to the daemon")
            }
        }
    }

    @Test func refusedFormsAreRefusedByBoth() throws {
        if !isRoot() { try Test.cancel("needs root (losetup, /dev links)") }
        let world = try World()
        for params in world.refused {
            let script = try runScript(params)
            let daemon = runDaemon(params)
            #expect(script.status == 1, "the script accepted \(params)")
            #expect(!daemon.opened, "the daemon opened \(params)")
            // Refused by the parser: one reason, word for word, on both sides.
            do {
                _ = try DiskTarget.parse(params)
            } catch {
                #expect(script.error == "\(error)", "\(params)")
                #expect(daemon.reason == "\(error)", "\(params)")
            }
        }
    }
}
