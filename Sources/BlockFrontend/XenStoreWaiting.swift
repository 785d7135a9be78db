import Glibc
import Hypervisor
import SystemSupport

/// Waiting on xenstore from a frontend: a watch, then poll its fd until a
/// condition holds or the time runs out.
public struct FrontendTimeout: Error, CustomStringConvertible, Sendable {
    public var what: String
    public var description: String { "timed out waiting for \(what)" }
}

extension XenStore {
    /// Waits until `condition` returns a value (re-evaluated after each watch
    /// event on `path`), up to `seconds`.
    func waitFor<T>(_ path: String, seconds: Double, what: String, _ condition: () -> T?) throws -> T {
        let token = "wait-\(UInt32.random(in: 0...UInt32.max))"
        try watch(path, token: token)
        defer { try? unwatch(path, token: token) }
        let deadline = MonotonicClock.seconds() + seconds
        while true {
            if let v = condition() { return v }
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 { throw FrontendTimeout(what: what) }
            var pfd = pollfd(fd: watchFileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, Int32(min(left, 0.2) * 1000) + 1)
            while let _ = try nextWatchEvent() {}
        }
    }
}
