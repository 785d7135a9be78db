import Glibc
import Synchronization
import SystemSupport

/// A guest doing verified I/O on its own disk on a thread of its own, to
/// show that another frontend's misbehaviour (or a daemon restart) does not
/// reach it. Hostile-frontend tests, restart tests and `xenbackd-lab fuzz` run
/// one next to whatever they do.
public final class BystanderGuest: Sendable {
    private let thread: NativeThread
    private let state: BystanderState

    /// `verifyAtEnd`: once stopped, read the whole disk back and check every
    /// sector the workload's model knows (`finish()` reports it).
    public convenience init(frontend fe: LoopbackBlockFrontend, seed: UInt64 = 5, queueDepth: Int = 8, verifyAtEnd: Bool = false) {
        self.init(ring: fe.queues.first, disk: fe.info, sectors: fe.info.sectors, seed: seed, queueDepth: queueDepth,
                  verifyAtEnd: verifyAtEnd)
    }

    /// The workload on one ring of a disk, over its sectors
    /// `firstSector..<firstSector + sectors` (one bystander per ring of a
    /// multi-queue disk, each on its own range).
    public init(ring: BlockFrontendRing?, disk: BlockDiskInfo, firstSector: UInt64 = 0, sectors: UInt64, seed: UInt64 = 5,
                queueDepth: Int = 8, verifyAtEnd: Bool = false) {
        let state = BystanderState()
        let box = UncheckedSendableBox(ring)
        thread = try! NativeThread(name: "bystander") {
            guard let ring = box.value else {
                state.fail("not connected")
                return
            }
            var w = VerifiedWorkload(sectors: sectors, firstSector: firstSector, seed: seed, queueDepth: queueDepth,
                                     canDiscard: disk.discard, canFlush: disk.flush)
            do {
                while !state.stop.load(ordering: .acquiring) {
                    let s = try w.run(on: ring, seconds: 0.2)
                    state.add(s)
                }
                if verifyAtEnd {
                    let full = try w.verifyAll(on: ring)
                    state.setFullCheck(verified: full.verified, mismatches: full.mismatches)
                }
            } catch {
                state.fail("\(error)")
            }
        }
        self.state = state
    }

    /// What the workload has seen so far, and the monotonic time of its
    /// last completed stretch (a stalled backend stops that clock).
    public var progress: (summary: VerifiedWorkload.Summary, lastProgress: Double, failure: String?) {
        state.snapshot()
    }

    /// Stops the workload and returns what it saw (with the full-disk check
    /// when asked for: `fullCheck` nil otherwise, or when it failed).
    public func finish() -> (summary: VerifiedWorkload.Summary, failure: String?) {
        stopAndJoin()
        let s = state.snapshot()
        return (s.summary, s.failure)
    }

    /// The full-disk check's figures, after `finish()`.
    public var fullCheck: (verified: UInt64, mismatches: Int)? { state.fullCheckResult() }

    private func stopAndJoin() {
        state.stop.store(true, ordering: .releasing)
        thread.join()
    }
}

/// The bystander's figures, written by its thread and read by anyone.
final class BystanderState: @unchecked Sendable {   // every var below is guarded by `lock`
    let stop = Atomic<Bool>(false)
    private let lock = PThreadMutex()
    private var summary = VerifiedWorkload.Summary()
    private var failure: String?
    private var lastProgress = MonotonicClock.seconds()
    private var fullCheck: (verified: UInt64, mismatches: Int)?

    func add(_ s: VerifiedWorkload.Summary) {
        lock.withLock {
            summary.reads += s.reads; summary.writes += s.writes
            summary.flushes += s.flushes; summary.discards += s.discards
            summary.bytesRead += s.bytesRead; summary.bytesWritten += s.bytesWritten
            summary.errors += s.errors; summary.mismatches += s.mismatches
            summary.sectorsVerified += s.sectorsVerified; summary.seconds += s.seconds
            lastProgress = MonotonicClock.seconds()
        }
    }

    func fail(_ message: String) { lock.withLock { failure = message } }

    func setFullCheck(verified: UInt64, mismatches: Int) { lock.withLock { fullCheck = (verified, mismatches) } }

    func snapshot() -> (summary: VerifiedWorkload.Summary, lastProgress: Double, failure: String?) {
        lock.withLock { (summary, lastProgress, failure) }
    }

    func fullCheckResult() -> (verified: UInt64, mismatches: Int)? { lock.withLock { fullCheck } }
}

/// A value handed to exactly one other thread, which alone uses it from then on.
final class UncheckedSendableBox<T>: @unchecked Sendable {
    let value: T
    init(_ v: T) { value = v }
}
