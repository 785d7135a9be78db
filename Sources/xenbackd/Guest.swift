import ArgumentParser
import BlockFrontend
import Glibc
import Hypervisor
import LoopbackHypervisor
import XenABI
import XenStoreClient

/// `xenbackd guest`: a simulated guest on the loopback hypervisor. It plays
/// the toolstack (creates the domain and its vbd the way libxl does) and
/// the guest's blkfront, runs a verified mixed workload against a running
/// `xenbackd run`, checks the whole disk, and unplugs.
struct Guest: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a simulated guest with a verified disk workload.")

    @Option(help: "Loopback hypervisor root folder.")
    var root: String = "/run/xenbackd/loopback"
    @Option(help: "The guest's domain id.")
    var domid: UInt16 = 1
    @Option(help: "Disk image (becomes the vbd's params).")
    var disk: String
    @Option(help: "Seconds of mixed workload.")
    var seconds: Double = 10
    @Option(help: "Requests in flight.")
    var queueDepth: Int = 16
    @Option(help: "Ring size as a power of two pages (0-4).")
    var ringPageOrder: Int = 0
    @Option(help: "Workload seed.")
    var seed: UInt64 = 42

    func run() throws {
        let layout = LoopbackLayout(root: root)
        let dom0 = try XenStoreSocketClient(socketPath: layout.xenStoreSocket)
        let toolstack = LoopbackToolstack(store: dom0)
        let d = DomID(domid)
        let guest = try LoopbackGuestDomain(layout: layout, domain: d)
        defer { guest.destroy() }
        try toolstack.createDomain(d, name: "demo-guest\(d)")
        try dom0.introduceDomain(d)
        defer { try? toolstack.destroyDomain(d); try? dom0.releaseDomain(d) }
        try toolstack.addDisk(domain: d, .init(params: disk))
        say("toolstack: dom\(d) created, vbd 51712 (xvda) -> \(disk)")

        let fe = LoopbackBlockFrontend(guest: guest, store: try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(d)))
        try fe.connect(ringPageOrder: ringPageOrder)
        let i = fe.info
        say("blkfront: Connected: \(i.sectors) sectors of \(i.sectorSize) bytes, ring \(fe.ringSlots) slots, "
              + "flush=\(i.flush) barrier=\(i.barrier) discard=\(i.discard) read-only=\(i.readOnly)")

        var workload = VerifiedWorkload(sectors: i.sectors, seed: seed, queueDepth: queueDepth,
                                        canDiscard: i.discard, canFlush: i.flush)
        let summary = try workload.run(on: fe, seconds: seconds) { s in
            progressLine("workload \(fixed(s.seconds, 0))/\(fixed(seconds, 0)) s: \(s.writes) writes, \(s.reads) reads, "
                         + "\(s.flushes) flushes, \(s.discards) discards, \(s.sectorsVerified) sectors verified, "
                         + "\(s.mismatches) mismatches")
        }
        progressLine("")
        say("workload: \(summary)")
        let full = try workload.verifyAll(on: fe) { sector in
            progressLine("full-disk check: \(sector * 100 / i.sectors)%")
        }
        progressLine("")
        say("full-disk check: \(full.verified) sectors compared with the model, \(full.mismatches) mismatches")
        try fe.disconnect()
        try toolstack.removeDisk(domain: d, devid: fe.devid)
        say("blkfront: Closed, vbd removed")
        if summary.mismatches > 0 || summary.errors > 0 || full.mismatches > 0 {
            throw ExitCode.failure
        }
        say("RESULT: OK — every byte read back matched what was written, discarded ranges read as zeros")
    }
}

/// Prints a line at once (stdout may be a pipe; progress goes to stderr).
func say(_ s: String) {
    let line = s + "\n"
    _ = line.withCString { write(1, $0, strlen($0)) }
}

/// Rewrites the current terminal line (stderr, so logs stay separate).
func progressLine(_ s: String) {
    var line = "\r\u{1B}[2K" + s
    if s.isEmpty { line = "\r\u{1B}[2K" }
    _ = line.withCString { write(2, $0, strlen($0)) }
}
