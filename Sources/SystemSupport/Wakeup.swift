import CXenBackSupport
import Glibc

/// An eventfd that wakes a thread's poll/epoll loop from other threads.
public struct Wakeup: Sendable {
    public let fd: Int32

    public init() throws(SystemError) {
        fd = xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC)
        guard fd >= 0 else { throw SystemError("eventfd", errno: errno) }
    }

    /// Wraps a non-blocking eventfd made elsewhere (its owner closes it).
    public init(adopting fd: Int32) { self.fd = fd }

    public func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    /// Resets the counter (after the poller woke).
    public func drain() {
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
    }

    public func close() { Glibc.close(fd) }
}

/// `mkdir -p`: creates `path` and its missing parents.
public func makeDirectories(_ path: String, mode: mode_t = 0o755) throws(SystemError) {
    var prefix = path.hasPrefix("/") ? "" : "."
    for part in path.split(separator: "/") {
        prefix += "/" + part
        if mkdir(prefix, mode) != 0 && errno != EEXIST {
            throw SystemError("mkdir \(prefix)", errno: errno)
        }
    }
}
