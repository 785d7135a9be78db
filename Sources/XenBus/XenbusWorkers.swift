import SystemSupport

/// Where a device's blocking work runs (opening a disk, draining a ring,
/// flushing before close), so that the control loop's thread only ever
/// waits for xenstore. The framework never gives one device two jobs at a
/// time; different devices' jobs run side by side.
public enum XenbusWorkers: Sendable {
    /// Up to `threads` jobs at once on threads of their own (the daemon).
    case threads(Int)
    /// On the caller's thread, at once: a test or fuzzer that steps the
    /// control plane stays on one thread and deterministic.
    case inline

    public static let defaultThreads = 8
}

/// The jobs of every device of a daemon: a FIFO served by a few threads,
/// started as work arrives; a worker idle for `idleSeconds` (1 s) ends, so an
/// idle daemon keeps none.
final class XenbusJobQueue: @unchecked Sendable {   // `jobs`, `running`, `threads` guarded by `condition`
    private let mode: XenbusWorkers
    private let condition = Condition()
    private var jobs: [@Sendable () -> Void] = []
    private var idleThreads = 0
    private var threads: [NativeThread] = []
    private var running = 0
    private var stopping = false
    static let idleSeconds = 1

    init(_ mode: XenbusWorkers) { self.mode = mode }

    /// Runs `job` now (inline) or on a worker. Throws only when no worker
    /// can be started at all (the caller fails that one device).
    func submit(_ job: @escaping @Sendable () -> Void) throws(SystemError) {
        guard case .threads(let limit) = mode else {
            job()
            return
        }
        let spawn: Bool = condition.withLock {
            jobs.append(job)
            condition.broadcast()
            return idleThreads == 0 && threads.count < max(1, limit)
        }
        guard spawn else { return }
        do {
            let t = try NativeThread(name: "xenbus-worker") { [self] in self.serve() }
            condition.withLock { threads.append(t) }
        } catch {
            // With at least one worker alive the job still runs; with none it never would.
            let alive = condition.withLock { threads.count }
            if alive == 0 {
                condition.withLock { _ = jobs.popLast() }
                throw error
            }
        }
    }

    private func serve() {
        while true {
            let next: (@Sendable () -> Void)? = condition.withLock {
                idleThreads += 1
                while jobs.isEmpty && !stopping {
                    if !condition.wait(seconds: Self.idleSeconds) && jobs.isEmpty { break }
                }
                idleThreads -= 1
                guard !jobs.isEmpty else {
                    // Idle (or stopping): leave. `stop` joins the ones still listed.
                    if !stopping, let i = threads.firstIndex(where: { $0.isCurrent }) { threads.remove(at: i).detach() }
                    return nil
                }
                running += 1
                return jobs.removeFirst()
            }
            guard let job = next else { return }
            job()
            condition.withLock {
                running -= 1
                condition.broadcast()
            }
        }
    }

    /// Blocks until no job is queued or running (daemon shutdown).
    func waitUntilIdle() {
        condition.withLock {
            while !jobs.isEmpty || running > 0 { condition.wait() }
        }
    }

    /// Runs what is queued, then ends the workers and joins them.
    func stop() {
        let all: [NativeThread] = condition.withLock {
            stopping = true
            condition.broadcast()
            return threads
        }
        for t in all where !t.isCurrent { t.join() }
    }
}
