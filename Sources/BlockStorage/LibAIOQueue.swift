import CLibAIO
import Glibc
import SystemSupport

/// Linux AIO (libaio): one iocb per slot, one `io_submit` per batch, events
/// read from the context's shared ring in user space, as fio's
/// `userspace_reap` does (libaio's `io_getevents` enters the kernel whenever
/// the ring holds events: a system call per batch, which a PV dom0 pays
/// through Xen). Each `io_setup` charges its depth against the host's
/// `fs.aio-max-nr`.
final class LibAIOQueue: KernelQueue {
    let engine = IOEngine.libaio
    private let depth: Int
    private let completions: Wakeup
    private var context: io_context_t?
    private let iocbs: UnsafeMutablePointer<iocb>
    /// The iocb pointer list handed to io_submit.
    private let submitList: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
    private var queuedCount = 0
    private let events: UnsafeMutablePointer<io_event>
    /// The ring has the layout we read (else `io_getevents` reaps).
    let reapsInUserSpace: Bool

    static func make(depth: Int) throws(KernelQueueSetupError) -> LibAIOQueue {
        let completions: Wakeup
        do throws(SystemError) { completions = try Wakeup() } catch {
            throw KernelQueueSetupError(call: error.call, errno: error.code)
        }
        var context: io_context_t?
        let result = io_setup(Int32(depth), &context)
        guard result == 0 else {
            completions.close()
            throw KernelQueueSetupError(call: "io_setup(\(depth))", errno: -result)
        }
        return LibAIOQueue(depth: depth, completions: completions, context: context)
    }

    private init(depth: Int, completions: Wakeup, context: io_context_t?) {
        self.depth = depth
        self.completions = completions
        self.context = context
        reapsInUserSpace = xb_aio_ring_usable(context) != 0
        iocbs = .allocate(capacity: depth)
        iocbs.initialize(repeating: iocb(), count: depth)
        submitList = .allocate(capacity: depth)
        submitList.initialize(repeating: nil, count: depth)
        events = .allocate(capacity: depth)
        events.initialize(repeating: io_event(), count: depth)
    }

    deinit {
        close()
        iocbs.deallocate()
        submitList.deallocate()
        events.deallocate()
    }

    /// Events the context's ring holds (0 when it is not read in user space).
    var ringEntries: Int { reapsInUserSpace ? Int(xb_aio_ring_entries(context)) : 0 }

    func close() {
        guard let context else { return }
        io_destroy(context)
        self.context = nil
        completions.close()
    }

    /// Every operation signals the eventfd when it completes.
    var completionFileDescriptor: Int32 { completions.fd }

    func signal() { completions.signal() }

    func clearSignal() { completions.drain() }

    func queueRead(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64) {
        io_prep_preadv(iocbs + slot, fd, iovecs, count, Int64(offset))
        enqueue(slot)
    }

    func queueWrite(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64) {
        io_prep_pwritev(iocbs + slot, fd, iovecs, count, Int64(offset))
        enqueue(slot)
    }

    func queueFlush(slot: Int, fd: Int32) {
        io_prep_fdsync(iocbs + slot, fd)
        enqueue(slot)
    }

    private func enqueue(_ slot: Int) {
        io_set_eventfd(iocbs + slot, completions.fd)
        submitList[queuedCount] = iocbs + slot
        queuedCount += 1
    }

    func submitQueued() -> (accepted: Int, refusal: Int32) {
        let count = queuedCount
        queuedCount = 0
        guard count > 0 else { return (0, 0) }
        let result = io_submit(context, count, submitList)
        if result >= 0 { return (Int(result), 0) }
        return (0, result == -EAGAIN ? 0 : -result)
    }

    func reap(_ body: (Int, Int64) -> Void) -> Int {
        guard let context else { return 0 }
        var noWait = timespec(tv_sec: 0, tv_nsec: 0)
        var reaped = 0
        while true {
            var count = reapsInUserSpace ? Int(xb_aio_ring_reap(context, events, Int32(depth))) : -1
            if count < 0 { count = Int(io_getevents(context, 0, depth, events, &noWait)) }
            guard count > 0 else { return reaped }
            for index in 0..<count {
                let event = events[index]
                body(iocbs.distance(to: event.obj), Int64(Int(bitPattern: event.res)))
            }
            reaped += count
        }
    }
}
