import Glibc
import NetworkPlumbing

/// A TAP queue in plain memory for engine tests and fuzzers: frames queued
/// for the guest (each with its virtio-net header, as a TAP with
/// IFF_VNET_HDR hands them out), the frames the engine wrote, and a switch
/// that makes the queue full (writes would block).
public final class InMemoryTap: TapPort {
    /// Frames waiting to be read, oldest first.
    public private(set) var toGuest: [[UInt8]] = []
    private var nextToGuest = 0
    /// Every frame written, virtio-net header included, oldest first.
    public var written: [[UInt8]] = []
    /// While true, writes return nil (EAGAIN) and write nothing.
    public var full = false
    /// When set, every write fails with it (a frame the kernel refused).
    public var writeError: NetworkError?
    /// Calls to `read`, frames or not: a test checks the engine stopped polling.
    public private(set) var reads = 0
    /// Calls to `writeFrames` and the frames each carried, in order: a test
    /// checks a pass's frames go to the TAP together.
    public private(set) var batches: [Int] = []
    /// Writes (counted from 0 over the tap's life, `write` and each frame
    /// of `writeFrames` alike) that find the queue full (nil) or that the
    /// kernel refuses (the error), whatever `full` and `writeError` say.
    public var fullAtWrite: Set<Int> = []
    public var refusedAtWrite: [Int: NetworkError] = [:]
    public private(set) var writes = 0

    public init() {}

    /// Frames not read yet.
    public var pending: Int { toGuest.count - nextToGuest }
    /// Frames read so far from `toGuest` (it restarts at 0 when a frame is
    /// queued after all were read).
    public var framesRead: Int { nextToGuest }

    /// Queues one frame for the guest: `header`'s 12 bytes, then `frame`.
    public func queue(_ frame: [UInt8], header: VirtioNetHeader = VirtioNetHeader()) {
        queue(raw: header.bytes + frame)
    }

    /// Queues bytes as read() returns them (virtio header included, any size).
    public func queue(raw bytes: [UInt8]) {
        if nextToGuest == toGuest.count {
            toGuest.removeAll(keepingCapacity: true)
            nextToGuest = 0
        }
        toGuest.append(bytes)
    }

    /// Forgets every frame, written or waiting (a fuzzer reusing the tap).
    public func reset() {
        toGuest.removeAll(keepingCapacity: true)
        nextToGuest = 0
        written.removeAll(keepingCapacity: true)
        full = false
        writeError = nil
        reads = 0
        batches.removeAll(keepingCapacity: true)
        fullAtWrite = []
        refusedAtWrite = [:]
        writes = 0
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int? {
        reads += 1
        guard nextToGuest < toGuest.count else { return nil }
        let frame = toGuest[nextToGuest]
        nextToGuest += 1
        let n = min(frame.count, buffer.count)
        frame.withUnsafeBytes { src in
            if n > 0 { buffer.baseAddress!.copyMemory(from: src.baseAddress!, byteCount: n) }
        }
        return n
    }

    public func writeFrames(_ frames: UnsafeBufferPointer<iovec>, results: UnsafeMutablePointer<Int>) {
        batches.append(frames.count)
        writeFramesOneByOne(self, frames, results: results)
    }

    public func write(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int? {
        let index = writes
        writes += 1
        if let e = refusedAtWrite[index] { throw e }
        if fullAtWrite.contains(index) { return nil }
        if let writeError { throw writeError }
        if full { return nil }
        var frame: [UInt8] = []
        for v in vectors where v.iov_len > 0 {
            frame.append(contentsOf: UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len))
        }
        written.append(frame)
        return frame.count
    }
}
