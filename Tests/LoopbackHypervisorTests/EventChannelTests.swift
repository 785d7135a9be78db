import Glibc
import Hypervisor
import LoopbackHypervisor
import Testing

@Suite("loopback event channels")
struct EventChannelTests {
    func waitReadable(_ fd: Int32, ms: Int32 = 1000) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, ms) == 1
    }

    @Test("bind an unbound port, notify both ways, pending ports read from the fd")
    func bindAndNotify() throws {
        let lb = try Loopback()
        let front = try lb.guest.openEventChannels()
        let back = try lb.platform.openEventChannels()
        let unbound = try front.allocateUnbound(remoteDomain: 0)
        let local = try back.bindInterdomain(remoteDomain: 1, remotePort: unbound)
        #expect(try back.nextPending() == nil)
        try front.notify(unbound)
        #expect(waitReadable(back.fileDescriptor))
        #expect(try back.nextPending() == local)
        #expect(try back.nextPending() == nil)
        try back.unmask(local)
        try back.notify(local)
        #expect(waitReadable(front.fileDescriptor))
        #expect(try front.nextPending() == unbound)
    }

    @Test("a fired port stays masked until unmask, and a notify meanwhile is delivered at unmask")
    func maskingSemantics() throws {
        let lb = try Loopback()
        let front = try lb.guest.openEventChannels()
        let back = try lb.platform.openEventChannels()
        let unbound = try front.allocateUnbound(remoteDomain: 0)
        let local = try back.bindInterdomain(remoteDomain: 1, remotePort: unbound)
        for _ in 0..<5 { try front.notify(unbound) }
        #expect(try back.nextPending() == local)
        #expect(try back.nextPending() == nil)      // coalesced while masked
        try back.unmask(local)
        #expect(try back.nextPending() == local)    // the notifies after delivery were kept pending
        try back.unmask(local)
        #expect(try back.nextPending() == nil)
    }

    @Test("binding checks the remote port: only once, only for the domain it was allocated to")
    func bindChecks() throws {
        let lb = try Loopback()
        let front = try lb.guest.openEventChannels()
        let back = try lb.platform.openEventChannels()
        let forOther = try front.allocateUnbound(remoteDomain: 5)
        #expect(throws: HypervisorError.self) { try back.bindInterdomain(remoteDomain: 1, remotePort: forOther) }
        let unbound = try front.allocateUnbound(remoteDomain: 0)
        let local = try back.bindInterdomain(remoteDomain: 1, remotePort: unbound)
        #expect(throws: HypervisorError.self) { try back.bindInterdomain(remoteDomain: 1, remotePort: unbound) }
        #expect(throws: HypervisorError.self) { try back.bindInterdomain(remoteDomain: 1, remotePort: 5000) }
        // After unbind the frontend's port is unbound again and can be re-bound (a backend restart).
        try back.unbind(local)
        let again = try back.bindInterdomain(remoteDomain: 1, remotePort: unbound)
        try front.notify(unbound)
        #expect(waitReadable(back.fileDescriptor))
        #expect(try back.nextPending() == again)
    }

    @Test("notifications are cheap: over a million a second while the receiver is masked")
    func notificationRate() throws {
        let lb = try Loopback()
        let front = try lb.guest.openEventChannels()
        let back = try lb.platform.openEventChannels()
        let unbound = try front.allocateUnbound(remoteDomain: 0)
        _ = try back.bindInterdomain(remoteDomain: 1, remotePort: unbound)
        let n = 1_000_000
        // This thread's CPU time, not the wall clock: other work on a
        // loaded machine (CI's two cores, parallel builds) must not count.
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0)
        for _ in 0..<n { try front.notify(unbound) }
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1)
        let seconds = Double(t1.tv_sec - t0.tv_sec) + Double(t1.tv_nsec - t0.tv_nsec) / 1e9
        #expect(Double(n) / seconds > 1_000_000, "\(Double(n) / seconds) notifications/s")
    }
}
