import Glibc
import SystemSupport

/// How a queue's engine hands a frame for the guest to the queue the
/// guest's hash table names (netif.h's SET_HASH_MAPPING), when the kernel
/// gave it to another TAP queue, and takes the frames other queues handed
/// it. Frames are whole, virtio-net header first. Every call is
/// non-blocking.
public protocol RxSteering: AnyObject {
    /// The vif's queues.
    var queues: Int { get }
    /// False when `queue`'s inbox is full (the frame is dropped, counted).
    func forward(_ frame: UnsafeRawPointer, length: Int, to queue: Int) -> Bool
    /// One frame another queue handed this one, or nil.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int?
}

/// The inboxes of one vif's queues: an AF_UNIX datagram socket pair per
/// queue. Any queue's thread sends into a pair's one end (a datagram is one
/// frame, written whole); the owner reads the other end, which its loop
/// polls beside its TAP queue. The kernel buffers, orders and wakes; no
/// lock, no allocation per frame.
public final class RxSteeringInboxes: @unchecked Sendable {   // descriptors fixed after init; the kernel serialises sends
    public let queues: Int
    /// [q]: the end queue q reads, the end others send to.
    private let pairs: [(read: Int32, send: Int32)]

    /// Inbox room: enough for a few maximum-size frames per queue.
    static let bufferBytes: Int32 = 1 << 20

    public init(queues: Int) throws(SystemError) {
        self.queues = queues
        var made: [(read: Int32, send: Int32)] = []
        for _ in 0..<queues {
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
                             0, &fds) == 0 else {
                let error = SystemError("socketpair", errno: errno)
                for p in made { close(p.read); close(p.send) }
                throw error
            }
            var size = Self.bufferBytes
            setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            made.append((fds[0], fds[1]))
        }
        pairs = made
    }

    deinit { for p in pairs { close(p.read); close(p.send) } }

    /// Queue `queue`'s view: what its engine and loop use.
    public func queue(_ queue: Int) -> QueueSteering { QueueSteering(inboxes: self, queue: queue) }

    func inboxDescriptor(_ queue: Int) -> Int32 { pairs[queue].read }

    func send(_ frame: UnsafeRawPointer, length: Int, to queue: Int) -> Bool {
        guard queue >= 0, queue < queues else { return false }
        return (try? Syscall.send(pairs[queue].send, frame, length, Int32(MSG_DONTWAIT))) != nil
    }

    func receive(_ queue: Int, into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        let n = try? Syscall.unlessWouldBlock { () throws(SystemError) -> Int in
            try Syscall.recv(pairs[queue].read, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
        }
        return n ?? nil
    }
}

/// One queue's side of the vif's inboxes.
public final class QueueSteering: RxSteering {
    private let inboxes: RxSteeringInboxes
    public let queue: Int
    init(inboxes: RxSteeringInboxes, queue: Int) { self.inboxes = inboxes; self.queue = queue }
    public var queues: Int { inboxes.queues }
    /// The descriptor the queue's loop polls for frames handed to it.
    public var inboxDescriptor: Int32 { inboxes.inboxDescriptor(queue) }
    public func forward(_ frame: UnsafeRawPointer, length: Int, to queue: Int) -> Bool {
        inboxes.send(frame, length: length, to: queue)
    }
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        inboxes.receive(queue, into: buffer)
    }
}
