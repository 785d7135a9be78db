import Glibc

// Unix stream sockets, wrapped once: xenstore's server and client, and the
// daemon's control socket.

public enum UnixSocket {
    /// A listening, non-blocking, close-on-exec stream socket bound at `path`.
    /// A stale file at `path` (left by a server that died) is removed first.
    /// `mode`: the socket file's permissions (connecting needs write
    /// permission), set on the socket before bind so that the file never
    /// exists with looser ones; nil leaves them to the umask.
    public static func listen(at path: String, backlog: Int32 = 64, mode: mode_t? = nil) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        unlink(path)
        do throws(SystemError) {
            if let mode, fchmod(fd, mode) != 0 { throw SystemError("fchmod \(path)", errno: errno) }
            try withAddress(path) { (addr, len) throws(SystemError) in
                guard bind(fd, addr, len) == 0 else { throw SystemError("bind \(path)", errno: errno) }
            }
            guard Glibc.listen(fd, backlog) == 0 else { throw SystemError("listen \(path)", errno: errno) }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    /// A blocking, close-on-exec stream socket connected to `path`.
    public static func connect(to path: String) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        do throws(SystemError) {
            try withAddress(path) { (addr, len) throws(SystemError) in
                do throws(SystemError) {
                    try Syscall.connect(fd, addr, len)
                } catch {
                    throw SystemError("connect \(path)", errno: error.errno)
                }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    private static func withAddress(
        _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> Void
    ) throws(SystemError) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else {
            throw SystemError("socket path longer than \(capacity - 1) bytes: \(path)", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let len = socklen_t(MemoryLayout<sockaddr_un>.size)
        var result: Result<Void, SystemError> = .success(())
        withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                do throws(SystemError) { try body(sa, len) } catch { result = .failure(error) }
            }
        }
        try result.get()
    }
}

/// Writes all of `bytes` to a blocking socket; false if the peer went away.
/// MSG_NOSIGNAL: a vanished peer must not raise SIGPIPE in the whole process.
public func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let sent = bytes.withUnsafeBytes { raw in
            try? Syscall.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
        }
        guard let n = sent else { return false }
        offset += n
    }
    return true
}

