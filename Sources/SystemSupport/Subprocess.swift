import Glibc

// Subprocesses: the tests and the network benchmark run real tools (hotplug
// scripts, ip, ping, iperf3). Never on a data path.

/// What a finished subprocess left.
public struct ProcessResult: CustomStringConvertible {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var seconds: Double
    public var description: String { "exit \(status) after \((seconds * 100).rounded() / 100)s; stdout: \(stdout) stderr: \(stderr)" }
}

/// Runs `arguments` (a program and its arguments) with exactly `environment`,
/// bounded by `timeout` seconds (coreutils timeout, so a hung script fails
/// the test instead of hanging it).
///
/// posix_spawn, not Foundation's Process: Process hands the child the
/// spawning thread's signal mask, and Swift Testing's threads block nearly
/// every signal, so a script would start with SIGTERM and SIGCHLD blocked
/// (a stub daemon could not be stopped, `wait` misbehaves). Here the child
/// gets an empty mask, default dispositions, stdin from /dev/null and no
/// descriptor of the test process beyond its two pipes.
@discardableResult
public func runProcess(_ arguments: [String], environment: [String: String], timeout: Int = 60) throws -> ProcessResult {
    let argv = ["/usr/bin/timeout", "-k", "5", String(timeout)] + arguments
    let envp = environment.map { "\($0.key)=\($0.value)" }
    var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
    guard gnuPipe2(&outPipe, O_CLOEXEC) == 0 else { throw SystemError("pipe2", errno: errno) }
    guard gnuPipe2(&errPipe, O_CLOEXEC) == 0 else {
        let saved = errno
        outPipe.forEach { _ = Glibc.close($0) }
        throw SystemError("pipe2", errno: saved)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    _ = gnuAddCloseFrom?(&actions, 3)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attributes, &empty)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGPIPE, SIGQUIT, SIGALRM, SIGUSR1, SIGUSR2] { sigaddset(&defaults, signal) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

    let start = MonotonicClock.seconds()
    var pid: pid_t = 0
    let cArgs = argv.map { strdup($0) } + [nil]
    let cEnv = envp.map { strdup($0) } + [nil]
    defer { (cArgs + cEnv).forEach { free($0) } }
    let rc = posix_spawn(&pid, argv[0], &actions, &attributes, cArgs, cEnv)
    Glibc.close(outPipe[1])
    Glibc.close(errPipe[1])
    guard rc == 0 else {
        Glibc.close(outPipe[0])
        Glibc.close(errPipe[0])
        throw SystemError("posix_spawn \(argv[0])", errno: rc)
    }
    // Both pipes at once: a full stderr pipe must not stall the child.
    var output: [Int32: [UInt8]] = [outPipe[0]: [], errPipe[0]: []]
    var open = [outPipe[0], errPipe[0]]
    var buffer = [UInt8](repeating: 0, count: 65536)
    while !open.isEmpty {
        var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        do throws(SystemError) {
            _ = try Syscall.poll(&fds, fds.count, timeoutMilliseconds: -1)
        } catch {
            break
        }
        for entry in fds where entry.revents != 0 {
            let n = (try? Syscall.read(entry.fd, &buffer, buffer.count)) ?? -1
            if n > 0 {
                output[entry.fd]!.append(contentsOf: buffer[0..<n])
            } else {
                Glibc.close(entry.fd)
                open.removeAll { $0 == entry.fd }
            }
        }
    }
    open.forEach { _ = Glibc.close($0) }
    let status = (try? Syscall.waitpid(pid))?.status ?? 0
    // WIFEXITED / WEXITSTATUS; a signal death reads as 128 + signal, as in a shell.
    let exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return ProcessResult(status: exitStatus,
                         stdout: String(decoding: output[outPipe[0]]!, as: UTF8.self),
                         stderr: String(decoding: output[errPipe[0]]!, as: UTF8.self),
                         seconds: MonotonicClock.seconds() - start)
}

// pipe2 and posix_spawn_file_actions_addclosefrom_np are GNU extensions the
// Glibc module does not import; glibc (≥ 2.34) has both.
private typealias Pipe2Function = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32
private typealias AddCloseFromFunction = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
private let gnuPipe2Pointer = dlsym(nil, "pipe2").map { unsafeBitCast($0, to: Pipe2Function.self) }
private let gnuAddCloseFrom = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np").map { unsafeBitCast($0, to: AddCloseFromFunction.self) }

private func gnuPipe2(_ fds: inout [Int32], _ flags: Int32) -> Int32 {
    guard let pipe2 = gnuPipe2Pointer else {
        let rc = pipe(&fds)
        if rc == 0 { fds.forEach { _ = fcntl($0, F_SETFD, FD_CLOEXEC) } }
        return rc
    }
    return fds.withUnsafeMutableBufferPointer { pipe2($0.baseAddress!, flags) }
}

/// The PATH given to tools we run (a short, fixed one, as udev and libxl do).
public let toolPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/// Runs a command; throws with its output unless it exits 0.
@discardableResult
public func sh(_ arguments: [String], timeout: Int = 60) throws -> String {
    let r = try runProcess(arguments, environment: ["PATH": toolPath], timeout: timeout)
    guard r.status == 0 else { throw CommandFailed(description: "\(arguments.joined(separator: " ")): \(r)") }
    return r.stdout
}

public struct CommandFailed: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}
