import Glibc
@testable import NetworkPlumbing
import Testing

/// BatchingTapQueue writes a batch of frames in io_uring submissions: each
/// frame arrives whole, in order, with its own result. A non-blocking
/// SOCK_SEQPACKET pair stands in for the TAP (one frame per message).
@Suite("a TAP queue's batched writes through io_uring")
struct BatchingTapQueueTests {
    /// 70 frames (more than one submission's 64) of different sizes and bytes.
    @Test("every frame of a batch arrives whole and in order, each with its length")
    func framesArriveInOrder() throws {
        let pair = try seqpacketPair()
        defer { pair.forEach { _ = close($0) } }
        var size = 1 << 20
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(pair[1], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let batching = BatchingTapQueue(TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 12))
        #expect(batching.usesURing, "io_uring refused: \(batching.uringRefusal ?? "")")
        let frames: [[UInt8]] = (0..<70).map { i in (0..<(60 + i * 7)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) } }
        var results = [Int](repeating: 0, count: frames.count)
        let (buffers, vectors) = copies(of: frames)
        defer { buffers.forEach { $0.deallocate() } }
        vectors.withUnsafeBufferPointer { v in
            results.withUnsafeMutableBufferPointer { batching.writeFrames(v, results: $0.baseAddress!) }
        }
        #expect(results == frames.map(\.count))
        #expect(try framesWaiting(on: pair[1]) == frames)
    }

    @Test("frames gathered from several vectors each arrive whole, in order")
    func gatheredFrames() throws {
        let pair = try seqpacketPair()
        defer { pair.forEach { _ = close($0) } }
        let batching = BatchingTapQueue(TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 12))
        // Frame i: a 12-byte header, then two parts of 40 + i and 3 bytes.
        let parts: [[[UInt8]]] = (0..<5).map { i in
            [[UInt8](repeating: UInt8(i), count: 12), (0..<(40 + i)).map { UInt8(truncatingIfNeeded: $0 + i) }, [0xaa, 0xbb, UInt8(i)]]
        }
        let (storage, vectors) = copies(of: parts.flatMap { $0 })
        defer { storage.forEach { $0.deallocate() } }
        var results = [Int](repeating: 0, count: parts.count)
        vectors.withUnsafeBufferPointer { v in
            results.withUnsafeMutableBufferPointer { r in
                batching.writeFrames(parts.count, results: r.baseAddress!) { UnsafeBufferPointer(rebasing: v[($0 * 3)..<($0 * 3 + 3)]) }
            }
        }
        let frames = parts.map { $0.flatMap { $0 } }
        #expect(results == frames.map(\.count))
        #expect(try framesWaiting(on: pair[1]) == frames)
    }

    @Test("a frame the kernel refuses gets its -errno, a full queue -EAGAIN, and nothing blocks")
    func failuresAreResults() throws {
        let closed = BatchingTapQueue(TapQueue(fileDescriptor: -1, vnetHeaderSize: 0))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 100, alignment: 8)
        defer { buffer.deallocate() }
        let two = [iovec(iov_base: buffer, iov_len: 100), iovec(iov_base: buffer, iov_len: 50)]
        var results = [0, 0]
        two.withUnsafeBufferPointer { v in results.withUnsafeMutableBufferPointer { closed.writeFrames(v, results: $0.baseAddress!) } }
        #expect(results == [-Int(EBADF), -Int(EBADF)])

        let pair = try seqpacketPair()
        defer { pair.forEach { _ = close($0) } }
        let full = BatchingTapQueue(TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 0))
        // Fill the socket: the peer reads nothing.
        while send(pair[0], buffer, 100, Int32(MSG_DONTWAIT)) > 0 {}
        two.withUnsafeBufferPointer { v in results.withUnsafeMutableBufferPointer { full.writeFrames(v, results: $0.baseAddress!) } }
        #expect(results == [-Int(EAGAIN), -Int(EAGAIN)])
    }

    /// Linux 6.1 (Debian 12's dom0 kernel) answers every RWF_NOWAIT write
    /// to a TAP with -EOPNOTSUPP: seen on real Xen as a guest whose every
    /// frame failed. The queue must notice (all refused while the file has
    /// room), write that batch again and every later one as a chain of
    /// linked writes, which io_uring's worker runs in order (forced onto
    /// the worker here, as on 6.1): 70 frames, more than one chain's 64.
    @Test("a kernel that refuses RWF_NOWAIT on a TAP: every batch goes as a linked chain through io_uring's worker, in order",
          arguments: [EOPNOTSUPP, EAGAIN])
    func nowaitRefusedWritesLinkedChains(refusal: Int32) throws {
        let pair = try seqpacketPair(buffers: 1 << 20)
        defer { pair.forEach { _ = close($0) } }
        let batching = BatchingTapQueue(TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 12), refusesNowaitForTesting: refusal,
                                        linkedWritesOnWorkersForTesting: true)
        try #require(batching.usesURing)
        #expect(!batching.writesThroughWorkers)
        let frames: [[UInt8]] = (0..<76).map { i in (0..<(64 + i * 5)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) } }
        let (buffers, vectors) = copies(of: frames)
        defer { buffers.forEach { $0.deallocate() } }
        for part in [0..<3, 3..<76] {
            var results = [Int](repeating: 0, count: part.count)
            Array(vectors[part]).withUnsafeBufferPointer { v in
                results.withUnsafeMutableBufferPointer { batching.writeFrames(v, results: $0.baseAddress!) }
            }
            #expect(results == frames[part].map(\.count))
            #expect(batching.writesThroughWorkers)
        }
        #expect(batching.usesURing)
        #expect(batching.uringRefusal == nil)
        #expect(try framesWaiting(on: pair[1]) == frames)
    }

    /// A write that fails in a chain cancels the rest of it: the failed
    /// frame gets its own error, and the cancelled ones are written after
    /// it, still in order.
    @Test("a frame that fails in a linked chain gets its error; the frames after it still arrive, in order")
    func failureInsideALinkedChain() throws {
        let pair = try seqpacketPair(buffers: 64 << 10)
        defer { pair.forEach { _ = close($0) } }
        let batching = BatchingTapQueue(TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 12), refusesNowaitForTesting: EOPNOTSUPP,
                                        linkedWritesOnWorkersForTesting: true)
        // Frame 2 is larger than the socket's send buffer: EMSGSIZE.
        let frames: [[UInt8]] = (0..<6).map { i in [UInt8](repeating: UInt8(i + 1), count: i == 2 ? 1 << 20 : 100 + i) }
        let (buffers, vectors) = copies(of: frames)
        defer { buffers.forEach { $0.deallocate() } }
        var results = [Int](repeating: 0, count: frames.count)
        vectors.withUnsafeBufferPointer { v in
            results.withUnsafeMutableBufferPointer { batching.writeFrames(v, results: $0.baseAddress!) }
        }
        #expect(batching.writesThroughWorkers)
        #expect(results == frames.enumerated().map { $0.offset == 2 ? -Int(EMSGSIZE) : $0.element.count })
        #expect(try framesWaiting(on: pair[1]) == frames.enumerated().filter { $0.offset != 2 }.map(\.element))
    }
}

/// A non-blocking SOCK_SEQPACKET pair: one frame per message, as a TAP
/// queue; with `buffers`, the sender's send and the receiver's receive
/// buffer set to that many bytes.
private func seqpacketPair(buffers: Int32? = nil) throws -> [Int32] {
    var pair: [Int32] = [-1, -1]
    try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
    if var size = buffers {
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(pair[1], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
    return pair
}

/// Each chunk in memory of its own (the caller frees it), and iovecs naming them.
private func copies(of chunks: [[UInt8]]) -> (buffers: [UnsafeMutableRawPointer], vectors: [iovec]) {
    let buffers = chunks.map { c -> UnsafeMutableRawPointer in
        let b = UnsafeMutableRawPointer.allocate(byteCount: c.count, alignment: 8)
        b.copyMemory(from: c, byteCount: c.count)
        return b
    }
    return (buffers, zip(buffers, chunks).map { iovec(iov_base: $0, iov_len: $1.count) })
}

/// Every frame waiting on `fd`, in order.
private func framesWaiting(on fd: Int32) throws -> [[UInt8]] {
    let reader = TapQueue(fileDescriptor: fd, vnetHeaderSize: 12)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 8)
    defer { buffer.deallocate() }
    var received: [[UInt8]] = []
    while let n = try reader.read(into: buffer) { received.append(Array(buffer[..<n])) }
    return received
}
