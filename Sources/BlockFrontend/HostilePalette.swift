import Glibc
import Hypervisor
import LoopbackHypervisor
import XenABI

/// The grants a hostile frontend aims its requests at, none of which holds
/// data it checks: scratch pages (writable, the backend may read or write
/// them), descriptor pages for raw indirect requests, a page granted
/// read-only and one granted to another domain (the backend must never
/// write into either: checked after every round), pages it revokes while a
/// request uses them, and references that were never granted. Never a ring
/// page or a page of a well-formed request: a raw request cannot corrupt
/// what the model checks except through the disk, which the model follows.
public final class HostilePalette {
    public struct Page {
        public let frame: UInt32
        public let ref: GrantRef
    }
    public let scratch: [Page]
    public let descriptors: [Page]
    public let readOnly: Page
    public let foreign: Page
    public let revocable: [Page]
    /// Never granted: the reserved 1..7, the first beyond the table, the largest.
    public let neverGranted: [GrantRef]
    /// Entries in the guest's grant table.
    public var tableSize: Int { guest.grantCount }
    private let guest: LoopbackGuestDomain
    private let backend: DomID
    private var revoked: Set<Int> = []
    static let readOnlyFill: UInt8 = 0x5A
    static let foreignFill: UInt8 = 0xA5
    /// The domain the foreign page is granted to: neither guest nor dom0.
    public static let foreignDomain: DomID = 0x7FEF

    public init(guest: LoopbackGuestDomain, backend: DomID) throws {
        self.guest = guest
        self.backend = backend
        func page(readOnly: Bool = false, to domain: DomID? = nil) throws -> Page {
            let frame = try guest.allocatePage()
            return Page(frame: frame, ref: try guest.grantAccess(frame: frame, to: domain ?? backend, readOnly: readOnly))
        }
        scratch = try (0..<16).map { _ in try page() }
        descriptors = try (0..<Blkif.maxIndirectPagesPerRequest).map { _ in try page() }
        readOnly = try page(readOnly: true)
        foreign = try page(to: Self.foreignDomain)
        revocable = try (0..<Blkif.maxSegmentsPerRequest).map { _ in try page() }
        neverGranted = Array(1...7) + [GrantRef(guest.grantCount), GrantRef.max]
        memset(guest.page(readOnly.frame), Int32(Self.readOnlyFill), XenPage.size)
        memset(guest.page(foreign.frame), Int32(Self.foreignFill), XenPage.size)
    }

    public func pointer(_ p: Page) -> UnsafeMutableRawPointer { guest.page(p.frame) }

    /// A reference a raw segment may name: any of the above but revocable pages.
    public func anyRef(_ rng: inout Xorshift) -> GrantRef {
        switch rng.next() % 8 {
        case 0...3: scratch[Int(rng.next() % UInt64(scratch.count))].ref
        case 4: readOnly.ref
        case 5: foreign.ref
        case 6: neverGranted[Int(rng.next() % UInt64(neverGranted.count))]
        default:   // beyond the table
            GrantRef(guest.grantCount) + GrantRef(rng.next() % UInt64(GrantRef.max - GrantRef(guest.grantCount)))
        }
    }

    /// A reference the backend must refuse for a read (it has to write the page).
    public func refusedForRead(_ rng: inout Xorshift) -> GrantRef {
        switch rng.next() % 3 {
        case 0: readOnly.ref
        case 1: foreign.ref
        default: neverGranted[Int(rng.next() % UInt64(neverGranted.count))]
        }
    }

    /// A reference the backend must refuse for any operation.
    public func refusedForAll(_ rng: inout Xorshift) -> GrantRef {
        rng.next() % 2 == 0 ? foreign.ref : neverGranted[Int(rng.next() % UInt64(neverGranted.count))]
    }

    /// Revokes revocable page `i` (a request may be using it right now).
    public func revoke(_ i: Int) {
        guest.setEntry(revocable[i].ref, GrantEntryV1(flags: GrantFlags.invalid, domid: 0, frame: 0))
        revoked.insert(i)
    }

    /// Grants every revoked page again, as it was.
    public func restoreRevoked() {
        for i in revoked {
            guest.setEntry(revocable[i].ref, GrantEntryV1(flags: GrantFlags.permitAccess, domid: backend, frame: revocable[i].frame))
        }
        revoked.removeAll()
    }

    /// The pages the backend may not write still hold what the guest put there.
    public func untouchedPagesIntact() -> String? {
        for (page, fill, what) in [(readOnly, Self.readOnlyFill, "read-only"), (foreign, Self.foreignFill, "granted to another domain")] {
            let p = pointer(page).assumingMemoryBound(to: UInt8.self)
            if let at = (0..<XenPage.size).first(where: { p[$0] != fill }) {
                let found = p[at]
                memset(p, Int32(fill), XenPage.size)   // report once
                return "the page granted \(what) (ref \(page.ref)) was written: byte \(at) is \(found)"
            }
        }
        return nil
    }
}
