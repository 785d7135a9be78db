import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// `xenbackd check-disk` as the block script and an operator run it: no
/// daemon, no xenstore (the environment has neither).
@Suite(.serialized) struct CheckDiskTests {
    func checkDisk(_ arguments: [String]) throws -> ProcessResult {
        try runProcess([xenbackdBinary, "check-disk"] + arguments, environment: ["PATH": basePath], timeout: 30)
    }

    func lines(_ text: String) -> [String] { text.split(separator: "\n").map(String.init) }

    func temporaryDirectory() throws -> String {
        let path = "/tmp/xbcheck-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        return path
    }

    @Test func file() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = try makeFile(directory + "/disk.img", size: 3 << 20)
        let result = try checkDisk(["--mode", "w", "aio:" + directory + "//disk.img"])
        #expect(result.status == 0, "\(result)")
        #expect(result.stderr.isEmpty)
        let out = lines(result.stdout)
        #expect(Array(out.prefix(5)) == [
            "target: \(file)", "kind: file", "path: \(file)", "size: 3145728 bytes (3.0 MiB)",
            "sector-size: 512 logical, 4096 physical",
        ])
        #expect(out.contains("read-only: no"))
        #expect(out.contains("flush: yes"))
        #expect(out.contains { $0.hasPrefix("discard: ") })
        #expect(out.contains { $0.hasPrefix("direct-io: ") })
        #expect(out.contains("identity: path:\(file)"))
        #expect(out.contains { $0.hasPrefix("identity: file:") })
        // Read-only by default.
        #expect(lines(try checkDisk([file]).stdout).contains("read-only: yes"))
    }

    @Test func loopDevice() throws {
        if !isRoot() { try Test.cancel("needs root (losetup)") }
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let backing = try makeFile(directory + "/backing.img", size: 4 << 20)
        guard let loop = LoopDevice(backing: backing) else { try Test.cancel("losetup -f --show failed") }
        defer { loop.detach() }
        let result = try checkDisk(["--mode", "w", "phy:" + loop.path])
        #expect(result.status == 0, "\(result)")
        let out = lines(result.stdout)
        let numbers = try #require(hexDeviceNumbers(loop.path)).split(separator: ":").map { Int($0, radix: 16)! }
        #expect(Array(out.prefix(6)) == [
            "target: \(loop.path)", "kind: block-device", "path: \(loop.path)", "device: \(numbers[0]):\(numbers[1])",
            "backing-file: \(backing)", "size: 4194304 bytes (4.0 MiB)",
        ])
        #expect(out.contains("sector-size: 512 logical, 512 physical"))
        #expect(out.contains("read-only: no"))
        // The loop device and its file are one disk to a sharing check.
        let ids = try checkDisk(["--identities", loop.path, backing])
        let words = lines(ids.stdout).map { Set($0.split(separator: " ")) }
        #expect(words.count == 2 && !words[0].isDisjoint(with: words[1]), "\(ids)")
    }

    @Test func nbdExport() throws {
        let server = try NBDTestServer.nbdkit(["memory", "16M"], transport: .tcp)
        let port = try #require(server.port)
        let result = try checkDisk(["--mode", "w", "nbd:127.0.0.1 \(port)"])
        #expect(result.status == 0, "\(result)")
        let out = lines(result.stdout)
        #expect(Array(out.prefix(3)) == ["target: nbd://127.0.0.1:\(port)", "kind: nbd", "size: 16777216 bytes (16.0 MiB)"])
        #expect(out.contains("read-only: no"))
        #expect(out.contains { $0.hasPrefix("discard: yes") })
        #expect(out.contains("identity: nbd://127.0.0.1:\(port)"))
    }

    @Test func missingFile() throws {
        let path = "/tmp/xbcheck-missing-\(getpid()).img"
        let result = try checkDisk([path])
        #expect(result.status == 1)
        #expect(result.stdout == "target: \(path)\n")
        #expect(result.stderr == "disk \(path) does not exist\n")
        // An LVM-shaped path also says which volume to activate.
        let volume = try checkDisk(["/dev/xbnovg/lv--1"])
        #expect(volume.status == 1)
        #expect(volume.stdout == "target: /dev/xbnovg/lv--1\nlvm-volume: xbnovg/lv--1\n")
    }

    @Test(arguments: [
        ("nbd:host:99999", "malformed NBD export 'nbd:host:99999': the port must be a number from 1 to 65535"),
        ("disk.img", "params 'disk.img' is neither an absolute path, an NBD export nor an RBD image"),
        ("rbd:pool:key=SECRET", "malformed RBD image 'rbd:pool:key=<redacted>': the image is named POOL/IMAGE or POOL/NAMESPACE/IMAGE"),
        ("nbd+tcp://h/x", "malformed NBD export 'nbd+tcp://h/x': nbd+tcp:// is QEMU's spelling, which libnbd does not take: write nbd://HOST:PORT/NAME"),
    ])
    func malformedTarget(target: String, reason: String) throws {
        let result = try checkDisk([target])
        #expect(result.status == 1)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr == reason + "\n")
    }

    /// A host with no Ceph configuration: one line saying what to give
    /// (CEPH_CONF names a file that is not there, so the host's own
    /// /etc/ceph cannot make the test pass or fail). A conf= that is not
    /// there is named.
    @Test func rbdWithoutAConfiguration() throws {
        let missing = "/tmp/xbcheck-no-ceph-\(getpid()).conf"
        let result = try runProcess([xenbackdBinary, "check-disk", "rbd:rbd/none"],
                                    environment: ["PATH": basePath, "CEPH_CONF": missing], timeout: 30)
        #expect(result.status == 1)
        #expect(result.stderr == "RBD image rbd:rbd/none cannot be opened: no Ceph configuration (no $CEPH_CONF, "
                + "/etc/ceph/ceph.conf, ~/.ceph/config or ./ceph.conf): give conf=PATH, or mon_host= and keyring=\n")
        let named = try checkDisk(["rbd:rbd/none:conf=\(missing)"])
        #expect(named.status == 1)
        #expect(named.stderr == "RBD image rbd:rbd/none cannot be opened: cannot read \(missing): No such file or directory\n")
    }

    @Test func badArgumentsAreUsageErrors() throws {
        #expect(try checkDisk(["--mode", "x", "/x"]).status != 0)
        #expect(try checkDisk(["/a", "/b"]).status != 0)
    }
}
