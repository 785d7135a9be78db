import Glibc
import SystemSupport

// How the NBD servers of the tests are started, stopped and reaped.
//
// Every server runs in a process group of its own, spawned with a clean
// signal mask (Swift Testing's threads block nearly every signal, and a
// child inherits the spawning thread's mask: nbdkit's --exit-with-parent
// death signal would then stay pending forever). Stopping kills the whole
// group with SIGKILL: nbdkit and the scripts of its sh/eval plugins, or
// nbd-server's daemon and its one child per connection (killing only the
// daemon would leave open connections served).
//
// nbd-server always daemonizes (its -d "do not fork" mode serves a single
// connection and then exits, so no second client could connect): its
// daemon and connection children are not our children. This container's
// init reaps such orphans, but only every second or two, so `stop()` waits
// until no member of the group is alive, zombies counting as gone (a
// zombie holds no socket, port or file). The test process is deliberately
// not made a child subreaper (PR_SET_CHILD_SUBREAPER): it would also adopt
// the orphans of every other test (daemons the hotplug scripts start with
// `setsid -f`, for one), which would then stay zombies that `kill -0` still
// finds: tried, the whole suite took 30 s longer.
//
// Every spawn happens on one thread that lives as long as the test process:
// nbdkit's --exit-with-parent (PR_SET_PDEATHSIG) fires when the *thread*
// that created it exits, so a server restarted from a short-lived thread
// would be killed as soon as that thread ended.

/// Spawning, reaping and killing the servers' processes.
enum ServerProcess {
    /// posix_spawn of `arguments` (argv[0] an absolute path) in a new process
    /// group, stdin from /dev/null, stdout and stderr appended to `logPath`,
    /// no descriptor of the test process beyond those three.
    static func spawn(_ arguments: [String], logPath: String) throws -> pid_t {
        let result = SpawningThread.shared.perform { Result { try spawnHere(arguments, logPath: logPath) } }
        return try result.get()
    }

    private static func spawnHere(_ arguments: [String], logPath: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        _ = addCloseFrom?(&actions, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGPIPE, SIGQUIT, SIGALRM, SIGUSR1, SIGUSR2] {
            sigaddset(&defaults, signal)
        }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        let argv = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, arguments[0], &actions, &attributes, argv, environ)
        guard rc == 0 else { throw NBDTestServerError("posix_spawn \(arguments[0]): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Reaps `pid` (a child of ours) if it has exited; its wait status, or
    /// nil while it runs. ECHILD (reaped elsewhere) reads as exited.
    static func reapIfExited(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        while true {
            let rc = waitpid(pid, &status, WNOHANG)
            if rc == pid { return status }
            if rc == 0 { return nil }
            if errno == EINTR { continue }
            return 0
        }
    }

    /// SIGKILL to the whole group, then every member that is our child
    /// reaped, and the others (nbd-server's) waited for until they are gone
    /// or zombies (bounded: 3 s).
    static func killGroup(_ group: pid_t) {
        var status: Int32 = 0
        for _ in 0..<600 {
            var childrenLeft = true
            while true {
                let rc = waitpid(-group, &status, WNOHANG)
                if rc > 0 { continue }
                if rc < 0 && errno == EINTR { continue }
                childrenLeft = rc == 0   // 0: some still running; ECHILD: none of ours left
                break
            }
            // Look before signalling: once the group is empty its number
            // may be reused (pid_max is 32768 here and the suite spawns
            // thousands of processes), and a kill(-group) then would hit
            // another test's new server, whose group has that number.
            if !childrenLeft && !groupHasLiveMembers(group) { return }
            kill(-group, SIGKILL)   // again each turn: a child forked meanwhile
            usleep(5_000)
        }
    }

    /// Whether any process of the group is alive (not a zombie), from /proc.
    static func groupHasLiveMembers(_ group: pid_t) -> Bool {
        guard let directory = opendir("/proc") else { return false }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = pid_t(name), let fields = statFields(pid) else { continue }
            // Fields after the command: state, ppid, pgrp, ...
            if fields.count > 2, pid_t(fields[2]) == group, fields[0] != "Z" { return true }
        }
        return false
    }

    /// Whether a process exists and is not a zombie.
    static func isAlive(_ pid: pid_t) -> Bool {
        guard let fields = statFields(pid) else { return false }
        return fields.first != "Z"
    }

    /// The fields of /proc/PID/stat after the parenthesised command name.
    private static func statFields(_ pid: pid_t) -> [Substring]? {
        guard let text = readSmallFile("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        return text[text.index(after: close)...].split(separator: " ")
    }
}

/// One thread, started on first use and never ended, that runs closures
/// handed to it one at a time: where servers are spawned.
final class SpawningThread: @unchecked Sendable {   // `queue` guarded by `condition`
    static let shared = SpawningThread()

    private let condition = Condition()
    private var queue: [@Sendable () -> Void] = []
    private var thread: NativeThread?

    private init() {
        thread = try! NativeThread(name: "nbd-test-spawn") { [self] in
            while true {
                let work = condition.withLock {
                    while queue.isEmpty { condition.wait() }
                    return queue.removeFirst()
                }
                work()
            }
        }
    }

    /// Runs `body` on the spawning thread and returns its value.
    func perform<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let answer = Handoff<T>()
        condition.withLock {
            queue.append { answer.put(body()) }
            condition.broadcast()
        }
        return answer.take()
    }
}

private typealias AddCloseFromFunction = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
// A GNU extension (glibc ≥ 2.34) the Glibc module does not import.
private let addCloseFrom = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np").map {
    unsafeBitCast($0, to: AddCloseFromFunction.self)
}

/// A small text file's content (the /proc files, PID files, logs), or nil.
func readSmallFile(_ path: String, limit: Int = 65536) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: limit)
    var total = 0
    while total < limit {
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + total, limit - total) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        total += n
    }
    return String(decoding: bytes[0..<total], as: UTF8.self)
}
