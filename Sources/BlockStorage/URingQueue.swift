import CLibURing
import CXenBackSupport
import Glibc
import SystemSupport

/// io_uring: one submission entry per queued operation (`readv`, `writev`,
/// `fsync` with DATASYNC; the slot is its tag), one `io_uring_submit` per
/// batch, completions read from the shared completion ring with no system
/// call.
///
/// The storage's descriptor is an epoll over the ring's own descriptor,
/// readable while the completion ring holds entries and quiet again once
/// they are reaped, and an eventfd for completions that are not the
/// kernel's (operations finished at submit time, entries the kernel did not
/// take), read only after it was signalled. An eventfd registered with the
/// ring instead would be signalled by every completion and cost a `read` to
/// clear before each sleep: a system call per batch on storage that
/// finishes inside the submission (a RAM disk, the page cache), which a PV
/// dom0 pays through Xen.
///
/// Memory: a ring of `depth` entries (and twice that many completion
/// entries, so it cannot overflow with at most `depth` in flight) is about
/// 16 KiB at 128, charged to the memory cgroup and not to RLIMIT_MEMLOCK
/// (Linux ≥ 5.12); no fixed buffers are registered (docs/PERFORMANCE.md says
/// why). Nothing is charged against `fs.aio-max-nr`.
final class URingQueue: KernelQueue {
    let engine = IOEngine.ioUring
    private let depth: Int
    private let completions: Wakeup
    /// Watches the ring's descriptor and `completions`.
    private let pollFD: Int32
    /// `completions` has been signalled since it was last read.
    private var signalled = false
    private var ring: OpaquePointer?
    /// Entries queued since the last submission.
    private var queuedCount = 0
    /// Completions copied out of the ring before their handlers run, so a
    /// handler's submission never shares the ring with unread entries.
    private let finishedSlots: UnsafeMutablePointer<UInt64>
    private let finishedResults: UnsafeMutablePointer<Int64>

    static func make(depth: Int) throws(KernelQueueSetupError) -> URingQueue {
        let completions: Wakeup
        do throws(SystemError) { completions = try Wakeup() } catch {
            throw KernelQueueSetupError(call: error.call, errno: error.code)
        }
        var ring: OpaquePointer?
        var failedCall: UnsafePointer<CChar>?
        let result = xb_uring_open(UInt32(depth), -1, &ring, &failedCall)
        guard result == 0, let ring else {
            completions.close()
            let call = failedCall.map { String(cString: $0) } ?? "io_uring_queue_init"
            throw KernelQueueSetupError(call: "\(call)(\(depth))", errno: -result)
        }
        let pollFD: Int32
        do throws(SystemError) {
            pollFD = try Syscall.epollCreate()
            do throws(SystemError) {
                try Syscall.epollAdd(pollFD, xb_uring_fd(ring), events: xb_EPOLLIN, token: 0)
                try Syscall.epollAdd(pollFD, completions.fd, events: xb_EPOLLIN, token: 1)
            } catch {
                Glibc.close(pollFD)
                throw error
            }
        } catch {
            xb_uring_close(ring)
            completions.close()
            throw KernelQueueSetupError(call: error.call, errno: error.code)
        }
        return URingQueue(depth: depth, completions: completions, pollFD: pollFD, ring: ring)
    }

    private init(depth: Int, completions: Wakeup, pollFD: Int32, ring: OpaquePointer) {
        self.depth = depth
        self.completions = completions
        self.pollFD = pollFD
        self.ring = ring
        finishedSlots = .allocate(capacity: depth)
        finishedSlots.initialize(repeating: 0, count: depth)
        finishedResults = .allocate(capacity: depth)
        finishedResults.initialize(repeating: 0, count: depth)
    }

    deinit {
        close()
        finishedSlots.deallocate()
        finishedResults.deallocate()
    }

    func close() {
        guard let ring else { return }
        xb_uring_close(ring)
        self.ring = nil
        Glibc.close(pollFD)
        completions.close()
    }

    var completionFileDescriptor: Int32 { pollFD }

    func signal() {
        completions.signal()
        signalled = true
    }

    /// Reaping the completion ring is what quiets the ring's descriptor.
    func clearSignal() {
        guard signalled else { return }
        signalled = false
        completions.drain()
    }

    // The submission queue has `depth` entries and the storage never has
    // more than `depth` operations taken, so an entry is always free.

    func queueRead(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64) {
        let queued = xb_uring_queue_readv(ring, UInt64(slot), fd, iovecs, UInt32(count), offset)
        precondition(queued == 0, "io_uring submission queue full")
        queuedCount += 1
    }

    func queueWrite(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64) {
        let queued = xb_uring_queue_writev(ring, UInt64(slot), fd, iovecs, UInt32(count), offset)
        precondition(queued == 0, "io_uring submission queue full")
        queuedCount += 1
    }

    func queueFlush(slot: Int, fd: Int32) {
        let queued = xb_uring_queue_fdatasync(ring, UInt64(slot), fd)
        precondition(queued == 0, "io_uring submission queue full")
        queuedCount += 1
    }

    /// Every queued entry is in the shared submission ring and the kernel
    /// takes it sooner or later, so the whole batch is accepted; an entry
    /// the kernel refuses completes with its error. What the kernel did not
    /// take now (short of memory, or interrupted) stays in the ring: the
    /// queue signals itself so that a reap comes and submits it again.
    func submitQueued() -> (accepted: Int, refusal: Int32) {
        let count = queuedCount
        queuedCount = 0
        guard count > 0 else { return (0, 0) }
        submit()
        return (count, 0)
    }

    private func submit() {
        if xb_uring_submit(ring) > 0 { signal() }
    }

    func reap(_ body: (Int, Int64) -> Void) -> Int {
        if xb_uring_unsubmitted(ring) > 0 { submit() }
        var reaped = 0
        while true {
            let count = Int(xb_uring_reap(ring, finishedSlots, finishedResults, UInt32(depth)))
            guard count > 0 else { return reaped }
            for index in 0..<count { body(Int(finishedSlots[index]), finishedResults[index]) }
            reaped += count
        }
    }
}
