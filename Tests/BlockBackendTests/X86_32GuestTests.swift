import BlockFrontend
import DaemonCLI
import Foundation
import Glibc
import Testing
import XenABI

/// A 32-bit PV guest's blkfront (`protocol` = x86_32-abi: 108-byte slots,
/// each request's id at 4) served by the daemon, as Linux blkback serves
/// one: the same checks and I/O as an x86_64 ring, through the real daemon
/// on the loopback hypervisor with our frontend speaking that layout.
@Suite("a 32-bit guest's blkfront (x86_32-abi)")
struct X86_32GuestTests {
    @Test("verified I/O from an x86_32 blkfront: direct and indirect reads and writes, flushes, discards; bytes in the file; status names the ABI")
    func verifiedIO() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, _) = try DaemonRestartTests().connectGuest(w, indirectSegments: 32, ringProtocol: .x86_32)
        #expect(fe.queues.first?.ringProtocol == .x86_32)
        #expect(fe.ringSlots == SharedRingLayout.slots(pages: 2, entrySize: BlkifX86_32.slotSize))
        #expect(fe.segmentsPerRequest == 32)

        // One page, then 11 segments (direct), then 32 (indirect), each read back.
        for (sector, pages) in [(UInt64(8), 1), (UInt64(2048), 11), (UInt64(4096), 32)] {
            let data = (0..<(pages * 4096)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ pages) }
            #expect(try fe.write(sector: sector, data: data) == BlkifStatus.okay, "\(pages) pages at \(sector)")
            let back = try fe.read(sector: sector, count: pages * 8)
            #expect(back.status == BlkifStatus.okay && back.data == data, "\(pages) pages at \(sector)")
        }
        #expect(fe.indirectRequestsSent >= 2, "the 32-page write and read went as BLKIF_OP_INDIRECT")
        #expect(try fe.run(.flush) == BlkifStatus.okay)
        let onDisk = try #require(FileHandle(forReadingAtPath: w.disk.path))
        try onDisk.seek(toOffset: 4096 * 512)
        let expected = (0..<(32 * 4096)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 32) }
        #expect(Array(try onDisk.read(upToCount: 32 * 4096) ?? Data()) == expected, "the indirect write is in the file")
        try onDisk.close()
        // A request the frontend gets wrong is refused by the same checks.
        #expect(try fe.write(sector: fe.info.sectors, data: [UInt8](repeating: 1, count: 4096)) == BlkifStatus.error)

        var load = VerifiedWorkload(sectors: fe.info.sectors, seed: 32, canDiscard: fe.info.discard, canFlush: fe.info.flush)
        load.segmentsPerRequest = 32
        let summary = try load.run(on: fe, seconds: 2)
        #expect(summary.errors == 0 && summary.mismatches == 0, "\(summary)")
        #expect(summary.writes > 20 && summary.reads > 20 && summary.sectorsVerified > 0, "\(summary)")
        #expect(fe.info.discard == false || summary.discards > 0, "\(summary)")

        let json = try w.output(["status", "--control-socket", w.controlSocket, "--json", "vbd-1-51712"])
        let terms = try JSONDecoder().decode(StatusDocument.self, from: Data(json.utf8)).devices.first?.vbd
        #expect(terms?.protocol == "x86_32-abi", "\(json)")
    }

    @Test("a kill -9 under an x86_32 guest's verified I/O: the journal replays widened requests; every request answered once, every byte right")
    func killUnderX86_32Guest() throws {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        let (fe, _) = try DaemonRestartTests().connectGuest(w, ringProtocol: .x86_32)
        let load = BystanderGuest(ring: fe.queues.first, disk: fe.info, sectors: fe.info.sectors, seed: 32, verifyAtEnd: true)
        usleep(400_000)
        kill(w.daemon!.processIdentifier, SIGKILL)
        _ = w.waitExit(w.daemon!, seconds: 5)
        w.daemon = try w.startDaemon()
        usleep(600_000)
        let (summary, failure) = load.finish()
        #expect(failure == nil)
        #expect(summary.errors == 0 && summary.mismatches == 0, "\(summary)")
        #expect(summary.reads + summary.writes > 50, "\(summary)")
        #expect(load.fullCheck?.mismatches == 0 && (load.fullCheck?.verified ?? 0) > 0)
    }
}
