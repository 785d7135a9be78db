import Glibc
import SystemSupport
import Hypervisor

// Small POSIX helpers shared by the loopback xenstored and the socket client.
// `package` access: internal to this SwiftPM package, not part of the wire API.

package enum UnixSocket {
    /// A listening, non-blocking, close-on-exec stream socket bound at `path`.
    /// A stale file at `path` (left by a server that died) is removed first.
    package static func listen(at path: String, backlog: Int32 = 64) throws(XenStoreError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw XenStoreError(errno: errno, context: "socket") }
        unlink(path)
        do throws(XenStoreError) {
            try withAddress(path) { (addr, len) throws(XenStoreError) in
                guard bind(fd, addr, len) == 0 else { throw XenStoreError(errno: errno, context: "bind \(path)") }
            }
            guard Glibc.listen(fd, backlog) == 0 else { throw XenStoreError(errno: errno, context: "listen \(path)") }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    /// A blocking, close-on-exec stream socket connected to `path`.
    package static func connect(to path: String) throws(XenStoreError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw XenStoreError(errno: errno, context: "socket") }
        do throws(XenStoreError) {
            try withAddress(path) { (addr, len) throws(XenStoreError) in
                var rc: Int32
                repeat { rc = Glibc.connect(fd, addr, len) } while rc != 0 && errno == EINTR
                guard rc == 0 else { throw XenStoreError(errno: errno, context: "connect \(path)") }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    private static func withAddress(
        _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(XenStoreError) -> Void
    ) throws(XenStoreError) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else {
            throw XenStoreError(errno: ENAMETOOLONG, context: "socket path longer than \(capacity - 1) bytes: \(path)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let len = socklen_t(MemoryLayout<sockaddr_un>.size)
        var result: Result<Void, XenStoreError> = .success(())
        withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                do throws(XenStoreError) { try body(sa, len) } catch { result = .failure(error) }
            }
        }
        try result.get()
    }
}

/// Writes all of `bytes` to a blocking socket; false if the peer went away.
/// MSG_NOSIGNAL: a vanished peer must not raise SIGPIPE in the whole process.
package func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { raw in
            send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
        }
        if n < 0 {
            if errno == EINTR { continue }
            return false
        }
        offset += n
    }
    return true
}

package extension NativeThread {
    /// A thread for xenstore's loops, failing as a xenstore error.
    static func forXenStore(name: String, _ body: @escaping @Sendable () -> Void) throws(XenStoreError) -> NativeThread {
        do { return try NativeThread(name: name, body) } catch {
            throw XenStoreError(errno: error.errno, context: "pthread_create")
        }
    }
}
