import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import Testing
import XenABI

/// A vbd whose params is a block device (what an LVM volume is): the same
/// file storage code, here over a loop device, through the ring.
@Suite("blkback on a block device")
struct BlockDeviceDiskTests {
    @Test("a loop device served through the ring: verified I/O, and the backing file agrees",
          arguments: [false, true], [IOEngineChoice.ioUring, .libaio])
    func loopDevice(directIO: Bool, engine: IOEngineChoice) throws {
        guard getuid() == 0 else { try Test.cancel("needs root for losetup") }
        let backing = TempDisk(megabytes: 16)
        defer { backing.remove() }
        guard let device = losetup(backing.path, directIO: directIO) else {
            try Test.cancel("losetup -f --show failed (no loop devices here)")
        }
        defer { _ = shell(["losetup", "-d", device]) }
        let bed = try TestBed(ioEngine: engine)
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: "phy:" + device))
        try fe.connect()
        #expect(bed.host.blockStatus.map(\.ioEngine) == [engine.rawValue])
        #expect(fe.info.sectors == 16 * 2048)
        #expect(fe.info.sectorSize == 512)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 9, queueDepth: 16,
                                 canDiscard: fe.info.discard, canFlush: fe.info.flush)
        let s = try w.run(on: fe, seconds: 30, operations: 2000)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 1000)
        #expect(try fe.run(.flush) == BlkifStatus.okay)
        try fe.disconnect()
        // What the device holds reached the backing file.
        _ = shell(["blockdev", "--flushbufs", device])
        #expect(backing.expectHolds(w, sectors: fe.info.sectors, every: 61) > 100)
    }

    /// An LV extended under a running guest is the same event: the block
    /// device's size (BLKGETSIZE64) grows; here `losetup -c` after the
    /// backing file grew.
    @Test("a loop device grown under a connected guest: the guest is told within a second and writes past the old end")
    func grownBlockDevice() throws {
        guard getuid() == 0 else { try Test.cancel("needs root for losetup") }
        let backing = TempDisk(megabytes: 16)
        defer { backing.remove() }
        guard let device = losetup(backing.path, directIO: true) else {
            try Test.cancel("losetup -f --show failed (no loop devices here)")
        }
        defer { _ = shell(["losetup", "-d", device]) }
        let bed = try TestBed(ioEngine: .libaio)
        defer { bed.close() }
        let guest = try bed.host.createGuest(1)
        let fe = try bed.host.attachDisk(to: guest, .init(params: "phy:" + device))
        try fe.connect()
        #expect(fe.info.sectors == 16 * 2048)
        #expect(truncate(backing.path, 24 << 20) == 0)
        #expect(shell(["losetup", "-c", device]) != nil)
        var told: UInt64?
        try waitUntil("the guest told of the new size", seconds: 3) {
            told = (try? fe.refreshCapacity()) ?? nil
            return told != nil
        }
        #expect(told == 24 * 2048)
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 ^ 0xC3) }
        #expect(try fe.write(sector: 24 * 2048 - 8, data: pattern) == BlkifStatus.okay)
        #expect(try fe.read(sector: 24 * 2048 - 8, count: 8).data == pattern)
        #expect(try fe.run(.flush) == BlkifStatus.okay)
    }

    func losetup(_ file: String, directIO: Bool) -> String? {
        shell(["losetup", "-f", "--show"] + (directIO ? ["--direct-io=on"] : []) + [file])
    }

    /// A command's trimmed output, or nil when it failed.
    @discardableResult
    func shell(_ arguments: [String]) -> String? {
        guard let r = try? runProgram("/usr/bin/env", arguments), r.status == 0 else { return nil }
        return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
