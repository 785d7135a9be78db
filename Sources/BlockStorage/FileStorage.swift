import CXenBackSupport
import Glibc
import SystemSupport

/// A regular file or a block device (loop device, LVM volume, partition)
/// behind a block backend, driven through io_uring or Linux AIO (libaio):
/// `ioEngine`, chosen at open (`IOEngineChoice`).
///
/// - Reads are `preadv`, writes `pwritev`, flushes `fdatasync` (libaio
///   iocbs or io_uring entries, one submission per batch), all making
///   `completionFileDescriptor` readable (libaio's eventfd; with io_uring an
///   epoll over the ring, quiet again once its completions are reaped).
/// - Discards run synchronously at submit time (hole punch for files,
///   BLKDISCARD for devices) and complete through the same path, as does a
///   flush when the kernel refuses an asynchronous fsync (EINVAL).
/// - Operations that cannot be done complete with a negative errno:
///   -EINVAL past the end of the disk, -EROFS for a write or discard on a
///   read-only disk, -EOPNOTSUPP for a discard the disk does not support.
/// - Short transfers: a short write is -EIO; a short read that stops at the
///   file's current end (the file shrank after open) is completed with zeros
///   and counts as a full read, like a sparse tail; any other short read is -EIO.
/// - In buffered mode (`directIO == false`) the kernel performs libaio's
///   I/O synchronously inside `submit`; io_uring hands what would block
///   to its own worker threads.
///
/// Opened on a control thread, then used by one data-plane thread only.
public final class FileStorage: BlockStorage, @unchecked Sendable {
    public let path: String
    /// O_DIRECT is in use (otherwise the page cache).
    public let directIO: Bool
    public let isBlockDevice: Bool
    public private(set) var geometry: StorageGeometry
    public let queueDepth: Int
    public var completionFileDescriptor: Int32 { queue.completionFileDescriptor }
    /// The kernel interface in use.
    public var ioEngine: IOEngine { queue.engine }
    public var ioEngineName: String? { queue.engine.rawValue }
    /// With io_uring, the device's `max_segments`: a larger operation is a
    /// bio the block layer must split, which io_uring cannot issue without
    /// blocking, so it hands the whole operation to a worker thread
    /// (measured: 1 MiB reads on a loop device, docs/PERFORMANCE.md).
    /// libaio blocks in io_submit instead: no limit.
    public let maxIovecsPerOperation: Int?
    /// Why `.auto` fell back to libaio (io_uring's setup call and its
    /// error), nil when it did not.
    public let ioUringRefusal: String?
    /// Flushes run as a synchronous fdatasync because the kernel refused an
    /// asynchronous one. Settable internally so tests can force the path.
    public internal(set) var synchronousFlush = false

    private let fd: Int32
    private let queue: any KernelQueue
    private var closed = false

    // Everything below is allocated at open: one entry per queue slot.
    private let slots: UnsafeMutablePointer<OperationSlot>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeSlotCount: Int
    /// Slots taken by the current `submit`, in operation order.
    private let batchSlots: UnsafeMutablePointer<Int32>
    /// Slots completed at submit time, waiting to be reaped (FIFO).
    private var finished: SlotQueue

    public static func open(path: String, readOnly: Bool, queueDepth: Int, direct: DirectIOMode = .auto,
                            engine: IOEngineChoice = .auto) throws(StorageError) -> FileStorage {
        guard queueDepth >= 1, queueDepth <= Int(Int32.max) else {
            throw StorageError("open (queue depth \(queueDepth))", errno: EINVAL, path: path)
        }
        let disk = try DiskProbe.openDisk(path: path, readOnly: readOnly, direct: direct)
        return try FileStorage(opened: disk, path: path, queueDepth: queueDepth, engine: engine)
    }

    /// The same file again, through this handle's descriptor (so it is the
    /// very file even if its path was renamed or replaced since), with the
    /// same mode, O_DIRECT choice and engine, and a kernel queue of its own.
    /// One file's fdatasync covers every descriptor's writes.
    public func openAnotherQueue() throws -> (any BlockStorage)? {
        let disk = try DiskProbe.openDisk(path: "/proc/self/fd/\(fd)", readOnly: geometry.readOnly,
                                          direct: directIO ? .always : .never)
        return try FileStorage(opened: disk, path: path, queueDepth: queueDepth,
                               engine: ioEngine == .ioUring ? .ioUring : .libaio)
    }

    private convenience init(opened disk: OpenedDisk, path: String, queueDepth: Int,
                             engine: IOEngineChoice) throws(StorageError) {
        var refusal: String?
        let queue: any KernelQueue
        do throws(KernelQueueSetupError) {
            switch engine {
            case .ioUring:
                queue = try URingQueue.make(depth: queueDepth)
            case .libaio:
                queue = try LibAIOQueue.make(depth: queueDepth)
            case .auto where !disk.isBlockDevice && Self.isOnTmpfs(disk.fd):
                queue = try LibAIOQueue.make(depth: queueDepth)
            case .auto:
                do throws(KernelQueueSetupError) {
                    queue = try URingQueue.make(depth: queueDepth)
                } catch {
                    refusal = "\(error.call): \(String(cString: strerror(error.errno)))"
                    queue = try LibAIOQueue.make(depth: queueDepth)
                }
            }
        } catch {
            Glibc.close(disk.fd)
            throw StorageError(error.call, errno: error.errno, path: path)
        }
        self.init(path: path, disk: disk, queue: queue, ioUringRefusal: refusal, queueDepth: queueDepth)
    }

    /// tmpfs offers io_uring no non-blocking path: every operation would
    /// go to an io_uring worker thread (a thread hop each; measured in
    /// docs/PERFORMANCE.md), where libaio does the copy inside io_submit.
    static func isOnTmpfs(_ fd: Int32) -> Bool {
        var type: Int64 = 0
        guard (try? Syscall.retryingOnInterrupt("fstatfs", { xb_file_system_type(fd, &type) })) != nil else { return false }
        return type == tmpfsMagic
    }

    private init(path: String, disk: OpenedDisk, queue: any KernelQueue, ioUringRefusal: String?,
                 queueDepth: Int) {
        self.path = path
        self.directIO = disk.directIO
        self.isBlockDevice = disk.isBlockDevice
        self.geometry = disk.geometry
        self.queueDepth = queueDepth
        self.fd = disk.fd
        self.queue = queue
        self.ioUringRefusal = ioUringRefusal
        maxIovecsPerOperation = queue.engine == .ioUring ? DiskProbe.maxSegments(device: disk.device) : nil
        slots = .allocate(capacity: queueDepth)
        slots.initialize(repeating: OperationSlot(), count: queueDepth)
        freeSlots = .allocate(capacity: queueDepth)
        for index in 0..<queueDepth { freeSlots[index] = Int32(queueDepth - 1 - index) }
        freeSlotCount = queueDepth
        batchSlots = .allocate(capacity: queueDepth)
        batchSlots.initialize(repeating: 0, count: queueDepth)
        finished = SlotQueue(capacity: queueDepth)
    }

    deinit {
        close()
        slots.deinitialize(count: queueDepth)
        slots.deallocate()
        freeSlots.deallocate()
        batchSlots.deallocate()
    }

    public func currentSizeBytes() -> UInt64? {
        if isBlockDevice {
            var size: UInt64 = 0
            return xb_block_device_size(fd, &size) == 0 ? size : nil
        }
        var status = stat()
        return fstat(fd, &status) == 0 ? UInt64(max(status.st_size, 0)) : nil
    }

    public func sizeChanged(to bytes: UInt64) { geometry.sizeBytes = bytes }

    public func close() {
        guard !closed else { return }
        closed = true
        queue.close()
        Glibc.close(fd)
    }

    // MARK: Submission

    public func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int {
        let candidates = min(operations.count, freeSlotCount)
        guard candidates > 0 else { return 0 }
        for index in 0..<candidates {
            let slot = takeFreeSlot()
            batchSlots[index] = slot
            prepare(operations[index], slot: Int(slot))
        }
        let (accepted, refusal) = queue.submitQueued()
        return settleBatch(candidates: candidates, kernelAccepted: accepted, firstRefusal: refusal)
    }

    /// Records the operation in its slot and queues it with the kernel
    /// queue, unless it does not go to the kernel (done at settle time).
    private func prepare(_ operation: StorageOperation, slot: Int) {
        let bytes = operation.byteCount
        slots[slot] = OperationSlot(tag: operation.tag, kind: operation.kind, offset: operation.offset,
                                    length: bytes, secure: operation.secure, iovecs: operation.iovecs,
                                    iovecCount: operation.iovecCount)
        switch operation.kind {
        case .read:
            guard let error = rangeError(operation.offset, bytes) else {
                queue.queueRead(slot: slot, fd: fd, iovecs: operation.iovecs, count: operation.iovecCount,
                                offset: operation.offset)
                return
            }
            slots[slot].work = .finished(-Int64(error))
        case .write:
            guard let error = geometry.readOnly ? EROFS : rangeError(operation.offset, bytes) else {
                queue.queueWrite(slot: slot, fd: fd, iovecs: operation.iovecs, count: operation.iovecCount,
                                 offset: operation.offset)
                return
            }
            slots[slot].work = .finished(-Int64(error))
        case .flush:
            guard synchronousFlush else {
                queue.queueFlush(slot: slot, fd: fd)
                return
            }
            slots[slot].work = .synchronousFlush
        case .discard:
            slots[slot].work = discardWork(operation.offset, bytes, secure: operation.secure)
        }
    }

    private func discardWork(_ offset: UInt64, _ length: UInt64, secure: Bool) -> SlotWork {
        if geometry.readOnly { return .finished(-Int64(EROFS)) }
        guard let support = geometry.discard, !secure || support.secure else { return .finished(-Int64(EOPNOTSUPP)) }
        if let error = rangeError(offset, length) { return .finished(-Int64(error)) }
        return length == 0 ? .finished(0) : .discard
    }

    /// EINVAL when [offset, offset+length) is not inside the disk.
    private func rangeError(_ offset: UInt64, _ length: UInt64) -> Int32? {
        let size = geometry.sizeBytes
        return length > size || offset > size - length ? EINVAL : nil
    }

    /// Walks the batch in order after the submission: kernel operations up to the
    /// number it accepted are taken; operations done here (discard, synchronous
    /// flush, early errors) run and are taken; the batch stops at the first
    /// kernel operation not accepted. If the kernel refused that one outright
    /// (not EAGAIN), it is taken and completes with the refusal, so that a
    /// caller retrying it cannot loop forever.
    private func settleBatch(candidates: Int, kernelAccepted: Int, firstRefusal: Int32) -> Int {
        var taken = 0
        var kernelIndex = 0
        var finishedAny = false
        batch: while taken < candidates {
            let slot = Int(batchSlots[taken])
            switch slots[slot].work {
            case .kernel:
                if kernelIndex < kernelAccepted {
                    kernelIndex += 1
                } else if kernelIndex == 0 && firstRefusal != 0 {
                    finish(slot, result: refusedResult(slot, errno: firstRefusal))
                    finishedAny = true
                    taken += 1
                    break batch
                } else {
                    break batch
                }
            case .discard:
                finish(slot, result: runDiscard(slot))
                finishedAny = true
            case .synchronousFlush:
                finish(slot, result: runFdatasync())
                finishedAny = true
            case .finished(let result):
                finish(slot, result: result)
                finishedAny = true
            }
            taken += 1
        }
        releaseSlots(from: taken, to: candidates)
        if finishedAny { signalCompletion() }
        return taken
    }

    /// A flush the kernel will not run asynchronously runs synchronously,
    /// now and from then on; any other refusal is the operation's result.
    private func refusedResult(_ slot: Int, errno error: Int32) -> Int64 {
        guard slots[slot].kind == .flush && error == EINVAL else { return -Int64(error) }
        synchronousFlush = true
        return runFdatasync()
    }

    private func runDiscard(_ slot: Int) -> Int64 {
        let offset = slots[slot].offset, length = slots[slot].length
        return Self.negativeErrno { () throws(SystemError) in
            if isBlockDevice && slots[slot].secure {
                _ = try Syscall.retryingOnInterrupt("BLKSECDISCARD") { xb_block_device_secure_discard(fd, offset, length) }
            } else if isBlockDevice {
                _ = try Syscall.retryingOnInterrupt("BLKDISCARD") { xb_block_device_discard(fd, offset, length) }
            } else {
                _ = try Syscall.retryingOnInterrupt("fallocate") {
                    xb_fallocate(fd, xb_FALLOC_FL_PUNCH_HOLE | xb_FALLOC_FL_KEEP_SIZE, Int64(offset), Int64(length))
                }
            }
        }
    }

    private func runFdatasync() -> Int64 {
        Self.negativeErrno { () throws(SystemError) in _ = try Syscall.retryingOnInterrupt("fdatasync") { fdatasync(fd) } }
    }

    /// 0, or -errno as a completion carries it.
    @inline(__always)
    private static func negativeErrno(_ body: () throws(SystemError) -> Void) -> Int64 {
        do {
            try body()
            return 0
        } catch {
            return -Int64(error.code)
        }
    }

    // MARK: Completion

    /// `body` may call `submit` (the completed operation's slot is already
    /// free) but not `reapCompletions`.
    public func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        // Drain first: a completion arriving after this re-arms the descriptor.
        drainEventCounter()
        return reapFinished(body) + reapKernelEvents(body)
    }

    public func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        reapFinished(body) + reapKernelEvents(body)
    }

    public func resetCompletionSignal() { drainEventCounter() }

    /// Completions of operations done at submit time. A slot is released
    /// before `body` runs, so `body` may submit again.
    private func reapFinished(_ body: (StorageCompletion) -> Void) -> Int {
        var reaped = 0
        while let slot = finished.pop() {
            let completion = StorageCompletion(tag: slots[slot].tag, result: slots[slot].result)
            releaseSlot(Int32(slot))
            body(completion)
            reaped += 1
        }
        return reaped
    }

    /// Both engines answer "nothing" from a ring shared with the kernel, without a system call.
    private func reapKernelEvents(_ body: (StorageCompletion) -> Void) -> Int {
        queue.reap { slot, result in
            let completion = StorageCompletion(tag: slots[slot].tag, result: kernelResult(slot, result))
            releaseSlot(Int32(slot))
            body(completion)
        }
    }

    /// Bytes moved, 0 for a flush, or -errno; see the type's comment on short transfers.
    private func kernelResult(_ slot: Int, _ result: Int64) -> Int64 {
        if result < 0 { return result }
        let state = slots[slot]
        switch state.kind {
        case .flush, .discard:
            return 0
        case .read, .write:
            let expected = Int64(state.length)
            if result == expected { return result }
            guard state.kind == .read, readStoppedAtEndOfFile(offset: state.offset, moved: result) else {
                return -Int64(EIO)
            }
            zeroFill(state.iovecs, state.iovecCount, from: Int(result))
            return expected
        }
    }

    private func readStoppedAtEndOfFile(offset: UInt64, moved: Int64) -> Bool {
        guard !isBlockDevice else { return false }
        var status = stat()
        guard fstat(fd, &status) == 0 else { return false }
        return Int64(offset) + moved >= Int64(status.st_size)
    }

    // MARK: Slots, finished ring and the completion signal

    private func takeFreeSlot() -> Int32 {
        freeSlotCount -= 1
        return freeSlots[freeSlotCount]
    }

    private func releaseSlot(_ slot: Int32) {
        freeSlots[freeSlotCount] = slot
        freeSlotCount += 1
    }

    private func releaseSlots(from start: Int, to end: Int) {
        for index in start..<end { releaseSlot(batchSlots[index]) }
    }

    /// An operation finished without the kernel (discard, synchronous flush, refusal).
    private func finish(_ slot: Int, result: Int64) {
        slots[slot].result = result
        finished.push(slot)
    }

    /// Wakes the poller for completions that did not come from the kernel.
    private func signalCompletion() { queue.signal() }

    private func drainEventCounter() { queue.clearSignal() }
}

/// statfs's f_type of tmpfs (linux/magic.h TMPFS_MAGIC).
let tmpfsMagic = 0x0102_1994

/// How a taken operation will complete.
enum SlotWork {
    /// Handed to the kernel queue (libaio or io_uring).
    case kernel
    /// Hole punch or BLKDISCARD, run in submit.
    case discard
    /// fdatasync run in submit (the kernel refused asynchronous fsync).
    case synchronousFlush
    /// Completed with this result without doing any I/O.
    case finished(Int64)
}

/// Bookkeeping for one in-flight operation; slot i owns the kernel queue's entry i (libaio) or is its user_data (io_uring).
struct OperationSlot {
    var tag: UInt64 = 0
    var kind: StorageOperationKind = .read
    var offset: UInt64 = 0
    /// Bytes to move (read, write) or to discard.
    var length: UInt64 = 0
    /// A discard that erases securely (BLKSECDISCARD).
    var secure = false
    var iovecs: UnsafeMutablePointer<iovec>?
    var iovecCount: Int32 = 0
    var work: SlotWork = .kernel
    /// Result of an operation completed at submit time.
    var result: Int64 = 0
}

/// Zeros the iovecs' bytes from `start` on (the part a short read left unread).
private func zeroFill(_ iovecs: UnsafeMutablePointer<iovec>?, _ count: Int32, from start: Int) {
    guard let iovecs else { return }
    var skip = start
    for index in 0..<Int(count) {
        let length = iovecs[index].iov_len
        if skip >= length { skip -= length; continue }
        if let base = iovecs[index].iov_base { memset(base + skip, 0, length - skip) }
        skip = 0
    }
}
