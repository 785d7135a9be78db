import CLibURing
import Glibc
import SystemSupport

/// A TAP queue whose batches of frames go to the kernel in one system call:
/// each frame a writev entry of an io_uring, submitted together. A TAP has
/// no sendmmsg, and each writev is a system call (about 0.26 µs here) beside
/// the kernel's work for the frame; on a TAP on a bridge a 64-byte frame
/// cost 1.8-2.2 µs of CPU written 32 to a submission against 2.4-2.7 µs one
/// by one (docs/PERFORMANCE.md). Entries carry RWF_NOWAIT: each write runs
/// within the submission, and a full queue completes with -EAGAIN at once
/// (without it io_uring would wait for room, O_NONBLOCK or not). When the
/// kernel refuses io_uring (an old kernel, a seccomp filter,
/// `kernel.io_uring_disabled`), batches are written one by one.
///
/// A kernel that cannot write a TAP without waiting (Linux 6.1, Debian
/// 12's, answers RWF_NOWAIT on a file without FMODE_NOWAIT with
/// EOPNOTSUPP; seen on real Xen as a guest whose every frame failed) is
/// noticed at the first batch whose writes all come back -EOPNOTSUPP, or
/// -EAGAIN while the TAP has room. From then on a batch is a chain of
/// linked writes without RWF_NOWAIT, submitted and waited for in one
/// system call: the kernel hands the chain to one of io_uring's worker
/// threads, which writes the frames one after the other, in order (a link
/// starts an entry only when the one before has completed). A PV dom0
/// enters every system call through Xen, so one per batch instead of one
/// per frame is what this is for. A write that fails cancels the rest of
/// its chain, and those frames are written one by one after it. A TAP
/// write does not wait for room (the frame goes to the stack or is
/// dropped), so the wait is for the worker's copies only.
///
/// One thread at a time (the queue's data-plane thread).
public final class BatchingTapQueue: TapPort {
    public let queue: TapQueue
    /// nil: io_uring refused, frames are written one by one.
    private let ring: OpaquePointer?
    /// The ring signals completions here (liburing's eventfd registration);
    /// waited on only when a write did not complete within the submission.
    private let completions: Wakeup?
    private let tags: UnsafeMutablePointer<UInt64>
    private let codes: UnsafeMutablePointer<Int64>
    /// Frames one submission takes; a larger batch goes in several.
    public static let entries = 64
    /// Why io_uring is not used (the call and errno), or nil when it is.
    public private(set) var uringRefusal: String?
    /// A RWF_NOWAIT write to this TAP has succeeded: no more checks.
    private var nowaitWorks = false
    /// How batches reach the TAP.
    private var mode: Mode
    private enum Mode {
        /// Each frame a RWF_NOWAIT writev, run within the submission.
        case nowait
        /// A chain of linked writevs that a worker thread runs in order.
        case linked
        /// No io_uring: a writev system call per frame.
        case oneByOne
    }
    /// Tests: play a kernel whose io_uring answers every RWF_NOWAIT write
    /// to a TAP with this errno (nothing is submitted); 0: the real kernel.
    let refusesNowaitForTesting: Int32
    /// Tests: linked writes go to a worker thread at once (IOSQE_ASYNC), as
    /// on a kernel without FMODE_NOWAIT on a TAP.
    let linkedWritesOnWorkersForTesting: Bool

    public convenience init(_ queue: TapQueue) { self.init(queue, refusesNowaitForTesting: 0) }

    init(_ queue: TapQueue, refusesNowaitForTesting: Int32, linkedWritesOnWorkersForTesting: Bool = false) {
        self.refusesNowaitForTesting = refusesNowaitForTesting
        self.linkedWritesOnWorkersForTesting = linkedWritesOnWorkersForTesting
        self.queue = queue
        tags = .allocate(capacity: Self.entries)
        codes = .allocate(capacity: Self.entries)
        var ring: OpaquePointer?
        var refusal: String?
        var completions: Wakeup?
        do {
            let wakeup = try Wakeup()
            var failed: UnsafePointer<CChar>?
            let r = xb_uring_open(UInt32(Self.entries), wakeup.fd, &ring, &failed)
            if r == 0 {
                completions = wakeup
            } else {
                wakeup.close()
                ring = nil
                refusal = "\(failed.map { String(cString: $0) } ?? "io_uring"): \(String(cString: strerror(-r))) (errno \(-r))"
            }
        } catch {
            refusal = "eventfd: \(error)"
        }
        self.ring = ring
        self.completions = completions
        uringRefusal = refusal
        mode = ring != nil ? .nowait : .oneByOne
    }

    deinit {
        if let ring { xb_uring_close(ring) }
        completions?.close()
        tags.deallocate()
        codes.deallocate()
    }

    /// Whether batches go through io_uring.
    public var usesURing: Bool { mode != .oneByOne }
    /// Whether batches go through io_uring's worker threads as chains of
    /// linked writes (this kernel refuses RWF_NOWAIT on a TAP).
    public var writesThroughWorkers: Bool { mode == .linked }

    @inline(__always)
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int? {
        try queue.read(into: buffer)
    }

    @inline(__always)
    public func write(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int? {
        try queue.write(vectors)
    }

    public func writeFrames(_ frames: UnsafeBufferPointer<iovec>, results: UnsafeMutablePointer<Int>) {
        writeFrames(frames.count, results: results) { UnsafeBufferPointer(start: frames.baseAddress! + $0, count: 1) }
    }

    /// Writes `total` frames in order, frame i gathered from `vectors(i)`
    /// (which must stay valid until this returns); `results` as for
    /// `writeFrames(_:results:)`.
    public func writeFrames(_ total: Int, results: UnsafeMutablePointer<Int>,
                            vectors: (Int) -> UnsafeBufferPointer<iovec>) {
        guard mode != .oneByOne, let ring else {
            writeOneByOne(0..<total, results: results, vectors: vectors)
            return
        }
        var start = 0
        while start < total {
            let count = min(Self.entries, total - start)
            if mode == .linked {
                writeLinked(ring, start..<(start + count), results: results, vectors: vectors)
                start += count
                continue
            }
            var queued = 0
            // The ring has room (every entry of the last submission was
            // reaped); should an entry be refused all the same, the frames
            // from there on are written one by one after the queued ones, in order.
            if refusesNowaitForTesting != 0 {
                for i in start..<(start + count) { results[i] = -Int(refusesNowaitForTesting) }
                queued = count
            }
            while queued < count {
                let v = vectors(start + queued)
                guard xb_uring_queue_writev_nowait(ring, UInt64(start + queued), queue.fileDescriptor,
                                                   v.baseAddress!, UInt32(v.count)) == 0 else { break }
                queued += 1
            }
            // Not taken now (the kernel short of memory): in the ring still,
            // taken by the next submit below.
            var unsubmitted = queued > 0 && refusesNowaitForTesting == 0 ? xb_uring_submit(ring) : 0
            var done = refusesNowaitForTesting != 0 ? queued : 0
            while done < queued {
                done += reapResults(ring, into: results)
                if done < queued {
                    if unsubmitted > 0 { unsubmitted = xb_uring_submit(ring) }
                    // A write the kernel finished outside the submission:
                    // wait for the ring's eventfd, then reap again.
                    waitForCompletions()
                }
            }
            if !nowaitWorks && nowaitRefused(start..<(start + queued), results: results) {
                // Every write of this chunk was refused and none written:
                // again, as a linked chain, and so from now on.
                mode = .linked
                continue
            }
            if queued < count { writeOneByOne((start + queued)..<(start + count), results: results, vectors: vectors) }
            start += count
        }
    }

    /// Whether the chunk's results show a kernel that refuses RWF_NOWAIT
    /// on a TAP: all -EOPNOTSUPP, or all -EAGAIN while the TAP has room. A
    /// success on the way settles that it works.
    private func nowaitRefused(_ frames: Range<Int>, results: UnsafeMutablePointer<Int>) -> Bool {
        guard !frames.isEmpty else { return false }
        let first = results[frames.lowerBound]
        for i in frames where results[i] >= 0 || results[i] != first {
            if results[i] >= 0 { nowaitWorks = true }
            return false
        }
        if first == -Int(EOPNOTSUPP) { return true }
        guard first == -Int(EAGAIN) else { return false }
        var p = pollfd(fd: queue.fileDescriptor, events: Int16(POLLOUT), revents: 0)
        let ready = (try? Syscall.poll(&p, 1, timeoutMilliseconds: 0)) ?? 0
        return ready > 0 && p.revents & Int16(POLLOUT) != 0
    }

    /// The frames as one chain of linked writes, submitted and waited for
    /// in one call; frames after a failed one (cancelled) one by one.
    private func writeLinked(_ ring: OpaquePointer, _ frames: Range<Int>, results: UnsafeMutablePointer<Int>,
                             vectors: (Int) -> UnsafeBufferPointer<iovec>) {
        var queued = 0
        for i in frames {
            let v = vectors(i)
            guard xb_uring_queue_writev_linked(ring, UInt64(i), queue.fileDescriptor, v.baseAddress!, UInt32(v.count),
                                               i + 1 < frames.upperBound ? 1 : 0,
                                               linkedWritesOnWorkersForTesting ? 1 : 0) == 0 else { break }
            queued += 1
        }
        // The ring had room for the whole chunk (every entry of the last
        // submission was reaped); should it not, the rest go one by one.
        var done = 0
        while done < queued {
            let r = xb_uring_submit_and_wait(ring, UInt32(queued - done))
            let n = reapResults(ring, into: results)
            done += n
            if r < 0 && r != -EAGAIN && r != -EBUSY && n == 0 {
                // The ring takes nothing more: no further batch goes through it.
                mode = .oneByOne
                uringRefusal = "io_uring_enter: \(String(cString: strerror(-r))) (errno \(-r))"
                break
            }
        }
        var taken = queued
        if done < queued {
            // What the kernel took completes; the tail it did not take is written one by one.
            taken = queued - Int(xb_uring_unsubmitted(ring))
            while done < taken {
                let n = reapResults(ring, into: results)
                done += n
                if n == 0 { waitForCompletions() }
            }
        }
        for i in frames.lowerBound..<(frames.lowerBound + taken) where results[i] == -Int(ECANCELED) {
            writeOneByOne(i..<(i + 1), results: results, vectors: vectors)
        }
        if taken < frames.count {
            writeOneByOne((frames.lowerBound + taken)..<frames.upperBound, results: results, vectors: vectors)
        }
    }

    /// Copies the finished entries' results (frame index tags) out of the ring.
    private func reapResults(_ ring: OpaquePointer, into results: UnsafeMutablePointer<Int>) -> Int {
        let n = Int(xb_uring_reap(ring, tags, codes, UInt32(Self.entries)))
        for j in 0..<n { results[Int(tags[j])] = Int(codes[j]) }
        return n
    }

    private func writeOneByOne(_ frames: Range<Int>, results: UnsafeMutablePointer<Int>,
                               vectors: (Int) -> UnsafeBufferPointer<iovec>) {
        for i in frames {
            do {
                results[i] = try queue.write(vectors(i)) ?? -Int(EAGAIN)
            } catch {
                results[i] = -Int(error.errno ?? EIO)
            }
        }
    }

    private func waitForCompletions() {
        guard let completions else { return }
        var p = pollfd(fd: completions.fd, events: Int16(POLLIN), revents: 0)
        _ = try? Syscall.poll(&p, 1, timeoutMilliseconds: 10)
        completions.drain()
    }
}
