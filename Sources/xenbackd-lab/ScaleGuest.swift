import BlockFrontend
import Glibc
import Hypervisor
import LoopbackHypervisor
import NetFrontend
import SystemSupport
import XenStoreClient

/// One guest of `bench scale`, driven by one thread at a time: the
/// toolstack's part (its domain, one vbd on a sparse file, one vif on the
/// bridge), then its blkfront and netfront (ours, on its own xenstore
/// connection), a little verified I/O and a ping of dom0 through the vif.
final class ScaleGuest: @unchecked Sendable {   // one thread at a time (its start, the kill phase, its destroy)
    let domid: Int
    let domain: LoopbackGuestDomain
    let disk: String
    private(set) var blkfront: LoopbackBlockFrontend?
    private(set) var netfront: LoopbackNetFrontend?
    private var store: XenStoreSocketClient?
    private(set) var io = VerifiedWorkload.Summary()
    private(set) var failure: String?
    private(set) var pinged = false

    var isReady: Bool { failure == nil && pinged && io.sectorsVerified > 0 && io.errors == 0 && io.mismatches == 0 }
    var mac: String { ScaleWorld.guestMAC(domid) }

    init(domid: Int, layout: LoopbackLayout, disk: String) throws {
        self.domid = domid
        self.disk = disk
        domain = try LoopbackGuestDomain(layout: layout, domain: DomID(domid), memoryPages: 4096, grantEntries: 2048)
    }

    /// The toolstack writes the domain and its devices (as `xl create`
    /// does, one transaction each), then the guest connects both devices,
    /// does `operations` verified requests and pings dom0. A failure is kept.
    func start(toolstack: LoopbackToolstack, dom0: XenStoreSocketClient, layout: LoopbackLayout,
               operations: Int, timeout: Double) {
        do {
            let d = DomID(domid)
            try toolstack.createDomain(d, name: "scale-guest\(domid)")
            try dom0.introduceDomain(d)
            try toolstack.addDisk(domain: d, .init(params: disk))
            try toolstack.addNic(domain: d, .init(devid: 0, mac: mac, bridge: "xenbr0"))
            let store = try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(d))
            self.store = store
            let fe = LoopbackBlockFrontend(guest: domain, store: store)
            blkfront = fe
            try fe.connect(timeout: timeout)
            let nf = LoopbackNetFrontend(guest: domain, store: store, devid: 0, tap: nil)
            netfront = nf
            try nf.connect(timeout: timeout)
            var workload = VerifiedWorkload(sectors: fe.info.sectors, seed: UInt64(domid), queueDepth: 8,
                                            canDiscard: fe.info.discard, canFlush: fe.info.flush)
            io = try workload.run(on: fe, seconds: timeout, operations: operations)
            // Everything written or discarded, read back and compared.
            let check = try workload.verifyAll(on: fe, knownOnly: true)
            io.sectorsVerified += check.verified
            io.mismatches += check.mismatches
            try ping()
            pinged = true
        } catch {
            failure = "dom\(domid): \(error)"
        }
    }

    /// ARP and one ICMP echo to dom0's bridge address, through the vif;
    /// how many requests had to be sent again.
    @discardableResult
    func ping() throws -> Int {
        guard let netfront else { throw ScaleError("dom\(domid): no netfront") }
        return try RawPing(guestMAC: RawPing.mac(mac), guestIP: ScaleWorld.guestIP(domid),
                    peerMAC: RawPing.mac(ScaleWorld.bridgeMAC), peerIP: ScaleWorld.bridgeIP).run(on: netfront)
    }

    func fail(_ reason: String) { if failure == nil { failure = "dom\(domid): \(reason)" } }

    /// As `xl destroy` of a running guest: the toolstack removes its
    /// devices' directories and its home, xenstored releases it, and the
    /// guest is gone (its frontends never close).
    func destroy(toolstack: LoopbackToolstack, dom0: XenStoreSocketClient) {
        let d = DomID(domid)
        do {
            try toolstack.destroyDomain(d)
        } catch {
            fail("destroy: \(error)")
        }
        try? dom0.releaseDomain(d)
        netfront?.releaseResources()
        blkfront?.releaseResources()
        store?.close()
        domain.destroy()
    }
}
