import Foundation
import Glibc
import NBDTestSupport
import SystemSupport
import Testing

/// `xenbackd-lab bench blk --nbd`: the export is written whole before the
/// rows (a server's first write of a block allocates it, and the first
/// side to write would pay for that), then each row prints its figures.
@Suite("bench blk")
struct BenchBlockTests {
    @Test("on an NBD export over a sparse file: every block is written before the rows, and the row is printed")
    func nbdExportWrittenWholeFirst() throws {
        let binary = try DaemonRestartTests.World.builtBinary("xenbackd-lab")
        let server = try NBDTestServer.scratchDisk(.nbdServer, megabytes: 16, transport: .unixSocket)
        let file = try #require(server.exportedFile)
        #expect(allocatedBytes(file) == 0, "a new sparse file")
        let result = try runProcess([binary, "bench", "blk", "--nbd", server.uri, "--seconds", "0.2", "--no-fio",
                                     "--only", "4k-randread-qd1", "--log-level", "error"],
                                    environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], timeout: 120)
        #expect(result.status == 0, "\(result.stdout)")
        #expect(allocatedBytes(file) == 16 << 20, "the whole export was written")
        // Not a terminal: progress comes as plain lines, with no control
        // sequences to garble a log.
        let output = result.stdout + result.stderr
        #expect(!output.contains("\u{1b}") && !output.contains("\r"), "\(output)")
        #expect(result.stderr.split(separator: "\n").contains { $0.hasPrefix("4k-randread-qd1: xenbackd, ") }, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n")
        // The row: its name, then IOPS, MB/s, p50, p99, CPU per I/O and share.
        let row = lines.first { $0.hasPrefix("4k-randread-qd1 ") }
        let fields = try #require(row, "\(result.stdout)").split(separator: " ")
        let iops = try #require(Double(fields[1]), "\(fields)")
        #expect(iops > 100, "\(fields)")
        #expect(row?.contains("(fio not run)") == true)
    }

    private func allocatedBytes(_ path: String) -> Int {
        var status = stat()
        guard stat(path, &status) == 0 else { return -1 }
        return Int(status.st_blocks) * 512
    }
}
