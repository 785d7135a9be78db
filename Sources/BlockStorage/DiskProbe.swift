import CXenBackSupport
import Glibc
import SystemSupport

/// How a `FileStorage` uses O_DIRECT.
public enum DirectIOMode: Sendable, Equatable {
    /// O_DIRECT when the open-time probe shows that sector I/O works with it,
    /// buffered I/O through the page cache otherwise.
    case auto
    /// O_DIRECT, or fail to open when it does not work.
    case always
    /// Buffered I/O through the page cache.
    case never
}

/// What `open` learns about the disk before the I/O machinery is built.
struct OpenedDisk {
    var fd: Int32
    var isBlockDevice: Bool
    var directIO: Bool
    var geometry: StorageGeometry
    /// The block device itself, or the one holding the file.
    var device: dev_t
}

/// Shape of an open file or block device, independent of O_DIRECT.
struct DiskShape {
    var isBlockDevice: Bool
    var sizeBytes: UInt64
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    /// Direct-I/O alignment (memory, file offset) when the kernel reports it.
    var directIOAlignment: (memory: UInt32, offset: UInt32)?
    var device: dev_t
}

/// Sector size the backend addresses a regular file with (blkif's unit).
let fileLogicalSectorSize: UInt32 = 512
/// Preferred I/O unit of a regular file unless its file system asks for more.
let filePhysicalSectorSize: UInt32 = 4096
/// Hole-punch granularity advertised for regular files (the page size).
let fileDiscardGranularity: UInt32 = 4096
let pageSize = 4096

enum DiskProbe {
    static func openDisk(path: String, readOnly: Bool, direct: DirectIOMode) throws(StorageError) -> OpenedDisk {
        let (fd, directIO) = try openChoosingDirectIO(path: path, readOnly: readOnly, mode: direct)
        do {
            let shape = try describe(fd: fd, path: path)
            let geometry = StorageGeometry(
                sizeBytes: shape.sizeBytes,
                logicalSectorSize: shape.logicalSectorSize,
                physicalSectorSize: shape.physicalSectorSize,
                readOnly: readOnly,
                supportsFlush: !readOnly,
                discard: readOnly ? nil : discardSupport(fd: fd, shape: shape))
            return OpenedDisk(fd: fd, isBlockDevice: shape.isBlockDevice, directIO: directIO, geometry: geometry,
                              device: shape.device)
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    // MARK: Opening and the O_DIRECT decision

    private static func openDescriptor(path: String, readOnly: Bool, direct: Bool) throws(StorageError) -> Int32 {
        var flags = (readOnly ? O_RDONLY : O_RDWR) | xb_O_CLOEXEC
        if direct { flags |= xb_O_DIRECT }
        return try storageCall(direct ? "open(O_DIRECT)" : "open", path: path) { xb_open(path, flags, 0) }
    }

    /// Opens with O_DIRECT when `mode` allows and a probe read shows it works
    /// for sector I/O; reopens buffered otherwise (`.auto`) or fails (`.always`).
    private static func openChoosingDirectIO(path: String, readOnly: Bool,
                                             mode: DirectIOMode) throws(StorageError) -> (Int32, Bool) {
        if mode == .never {
            return (try openDescriptor(path: path, readOnly: readOnly, direct: false), false)
        }
        let fd: Int32
        do {
            fd = try openDescriptor(path: path, readOnly: readOnly, direct: true)
        } catch where error.errno == EINVAL && mode == .auto {
            // The file system refuses O_DIRECT outright.
            return (try openDescriptor(path: path, readOnly: readOnly, direct: false), false)
        }
        let works: Bool
        do {
            works = directSectorIOWorks(fd: fd, shape: try describe(fd: fd, path: path))
        } catch {
            Glibc.close(fd)
            throw error
        }
        if works { return (fd, true) }
        Glibc.close(fd)
        if mode == .always { throw StorageError("O_DIRECT sector read probe", errno: EINVAL, path: path) }
        return (try openDescriptor(path: path, readOnly: readOnly, direct: false), false)
    }

    /// The backend reads and writes whole logical sectors (512 bytes for a
    /// file) at sector offsets within page-aligned pages, so O_DIRECT must
    /// accept a one-sector transfer at a sector-aligned, not page-aligned,
    /// memory address. The kernel's statx alignment answers first; a real
    /// read confirms (or is the only test when statx does not report).
    static func directSectorIOWorks(fd: Int32, shape: DiskShape) -> Bool {
        let unit = Int(shape.logicalSectorSize)
        if let alignment = shape.directIOAlignment {
            if alignment.offset == 0 || Int(alignment.offset) > unit || Int(alignment.memory) > unit {
                return false
            }
        }
        var buffer: UnsafeMutableRawPointer?
        guard posix_memalign(&buffer, pageSize, 2 * pageSize) == 0, let buffer else { return false }
        defer { free(buffer) }
        let memoryOffset = unit < pageSize ? unit : 0
        let fileOffset = shape.sizeBytes >= UInt64(2 * unit) ? unit : 0
        do {
            _ = try Syscall.retryingOnInterrupt("pread") { pread(fd, buffer + memoryOffset, unit, off_t(fileOffset)) }
            return true
        } catch {
            // Only EINVAL says "alignment refused"; other errors are not about O_DIRECT.
            return error.errno != .invalidArgument
        }
    }

    // MARK: Size and sector sizes

    static func describe(fd: Int32, path: String) throws(StorageError) -> DiskShape {
        var status = stat()
        _ = try storageCall("fstat", path: path) { fstat(fd, &status) }
        let alignment = directIOAlignment(fd: fd)
        switch status.st_mode & S_IFMT {
        case S_IFREG:
            return DiskShape(
                isBlockDevice: false, sizeBytes: UInt64(status.st_size),
                logicalSectorSize: fileLogicalSectorSize,
                physicalSectorSize: max(filePhysicalSectorSize, alignment?.offset ?? 0),
                directIOAlignment: alignment, device: status.st_dev)
        case S_IFBLK:
            var size: UInt64 = 0
            _ = try storageCall("BLKGETSIZE64", path: path) { xb_block_device_size(fd, &size) }
            var logical: UInt32 = 0, physical: UInt32 = 0
            _ = try storageCall("BLKSSZGET/BLKPBSZGET", path: path) { xb_block_device_sector_sizes(fd, &logical, &physical) }
            return DiskShape(
                isBlockDevice: true, sizeBytes: size, logicalSectorSize: logical,
                physicalSectorSize: max(physical, logical),
                directIOAlignment: alignment, device: status.st_rdev)
        default:
            throw StorageError("open (neither a regular file nor a block device)", errno: ENODEV, path: path)
        }
    }

    private static func directIOAlignment(fd: Int32) -> (memory: UInt32, offset: UInt32)? {
        var memory: UInt32 = 0, offset: UInt32 = 0
        return xb_dio_alignment(fd, &memory, &offset) == 1 ? (memory, offset) : nil
    }

    // MARK: Discard

    static func discardSupport(fd: Int32, shape: DiskShape) -> DiscardSupport? {
        shape.isBlockDevice ? blockDeviceDiscardSupport(fd: fd, device: shape.device)
                            : fileDiscardSupport(fd: fd, sizeBytes: shape.sizeBytes)
    }

    /// Punching a hole past end of file (KEEP_SIZE) changes nothing but
    /// fails with EOPNOTSUPP where the file system cannot punch holes.
    private static func fileDiscardSupport(fd: Int32, sizeBytes: UInt64) -> DiscardSupport? {
        let pastEnd = (sizeBytes + UInt64(pageSize) - 1) / UInt64(pageSize) * UInt64(pageSize)
        let mode = xb_FALLOC_FL_PUNCH_HOLE | xb_FALLOC_FL_KEEP_SIZE
        guard xb_fallocate(fd, mode, Int64(pastEnd), Int64(pageSize)) == 0 else { return nil }
        return DiscardSupport(granularity: fileDiscardGranularity, alignment: 0, zeroesData: true)
    }

    /// The block layer's limits in sysfs; a granularity or maximum of 0 means
    /// no discard. discard_zeroes_data is 0 on current kernels, so zeroesData
    /// is true only if a kernel says so. Secure erase has no sysfs file: it
    /// is probed with BLKSECDISCARD given no range, which erases nothing.
    private static func blockDeviceDiscardSupport(fd: Int32, device: dev_t) -> DiscardSupport? {
        var major: UInt32 = 0, minor: UInt32 = 0
        xb_device_numbers(UInt64(device), &major, &minor)
        let directory = "/sys/dev/block/\(major):\(minor)"
        guard let granularity = readSysfsNumber("\(directory)/queue/discard_granularity"), granularity > 0,
              let maximum = readSysfsNumber("\(directory)/queue/discard_max_bytes"), maximum > 0,
              granularity <= UInt64(UInt32.max)
        else { return nil }
        let alignment = readSysfsNumber("\(directory)/discard_alignment") ?? 0
        let zeroes = readSysfsNumber("\(directory)/queue/discard_zeroes_data") == 1
        return DiscardSupport(granularity: UInt32(granularity), alignment: UInt32(truncatingIfNeeded: alignment),
                              zeroesData: zeroes, secure: xb_block_device_supports_secure_discard(fd) == 1)
    }

    static func readSysfsNumber(_ path: String) -> UInt64? {
        let fd = xb_open(path, O_RDONLY | xb_O_CLOEXEC, 0)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 64)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        let text = String(decoding: bytes[0..<count], as: UTF8.self)
        return UInt64(text.filter { !$0.isWhitespace })
    }
}

extension DiskProbe {
    /// The block layer's `max_segments` of `device` (a partition's: its
    /// disk's), from sysfs; nil when there is none (tmpfs, NFS).
    static func maxSegments(device: dev_t) -> Int? {
        var major: UInt32 = 0, minor: UInt32 = 0
        xb_device_numbers(UInt64(device), &major, &minor)
        for path in ["/sys/dev/block/\(major):\(minor)/queue/max_segments",
                     "/sys/dev/block/\(major):\(minor)/../queue/max_segments"] {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            var bytes = [UInt8](repeating: 0, count: 32)
            let count = (try? Syscall.retryingOnInterrupt("read") { read(fd, &bytes, bytes.count) }) ?? 0
            let text = String(decoding: bytes.prefix(max(0, count)), as: UTF8.self).filter(\.isNumber)
            if let value = Int(text), value > 0 { return value }
        }
        return nil
    }
}
