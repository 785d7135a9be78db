import BlockFrontend
import Hypervisor
import LoopbackHypervisor
import NetFrontend
import XenStoreClient

/// A guest domain on the loopback hypervisor as `xenbackd-lab guest` and
/// `xenbackd-lab fuzz` make one: its memory, grant table and event channels,
/// its xenstore home written by the toolstack and introduced, and vbds on
/// disk images. `close()` undoes all of it, devices first.
final class SimulatedDomain {
    let guest: LoopbackGuestDomain
    let toolstack: LoopbackToolstack
    let layout: LoopbackLayout
    private let dom0: XenStoreSocketClient
    private var disks: Set<UInt32> = []
    private var nics: Set<UInt32> = []

    init(layout: LoopbackLayout, dom0: XenStoreSocketClient, domid: DomID, name: String,
         memoryPages: Int = 16384, grantEntries: Int = 8192) throws {
        self.layout = layout
        self.dom0 = dom0
        toolstack = LoopbackToolstack(store: dom0)
        guest = try LoopbackGuestDomain(layout: layout, domain: domid, memoryPages: memoryPages, grantEntries: grantEntries)
        do {
            try toolstack.createDomain(domid, name: name)
            try dom0.introduceDomain(domid)
        } catch {
            guest.destroy()
            throw error
        }
    }

    var domid: DomID { guest.domain }

    /// A vbd as libxl adds it (`params` = the image).
    func addDisk(_ params: String, devid: UInt32 = 51712) throws {
        try toolstack.addDisk(domain: domid, .init(devid: devid, params: params))
        disks.insert(devid)
    }

    func removeDisk(devid: UInt32 = 51712) throws {
        disks.remove(devid)
        try toolstack.removeDisk(domain: domid, devid: devid)
    }

    /// A blkfront on the domain's own xenstore connection (unprivileged).
    func blockFrontend(devid: UInt32 = 51712) throws -> LoopbackBlockFrontend {
        LoopbackBlockFrontend(guest: guest, store: try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(domid)),
                              devid: devid)
    }

    /// A vif as libxl adds it, on `bridge` in the daemon's network namespace.
    func addNic(devid: UInt32, mac: String, bridge: String) throws {
        try toolstack.addNic(domain: domid, .init(devid: devid, mac: mac, bridge: bridge))
        nics.insert(devid)
    }

    func removeNic(devid: UInt32) throws {
        nics.remove(devid)
        try toolstack.removeNic(domain: domid, devid: devid)
    }

    /// A netfront without a TAP (its rings driven by hand) on the domain's
    /// own xenstore connection.
    func netFrontend(devid: UInt32, options: NetFrontendOptions) throws -> LoopbackNetFrontend {
        LoopbackNetFrontend(guest: guest, store: try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(domid)),
                            devid: devid, tap: nil, options: options)
    }

    func close() {
        for n in nics { try? toolstack.removeNic(domain: domid, devid: n) }
        nics.removeAll()
        for d in disks { try? toolstack.removeDisk(domain: domid, devid: d) }
        disks.removeAll()
        try? toolstack.destroyDomain(domid)
        try? dom0.releaseDomain(domid)
        guest.destroy()
    }
}
