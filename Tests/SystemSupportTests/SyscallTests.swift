import Glibc
import SystemPackage
import SystemSupport
import Testing

@Suite("Syscall: the wrappers' results and typed errors")
struct SyscallTests {
    @Test("a failed call throws a SystemError with the call's name and its errno")
    func errorNamesTheCall() {
        var byte: UInt8 = 0
        #expect(throws: SystemError("read", errno: .badFileDescriptor)) { try Syscall.read(-1, &byte, 1) }
        #expect(throws: SystemError("writev", errno: .badFileDescriptor)) {
            try [iovec()].withUnsafeBufferPointer { v throws(SystemError) in try Syscall.writev(-1, v) }
        }
        #expect(throws: SystemError("waitpid", errno: .noChildProcess)) { try Syscall.waitpid(getpid(), options: WNOHANG) }
        #expect(throws: SystemError("fopen", errno: .noSuchFileOrDirectory)) {
            try Syscall.retryingOnInterrupt("fopen", nonNil: { fopen("/nonexistent/file", "r") })
        }
        let error = SystemError("read", errno: .badFileDescriptor)
        #expect(error.code == EBADF)
        #expect(error.description == "read: Bad file descriptor (errno \(EBADF))")
    }

    @Test("a named wrapper's error keeps what it was for: connect names the socket's path")
    func connectNamesThePath() {
        #expect(throws: SystemError("connect /nonexistent/xenbackd.sock", errno: .noSuchFileOrDirectory)) {
            try UnixSocket.connect(to: "/nonexistent/xenbackd.sock")
        }
    }

    @Test("unlessWouldBlock: an empty non-blocking pipe reads as nil, then its data")
    func wouldBlockIsNil() throws {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        defer { fds.forEach { _ = close($0) } }
        _ = fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 1)
        defer { buffer.deallocate() }
        let readEnd = fds[0]
        func readNow() throws(SystemError) -> Int? {
            try Syscall.unlessWouldBlock { () throws(SystemError) in try Syscall.read(readEnd, buffer.baseAddress, buffer.count) }
        }
        #expect(try readNow() == nil)
        let bytes: [UInt8] = [1, 2, 3]
        #expect(try bytes.withUnsafeBytes { raw throws(SystemError) in try Syscall.write(fds[1], raw.baseAddress, raw.count) } == 3)
        #expect(try readNow() == 3)
        #expect(Array(buffer[..<3]) == [1, 2, 3])
        close(fds[1]); fds[1] = -1
        #expect(try readNow() == 0)   // end of file is not "would block"
    }

    @Test("poll returns the ready count: 0 on a timeout, 1 when readable")
    func pollCounts() throws {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        defer { fds.forEach { _ = close($0) } }
        var entry = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        #expect(try Syscall.poll(&entry, 1, timeoutMilliseconds: 0) == 0)
        var byte: UInt8 = 1
        _ = try Syscall.write(fds[1], &byte, 1)
        #expect(try Syscall.poll(&entry, 1, timeoutMilliseconds: 1000) == 1)
        #expect(entry.revents & Int16(POLLIN) != 0)
    }

    @Test("waitpid reaps a child and gives its exit status")
    func waitpidReaps() throws {
        let result = try runProcess(["/bin/sh", "-c", "exit 3"], environment: [:])
        #expect(result.status == 3)
    }
}
