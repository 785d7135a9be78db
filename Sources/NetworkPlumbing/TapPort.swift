import Glibc

/// What a net data-plane engine needs of one TAP queue: read one frame,
/// write one frame. `TapQueue` is the real one; tests and fuzzers use an
/// in-memory double. Both calls are non-blocking.
public protocol TapPort {
    /// Reads one frame (its virtio-net header first) into `buffer`; its
    /// length, or nil when none is waiting. A frame longer than the buffer
    /// is cut to the buffer's size.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int?
    /// Writes one frame gathered from `vectors` (virtio-net header first);
    /// the bytes written, or nil when the queue is full (EAGAIN). A frame
    /// the kernel refuses (EINVAL) or a link that is down (EIO) throws.
    func write(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int?
}

extension TapQueue: TapPort {}
