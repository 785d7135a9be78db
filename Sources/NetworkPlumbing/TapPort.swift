import Glibc

/// What a net data-plane engine needs of one TAP queue: read one frame,
/// write one frame, write a batch of frames. `TapQueue` is the real one
/// (`BatchingTapQueue` adds io_uring for batches); tests and fuzzers use an
/// in-memory double. Every call is non-blocking.
public protocol TapPort {
    /// Reads one frame (its virtio-net header first) into `buffer`; its
    /// length, or nil when none is waiting. A frame longer than the buffer
    /// is cut to the buffer's size.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int?
    /// Writes one frame gathered from `vectors` (virtio-net header first);
    /// the bytes written, or nil when the queue is full (EAGAIN). A frame
    /// the kernel refuses (EINVAL) or a link that is down (EIO) throws.
    func write(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int?
    /// Writes `frames.count` frames, in order, frame i being the one buffer
    /// `frames[i]` (virtio-net header first). `results[i]`: the bytes
    /// written, or -errno (`-EAGAIN`: the queue was full, the frame was not
    /// written). The default writes them one by one with `write`.
    func writeFrames(_ frames: UnsafeBufferPointer<iovec>, results: UnsafeMutablePointer<Int>)
}

extension TapPort {
    public func writeFrames(_ frames: UnsafeBufferPointer<iovec>, results: UnsafeMutablePointer<Int>) {
        writeFramesOneByOne(self, frames, results: results)
    }
}

/// `writeFrames` as one `write` per frame: the default (test doubles).
@inline(__always)
public func writeFramesOneByOne<Tap: TapPort>(_ tap: Tap, _ frames: UnsafeBufferPointer<iovec>,
                                             results: UnsafeMutablePointer<Int>) {
    for i in frames.indices {
        do {
            results[i] = try tap.write(UnsafeBufferPointer(start: frames.baseAddress! + i, count: 1)) ?? -Int(EAGAIN)
        } catch {
            results[i] = -Int(error.errno ?? EIO)
        }
    }
}

extension TapQueue: TapPort {}
