import Foundation
import CXenBackSupport
import Glibc
import NBDTestSupport
import Testing
@testable import BlockStorage

/// Loop devices and mounts: serialized, root only, always detached.
@Suite(.serialized) struct BlockDeviceTests {
    @Test(arguments: [false, true], kernelEngines)
    func loopDeviceThroughTheSameCode(loopDirectIO: Bool, engine: IOEngineChoice) throws {
        try requireLoopDevices()
        let backing = try TempFile(directory: "/tmp", size: 16 * mebibyte, randomSeed: 99)
        guard let loop = LoopDevice(backing: backing.path, directIO: loopDirectIO) else {
            try Test.cancel("loop-device test skipped: losetup -f --show failed")
        }
        defer { loop.detach() }
        let storage = try FileStorage.open(path: loop.path, readOnly: false, queueDepth: 16, engine: engine)
        defer { storage.close() }

        #expect(storage.ioEngine.rawValue == engine.rawValue)
        // io_uring: merged operations stop at the device's max_segments (a split bio would go to a worker).
        let maxSegments = try String(contentsOfFile: "/sys/block/\(loop.path.split(separator: "/").last!)/queue/max_segments",
                                     encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(storage.maxIovecsPerOperation == (engine == .ioUring ? Int(maxSegments) : nil))
        #expect(storage.isBlockDevice == true)
        #expect(storage.directIO == true)
        #expect(openFlags(of: loop.path).map { $0 & oDirectFlag } == oDirectFlag)
        #expect(storage.geometry == StorageGeometry(
            sizeBytes: UInt64(16 * mebibyte), logicalSectorSize: 512, physicalSectorSize: 512,
            readOnly: false, supportsFlush: true,
            discard: DiscardSupport(granularity: 4096, alignment: 0, zeroesData: false)))

        exerciseRandomIO(storage, inspectPath: loop.path, seed: loopDirectIO ? 1 : 2)
        #expect(singleOperation(storage, .flush) == 0)
        // What the device shows is what reached the backing file.
        let device = preadBytes(loop.path, offset: 0, length: 16 * mebibyte)
        let file = preadBytes(backing.path, offset: 0, length: 16 * mebibyte)
        #expect(device.withUnsafeBytes(fnv1a64) == file.withUnsafeBytes(fnv1a64))

        // BLKDISCARD: the loop driver punches a hole in the backing file.
        let blocksBefore = backing.allocatedBlocks
        #expect(singleOperation(storage, .discard, offset: mebibyte, length: 256 * 1024) == 0)
        #expect(backing.allocatedBlocks == blocksBefore - 512)
        let read = readThroughStorage(storage, offset: mebibyte, length: 256 * 1024)
        #expect(read.result == Int64(256 * 1024))
        #expect(read.bytes == [UInt8](repeating: 0, count: 256 * 1024))
        #expect(readThroughStorage(storage, offset: 16 * mebibyte, length: 512).result == -Int64(EINVAL))

        // A loop device cannot erase securely: the kernel says so to the
        // probe's BLKSECDISCARD without a range (EOPNOTSUPP, not EFAULT),
        // and a secure discard is refused without touching the data.
        let fd = open(loop.path, O_RDWR)
        defer { close(fd) }
        #expect(xb_block_device_supports_secure_discard(fd) == 0)
        #expect(ioctl(fd, 0x127d /* BLKSECDISCARD */, 0) == -1 && errno == EOPNOTSUPP)
        let blocks = backing.allocatedBlocks
        let secure = runAll(storage, [StorageOperation(tag: 8, kind: .discard, offset: UInt64(2 * mebibyte),
                                                       length: 64 * 1024, secure: true)])[8]
        #expect(secure == -Int64(EOPNOTSUPP))
        #expect(backing.allocatedBlocks == blocks)
    }

    @Test func readOnlyLoopDevice() throws {
        try requireLoopDevices()
        let backing = try TempFile(directory: "/tmp", size: 4 * mebibyte, randomSeed: 12)
        guard let loop = LoopDevice(backing: backing.path, directIO: true) else {
            try Test.cancel("loop-device test skipped: losetup -f --show failed")
        }
        defer { loop.detach() }
        let storage = try FileStorage.open(path: loop.path, readOnly: true, queueDepth: 4)
        defer { storage.close() }
        #expect(storage.geometry == StorageGeometry(
            sizeBytes: UInt64(4 * mebibyte), logicalSectorSize: 512, physicalSectorSize: 512,
            readOnly: true, supportsFlush: false, discard: nil))
        #expect(writeThroughStorage(storage, offset: 0, bytes: [UInt8](repeating: 1, count: 512)) == -Int64(EROFS))
        let read = readThroughStorage(storage, offset: 8192, length: 4096)
        #expect(read.result == 4096)
        #expect(read.bytes == preadBytes(backing.path, offset: 8192, length: 4096))
    }

    /// A 4096-byte-sector device keeps O_DIRECT (its unit is the logical
    /// sector); a transfer smaller than a sector fails in the kernel.
    @Test func fourKSectorLoopDevice() throws {
        try requireLoopDevices()
        let backing = try TempFile(directory: "/tmp", size: 8 * mebibyte, randomSeed: 13)
        guard let loop = LoopDevice(backing: backing.path, directIO: true, sectorSize: 4096) else {
            try Test.cancel("loop-device test skipped: losetup --sector-size 4096 failed")
        }
        defer { loop.detach() }
        let storage = try FileStorage.open(path: loop.path, readOnly: false, queueDepth: 4)
        defer { storage.close() }
        #expect(storage.directIO == true)
        #expect(storage.geometry.logicalSectorSize == 4096)
        #expect(storage.geometry.physicalSectorSize == 4096)
        #expect(readThroughStorage(storage, offset: 4096, length: 4096).bytes
                == preadBytes(backing.path, offset: 4096, length: 4096))
        #expect(readThroughStorage(storage, offset: 512, length: 512).result == -Int64(EINVAL))
    }

    /// ext4 on a 4096-byte-sector device refuses 512-byte O_DIRECT: `.auto`
    /// falls back to buffered I/O (which then works) and `.always` fails.
    @Test func fallbackWhereDirectSectorIOFails() throws {
        try requireLoopDevices()
        let image = try TempFile(directory: "/tmp", size: 64 * mebibyte)
        guard let loop = LoopDevice(backing: image.path, directIO: false, sectorSize: 4096) else {
            try Test.cancel("fallback test skipped: losetup --sector-size 4096 failed")
        }
        defer { loop.detach() }
        let mountPoint = image.path + ".mnt"
        guard run(["mkfs.ext4", "-q", "-F", loop.path]) != nil, mkdir(mountPoint, 0o700) == 0 else {
            try Test.cancel("fallback test skipped: mkfs.ext4 failed")
        }
        defer { rmdir(mountPoint) }
        guard run(["mount", loop.path, mountPoint]) != nil else {
            try Test.cancel("fallback test skipped: mount failed")
        }
        defer { run(["umount", mountPoint]) }

        let file = try TempFile(directory: mountPoint, size: 4 * mebibyte, randomSeed: 14)
        let storage = try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8)
        #expect(storage.directIO == false)
        #expect(openFlags(of: file.path).map { $0 & oDirectFlag } == 0)
        #expect(storage.geometry.logicalSectorSize == 512)
        #expect(storage.geometry.physicalSectorSize == 4096)
        exerciseRandomIO(storage, inspectPath: file.path, seed: 15, rounds: 2)
        storage.close()

        #expect(throws: StorageError("O_DIRECT sector read probe", errno: EINVAL, path: file.path)) {
            try FileStorage.open(path: file.path, readOnly: false, queueDepth: 8, direct: .always)
        }
    }
}
