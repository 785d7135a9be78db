import Glibc

/// What the backend learns about a disk when it opens it.
public struct StorageGeometry: Equatable, Sendable {
    public var sizeBytes: UInt64
    /// Smallest addressable unit (published as `sector-size`).
    public var logicalSectorSize: UInt32
    /// Preferred I/O unit (published as `physical-sector-size`).
    public var physicalSectorSize: UInt32
    public var readOnly: Bool
    /// Flush reaches stable storage (a file or a device with a volatile cache).
    public var supportsFlush: Bool
    /// nil when discard is not supported.
    public var discard: DiscardSupport?

    public init(sizeBytes: UInt64, logicalSectorSize: UInt32, physicalSectorSize: UInt32,
                readOnly: Bool, supportsFlush: Bool, discard: DiscardSupport?) {
        self.sizeBytes = sizeBytes; self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize; self.readOnly = readOnly
        self.supportsFlush = supportsFlush; self.discard = discard
    }
}

public struct DiscardSupport: Equatable, Sendable {
    public var granularity: UInt32
    public var alignment: UInt32
    /// Discarded ranges read back as zeros.
    public var zeroesData: Bool
    /// The device erases securely (BLKSECDISCARD): blkif's `discard-secure`.
    public var secure: Bool
    public init(granularity: UInt32, alignment: UInt32, zeroesData: Bool, secure: Bool = false) {
        self.granularity = granularity; self.alignment = alignment; self.zeroesData = zeroesData; self.secure = secure
    }
}

public enum StorageOperationKind: UInt8, Sendable {
    case read, write, flush, discard
}

/// One I/O handed to a storage. The caller owns the iovec array and the
/// buffers until the operation's completion has been reaped.
public struct StorageOperation {
    /// The caller's identifier, echoed in the completion.
    public var tag: UInt64
    public var kind: StorageOperationKind
    /// Byte offset on the disk (read, write, discard).
    public var offset: UInt64
    /// Byte length (discard; for read/write the iovecs' total).
    public var length: UInt64
    public var iovecs: UnsafeMutablePointer<iovec>?
    public var iovecCount: Int32
    /// A discard that must erase securely (a storage whose discard support
    /// says `secure`); others ignore it.
    public var secure = false

    public init(tag: UInt64, kind: StorageOperationKind, offset: UInt64 = 0, length: UInt64 = 0,
                iovecs: UnsafeMutablePointer<iovec>? = nil, iovecCount: Int32 = 0, secure: Bool = false) {
        self.tag = tag; self.kind = kind; self.offset = offset; self.length = length
        self.iovecs = iovecs; self.iovecCount = iovecCount; self.secure = secure
    }

    /// The bytes it moves or covers: the iovecs' total for a read or write,
    /// `length` for the others. Allocation-free (storages' submit paths).
    public var byteCount: UInt64 {
        guard kind == .read || kind == .write else { return length }
        guard let iovecs, iovecCount > 0 else { return 0 }
        var total: UInt64 = 0
        for index in 0..<Int(iovecCount) { total &+= UInt64(iovecs[index].iov_len) }
        return total
    }
}

/// A finished operation: `result` is the byte count moved (0 for flush and
/// discard) or a negative errno.
public struct StorageCompletion: Equatable, Sendable {
    public var tag: UInt64
    public var result: Int64
    public init(tag: UInt64, result: Int64) { self.tag = tag; self.result = result }
}

public struct StorageError: Error, Equatable, CustomStringConvertible, Sendable {
    public var operation: String
    public var errno: Int32
    public var path: String
    /// Words for the operator instead of strerror's, where errno alone would mislead.
    public var detail: String?
    public init(_ operation: String, errno: Int32, path: String, detail: String? = nil) {
        self.operation = operation; self.errno = errno; self.path = path; self.detail = detail
    }
    public var description: String {
        if let detail { return "\(operation) \(path): \(detail)" }
        return "\(operation) \(path): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

public extension BlockStorage {
    func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int { reapCompletions(body) }
    /// Storages with nothing to report (a file) ignore the handler.
    func setEventHandler(_ handler: @escaping StorageEventHandler) {}
    var ioEngineName: String? { nil }
    var maxIovecsPerOperation: Int? { nil }
    /// One queue only, unless the storage says otherwise.
    func openAnotherQueue() throws -> (any BlockStorage)? { nil }
    /// Storages whose descriptor goes quiet once reaped need nothing.
    func resetCompletionSignal() {}
    /// A storage whose size cannot change under it (an NBD export's size
    /// is fixed for its connection) says nil.
    func currentSizeBytes() -> UInt64? { nil }
    func sizeChanged(to bytes: UInt64) {}
    /// Nothing to lock: a file's or an NBD export's sharing is the toolstack's to check.
    func takeWriterLock(waitingUpTo seconds: Double, breakingPreviousOwner previousOwner: String?,
                        giveUp: () -> Bool) throws -> String? { nil }
}

/// A disk behind a block backend ring. Asynchronous: operations are
/// submitted in batches and complete later, signalled through a pollable
/// file descriptor that the ring's event loop waits on with the event
/// channel. Confined to one thread (the ring's data-plane thread) after open.
/// Hot path (submit, reapCompletions): no allocation, no lock, no logging.
public protocol BlockStorage: AnyObject {
    var geometry: StorageGeometry { get }
    /// Readable when completions are waiting to be reaped.
    var completionFileDescriptor: Int32 { get }
    /// Operations that may be in flight at once.
    var queueDepth: Int { get }
    /// Submits as many of `operations` as fit (in order) and returns how
    /// many were taken; the rest must be submitted again after completions
    /// are reaped. A taken operation always completes, possibly with an error.
    func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int
    /// Reaps finished operations without blocking; returns how many. Resets
    /// the completion descriptor's readiness first.
    func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int
    /// Reaps what has finished, as cheaply as the storage can (no system
    /// call when nothing has), leaving the descriptor's readiness alone: for
    /// a caller that polls instead of sleeping. A later `reapCompletions`
    /// resets the descriptor.
    func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int
    /// Clears the completion descriptor's readiness left by operations
    /// that `pollCompletions` already reaped. Call only with nothing in
    /// flight (a completion signalled later would be lost): storage that
    /// finishes inside `submit` (tmpfs, the page cache, a RAM disk) has
    /// signalled it, and a loop about to sleep would wake at once for nothing.
    func resetCompletionSignal()
    /// Releases the disk. Call only with nothing in flight.
    func close()
    /// Where to report what an operator should know (a connection lost or
    /// regained). Called on the data-plane thread, on such changes only.
    func setEventHandler(_ handler: @escaping StorageEventHandler)
    /// The kernel interface behind the disk ("io_uring", "libaio"), for
    /// `xenbackd status`; nil for a storage without a choice (NBD).
    var ioEngineName: String? { get }
    /// Operations with more iovecs than this take a slow path, so a caller
    /// merging requests stops there; nil: no such limit. (io_uring on a
    /// block device: a bio the device must split cannot be issued without
    /// blocking, and the whole operation goes to a worker thread.)
    var maxIovecsPerOperation: Int? { get }
    /// Another handle on the same disk for another ring of the same device
    /// (multi-queue blkif), used by another data-plane thread: its own
    /// `queueDepth` operations and completion descriptor, and a flush
    /// through either handle covers writes completed through both. Nil
    /// when this storage cannot give one. Call before the data plane starts.
    func openAnotherQueue() throws -> (any BlockStorage)?
    /// The disk's size as the kernel has it now (a file grown, an LV
    /// extended): what online resize compares with the size the frontend
    /// was told. Safe from any thread (the control thread asks while the
    /// data plane runs): it only asks the kernel. Nil: it cannot change.
    func currentSizeBytes() -> UInt64?
    /// The size the frontend is now told; requests are checked against it
    /// from here on. Called on the data-plane thread.
    func sizeChanged(to bytes: UInt64)
    /// Before a read-write connection serves its first request: a disk other
    /// hosts can open too (an RBD image) takes its single-writer lock,
    /// waiting up to `seconds` for a holder that is letting go (a
    /// migration's source). `previousOwner` is what this call returned to
    /// the disk's previous daemon (its lock is broken: that daemon is gone).
    /// Returns the name to keep for the next restart; nil when there is no
    /// lock. Gives up, with an error, as soon as `giveUp` says so (the
    /// device is going away, or the daemon stops).
    func takeWriterLock(waitingUpTo seconds: Double, breakingPreviousOwner previousOwner: String?,
                        giveUp: () -> Bool) throws -> String?
}

/// What a storage tells the operator: a connection lost or regained.
public struct StorageEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// One connection or all of them gone (the storage tries again).
        case connectionLost
        /// A connection back (all of them, or one of several).
        case reconnected
        /// Still away past the reconnect window: held requests failed.
        case unreachable
        /// Back, but not as it was (another size): refused for good.
        case refused
    }
    public var kind: Kind
    /// One line for the log and `xenbackd status`.
    public var message: String

    public init(_ kind: Kind, _ message: String) { self.kind = kind; self.message = message }
}

/// Receives a storage's events.
public typealias StorageEventHandler = @Sendable (StorageEvent) -> Void

public extension BlockStorage {
    /// Flushes and waits for it (up to `timeoutMilliseconds`): for the
    /// control plane, with nothing else in flight (the ring is stopped).
    /// Returns 0, a negative errno, or -ETIMEDOUT.
    func flushAndWait(timeoutMilliseconds: Int32 = 30_000) -> Int64 {
        let tag = UInt64.max
        var op = StorageOperation(tag: tag, kind: .flush)
        guard withUnsafeMutablePointer(to: &op, { submit(UnsafeMutableBufferPointer(start: $0, count: 1)) }) == 1 else {
            return -Int64(EBUSY)
        }
        var result: Int64?
        var waited: Int32 = 0
        // A storage that finished at once (or in memory, with no descriptor) is not waited for.
        _ = reapCompletions { if $0.tag == tag { result = $0.result } }
        while result == nil && waited <= timeoutMilliseconds {
            var pfd = pollfd(fd: completionFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 100)
            waited += 100
            _ = reapCompletions { if $0.tag == tag { result = $0.result } }
        }
        return result ?? -Int64(ETIMEDOUT)
    }
}
