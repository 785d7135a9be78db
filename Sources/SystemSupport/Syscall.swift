import Glibc
import SystemPackage

// System calls, made in one place: EINTR is retried here and nowhere else,
// and a failure comes back as a SystemError naming the call and its errno.
// Everything is @inlinable with non-escaping closures: the data planes call
// these on every frame and request, so they must cost no allocation or lock.

public enum Syscall {
    /// Runs `body` (a system call returning -1 and setting errno on failure)
    /// again while it fails with EINTR; any other failure throws `call` and errno.
    @inlinable @inline(__always)
    public static func retryingOnInterrupt<Result: BinaryInteger>(
        _ call: StaticString, _ body: () -> Result
    ) throws(SystemError) -> Result {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = Glibc.errno
            if code != EINTR { throw SystemError(call.description, errno: code) }
        }
    }

    /// For calls that return NULL and set errno on failure (a library's
    /// open): the value, EINTR retried, any other failure thrown.
    @inlinable @inline(__always)
    public static func retryingOnInterrupt<Value>(
        _ call: StaticString, nonNil body: () -> Value?
    ) throws(SystemError) -> Value {
        while true {
            if let value = body() { return value }
            let code = Glibc.errno
            if code != EINTR { throw SystemError(call.description, errno: code) }
        }
    }

    /// `body`'s result, or nil when it failed with EAGAIN/EWOULDBLOCK (a
    /// non-blocking descriptor with nothing now); other failures are rethrown.
    @inlinable @inline(__always)
    public static func unlessWouldBlock<Result>(_ body: () throws(SystemError) -> Result) throws(SystemError) -> Result? {
        do {
            return try body()
        } catch where error.isWouldBlock {
            return nil
        }
    }

    // MARK: Thin wrappers for the calls the code makes often

    @inlinable @inline(__always)
    public static func read(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int) throws(SystemError) -> Int {
        try retryingOnInterrupt("read") { Glibc.read(fd, buffer, count) }
    }

    @inlinable @inline(__always)
    public static func write(_ fd: Int32, _ buffer: UnsafeRawPointer?, _ count: Int) throws(SystemError) -> Int {
        try retryingOnInterrupt("write") { Glibc.write(fd, buffer, count) }
    }

    @inlinable @inline(__always)
    public static func readv(_ fd: Int32, _ vectors: UnsafeBufferPointer<iovec>) throws(SystemError) -> Int {
        try retryingOnInterrupt("readv") { Glibc.readv(fd, vectors.baseAddress, Int32(vectors.count)) }
    }

    @inlinable @inline(__always)
    public static func writev(_ fd: Int32, _ vectors: UnsafeBufferPointer<iovec>) throws(SystemError) -> Int {
        try retryingOnInterrupt("writev") { Glibc.writev(fd, vectors.baseAddress, Int32(vectors.count)) }
    }

    @inlinable @inline(__always)
    public static func recv(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int, _ flags: Int32 = 0) throws(SystemError) -> Int {
        try retryingOnInterrupt("recv") { Glibc.recv(fd, buffer, count, flags) }
    }

    @inlinable @inline(__always)
    public static func send(_ fd: Int32, _ buffer: UnsafeRawPointer?, _ count: Int, _ flags: Int32 = 0) throws(SystemError) -> Int {
        try retryingOnInterrupt("send") { Glibc.send(fd, buffer, count, flags) }
    }

    /// poll(2); the number of ready entries (0 on timeout). An interrupted
    /// poll is called again with the whole timeout.
    @inlinable @inline(__always)
    public static func poll(_ fds: UnsafeMutablePointer<pollfd>, _ count: Int, timeoutMilliseconds: Int32) throws(SystemError) -> Int {
        Int(try retryingOnInterrupt("poll") { Glibc.poll(fds, nfds_t(count), timeoutMilliseconds) })
    }

    /// accept(2) without the peer's address; ECONNABORTED (a peer that left
    /// the queue before we took it) is tried again like EINTR.
    @inlinable
    public static func accept(_ listener: Int32) throws(SystemError) -> Int32 {
        while true {
            do {
                return try retryingOnInterrupt("accept") { Glibc.accept(listener, nil, nil) }
            } catch where error.errno == .connectionAbort {
                continue
            }
        }
    }

    @inlinable
    public static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) throws(SystemError) {
        _ = try retryingOnInterrupt("connect") { Glibc.connect(fd, address, length) }
    }

    /// waitpid(2): the child's pid (0 with WNOHANG and nothing to reap) and its status.
    @inlinable
    public static func waitpid(_ pid: pid_t, options: Int32 = 0) throws(SystemError) -> (pid: pid_t, status: Int32) {
        var status: Int32 = 0
        let reaped = try retryingOnInterrupt("waitpid") { Glibc.waitpid(pid, &status, options) }
        return (reaped, status)
    }
}
