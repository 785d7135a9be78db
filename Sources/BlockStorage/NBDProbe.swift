import CLibNBD
import CXenBackSupport
import Glibc
import SystemSupport

/// One NBD handshake with a time limit: libnbd's blocking connect has none,
/// and a server that accepts and never answers must not hold a hotplug
/// script past its deadline. Used by `DiskTarget.probe`.
enum NBDProbe {
    static func handshake(_ address: NBDAddress, timeout: Double) throws(DiskTargetError) -> NBDServerFeatures {
        let name = address.normalized
        guard let handle = nbd_create() else { throw .nbdUnreachable(export: name, detail: libnbdMessage()) }
        defer { nbd_close(handle) }
        if address.tls && nbd_supports_tls(handle) != 1 { throw .nbdTLSUnavailable(export: name) }
        let started: Int32
        switch (address.uri, address.transport) {
        case (let uri?, _):
            started = NBDStorage.allowLocalFiles(handle) == 0 ? nbd_aio_connect_uri(handle, uri) : -1
        case (nil, .tcp(let host, let port)):
            started = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_aio_connect_tcp(handle, host, port) : -1
        case (nil, .unix(let path)):
            started = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_aio_connect_unix(handle, path) : -1
        }
        guard started == 0 else { throw .nbdUnreachable(export: name, detail: libnbdMessage()) }

        let deadline = MonotonicClock.seconds() + timeout
        while nbd_aio_is_ready(handle) != 1 {
            if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 {
                throw .nbdUnreachable(export: name, detail: libnbdMessage())
            }
            let left = deadline - MonotonicClock.seconds()
            guard left > 0 else { throw .nbdTimedOut(export: name, seconds: timeout) }
            let fd = nbd_aio_get_fd(handle)
            guard fd >= 0 else { throw .nbdUnreachable(export: name, detail: libnbdMessage()) }
            let direction = nbd_aio_get_direction(handle)
            var events: Int16 = 0
            if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
            if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
            var entry = pollfd(fd: fd, events: events, revents: 0)
            let ready: Int
            do {
                ready = try Syscall.poll(&entry, 1, timeoutMilliseconds: Int32(min(left * 1000 + 1, 1000)))
            } catch {
                throw .nbdUnreachable(export: name, detail: "\(error)")
            }
            guard ready > 0 else { continue }
            // An error or hang-up is read as such by libnbd's state machine.
            if entry.revents & Int16(POLLIN | POLLERR | POLLHUP) != 0 { _ = nbd_aio_notify_read(handle) }
            if entry.revents & Int16(POLLOUT) != 0 { _ = nbd_aio_notify_write(handle) }
        }
        let features = NBDStorage.readFeatures(handle)
        guard features.sizeBytes != UInt64.max else { throw .nbdUnreachable(export: name, detail: libnbdMessage()) }
        return features
    }

    private static func libnbdMessage() -> String {
        let message = nbd_get_error().map { String(cString: $0) } ?? ""
        return message.isEmpty ? "libnbd error \(nbd_get_errno())" : message
    }
}
