import Foundation
import NetFrontend
import SystemSupport

/// `xenbackd-lab fuzz --net`: the hostile guest's vif (HostileNetfront) and the
/// bystander's two vifs passing verified frames (NetBystander), all on one
/// bridge in the daemon's network namespace; checked from outside after
/// every round: the daemon lists both bystander vifs Connected with no
/// error, and the bystander has seen no corrupted frame, no refused frame,
/// and is not stalled.
final class NetSide {
    let hostile: HostileNetfront
    let bystander: NetBystander
    private let quiet: [LoopbackNetFrontend]
    private let daemon: DaemonProbe
    private let bystanderDevices: [String]
    private(set) var failures: [String] = []
    private var finished = false
    private var bystanderStalled = false

    static func mac(_ domid: UInt16, _ devid: UInt32) -> [UInt8] { [0x00, 0x16, 0x3e, UInt8(domid), 0x00, UInt8(devid)] }
    static func text(_ mac: [UInt8]) -> String { mac.map { String(format: "%02x", $0) }.joined(separator: ":") }

    init(fuzz: Fuzz, seed: UInt64, hostileDomain: SimulatedDomain, bystanderDomain: SimulatedDomain, daemon: DaemonProbe) throws {
        self.daemon = daemon
        let bystanderDomid = bystanderDomain.domid, domid = hostileDomain.domid
        bystanderDevices = ["vif-\(bystanderDomid)-0", "vif-\(bystanderDomid)-1"]
        var ends: [LoopbackNetFrontend] = []
        for devid: UInt32 in [0, 1] {
            try bystanderDomain.addNic(devid: devid, mac: Self.text(Self.mac(bystanderDomid, devid)), bridge: fuzz.bridge)
            let fe = try bystanderDomain.netFrontend(devid: devid, options: .init())
            try fe.connect(timeout: 10)
            ends.append(fe)
        }
        quiet = ends
        bystander = try NetBystander(ends[0], macA: Self.mac(bystanderDomid, 0), ends[1], macB: Self.mac(bystanderDomid, 1),
                                     seed: seed ^ 0x0B57_A2DE_4E70)
        let hostileMAC = Self.mac(domid, 0)
        let bridge = fuzz.bridge
        try hostileDomain.addNic(devid: 0, mac: Self.text(hostileMAC), bridge: bridge)
        var options = HostileNetfront.Options(seed: seed)
        options.expectReconnect = fuzz.expectReconnect
        options.reconnectTimeout = fuzz.reconnectTimeout
        let name = "vif-\(domid)-0"
        hostile = try HostileNetfront(makeFrontend: { try hostileDomain.netFrontend(devid: 0, options: $0) }, mac: hostileMAC,
                                      options: options) {
            // The backend will not offer the vif again: the toolstack makes it anew.
            try hostileDomain.removeNic(devid: 0)
            try daemon.waitUntilGone(name)
            try hostileDomain.addNic(devid: 0, mac: Self.text(hostileMAC), bridge: bridge)
        }
        try hostile.connect()
    }

    var failureCount: Int { hostile.failures.count + failures.count }

    /// A failure that ends the run, if any.
    func check(round: Int, seed: UInt64) -> String? {
        let tag = "round \(round) (seed \(seed))"
        guard let devices = try? daemon.devices() else { return "\(tag): the daemon does not answer status" }
        for name in bystanderDevices {
            guard let d = devices.first(where: { $0.device == name }) else {
                return "\(tag): the daemon no longer lists the bystander's vif \(name)"
            }
            if d.state != "Connected" || d.errors > 0 {
                return "\(tag): the bystander's vif \(name) is \(d.state) with \(d.errors) errors" + (d.lastError.map { " (\($0))" } ?? "")
            }
        }
        let p = bystander.progress
        if let f = p.failures.first { return "\(tag): the net bystander failed: \(f)" }
        if p.summary.corrupted > 0 { return "\(tag): the net bystander received \(p.summary.corrupted) corrupted frames" }
        if p.summary.txErrors > 0 { return "\(tag): \(p.summary.txErrors) of the net bystander's frames were answered ERROR" }
        if MonotonicClock.seconds() - p.lastProgress > 15 {
            bystanderStalled = true
            return "\(tag): the net bystander has verified no frame for 15 s"
        }
        return nil
    }

    /// Stops the bystander, closes every vif; the end's failures.
    func finish(maxLossPercent: Double, closeHostile: Bool) -> [String] {
        finished = true
        var out = failures
        guard !bystanderStalled else { return out + ["the net bystander is stalled: its thread is left to the exit"] }
        let (s, bf) = bystander.finish()
        out += bf.map { "net bystander: \($0)" }
        say("fuzz: net bystander: " + Self.line(s))
        if s.verified == 0 { out.append("net bystander: no frame verified") }
        if s.corrupted > 0 { out.append("net bystander: \(s.corrupted) corrupted frames") }
        if s.txErrors > 0 { out.append("net bystander: \(s.txErrors) frames answered ERROR") }
        if Double(s.lost) > Double(s.sent) * maxLossPercent / 100 {
            out.append("net bystander: \(s.lost) of \(s.sent) frames lost, more than \(maxLossPercent) %")
        }
        for fe in quiet {
            do { try fe.disconnect(timeout: 5) } catch { out.append("net bystander: closing vif \(fe.devid): \(error)") }
        }
        if closeHostile { hostile.close() }
        return hostile.failures.map(\.description) + out
    }

    /// When the run ends early: stop the bystander's thread (if it can be joined).
    func abandon() {
        guard !finished, !bystanderStalled else { return }
        finished = true
        _ = bystander.finish()
    }

    func report() -> String {
        let c = hostile.counters
        return "\(c.rounds) rounds, \(c.frames) frames (\(c.wellFormed) well-formed, \(c.refusable) to refuse, "
            + "\(c.kernelDecides) offloads), \(c.slots) slots: \(c.okay) OKAY, \(c.error) ERROR, \(c.dropped) DROPPED, \(c.null) NULL; "
            + "rx \(c.rxPosted) posted, \(c.rxData) filled, \(c.rxErrors) ERROR, \(c.bystanderFramesSeen) bystander frames seen; "
            + "\(c.breaches) breaches, \(c.closes) closes, \(c.spuriousStates) out-of-turn states, \(c.reconnects) reconnects, \(c.refusedReconnects) refused "
            + "(\(c.recreated) re-created), \(c.unansweredAtClose) unanswered at close; bystander: " + Self.line(bystander.progress.summary)
    }

    static func line(_ s: NetBystander.Summary) -> String {
        "\(s.sent) frames sent, \(s.verified) verified (\(s.late) late), \(s.lost) lost, \(s.corrupted) corrupted, "
            + "\(s.duplicates) duplicates, \(s.foreign) foreign, \(s.txDropped) DROPPED, \(s.txErrors) ERROR"
    }
}
