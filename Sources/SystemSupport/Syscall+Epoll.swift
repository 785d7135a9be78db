import CXenBackSupport

// epoll through CXenBackSupport's C shims (as the rest of the code reaches
// it), made through Syscall like every other call.

extension Syscall {
    /// A close-on-exec epoll instance.
    @inlinable
    public static func epollCreate() throws(SystemError) -> Int32 {
        try retryingOnInterrupt("epoll_create") { xb_epoll_create() }
    }

    /// Watches `fd` for `events`; `token` comes back with its readiness.
    @inlinable
    public static func epollAdd(_ epoll: Int32, _ fd: Int32, events: UInt32, token: UInt64) throws(SystemError) {
        _ = try retryingOnInterrupt("epoll_ctl") { xb_epoll_add(epoll, fd, events, token) }
    }
}
