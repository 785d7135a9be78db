import Glibc
import NetworkPlumbing
import Testing

/// TapQueue's reads and writes go through SystemSupport's Syscall: nothing
/// waiting is still nil (EAGAIN), a failure names its call with its errno.
/// A non-blocking SOCK_SEQPACKET pair stands in for the TAP (one frame per message).
@Suite("a TAP queue's calls: EAGAIN as nil, failures named")
struct TapQueueCallTests {
    @Test("an empty queue reads as nil, a written frame reads back whole")
    func emptyThenFrame() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
        defer { pair.forEach { _ = close($0) } }
        let ours = TapQueue(fileDescriptor: pair[0], vnetHeaderSize: 0)
        let theirs = TapQueue(fileDescriptor: pair[1], vnetHeaderSize: 0)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        #expect(try ours.read(into: buffer) == nil)

        var frame: [UInt8] = Array(0..<20)
        let written = try frame.withUnsafeMutableBytes { raw in
            try [iovec(iov_base: raw.baseAddress, iov_len: raw.count)].withUnsafeBufferPointer { try theirs.write($0) }
        }
        #expect(written == 20)
        #expect(try ours.read(into: buffer) == 20)
        #expect(Array(buffer[..<20]) == frame)
        #expect(try ours.read(into: buffer) == nil)
    }

    @Test("a failed read or write is .system with the call's name and errno")
    func failureNamesTheCall() {
        let closed = TapQueue(fileDescriptor: -1, vnetHeaderSize: 0)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
        defer { buffer.deallocate() }
        #expect(throws: NetworkError.system(call: "read", interface: "", errno: EBADF)) { try closed.read(into: buffer) }
        let vector = [iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)]
        #expect(throws: NetworkError.system(call: "readv", interface: "", errno: EBADF)) {
            try vector.withUnsafeBufferPointer { try closed.read($0) }
        }
        #expect(throws: NetworkError.system(call: "writev", interface: "", errno: EBADF)) {
            try vector.withUnsafeBufferPointer { try closed.write($0) }
        }
    }
}
