import Glibc
import Hypervisor
import LoopbackHypervisor
import Testing
import XenABI

/// A loopback root with one guest, removed afterwards.
final class Loopback {
    let root: String
    let layout: LoopbackLayout
    let guest: LoopbackGuestDomain
    let platform: LoopbackPlatform

    init(guestDomain: DomID = 1, pages: Int = 64) throws {
        var template = Array("/tmp/xenbackd-lb-XXXXXX".utf8CString)
        root = String(cString: mkdtemp(&template)!)
        layout = LoopbackLayout(root: root)
        platform = try LoopbackPlatform(root: root)
        guest = try LoopbackGuestDomain(layout: layout, domain: guestDomain, memoryPages: pages, grantEntries: 64)
    }

    deinit {
        guest.destroy()
        for f in ["event-channels"] { unlink(layout.domainDirectory(0) + "/" + f) }
        rmdir(layout.domainDirectory(0))
        rmdir(root)
    }
}

@Suite("loopback grant tables")
struct GrantTableTests {
    @Test("a batch of grants maps contiguously, in order, with the guest's data, and writes reach the guest")
    func mapBatch() throws {
        let lb = try Loopback()
        let frames = try (0..<4).map { _ in try lb.guest.allocatePage() }.shuffled()
        var refs: [GrantRef] = []
        for (i, f) in frames.enumerated() {
            memset(lb.guest.page(f), Int32(0x10 + i), XenPage.size)
            refs.append(try lb.guest.grantAccess(frame: f, to: 0, readOnly: false))
        }
        let gt = try lb.platform.openGrantTable()
        let m = try gt.map(domain: 1, refs: refs, writable: true)
        defer { gt.unmap(m) }
        #expect(m.pageCount == 4)
        for i in 0..<4 {
            #expect(m.address.load(fromByteOffset: i * XenPage.size + 100, as: UInt8.self) == UInt8(0x10 + i))
        }
        m.address.storeBytes(of: 0xEE, toByteOffset: 2 * XenPage.size, as: UInt8.self)
        #expect(lb.guest.page(frames[2]).load(as: UInt8.self) == 0xEE)
    }

    func mapStatus(_ lb: Loopback, _ refs: [GrantRef], domain: DomID = 1, writable: Bool = true) -> Int16? {
        let gt = LoopbackGrantTable(layout: lb.layout, ownDomain: 0)
        do {
            let m = try gt.map(domain: domain, refs: refs, writable: writable)
            gt.unmap(m)
            return GrantStatus.okay
        } catch {
            return error.grantStatus
        }
    }

    @Test("mapping fails as Xen does: flags, domid, read-only, bounds, domain")
    func mapFailures() throws {
        let lb = try Loopback()
        let f = try lb.guest.allocatePage()
        let good = try lb.guest.grantAccess(frame: f, to: 0, readOnly: false)
        let ro = try lb.guest.grantAccess(frame: f, to: 0, readOnly: true)
        let other = try lb.guest.grantAccess(frame: f, to: 9, readOnly: false)
        #expect(mapStatus(lb, [good]) == GrantStatus.okay)
        #expect(mapStatus(lb, [ro], writable: false) == GrantStatus.okay)
        #expect(mapStatus(lb, [ro], writable: true) == GrantStatus.generalError)
        #expect(mapStatus(lb, [other]) == GrantStatus.generalError)
        #expect(mapStatus(lb, [40]) == GrantStatus.generalError)         // in range, never granted
        #expect(mapStatus(lb, [64]) == GrantStatus.badGntref)            // beyond the table
        #expect(mapStatus(lb, [good], domain: 4) == GrantStatus.badDomain)
        lb.guest.setEntry(41, GrantEntryV1(flags: GrantFlags.permitAccess, domid: 0, frame: 64))
        #expect(mapStatus(lb, [41]) == GrantStatus.badPage)               // frame outside memory
        // One bad reference fails the whole batch.
        #expect(mapStatus(lb, [good, 40]) == GrantStatus.generalError)
        // A revoked grant can no longer be mapped.
        lb.guest.endAccess(good)
        #expect(mapStatus(lb, [good]) == GrantStatus.generalError)
    }

    @Test("copy to and from granted pages, each operation with its own status")
    func copyBatch() throws {
        let lb = try Loopback()
        let f1 = try lb.guest.allocatePage(), f2 = try lb.guest.allocatePage()
        memset(lb.guest.page(f1), 0x33, XenPage.size)
        let rw = try lb.guest.grantAccess(frame: f1, to: 0, readOnly: false)
        let ro = try lb.guest.grantAccess(frame: f2, to: 0, readOnly: true)
        let local = UnsafeMutableRawPointer.allocate(byteCount: XenPage.size, alignment: XenPage.size)
        defer { local.deallocate() }
        memset(local, 0x77, XenPage.size)
        let gt = try lb.platform.openGrantTable()
        var ops = [
            GrantCopyOperation(direction: .fromGuest, domain: 1, ref: rw, guestOffset: 512, length: 1024, local: local),
            GrantCopyOperation(direction: .toGuest, domain: 1, ref: rw, guestOffset: 0, length: 512, local: local + 2048),
            GrantCopyOperation(direction: .toGuest, domain: 1, ref: ro, guestOffset: 0, length: 512, local: local),
            GrantCopyOperation(direction: .fromGuest, domain: 1, ref: ro, guestOffset: 3584, length: 1024, local: local),
            GrantCopyOperation(direction: .fromGuest, domain: 1, ref: 63, guestOffset: 0, length: 8, local: local),
            GrantCopyOperation(direction: .fromGuest, domain: 3, ref: rw, guestOffset: 0, length: 8, local: local),
        ]
        ops.withUnsafeMutableBufferPointer { gt.copy($0) }
        #expect(ops.map(\.status) == [GrantStatus.okay, GrantStatus.okay, GrantStatus.generalError,
                                      GrantStatus.badCopyArg, GrantStatus.generalError, GrantStatus.badDomain])
        #expect(local.load(as: UInt8.self) == 0x33 && local.load(fromByteOffset: 1023, as: UInt8.self) == 0x33)
        #expect(local.load(fromByteOffset: 1024, as: UInt8.self) == 0x77)
        #expect(lb.guest.page(f1).load(as: UInt8.self) == 0x77)
        #expect(lb.guest.page(f1).load(fromByteOffset: 512, as: UInt8.self) == 0x33)
        #expect(lb.guest.page(f2).load(as: UInt8.self) == 0)   // the read-only page was not written
    }
}
