import CXenBackSupport
import Glibc
import SystemSupport
import Hypervisor
import XenABI
import XenStoreWire

/// The socket of a XenStoreSocketClient and its reader thread: replies are
/// filed by req_id for the threads waiting on them, watch events are queued
/// and signalled on an eventfd.
final class ClientChannel: @unchecked Sendable {  // mutable state below is guarded by `condition`; `fd` and `eventFD` never change
    let fd: Int32
    /// Readable while `events` is not empty (or once the connection is lost).
    let eventFD: Int32
    private let condition = Condition()
    private var replies: [UInt32: XenStoreMessage] = [:]
    private var events: [XenStoreWatchEvent] = []
    private var eventsHead = 0
    private var isClosed = false
    private var lastRequestID: UInt32 = 0

    init(fd: Int32) throws(XenStoreError) {
        let eventFD: Int32
        do {
            eventFD = try Syscall.retryingOnInterrupt("eventfd") { xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC) }
        } catch {
            throw XenStoreError(errno: error.code, context: error.call)
        }
        self.fd = fd
        self.eventFD = eventFD
    }

    deinit {
        Glibc.close(fd)
        Glibc.close(eventFD)
    }

    // MARK: Requests (any thread)

    /// Sends a request and waits for the reply with its req_id.
    func exchange(_ request: XenStoreMessage) throws(XenStoreError) -> XenStoreMessage {
        var message = request
        // The id is taken and the frame written under the lock, so frames never interleave.
        let sent = condition.withLock { () -> Bool in
            guard !isClosed else { return false }
            lastRequestID &+= 1
            message.requestID = lastRequestID
            return sendAll(fd, message.encoded())
        }
        guard sent else { throw XenStoreError(errno: XenStoreError.io, context: "xenstore connection lost") }
        return try condition.withLock { () throws(XenStoreError) -> XenStoreMessage in
            while true {
                if let reply = replies.removeValue(forKey: message.requestID) { return reply }
                if isClosed { throw XenStoreError(errno: XenStoreError.io, context: "xenstore connection lost") }
                condition.wait()
            }
        }
    }

    /// The oldest queued watch event; nil if none. Throws once the connection is lost and the queue is empty.
    func nextEvent() throws(XenStoreError) -> XenStoreWatchEvent? {
        try condition.withLock { () throws(XenStoreError) -> XenStoreWatchEvent? in
            guard eventsHead < events.count else {
                if isClosed { throw XenStoreError(errno: XenStoreError.io, context: "xenstore connection lost") }
                return nil
            }
            let event = events[eventsHead]
            eventsHead += 1
            if eventsHead == events.count {
                events.removeAll(keepingCapacity: true)
                eventsHead = 0
                var count: UInt64 = 0
                _ = read(eventFD, &count, 8)  // empty again: no longer readable
            }
            return event
        }
    }

    /// Ends the connection: the reader thread sees end of stream and exits.
    func shutDown() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    // MARK: Reader thread

    func readUntilClosed() {
        xb_set_thread_name("xenstore-client")
        var decoder = XenStoreFrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        reading: while true {
            let received = buffer.withUnsafeMutableBytes { raw in try? Syscall.recv(fd, raw.baseAddress!, raw.count) }
            guard let n = received, n > 0 else { break }   // closed, or failed
            buffer.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
            do {
                while let message = try decoder.nextMessage() { deliver(message) }
            } catch {
                break reading  // the stream cannot be framed any more
            }
        }
        condition.withLock {
            isClosed = true
            signalEventFD()  // wake pollers so that they learn the connection is gone
            condition.broadcast()
        }
    }

    private func deliver(_ message: XenStoreMessage) {
        condition.withLock {
            if message.type == .watchEvent {
                let strings = XenStorePayload.strings(message.payload)
                guard strings.count >= 2 else { return }
                if eventsHead == events.count { signalEventFD() }
                events.append(XenStoreWatchEvent(path: strings[XenStoreLimits.watchPathIndex],
                                                 token: strings[XenStoreLimits.watchTokenIndex]))
            } else {
                replies[message.requestID] = message
                condition.broadcast()
            }
        }
    }

    private func signalEventFD() {
        var one: UInt64 = 1
        _ = write(eventFD, &one, 8)
    }
}
