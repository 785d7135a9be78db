import Glibc

/// Which kernel interface a `FileStorage` hands its reads, writes and
/// flushes to (`xenbackd run --io-engine`).
public enum IOEngineChoice: String, Sendable, CaseIterable {
    /// io_uring when the kernel lets this process set one up, libaio
    /// otherwise, and for a file on tmpfs (io_uring would hand each of its
    /// operations to a worker thread).
    case auto
    case ioUring = "io_uring"
    case libaio
}

extension IOEngineChoice {
    /// Nil when this thread may set up an io_uring, else why not (the call
    /// and its error): what `auto` would fall back to libaio for, said once
    /// by the daemon at start.
    public static func ioUringRefusal() -> String? {
        do throws(KernelQueueSetupError) {
            try URingQueue.make(depth: 1).close()
            return nil
        } catch {
            return "\(error.call): \(String(cString: strerror(error.errno)))"
        }
    }
}

/// The interface a storage actually uses.
public enum IOEngine: String, Sendable, Equatable {
    case ioUring = "io_uring"
    case libaio
}

/// The kernel queue behind a `FileStorage`: reads, writes and flushes are
/// queued one by one into a slot's entry, then submitted as one batch;
/// completions are reaped without blocking. One implementation per engine
/// (`LibAIOQueue`, `URingQueue`); what files and block devices share (range
/// checks, discard, short reads, slots) stays in `FileStorage`.
/// Confined to the storage's thread; no allocation after open.
protocol KernelQueue: AnyObject {
    var engine: IOEngine { get }
    /// Readable while completions wait to be reaped: the storage's
    /// `completionFileDescriptor`, owned by the queue.
    var completionFileDescriptor: Int32 { get }
    /// Makes it readable for completions that do not come from the kernel
    /// (operations finished at submit time).
    func signal()
    /// Clears the readiness the queue's own signals left (and libaio's
    /// completions, which signal an eventfd); called before reaping, so
    /// that a completion after it makes the descriptor readable again.
    func clearSignal()
    func queueRead(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64)
    func queueWrite(slot: Int, fd: Int32, iovecs: UnsafeMutablePointer<iovec>?, count: Int32, offset: UInt64)
    func queueFlush(slot: Int, fd: Int32)
    /// Hands the kernel everything queued since the last call, in order.
    /// `accepted` of them (a prefix) will complete through `reap`; when the
    /// kernel refused the first one outright, `refusal` is its errno (it is
    /// the caller's to complete) and the rest go back to the caller.
    func submitQueued() -> (accepted: Int, refusal: Int32)
    /// Calls `body(slot, result)` for every finished operation, without
    /// blocking: `result` is bytes moved or -errno. `body` may queue and submit.
    func reap(_ body: (Int, Int64) -> Void) -> Int
    func close()
}

/// A kernel queue that could not be set up: the call and its errno.
struct KernelQueueSetupError: Error {
    var call: String
    var errno: Int32
}
