import Glibc
import SystemSupport

/// What the daemon holds, seen from /proc (found through SO_PEERCRED on its
/// control socket): whatever a guest does, its descriptors and threads must
/// not grow while the same devices are connected.
struct DaemonFootprint: CustomStringConvertible {
    var descriptors: Int
    /// The daemon's own threads: without io_uring's workers (`iou-wrk-N`),
    /// which the kernel starts for operations that would block and ends
    /// after 5 s idle, at most XB_URING_MAX_WORKERS per ring and kind.
    var threads: Int
    var ioUringWorkers: Int
    var residentKB: Int

    /// The process serving the control socket at `socket`.
    static func daemonPID(socket: String) throws -> pid_t {
        let fd = try UnixSocket.connect(to: socket)
        defer { close(fd) }
        // struct ucred (pid, uid, gid), which Glibc's module does not export.
        var credentials: (pid: pid_t, uid: uid_t, gid: gid_t) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: credentials))
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else {
            throw SystemError("getsockopt(SO_PEERCRED)", errno: errno)
        }
        return credentials.pid
    }

    init?(pid: pid_t) {
        guard let dir = opendir("/proc/\(pid)/fd") else { return nil }
        var n = 0
        while let entry = readdir(dir) { if entry.pointee.d_name.0 != UInt8(ascii: ".") { n += 1 } }
        closedir(dir)
        descriptors = n
        threads = 0
        ioUringWorkers = 0
        residentKB = 0
        if let tasks = opendir("/proc/\(pid)/task") {
            while let entry = readdir(tasks) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard !name.hasPrefix("."),
                      let comm = try? String(contentsOfProcFile: "/proc/\(pid)/task/\(name)/comm") else { continue }
                if comm.hasPrefix("iou-wrk-") { ioUringWorkers += 1 }
            }
            closedir(tasks)
        }
        guard let status = try? String(contentsOfProcFile: "/proc/\(pid)/status") else { return nil }
        for line in status.split(separator: "\n") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.first == "Threads:", fields.count > 1 { threads = (Int(fields[1]) ?? 0) - ioUringWorkers }
            if fields.first == "VmRSS:", fields.count > 1 { residentKB = Int(fields[1]) ?? 0 }
        }
    }

    var description: String {
        "\(descriptors) descriptors, \(threads) threads"
            + (ioUringWorkers > 0 ? " (+\(ioUringWorkers) io_uring workers)" : "") + ", \(residentKB / 1024) MB resident"
    }
}

extension String {
    /// A /proc file's text (its size says 0, so read to the end).
    init(contentsOfProcFile path: String) throws {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        self = String(decoding: bytes, as: UTF8.self)
    }
}
