import BlockBackend
import BlockFrontend
import BlockStorage
import Glibc
import Testing
import XenABI
import XenBus

@Suite("blkback data path, end to end over the loopback hypervisor")
struct DataPathTests {
    @Test("random reads and writes of random sizes and offsets, verified by checksum, also from the file",
          arguments: [IOEngineChoice.ioUring, .libaio])
    func randomVerifiedIO(engine: IOEngineChoice) throws {
        let bed = try TestBed(ioEngine: engine)
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1, megabytes: 32)
        #expect(bed.host.blockStatus.map(\.ioEngine) == [engine.rawValue])
        #expect(fe.info.sectors == 32 * 2048)
        #expect(fe.info.sectorSize == 512)
        #expect(fe.info.flush && fe.info.barrier && fe.info.discard && !fe.info.readOnly)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 1234, queueDepth: 16, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 60, operations: 4000)
        #expect(s.errors == 0)
        #expect(s.mismatches == 0)
        #expect(s.writes > 1000 && s.reads > 1000 && s.flushes > 0 && s.discards > 0)
        #expect(s.sectorsVerified > 10_000)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0)
        #expect(full.verified > 10_000)
        try fe.disconnect()
        // The file itself, read without the ring, holds what the model says.
        #expect(disk.expectHolds(w, sectors: fe.info.sectors, every: 97) > 100)
    }

    @Test("verified I/O with both ends polling: the backend's idle poll and our blkfront's spin (adaptive windows)")
    func verifiedIOWithBothEndsPolling() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 16)
        fe.spinMicroseconds = 50
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 4321, queueDepth: 4, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 60, operations: 3000)
        #expect(s.errors == 0)
        #expect(s.mismatches == 0)
        #expect(s.writes > 500 && s.reads > 500)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0)
        #expect(full.verified > 5_000)
        try fe.disconnect()
    }

    @Test("every ring size from 1 to 16 pages serves verified I/O", arguments: [0, 1, 2, 3, 4])
    func ringSizes(order: Int) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 8, ringPageOrder: order)
        #expect(fe.ringPageOrder == order)
        #expect(fe.ringSlots == SharedRingLayout.slots(pages: 1 << order, entrySize: Blkif.slotSize))
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: UInt64(order + 1), queueDepth: fe.ringSlots,
                                 canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 30, operations: 1500)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 0)
        #expect(bed.host.blockStatus.first?.ringPages == 1 << order)
    }

    @Test("flush and barrier are answered OKAY and the barrier's data is on disk")
    func flushAndBarrier() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1)
        #expect(try fe.run(.flush) == BlkifStatus.okay)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        fe.copyIn(slot: fe.nextFreeSlot!, first: 0, from: data)
        #expect(try fe.run(.barrier(sector: 800, count: 8)) == BlkifStatus.okay)
        #expect(Array(data[0..<512]) == disk.sector(800))
        #expect(Array(data[3584..<4096]) == disk.sector(807))
        // A barrier without data is a pure flush.
        #expect(try fe.run(.barrier(sector: 0, count: 0)) == BlkifStatus.okay)
    }

    @Test("discard punches a hole: the range reads back as zeros, the rest is intact")
    func discardReadsZeros() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1)
        let ones = [UInt8](repeating: 0xA5, count: 88 * 512)
        for base in stride(from: UInt64(0), to: 88 * 4, by: 88) {
            #expect(try fe.write(sector: 1000 + base, data: ones) == BlkifStatus.okay)
        }
        #expect(try fe.run(.discard(sector: 1008, count: 256)) == BlkifStatus.okay)
        let (st1, before) = try fe.read(sector: 1000, count: 8)
        #expect(st1 == BlkifStatus.okay && before == [UInt8](repeating: 0xA5, count: 4096))
        let (st2, hole) = try fe.read(sector: 1008, count: 88)
        #expect(st2 == BlkifStatus.okay && hole == [UInt8](repeating: 0, count: 88 * 512))
        let (st3, after) = try fe.read(sector: 1264, count: 88)
        #expect(st3 == BlkifStatus.okay && after == [UInt8](repeating: 0xA5, count: 88 * 512))
        // discard-secure=0: the secure flag is ignored (blkif.h), a plain discard.
        #expect(try fe.write(sector: 0, data: [UInt8](repeating: 0x5A, count: 4096)) == BlkifStatus.okay)
        #expect(try fe.run(.discard(sector: 0, count: 8, secure: true)) == BlkifStatus.okay)
        let (st4, secure) = try fe.read(sector: 0, count: 8)
        #expect(st4 == BlkifStatus.okay && secure == [UInt8](repeating: 0, count: 4096))
    }

    @Test("a read-only disk serves reads and refuses writes, barriers and discards")
    func readOnlyDisk() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, readOnly: true)
        #expect(fe.info.readOnly)
        #expect(!fe.info.discard)
        #expect(try bed.host.toolstack.store.read(fe.backendPath + "/info") == String(Blkif.vdiskReadOnly))
        #expect(try fe.read(sector: 0, count: 8).status == BlkifStatus.okay)
        #expect(try fe.write(sector: 0, data: [UInt8](repeating: 1, count: 512)) == BlkifStatus.error)
        #expect(try fe.run(.barrier(sector: 0, count: 1)) == BlkifStatus.error)
        #expect(try fe.run(.discard(sector: 0, count: 8)) == BlkifStatus.error)
    }

    @Test("a frontend that closes and starts over is served again, with its data intact")
    func reconnect() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 8)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 77, queueDepth: 8, canDiscard: true, canFlush: true)
        let before = try w.run(on: fe, seconds: 30, operations: 500)
        #expect(before.errors == 0 && before.mismatches == 0)
        try fe.disconnect()
        #expect(bed.backendState(fe) == .closed)
        // As after a guest kexec or a migration: the frontend initialises again.
        try fe.connect(ringPageOrder: 2)
        #expect(bed.backendState(fe) == .connected)
        #expect(fe.ringSlots == 128)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        let after = try w.run(on: fe, seconds: 30, operations: 500)
        #expect(after.errors == 0 && after.mismatches == 0)
        #expect(bed.host.blockStatus.first?.statistics.requests ?? 0 > 1000)
    }

    @Test("the handshake publishes what the disk offers, in state Connected, and closes cleanly")
    func handshakeKeys() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(3, megabytes: 4)
        let store = bed.host.toolstack.store
        let be = fe.backendPath
        #expect(bed.backendState(fe) == .connected)
        #expect(try store.read(be + "/sectors") == "8192")
        #expect(try store.read(be + "/sector-size") == "512")
        #expect(try store.read(be + "/feature-flush-cache") == "1")
        #expect(try store.read(be + "/feature-barrier") == "1")
        #expect(try store.read(be + "/feature-discard") == "1")
        #expect(try store.read(be + "/discard-secure") == "0")
        #expect(try store.read(be + "/max-ring-page-order") == "4")
        try fe.disconnect()
        #expect(bed.backendState(fe) == .closed)
    }
}
