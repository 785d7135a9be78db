import Glibc
import Hypervisor
import SystemSupport
import XenABI
import XenStoreWire

/// A registered watch, as one connection asked for it.
struct Watch {
    /// The path as sent: relative, absolute or special. The initial firing reports it.
    var requestedPath: String
    /// The absolute (or special) path events are matched against.
    var absolutePath: String
    var token: String
    /// Relative watches get event paths relative to the domain's base path.
    var isRelative: Bool { requestedPath.utf8.first != UInt8(ascii: "/") && !XenStorePath.isSpecial(requestedPath) }

    func matches(_ trigger: WatchTrigger) -> Bool {
        trigger.exactOnly ? absolutePath == trigger.path : XenStorePath.isSubpath(trigger.path, of: absolutePath)
    }
}

/// Replies of an in-process connection (no socket): they land in `delivered`
/// until it holds `window` bytes, as in a socket's buffer that the peer
/// drains by taking them.
final class InProcessPipe {
    var delivered: [UInt8] = []
    let window: Int

    init(window: Int) { self.window = window }

    /// What `send` would do: takes what fits, or fails with EAGAIN when full.
    func accept(_ bytes: UnsafeRawBufferPointer) -> Int {
        let n = min(bytes.count, window - delivered.count)
        guard n > 0 else {
            errno = EAGAIN
            return -1
        }
        delivered.append(contentsOf: bytes[..<n])
        return n
    }
}

/// One client of the loopback xenstored: its socket, partial input, queued
/// output and watches. Owned by the server core (used only under its lock).
final class ClientConnection {
    let id: UInt64
    /// -1 for an in-process connection.
    let fd: Int32
    /// Set for an in-process connection (fuzzing, tests), nil for a socket.
    let pipe: InProcessPipe?
    let requester: Requester
    var decoder = XenStoreFrameDecoder()
    var watches: [Watch] = []
    /// EPOLLOUT is requested while output is queued that the socket did not take.
    var isWaitingForWritable = false

    private(set) var output: [UInt8] = []
    private var outputSent = 0


    init(id: UInt64, fd: Int32, requester: Requester) {
        self.id = id; self.fd = fd; self.pipe = nil; self.requester = requester
    }

    init(id: UInt64, pipe: InProcessPipe, requester: Requester) {
        self.id = id; self.fd = -1; self.pipe = pipe; self.requester = requester
    }

    var queuedOutputCount: Int { output.count - outputSent }
    var isOverflowing: Bool { queuedOutputCount > GuestQuota.queuedOutputBytes }

    func queue(_ message: XenStoreMessage) {
        output.append(contentsOf: message.encoded())
    }

    func queueWatchEvent(path: String, token: String) {
        let payload = XenStorePayload.terminated([path, token])
        // xenstored drops events that would not fit one message.
        guard payload.count <= XenStoreLimits.payloadMax else { return }
        queue(XenStoreMessage(.watchEvent, payload: payload))
    }

    enum FlushResult { case done, wouldBlock, failed }

    /// Writes queued output until it is all sent or the socket is full.
    func flush() -> FlushResult {
        while outputSent < output.count {
            let sent = output.withUnsafeBytes { raw in
                let rest = UnsafeRawBufferPointer(rebasing: raw[outputSent...])
                return Result { () throws(SystemError) in
                    try Syscall.unlessWouldBlock { () throws(SystemError) in
                        try Syscall.retryingOnInterrupt("send") {
                            pipe?.accept(rest) ?? Glibc.send(fd, rest.baseAddress!, rest.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                        }
                    }
                }
            }
            switch sent {
            case .success(let n?) where n > 0: outputSent += n
            case .success(nil): return .wouldBlock
            default: return .failed
            }
        }
        output.removeAll(keepingCapacity: output.capacity <= 64 * 1024)
        outputSent = 0
        return .done
    }
}
