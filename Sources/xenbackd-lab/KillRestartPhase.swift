import BlockFrontend
import Glibc
import Hypervisor
import SystemSupport
import XenBus

/// `bench scale --kill-restart`: every guest does verified I/O on its
/// disk (a BystanderGuest each) while the daemon is killed with SIGKILL and
/// started again, as DaemonRestartTests does with one guest. Each must go
/// on without an error: no failed request, no mismatch, I/O again after
/// the restart, both devices still Connected on both ends (no reconnect),
/// and a ping through its vif answered.
struct KillRestartPhase {
    let world: ScaleWorld
    let store: any XenStore
    let guests: [ScaleGuest]
    let afterRestart: Double

    /// How many guests went on.
    func run() throws -> Int {
        note("kill -9 under I/O: starting verified I/O on \(guests.count) guests")
        let loads = guests.map { BystanderGuest(frontend: $0.blkfront!, seed: UInt64($0.domid) &* 7, queueDepth: 4) }
        usleep(1_000_000)
        let killedAt = MonotonicClock.seconds()
        world.killDaemon()
        note("daemon killed; starting it again")
        try world.startDaemon()
        let restarted = MonotonicClock.seconds()
        // Until every guest has made progress since the restart, then a little more.
        var all = false
        while MonotonicClock.seconds() - restarted < 60 {
            all = loads.allSatisfy { $0.progress.lastProgress > restarted }
            if all { break }
            usleep(50_000)
        }
        let resumed = MonotonicClock.seconds()
        usleep(useconds_t(afterRestart * 1e6))
        var wentOn = 0, resent = 0
        for (g, load) in zip(guests, loads) {
            let (summary, failure) = load.finish()
            var problems: [String] = []
            if let failure { problems.append(failure) }
            if summary.errors > 0 || summary.mismatches > 0 {
                problems.append("\(summary.errors) errors, \(summary.mismatches) mismatches")
            }
            for (type, devid) in [("vbd", 51712), ("vif", 0)] {
                let be = "/local/domain/0/backend/\(type)/\(g.domid)/\(devid)"
                let fe = "/local/domain/\(g.domid)/device/\(type)/\(devid)"
                if store.readState(be) != .connected || store.readState(fe) != .connected {
                    problems.append("\(type) not Connected on both ends after the restart")
                }
            }
            do { resent += try g.ping() > 0 ? 1 : 0 } catch { problems.append("ping after the restart: \(error)") }
            if problems.isEmpty { wentOn += 1 } else { note("dom\(g.domid) after the restart: " + problems.joined(separator: "; ")) }
        }
        say("kill -9 under I/O: the daemon was back \(fixed(restarted - killedAt, 2)) s after the kill; every guest's I/O "
            + (all ? "went on within \(fixed(resumed - restarted, 2)) s of the restart" : "had NOT resumed 60 s after the restart")
            + "; \(resent) guests' first ping after it went unanswered and was sent again")
        return wentOn
    }
}
