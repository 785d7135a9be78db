import Glibc

/// A third party's view of a disk's bytes, sharing no code with the storage
/// under test: what tests compare the guest's acknowledged writes with.
public protocol DiskContentReader {
    func read(offset: UInt64, length: Int) throws -> [UInt8]
    func checksum(offset: UInt64, length: Int) throws -> UInt64
}

extension NBDReader: DiskContentReader {}

/// An RBD image's bytes as `rbd export` (Ceph's own tool) writes them to a
/// file at the moment it runs; read from that file.
public final class RBDExportReader: DiskContentReader {
    public let path: String
    public let size: UInt64

    public init(cluster: CephCluster, image: String) throws {
        path = cluster.directory + "/export-\(image)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try cluster.rbd(["export", "--no-progress", "\(cluster.pool)/\(image)", path], timeout: 120)
        var status = stat()
        guard stat(path, &status) == 0 else { throw CephClusterError("rbd export wrote no \(path)") }
        size = UInt64(status.st_size)
    }

    deinit { unlink(path) }

    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        guard offset + UInt64(length) <= size else { throw CephClusterError("read past the export's \(size) bytes") }
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw CephClusterError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: length)
        let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(offset)) }
        guard got == length else { throw CephClusterError("short read of \(path)") }
        return bytes
    }

    public func checksum(offset: UInt64, length: Int) throws -> UInt64 { fnv1a64(try read(offset: offset, length: length)) }
}
