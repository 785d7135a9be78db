import Foundation
import Glibc
import Logging
import Testing
@testable import DaemonCLI

/// The daemon's log under systemd: journald's native protocol, each line
/// one datagram with PRIORITY, MESSAGE and the metadata as fields of their
/// own, received here on a socket of the test's.
@Suite struct JournalLogTests {
    /// A datagram socket at a fresh path: what the handler sends to.
    final class FakeJournal {
        let path: String
        let fd: Int32
        init() throws {
            path = "/tmp/xenbackd-journal-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard fd >= 0, bound == 0 else { throw POSIXError(.EADDRINUSE) }
        }
        deinit { close(fd); unlink(path) }

        /// The next datagram's fields (the native protocol decoded).
        func receive() -> [String: String] {
            var buffer = [UInt8](repeating: 0, count: 65536)
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            guard n > 0 else { return [:] }
            let bytes = Array(buffer[0..<n])
            var fields: [String: String] = [:]
            var i = 0
            while i < bytes.count {
                var j = i
                while j < bytes.count && bytes[j] != UInt8(ascii: "=") && bytes[j] != UInt8(ascii: "\n") { j += 1 }
                guard j < bytes.count else { break }
                let name = String(decoding: bytes[i..<j], as: UTF8.self)
                if bytes[j] == UInt8(ascii: "=") {
                    var k = j + 1
                    while bytes[k] != UInt8(ascii: "\n") { k += 1 }
                    fields[name] = String(decoding: bytes[(j + 1)..<k], as: UTF8.self)
                    i = k + 1
                } else {
                    let length = Int((0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[j + 1 + $1]) << (8 * UInt64($1)) })
                    let start = j + 9
                    fields[name] = String(decoding: bytes[start..<(start + length)], as: UTF8.self)
                    i = start + length + 1
                }
            }
            return fields
        }
    }

    @Test func aLineIsOneDatagramWithItsPriorityAndEachMetadataKeyAsAField() throws {
        let journal = try FakeJournal()
        let socket = try #require(JournalSocket(path: journal.path))
        var logger = Logger(label: "xenbackd.vif") { JournalLogHandler(label: $0, level: .info, socket: socket) }
        logger[metadataKey: "device"] = "vif-1-0"
        logger.notice("rx headroom", metadata: ["bytes": "256", "rx-queue": "0"])
        #expect(journal.receive() == [
            "MESSAGE": "bytes=256 device=vif-1-0 rx-queue=0 rx headroom", "PRIORITY": "5",
            "SYSLOG_IDENTIFIER": "xenbackd", "XENBACKD_LOGGER": "xenbackd.vif",
            "DEVICE": "vif-1-0", "BYTES": "256", "RX_QUEUE": "0",
        ])
        // Below the level: nothing sent. A message with a newline: the length form.
        logger.debug("not sent")
        logger.error("two\nlines")
        let second = journal.receive()
        #expect(second["MESSAGE"] == "device=vif-1-0 two\nlines" && second["PRIORITY"] == "3", "\(second)")
        #expect(journal.receive().isEmpty)
    }

    @Test func fieldNamesAreTheJournalsAndLevelsSyslogs() {
        #expect(JournalLogHandler.fieldName("device") == "DEVICE")
        #expect(JournalLogHandler.fieldName("rx-queue.id") == "RX_QUEUE_ID")
        #expect(JournalLogHandler.fieldName("_secret") == "SECRET")
        #expect(JournalLogHandler.fieldName("9lives") == "X9LIVES")
        #expect([Logger.Level.trace, .debug, .info, .notice, .warning, .error, .critical].map(JournalLogHandler.priority)
                == [7, 7, 6, 5, 4, 3, 2])
    }

    @Test func standardErrorIsTheJournalOnlyWhenJournalStreamNamesIt() throws {
        var st = stat()
        try #require(fstat(2, &st) == 0)
        #expect(!JournalSocket.standardErrorIsJournal(journalStream: nil))
        #expect(JournalSocket.standardErrorIsJournal(journalStream: "\(st.st_dev):\(st.st_ino)"))
        #expect(!JournalSocket.standardErrorIsJournal(journalStream: "\(st.st_dev):\(st.st_ino &+ 1)"))
        #expect(!JournalSocket.standardErrorIsJournal(journalStream: "garbage"))
    }
}
