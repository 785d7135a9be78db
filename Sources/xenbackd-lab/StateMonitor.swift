import BlockFrontend
import Glibc
import Synchronization
import SystemSupport
import XenStoreClient

/// One dom0 observer of every xenbus `state` node under /local/domain: it
/// notes when each device directory's state first changed (the toolstack's
/// keys committed) and when each value was first seen, so that both ends'
/// times come from one clock and one watcher.
final class StateMonitor: @unchecked Sendable {   // `firstEvent`, `firstSeen` only under `lock`
    private let store: XenStoreSocketClient
    private let lock = PThreadMutex()
    private var firstEvent: [String: Double] = [:]
    private var firstSeen: [String: [Int: Double]] = [:]
    private let stopping = Atomic<Bool>(false)
    private var thread: NativeThread?

    init(socket: String) throws {
        store = try XenStoreSocketClient(socketPath: socket)
        try store.watch("/local/domain", token: "scale-monitor")
        thread = try NativeThread(name: "state-monitor") { [unowned self] in self.loop() }
    }

    private func loop() {
        while !stopping.load(ordering: .acquiring) {
            var pfd = pollfd(fd: store.watchFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 100)
            while let event = try? store.nextWatchEvent() {
                guard event.path.hasSuffix("/state") else { continue }
                let now = MonotonicClock.seconds()
                let directory = String(event.path.dropLast("/state".count))
                let value = ((try? store.read(event.path)) ?? nil).flatMap { Int($0) }
                lock.withLock {
                    if firstEvent[directory] == nil { firstEvent[directory] = now }
                    if let value, firstSeen[directory]?[value] == nil { firstSeen[directory, default: [:]][value] = now }
                }
            }
        }
    }

    /// When `directory`'s state node first changed.
    func firstChange(_ directory: String) -> Double? { lock.withLock { firstEvent[directory] } }

    /// When `directory`'s state was first seen at `state` or beyond (a
    /// state passed between two looks is taken as reached at the later one).
    func reached(_ directory: String, _ state: Int) -> Double? {
        lock.withLock { firstSeen[directory]?.filter { $0.key >= state && $0.key <= 4 }.map(\.value).min() }
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        thread?.join()
        thread = nil
        store.close()
    }
}

/// Percentiles of a set of durations (seconds).
struct Durations {
    private(set) var values: [Double] = []
    mutating func add(_ v: Double) { values.append(v) }
    var count: Int { values.count }

    func percentile(_ p: Double) -> Double {
        guard !values.isEmpty else { return 0 }
        let sorted = values.sorted()
        let rank = Int((Double(sorted.count) * p).rounded(.up)) - 1
        return sorted[Swift.min(Swift.max(rank, 0), sorted.count - 1)]
    }

    var max: Double { values.max() ?? 0 }

    /// "p50 A ms, p99 B ms, max C ms (n)".
    var summary: String {
        "p50 \(ms(percentile(0.5))) ms, p99 \(ms(percentile(0.99))) ms, max \(ms(max)) ms (\(count) devices)"
    }
}

func ms(_ seconds: Double) -> String { fixed(seconds * 1000, seconds < 0.01 ? 1 : 0) }
