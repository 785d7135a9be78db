import Foundation
import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

/// DiskTarget.probe on files, loop devices and NBD exports: what the daemon
/// would see, and a one-line reason when it would fail.
@Suite struct DiskTargetProbeTests {
    func reason(_ params: String, _ access: DiskAccess, timeout: Double = 10) -> String? {
        do {
            _ = try DiskTarget.parse(params).probe(access, timeout: timeout)
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test func fileReadOnlyAndWritable() throws {
        let file = try TempFile(directory: "/tmp", size: 3 * mebibyte)
        let reader = try DiskTarget.parse("aio:" + file.path).probe(DiskAccess(writable: false))
        #expect(reader.kind == .file)
        #expect(reader.resolvedPath == file.path)
        #expect(reader.geometry.sizeBytes == UInt64(3 * mebibyte))
        #expect(reader.geometry.logicalSectorSize == 512)
        #expect(reader.geometry.readOnly)
        #expect(reader.geometry.discard == nil)
        let writer = try DiskTarget.parse(file.path).probe(DiskAccess(writable: true))
        #expect(!writer.geometry.readOnly)
        #expect(writer.identities.count == 2)
        #expect(writer.identities[0] == "path:" + file.path)
        #expect(writer.identities[1].hasPrefix("file:"))
        #expect(writer.mounts.isEmpty)
    }

    @Test func missingEmptyOrOddPaths() throws {
        #expect(reason("/tmp/no-such-disk-\(getpid()).img", DiskAccess(writable: false))
            == "disk /tmp/no-such-disk-\(getpid()).img does not exist")
        let empty = try TempFile(directory: "/tmp", size: 0)
        #expect(reason(empty.path, DiskAccess(writable: true)) == "disk file \(empty.path) is empty")
        #expect(reason("/tmp", DiskAccess(writable: false)) == "disk /tmp is neither a regular file nor a block device")
        #expect(reason("/dev/null", DiskAccess(writable: false)) == "disk /dev/null is neither a regular file nor a block device")
    }

    @Test func nbdExportOverTCPAndUnix() throws {
        let server = try NBDTestServer.nbdkit(["memory", "8M"], transport: .tcp)
        let port = try #require(server.port)
        for params in ["nbd:127.0.0.1:\(port)", "nbd:127.0.0.1 \(port)", "nbd://127.0.0.1:\(port)/x",
                       "nbd:127.0.0.1:\(port):exportname=x"] {
            let report = try DiskTarget.parse(params).probe(DiskAccess(writable: true))
            #expect(report.kind == .nbd)
            #expect(report.geometry.sizeBytes == UInt64(8 * mebibyte), "\(params)")
            #expect(!report.geometry.readOnly)
        }
        let unix = try NBDTestServer.nbdkit(["memory", "4M"], readOnly: true)
        let socket = try #require(unix.socketPath)
        for params in ["nbd:unix:\(socket)", "nbd+unix:///?socket=\(socket)", "nbd:unix:\(socket):exportname=e"] {
            let report = try DiskTarget.parse(params).probe(DiskAccess(writable: false))
            #expect(report.geometry.sizeBytes == UInt64(4 * mebibyte), "\(params)")
            #expect(report.geometry.readOnly)
        }
        #expect(reason("nbd:unix:\(socket)", DiskAccess(writable: true))
            == "NBD export nbd+unix:///?socket=\(socket) is read-only")
    }

    @Test func nbdServerThatNeverAnswersTimesOut() throws {
        let listener = try SilentListener()
        defer { listener.close() }
        let started = Date()
        #expect(reason("nbd:127.0.0.1:\(listener.port)", DiskAccess(writable: false), timeout: 1)
            == "NBD export nbd://127.0.0.1:\(listener.port) did not complete its handshake within 1 s")
        #expect(Date().timeIntervalSince(started) < 5)
    }

    @Test func nbdNobodyListens() throws {
        let port = try freeTCPPort()
        let text = reason("nbd:127.0.0.1:\(port)", DiskAccess(writable: false)) ?? ""
        #expect(text.hasPrefix("NBD export nbd://127.0.0.1:\(port) cannot be reached: "), "\(text)")
        #expect(text.contains("Connection refused"), "\(text)")
    }

    /// nbds:// goes through libnbd's TLS (here with a pre-shared key file
    /// named in the URI, which the daemon allows: params come from dom0).
    @Test func nbdsWithAPreSharedKey() throws {
        let keys = "/tmp/xb-psk-\(getpid()).keys"
        try "alice:0123456789abcdef0123456789abcdef\n".write(toFile: keys, atomically: true, encoding: .utf8)
        defer { unlink(keys) }
        let server = try NBDTestServer.nbdkit(["--tls=require", "--tls-psk=\(keys)", "memory", "2M"], transport: .tcp)
        let port = try #require(server.port)
        let report = try DiskTarget.parse("nbds://alice@127.0.0.1:\(port)/?tls-psk-file=\(keys)")
            .probe(DiskAccess(writable: true))
        #expect(report.target.normalized == "nbds://127.0.0.1:\(port)")
        #expect(report.geometry.sizeBytes == UInt64(2 * mebibyte))
        // Without TLS the server refuses the handshake.
        #expect(reason("nbd://127.0.0.1:\(port)/", DiskAccess(writable: false)) != nil)
    }
}

/// Loop devices: root only, serialised, always detached.
@Suite(.serialized) struct DiskTargetLoopDeviceTests {
    @Test func loopDeviceAndItsBackingFileAreOneDisk() throws {
        try requireLoopDevices()
        let backing = try TempFile(directory: "/tmp", size: 4 * mebibyte)
        guard let loop = LoopDevice(backing: backing.path, directIO: false) else {
            try Test.cancel("losetup -f --show failed")
        }
        defer { loop.detach() }
        let report = try DiskTarget.parse("phy:" + loop.path).probe(DiskAccess(writable: true))
        #expect(report.kind == .blockDevice)
        #expect(report.device?.major == 7)
        #expect(report.backingFile == backing.path)
        #expect(report.geometry.sizeBytes == UInt64(4 * mebibyte))
        let fileKeys = DiskIdentity.keys(of: try DiskTarget.parse(backing.path))
        #expect(report.identities.contains(fileKeys[1]), "\(report.identities) vs \(fileKeys)")
    }

    @Test func readOnlyLoopDeviceRefusesWriting() throws {
        try requireLoopDevices()
        let backing = try TempFile(directory: "/tmp", size: 4 * mebibyte)
        guard let device = run(["losetup", "-r", "-f", "--show", backing.path]), device.hasPrefix("/dev/loop") else {
            try Test.cancel("losetup -r failed")
        }
        defer { run(["losetup", "-d", device]) }
        #expect(throws: DiskTargetError.readOnly(what: "block device \(device)")) {
            try DiskTarget.parse(device).probe(DiskAccess(writable: true))
        }
        #expect(try DiskTarget.parse(device).probe(DiskAccess(writable: false)).geometry.readOnly)
    }
}

/// A TCP socket on 127.0.0.1 that accepts into its backlog and never answers.
final class SilentListener {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard fd >= 0, ok, listen(fd, 8) == 0 else {
            let code = errno
            if fd >= 0 { Glibc.close(fd) }
            throw StorageError("listen", errno: code, path: "127.0.0.1")
        }
        self.fd = fd
        port = Int(UInt16(bigEndian: address.sin_port))
    }
    func close() { _ = Glibc.close(fd) }
}
