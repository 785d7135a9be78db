import Glibc
import Synchronization
import SystemSupport
import Testing

/// SIGUSR1s the handler below has run.
private let signalsHandled = Atomic<Int>(0)
/// Reads that returned (so signalling can stop).
private let readsReturned = Atomic<Int>(0)

/// A reader thread blocked in a pipe read while SIGUSR1 (with a handler
/// installed without SA_RESTART, so the kernel does not restart the read)
/// is sent to it, before the data arrives.
@Suite("A system call interrupted by a signal", .serialized)
struct InterruptedReadTests {
    @Test("Syscall.read is called again and returns the data that came after the signals")
    func wrapperRetries() throws {
        let (result, signals) = try readWhileSignalled { fd, buffer in
            Result { () throws(SystemError) in try Syscall.read(fd, buffer, 1) }
        }
        #expect(signals > 0)
        #expect(result == .success(1))
    }

    /// The control: the same set-up makes a bare read fail with EINTR, so
    /// the test above does interrupt the read it retries.
    @Test("a bare read fails with EINTR under the same signals")
    func bareReadIsInterrupted() throws {
        let (result, signals) = try readWhileSignalled { fd, buffer in
            let n = Glibc.read(fd, buffer, 1)
            return n >= 0 ? .success(n) : .failure(SystemError("read", errno: errno))
        }
        #expect(signals > 0)
        #expect(result == .failure(SystemError("read", errno: .interrupted)))
    }

    /// Runs `read` on a thread of its own on an empty pipe, signals that
    /// thread until a signal has been handled while it waits (or the read
    /// returned), then writes one byte.
    private func readWhileSignalled(
        _ read: @escaping @Sendable (Int32, UnsafeMutableRawPointer) -> Result<Int, SystemError>
    ) throws -> (Result<Int, SystemError>, Int) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        defer { fds.forEach { _ = close($0) } }
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in signalsHandled.add(1, ordering: .relaxed) }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0   // no SA_RESTART: the read is interrupted
        var previous = sigaction()
        guard sigaction(SIGUSR1, &action, &previous) == 0 else { throw SystemError("sigaction", errno: errno) }
        defer { sigaction(SIGUSR1, &previous, nil) }
        let before = signalsHandled.load(ordering: .relaxed)
        let returnedBefore = readsReturned.load(ordering: .relaxed)

        let readerID = Handoff<pthread_t>()
        let outcome = Handoff<Result<Int, SystemError>>()
        let readEnd = fds[0]
        let reader = try NativeThread(name: "interrupted-read") {
            // Test runners' threads block most signals; this one takes SIGUSR1.
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, SIGUSR1)
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            readerID.put(pthread_self())
            var byte: UInt8 = 0
            let result = read(readEnd, &byte)
            readsReturned.add(1, ordering: .relaxed)
            outcome.put(result)
        }
        let thread = readerID.take()
        // Signal until one was handled after the reader had time to block in read.
        for _ in 0..<100 where signalsHandled.load(ordering: .relaxed) - before < 3
            && readsReturned.load(ordering: .relaxed) == returnedBefore {
            usleep(20_000)
            pthread_kill(thread, SIGUSR1)
        }
        usleep(20_000)
        var byte: UInt8 = 7
        _ = write(fds[1], &byte, 1)
        let result = outcome.take()
        reader.join()
        return (result, signalsHandled.load(ordering: .relaxed) - before)
    }
}
