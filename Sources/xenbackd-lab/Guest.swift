import ArgumentParser
import BlockFrontend
import Glibc
import Hypervisor
import LoopbackHypervisor
import NetFrontend
import NetworkPlumbing
import SystemSupport
import XenABI
import XenStoreClient

/// `xenbackd-lab guest`: a simulated guest on the loopback hypervisor. It plays
/// the toolstack (creates the domain and its vbd the way libxl does) and
/// the guest's blkfront, runs a verified mixed workload against a running
/// `xenbackd run`, checks the whole disk, and unplugs. With `--nic-address`
/// it also gets a vif: our netfront joins it to a TAP `eth0` in the
/// process's network namespace (run it under `ip netns exec`), whose IP
/// stack then pings `--nic-peer` and runs iperf3 against it through the
/// backend and the bridge.
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
    @Option(help: "Most pages per indirect request, used up to the backend's offer (Linux blkfront's max_indirect_segments; 0: direct requests of 11 pages only).")
    var maxIndirectSegments = 32
    @Option(help: "Give the guest a NIC with this address (CIDR, e.g. 10.99.0.1/24) on a TAP eth0 in this namespace.")
    var nicAddress: String?
    @Option(help: "An address to ping (and run iperf3 against, if it serves) through the NIC.")
    var nicPeer: String?
    @Option(help: "The bridge the vif joins (the vif's `bridge` key).")
    var bridge = "xenbr0"

    func validate() throws {
        // Beyond what any backend here offers (256): a typo, not a wish.
        guard (0...1024).contains(maxIndirectSegments) else {
            throw ValidationError("--max-indirect-segments must be 0 to 1024")
        }
    }

    func run() throws {
        let layout = LoopbackLayout(root: root)
        let dom0 = try XenStoreSocketClient(socketPath: layout.xenStoreSocket)
        let d = DomID(domid)
        // Every slot's data and descriptor pages, the ring, and room to spare.
        let slots = SharedRingLayout.slots(pages: 1 << min(max(ringPageOrder, 0), 4), entrySize: Blkif.slotSize)
        let pages = slots * (max(maxIndirectSegments, Blkif.maxSegmentsPerRequest) + 1) + 1024
        let domain = try SimulatedDomain(layout: layout, dom0: dom0, domid: d, name: "demo-guest\(d)",
                                         memoryPages: max(16384, pages), grantEntries: max(8192, pages))
        defer { domain.close() }
        try domain.addDisk(disk)
        say("toolstack: dom\(d) created, vbd 51712 (xvda) -> \(disk)")

        var nic: (LoopbackNetFrontend, TapDevice)?
        if let nicAddress {
            nic = try plugNIC(guest: domain.guest, toolstack: domain.toolstack, layout: layout, address: nicAddress)
        }
        defer {
            if let (netfront, tap) = nic {
                try? netfront.disconnect()
                tap.close()
                try? domain.toolstack.removeNic(domain: d, devid: 0)
            }
        }
        if let (netfront, _) = nic, let nicPeer { try exerciseNIC(netfront, peer: nicPeer) }

        let fe = try domain.blockFrontend()
        fe.maxIndirectSegments = maxIndirectSegments
        try fe.connect(ringPageOrder: ringPageOrder)
        let i = fe.info
        say("blkfront: Connected: \(i.sectors) sectors of \(i.sectorSize) bytes, ring \(fe.ringSlots) slots, "
              + "flush=\(i.flush) barrier=\(i.barrier) discard=\(i.discard) read-only=\(i.readOnly), "
              + "requests of up to \(fe.segmentsPerRequest) pages"
              + (fe.segmentsPerRequest > Blkif.maxSegmentsPerRequest ? " (indirect)" : ""))

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
        try domain.removeDisk(devid: fe.devid)
        say("blkfront: Closed, vbd removed")
        if summary.mismatches > 0 || summary.errors > 0 || full.mismatches > 0 {
            throw ExitCode.failure
        }
        say("RESULT: OK — every byte read back matched what was written, discarded ranges read as zeros")
    }

    /// Adds a vif as libxl does and connects our netfront to a new TAP eth0.
    private func plugNIC(guest: LoopbackGuestDomain, toolstack: LoopbackToolstack, layout: LoopbackLayout,
                         address: String) throws -> (LoopbackNetFrontend, TapDevice) {
        let d = DomID(domid)
        let mac = "00:16:3e:00:00:" + (d < 16 ? "0" : "") + String(d, radix: 16)
        let tap = try TapDevice.create(name: "eth0")
        for args in [["link", "set", "lo", "up"], ["link", "set", "eth0", "address", mac],
                     ["addr", "add", address, "dev", "eth0"], ["link", "set", "eth0", "up"]] {
            try sh(["ip"] + args)
        }
        try toolstack.addNic(domain: d, .init(devid: 0, mac: mac, bridge: bridge))
        let netfront = LoopbackNetFrontend(guest: guest, store: try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(d)),
                                           devid: 0, tap: tap)
        try netfront.connect()
        say("netfront: Connected: vif\(d).0 on \(bridge), eth0 \(address) (\(mac))")
        return (netfront, tap)
    }

    /// Real traffic through the backend: ping, then iperf3 if the peer serves it.
    private func exerciseNIC(_ netfront: LoopbackNetFrontend, peer: String) throws {
        let ping = try runProcess(["ping", "-c", "10", "-i", "0.1", "-W", "2", peer], environment: ["PATH": toolPath], timeout: 30)
        let summary = ping.stdout.split(separator: "\n").filter { $0.contains("packets transmitted") || $0.hasPrefix("rtt") }
        say("ping \(peer): " + summary.joined(separator: "; "))
        guard ping.status == 0 else {
            say("ping failed: \(ping.stderr)")
            throw ExitCode.failure
        }
        if access("/usr/bin/iperf3", X_OK) == 0 {
            let iperf = try runProcess(["iperf3", "-c", peer, "-t", "3"], environment: ["PATH": toolPath], timeout: 30)
            if iperf.status == 0 {
                for line in iperf.stdout.split(separator: "\n") where line.contains("sender") || line.contains("receiver") {
                    say("iperf3 TCP to \(peer): " + line.split(separator: " ", omittingEmptySubsequences: true).dropFirst(4).joined(separator: " "))
                }
            } else {
                say("iperf3: no server at \(peer) (skipped)")
            }
        }
        let s = netfront.statistics
        say("netfront: \(s.txFrames) frames sent, \(s.rxFrames) received, \(s.txErrors + s.rxErrors) errors")
    }
}

/// Prints a line at once (stdout may be a pipe; progress goes to stderr).
func say(_ s: String, to fd: Int32 = 1) {
    let line = s + "\n"
    _ = line.withCString { write(fd, $0, strlen($0)) }
}

/// Progress, on stderr so that logs stay separate. On a terminal one line
/// is rewritten in place; in a log or a pipe, where control sequences are
/// noise, each update is a plain line, and clearing the line prints
/// nothing. Updates of one kind (the same text but for its figures: a
/// workload's counts, a check's percentage) are thinned to one a second;
/// a new kind (the next bench phase) is printed at once.
func progressLine(_ s: String) {
    ProgressPrinter.shared.show(s)
}

final class ProgressPrinter: @unchecked Sendable {   // `lastPlainLine` guarded by `lock`
    static let shared = ProgressPrinter(onTerminal: isatty(2) != 0)

    let onTerminal: Bool
    private let lock = PThreadMutex()
    private var lastPlainLine = Int.min / 2
    private var lastKind = ""

    init(onTerminal: Bool) { self.onTerminal = onTerminal }

    func show(_ s: String) {
        if onTerminal {
            let line = "\r\u{1B}[2K" + s
            _ = line.withCString { write(2, $0, strlen($0)) }
            return
        }
        guard !s.isEmpty else { return }
        let now = MonotonicClock.nanoseconds()
        let kind = String(s.unicodeScalars.filter { !("0"..."9").contains($0) })
        let due: Bool = lock.withLock {
            guard kind != lastKind || now - lastPlainLine >= 1_000_000_000 else { return false }
            lastPlainLine = now
            lastKind = kind
            return true
        }
        if due { say(s, to: 2) }
    }
}
