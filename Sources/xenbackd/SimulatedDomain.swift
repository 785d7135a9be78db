import BlockFrontend
import Hypervisor
import LoopbackHypervisor
import XenStoreClient

/// A guest domain on the loopback hypervisor as `xenbackd guest` and
/// `xenbackd fuzz` make one: its memory, grant table and event channels,
/// its xenstore home written by the toolstack and introduced, and vbds on
/// disk images. `close()` undoes all of it, devices first.
final class SimulatedDomain {
    let guest: LoopbackGuestDomain
    let toolstack: LoopbackToolstack
    let layout: LoopbackLayout
    private let dom0: XenStoreSocketClient
    private var disks: Set<UInt32> = []

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

    func close() {
        for d in disks { try? toolstack.removeDisk(domain: domid, devid: d) }
        disks.removeAll()
        try? toolstack.destroyDomain(domid)
        try? dom0.releaseDomain(domid)
        guest.destroy()
    }
}
