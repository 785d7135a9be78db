import BlockStorage
import Glibc

/// A disk in memory that completes operations when, in the order and with
/// the result the test says. It keeps two views: `written` (what a read
/// returns: every completed write and discard) and `durable` (what would
/// survive a power cut: the writes that completed before a flush that has
/// completed was submitted), so flush and barrier ordering can be checked.
public final class InMemoryStorage: BlockStorage {
    public let geometry: StorageGeometry
    public let queueDepth: Int
    /// No descriptor: the test reports readiness by stepping with .storageReady.
    public var completionFileDescriptor: Int32 { -1 }
    public let written: UnsafeMutableRawPointer
    public let durable: UnsafeMutableRawPointer
    public var sizeBytes: Int { Int(geometry.sizeBytes) }

    /// A submitted operation, until the test completes it.
    public struct Pending {
        public var operation: StorageOperation
        /// For a flush: the completed writes it covers (those logged before its submission).
        var coveredWrites: Int
        public var kind: StorageOperationKind { operation.kind }
        public var offset: UInt64 { operation.offset }
    }
    public private(set) var pending: [Pending] = []
    private var finished: [StorageCompletion] = []
    /// Completed writes not yet durable, in completion order; their bytes
    /// are in `logBytes` from `start` (one buffer: no allocation per write).
    private var writeLog: [(offset: Int, start: Int, count: Int)] = []
    private var logBytes: [UInt8] = []
    private var writeLogBase = 0
    /// Complete each operation as soon as it is submitted (tests that do
    /// not care about timing).
    public var completesAtOnce = false
    /// What the storage tells a merging caller (nil: no limit).
    public var maxIovecsPerOperation: Int?
    public private(set) var submittedOperations = 0
    public private(set) var closed = false
    /// What `openAnotherQueue` gives a multi-queue connection (nil: this
    /// disk serves one ring).
    public var anotherQueue: (() -> any BlockStorage)?

    public init(sizeBytes: Int, queueDepth: Int = 64, readOnly: Bool = false, discard: Bool = true) {
        geometry = StorageGeometry(sizeBytes: UInt64(sizeBytes), logicalSectorSize: 512, physicalSectorSize: 4096,
                                   readOnly: readOnly, supportsFlush: true,
                                   discard: discard ? DiscardSupport(granularity: 4096, alignment: 0, zeroesData: true) : nil)
        self.queueDepth = queueDepth
        written = .allocate(byteCount: sizeBytes, alignment: 4096)
        durable = .allocate(byteCount: sizeBytes, alignment: 4096)
        memset(written, 0, sizeBytes)
        memset(durable, 0, sizeBytes)
        dirtyChunks = [Bool](repeating: false, count: (sizeBytes + Self.chunk - 1) / Self.chunk)
        pending.reserveCapacity(queueDepth)
        finished.reserveCapacity(queueDepth)
    }

    deinit {
        written.deallocate()
        durable.deallocate()
    }

    /// 4 KiB chunks that may differ from zeros in either view (what `reset` clears).
    private var dirtyChunks: [Bool] = []
    private static let chunk = 4096

    /// Forgets everything (a fuzzer reusing the disk): zeroes only the
    /// chunks writes and discards reached, so a small program resets quickly.
    public func reset() {
        for c in dirtyChunks.indices where dirtyChunks[c] {
            let n = min(Self.chunk, sizeBytes - c * Self.chunk)
            memset(written + c * Self.chunk, 0, n)
            memset(durable + c * Self.chunk, 0, n)
            dirtyChunks[c] = false
        }
        pending.removeAll(keepingCapacity: true)
        finished.removeAll(keepingCapacity: true)
        writeLog.removeAll(keepingCapacity: true)
        logBytes.removeAll(keepingCapacity: true)
        writeLogBase = 0
        completesAtOnce = false
        submittedOperations = 0
        completionSignalResets = 0
        completionSignalResetsInFlight = 0
        closed = false
    }

    /// Runs at the start of every `submit`: a test stops the world there
    /// (what a kill -9 in the middle of an engine's step would leave).
    public var beforeSubmit: (() -> Void)?

    public func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int {
        beforeSubmit?()
        let room = max(0, queueDepth - pending.count - finished.count)
        let n = min(room, operations.count)
        for op in operations.prefix(n) {
            pending.append(Pending(operation: op, coveredWrites: writeLogBase + writeLog.count))
            submittedOperations += 1
        }
        if completesAtOnce { while !pending.isEmpty { complete(0) } }
        return n
    }

    public func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        let n = finished.count
        for c in finished { body(c) }
        finished.removeAll(keepingCapacity: true)
        return n
    }

    public func close() { closed = true }

    /// How often the engine reset the completion signal, and how many of
    /// those came with operations in flight (a completion could be lost).
    public private(set) var completionSignalResets = 0
    public private(set) var completionSignalResetsInFlight = 0
    public func resetCompletionSignal() {
        completionSignalResets += 1
        if !pending.isEmpty || !finished.isEmpty { completionSignalResetsInFlight += 1 }
    }
    public func openAnotherQueue() throws -> (any BlockStorage)? { anotherQueue?() }

    /// Completes pending operation `index`: its effect happens now, or it
    /// fails with `-errno` and has none.
    public func complete(_ index: Int, errno failure: Int32 = 0) {
        let p = pending.remove(at: index)
        finished.append(StorageCompletion(tag: p.operation.tag, result: failure != 0 ? -Int64(failure) : perform(p)))
    }

    public func completeAll() { while !pending.isEmpty { complete(0) } }

    /// The queues at one instant, for `rollBack`.
    public struct QueueMark {
        let pending: Int
        let finished: [StorageCompletion]
    }

    /// Marks the queues as they are now (a test stopping the world inside
    /// an engine's step, in `beforeSubmit`).
    public func markQueues() -> QueueMark { QueueMark(pending: pending.count, finished: finished) }

    /// Undoes what was submitted and reaped since `mark`: the storage as a
    /// kill at that instant left it. Nothing may have completed since (data
    /// changes only at `complete`).
    public func rollBack(to mark: QueueMark) {
        precondition(pending.count >= mark.pending, "completed since the mark")
        pending.removeSubrange(mark.pending...)
        finished = mark.finished
    }

    /// Drops every pending operation with no effect and no completion (the
    /// process that submitted them was killed before the disk did them).
    public func dropPending() {
        pending.removeAll(keepingCapacity: true)
        finished.removeAll(keepingCapacity: true)
    }

    /// True while no write or discard has reached the 4 KiB chunk holding
    /// `offset` since the last reset: it holds zeros in both views, so a
    /// checker need not compare it.
    public func isUntouched(byteOffset offset: Int) -> Bool { !dirtyChunks[offset / Self.chunk] }

    private func markDirty(_ offset: Int, _ count: Int) {
        guard count > 0 else { return }
        for c in offset / Self.chunk...(offset + count - 1) / Self.chunk { dirtyChunks[c] = true }
    }

    private func perform(_ p: Pending) -> Int64 {
        let op = p.operation
        let size = UInt64(sizeBytes)
        switch op.kind {
        case .read, .write:
            var offset = op.offset
            var moved: Int64 = 0
            for i in 0..<Int(op.iovecCount) {
                let v = op.iovecs![i]
                guard offset <= size, UInt64(v.iov_len) <= size - offset else { return -Int64(EINVAL) }
                if op.kind == .read {
                    memcpy(v.iov_base, written + Int(offset), v.iov_len)
                } else {
                    memcpy(written + Int(offset), v.iov_base, v.iov_len)
                    markDirty(Int(offset), v.iov_len)
                    writeLog.append((Int(offset), logBytes.count, v.iov_len))
                    logBytes.append(contentsOf: UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len))
                }
                offset += UInt64(v.iov_len)
                moved += Int64(v.iov_len)
            }
            return moved
        case .discard:
            guard op.offset <= size, op.length <= size - op.offset else { return -Int64(EINVAL) }
            memset(written + Int(op.offset), 0, Int(op.length))
            markDirty(Int(op.offset), Int(op.length))
            writeLog.append((Int(op.offset), logBytes.count, Int(op.length)))
            // The range's bytes as they are now: zeros, just cleared.
            logBytes.append(contentsOf: UnsafeRawBufferPointer(start: written + Int(op.offset), count: Int(op.length)))
            return 0
        case .flush:
            // What completed before the flush was submitted is now durable.
            let covered = p.coveredWrites - writeLogBase
            if covered > 0 {
                logBytes.withUnsafeBytes { log in
                    for e in writeLog.prefix(covered) where e.count > 0 {
                        memcpy(durable + e.offset, log.baseAddress! + e.start, e.count)
                    }
                }
                writeLog.removeFirst(covered)
                writeLogBase += covered
                if writeLog.isEmpty { logBytes.removeAll(keepingCapacity: true) }
            }
            return 0
        }
    }
}
