import DaemonCLI
import Foundation
import Glibc
import Hypervisor
import SystemSupport
import Testing
import XenABI
import XenStoreClient

/// Online resize through the daemon, on a file with libaio: the disk grows
/// under a connected guest, the daemon notices within a second (or at once
/// on `xenbackd rescan`), lets the ring take requests up to the new end,
/// then writes `sectors` and state=Connected again, as Linux's blkback does
/// for blkfront.
@Suite("online resize")
struct OnlineResizeTests {
    @Test("a file grown under a connected guest: sectors and Connected written again within a second; I/O past the old end works")
    func grownFileReachesTheGuest() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, dom0) = try DaemonRestartTests().connectGuest(w)
        let oldEnd: UInt64 = 16 * 2048
        #expect(fe.info.sectors == oldEnd)
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        #expect(try fe.write(sector: oldEnd, data: pattern) == BlkifStatus.error, "past the end before the resize")

        let watcher = try XenStoreSocketClient(socketPath: w.layout.xenStoreSocket)
        try watcher.watch(fe.backendPath + "/state", token: "resize")
        #expect(try nextEvent(watcher)?.token == "resize", "a watch fires once when set")

        #expect(truncate(w.disk.path, 32 << 20) == 0)
        let grown = Date()
        try waitUntil("the new size in xenstore", seconds: 3) {
            ((try? dom0.read(fe.backendPath + "/sectors")) ?? nil) == "65536"
        }
        #expect(Date().timeIntervalSince(grown) < 2.5, "the periodic check runs every second")
        // Written again in the same transaction, which is what fires blkfront's watch.
        #expect(try nextEvent(watcher)?.path == fe.backendPath + "/state")
        #expect(dom0.readState(fe.backendPath) == .connected)

        #expect(try fe.refreshCapacity() == 65536)
        #expect(try fe.write(sector: oldEnd, data: pattern) == BlkifStatus.okay)
        #expect(try fe.write(sector: 65536 - 8, data: pattern) == BlkifStatus.okay)
        let back = try fe.read(sector: 65536 - 8, count: 8)
        #expect(back.status == BlkifStatus.okay && back.data == pattern)
        #expect(try fe.read(sector: 65536, count: 8).status == BlkifStatus.error, "the new end is an end")
        #expect(try fe.run(.flush) == BlkifStatus.okay)
        let onDisk = try #require(FileHandle(forReadingAtPath: w.disk.path))
        try onDisk.seek(toOffset: oldEnd * 512)
        #expect(Array(try onDisk.read(upToCount: 4096) ?? Data()) == pattern, "the write past the old end is in the file")
        try onDisk.close()

        let json = try w.output(["status", "--control-socket", w.controlSocket, "--json", "vbd-1-51712"])
        let terms = try JSONDecoder().decode(StatusDocument.self, from: Data(json.utf8)).devices.first?.vbd
        #expect(terms?.sectors == 65536, "\(json)")
    }

    @Test("xenbackd rescan: the new size in xenstore when it returns; unchanged says so; an unknown vbd is refused")
    func rescanTellsTheGuestAtOnce() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, dom0) = try DaemonRestartTests().connectGuest(w)
        let rescan = ["rescan", "--control-socket", w.controlSocket, "vbd-1-51712"]
        #expect(try w.output(rescan) == "vbd-1-51712: 32768 sectors, unchanged\n")
        #expect(truncate(w.disk.path, 48 << 20) == 0)
        let said = try w.output(rescan)
        // The periodic check may have got there between the two calls.
        #expect(said == "vbd-1-51712: 98304 sectors, was 32768: the guest has been told\n"
                || said == "vbd-1-51712: 98304 sectors, unchanged\n", "\(said)")
        #expect(try dom0.read(fe.backendPath + "/sectors") == "98304")
        let unknown = try runProgram(w.binary, ["rescan", "--control-socket", w.controlSocket, "vbd-9-1"])
        #expect(unknown.status == 1 && unknown.output.isEmpty)
    }

    @Test("a disk grown while no daemon ran: the next daemon resumes the ring and then tells the guest")
    func grownWhileTheDaemonWasDown() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, dom0) = try DaemonRestartTests().connectGuest(w)
        kill(w.daemon!.processIdentifier, SIGKILL)
        _ = w.waitExit(w.daemon!, seconds: 5)
        #expect(truncate(w.disk.path, 20 << 20) == 0)
        w.daemon = try w.startDaemon()
        try waitUntil("the new size in xenstore", seconds: 4) {
            ((try? dom0.read(fe.backendPath + "/sectors")) ?? nil) == "40960"
        }
        #expect(dom0.readState(fe.backendPath) == .connected)
        #expect(try fe.refreshCapacity() == 40960)
        let pattern = [UInt8](repeating: 0x6D, count: 4096)
        #expect(try fe.write(sector: 40960 - 8, data: pattern) == BlkifStatus.okay)
        #expect(try fe.read(sector: 40960 - 8, count: 8).data == pattern)
    }
}

/// The watcher's next event, waiting up to `seconds` for it: events come in
/// on the client's reader thread, after the request that caused them returned.
private func nextEvent(_ watcher: XenStoreSocketClient, seconds: Int32 = 5) throws -> XenStoreWatchEvent? {
    if let event = try watcher.nextWatchEvent() { return event }
    var entry = pollfd(fd: watcher.watchFileDescriptor, events: Int16(POLLIN), revents: 0)
    _ = poll(&entry, 1, seconds * 1000)
    return try watcher.nextWatchEvent()
}
