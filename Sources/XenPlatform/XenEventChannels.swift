import CXenStableLibs
import Glibc
import Hypervisor
import SystemSupport

/// Event channels over libxenevtchn (/dev/xen/evtchn). Every port bound
/// through this handle delivers to its file descriptor; the Linux driver
/// masks a port when it fires until `unmask` (a write of the port number to
/// the fd). libxenevtchn opens the device blocking, so the fd is switched to
/// O_NONBLOCK here: `nextPending` must never block.
public final class XenEventChannels: EventChannelHandle, @unchecked Sendable {   // one thread at a time (each data-plane thread opens its own)
    private var handle: OpaquePointer?
    public let fileDescriptor: Int32

    public init() throws(HypervisorError) {
        // A NULL logger: libxenevtchn's Linux calls log nothing themselves.
        let h: OpaquePointer
        do {
            h = try Syscall.retryingOnInterrupt("xenevtchn_open", nonNil: { xenevtchn_open(nil, 0) })
        } catch {
            throw HypervisorError(error.call, errno: error.code, detail: XenHypervisorPlatform.eventChannelDevice)
        }
        let fd = xenevtchn_fd(h)
        do throws(SystemError) {
            let flags = try Syscall.retryingOnInterrupt("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
            _ = try Syscall.retryingOnInterrupt("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        } catch {
            xenevtchn_close(h)
            throw HypervisorError(error.call, errno: error.code, detail: "cannot make the event channel fd non-blocking")
        }
        handle = h
        fileDescriptor = fd
    }

    deinit { close() }

    /// Closes the handle; the driver unbinds every port still bound through it.
    public func close() {
        guard let h = handle else { return }
        handle = nil
        xenevtchn_close(h)
    }

    private func open(_ operation: String) throws(HypervisorError) -> OpaquePointer {
        guard let h = handle else { throw HypervisorError(operation, errno: EBADF, detail: "handle closed") }
        return h
    }

    public func bindInterdomain(remoteDomain: DomID, remotePort: EventChannelPort) throws(HypervisorError) -> EventChannelPort {
        let h = try open("xenevtchn_bind_interdomain")
        let port = try xenLibraryCall("xenevtchn_bind_interdomain", detail: "dom\(remoteDomain) port \(remotePort)") {
            xenevtchn_bind_interdomain(h, UInt32(remoteDomain), remotePort)
        }
        return EventChannelPort(port)
    }

    public func unbind(_ port: EventChannelPort) throws(HypervisorError) {
        let h = try open("xenevtchn_unbind")
        _ = try xenLibraryCall("xenevtchn_unbind", detail: "port \(port)") { xenevtchn_unbind(h, port) }
    }

    public func notify(_ port: EventChannelPort) throws(HypervisorError) {
        let h = try open("xenevtchn_notify")
        _ = try xenLibraryCall("xenevtchn_notify", detail: "port \(port)") { xenevtchn_notify(h, port) }
    }

    public func nextPending() throws(HypervisorError) -> EventChannelPort? {
        let h = try open("xenevtchn_pending")
        do {
            let port = try Syscall.unlessWouldBlock { () throws(SystemError) in
                try Syscall.retryingOnInterrupt("xenevtchn_pending") { xenevtchn_pending(h) }
            }
            return port.map { EventChannelPort($0) }
        } catch {
            // EFBIG: the driver's ring of pending ports overflowed (events were lost).
            throw HypervisorError(error.call, errno: error.code)
        }
    }

    public func unmask(_ port: EventChannelPort) throws(HypervisorError) {
        let h = try open("xenevtchn_unmask")
        _ = try xenLibraryCall("xenevtchn_unmask", detail: "port \(port)") { xenevtchn_unmask(h, port) }
    }
}
