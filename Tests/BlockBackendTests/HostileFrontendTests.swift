import BlockBackend
import BlockFrontend
import Glibc
import Hypervisor
import Testing
import XenABI
import XenBus

/// Each test: guest 1 misbehaves while guest 2 does verified I/O on another
/// disk; guest 1 gets the documented answer (or is disconnected), guest 2
/// sees no error, and the daemon keeps serving.
@Suite("hostile frontend")
struct HostileFrontendTests {
    func withHostileGuest(readOnly: Bool = false, _ body: (LoopbackBlockFrontend, TestBed) throws -> Void) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (bad, _) = try bed.guestWithDisk(1, megabytes: 16, readOnly: readOnly)
        let (good, _) = try bed.guestWithDisk(2, megabytes: 16)
        try alongsideVerifiedGuest(good) { try body(bad, bed) }
    }

    func segments(_ fe: LoopbackBlockFrontend, count: Int, first: UInt8 = 0, last: UInt8 = 7) -> InlineArray<11, BlkifSegment> {
        InlineArray { i in BlkifSegment(gref: i < count ? fe.grantRef(slot: 0, segment: i) : 0, firstSect: first, lastSect: last) }
    }

    func request(_ op: UInt8, id: UInt64, sector: UInt64 = 0, nseg: Int, segs: InlineArray<11, BlkifSegment>) -> (UnsafeMutableRawPointer) -> Void {
        { BlkifRequest(operation: op, nrSegments: UInt8(nseg), id: id, sectorNumber: sector, segments: segs).encode(to: $0) }
    }

    /// The ring still serves a well-formed request after the bad one.
    func expectStillServing(_ fe: LoopbackBlockFrontend) throws {
        #expect(try fe.read(sector: 8, count: 8).status == BlkifStatus.okay)
    }

    @Test("nr_segments 0 on a read is an error")
    func zeroSegments() throws {
        try withHostileGuest { fe, _ in
            let r = try raw(fe, request(BlkifOperation.read, id: 11, nseg: 0, segs: segments(fe, count: 0)))
            #expect(r == BlkifResponse(id: 11, operation: BlkifOperation.read, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("nr_segments 12 is an error")
    func twelveSegments() throws {
        try withHostileGuest { fe, _ in
            let r = try raw(fe, request(BlkifOperation.write, id: 12, nseg: 12, segs: segments(fe, count: 11)))
            #expect(r == BlkifResponse(id: 12, operation: BlkifOperation.write, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("first_sect > last_sect is an error")
    func firstAfterLast() throws {
        try withHostileGuest { fe, _ in
            let r = try raw(fe, request(BlkifOperation.read, id: 13, nseg: 1, segs: segments(fe, count: 1, first: 5, last: 4)))
            #expect(r == BlkifResponse(id: 13, operation: BlkifOperation.read, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("last_sect 8 is an error")
    func lastSectEight() throws {
        try withHostileGuest { fe, _ in
            let r = try raw(fe, request(BlkifOperation.read, id: 14, nseg: 1, segs: segments(fe, count: 1, first: 0, last: 8)))
            #expect(r == BlkifResponse(id: 14, operation: BlkifOperation.read, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("a sector range past the end of the disk is an error")
    func pastTheEnd() throws {
        try withHostileGuest { fe, _ in
            let last = fe.info.sectors - 4   // 8 sectors from here cross the end
            let r = try raw(fe, request(BlkifOperation.read, id: 15, sector: last, nseg: 1, segs: segments(fe, count: 1)))
            #expect(r == BlkifResponse(id: 15, operation: BlkifOperation.read, status: BlkifStatus.error))
            let d = try raw(fe) { BlkifDiscardRequest(id: 16, sectorNumber: last, nrSectors: 5).encode(to: $0) }
            #expect(d == BlkifResponse(id: 16, operation: BlkifOperation.discard, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("a sector range that overflows 64 bits is an error")
    func overflowingRange() throws {
        try withHostileGuest { fe, _ in
            let r = try raw(fe, request(BlkifOperation.write, id: 17, sector: UInt64.max - 3, nseg: 1, segs: segments(fe, count: 1)))
            #expect(r == BlkifResponse(id: 17, operation: BlkifOperation.write, status: BlkifStatus.error))
            let d = try raw(fe) { BlkifDiscardRequest(id: 18, sectorNumber: 8, nrSectors: UInt64.max - 4).encode(to: $0) }
            #expect(d == BlkifResponse(id: 18, operation: BlkifOperation.discard, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    /// Linux blkfront's flush carries blk_rq_pos of a request without data,
    /// (sector_t)-1: the sector of a request without segments means nothing
    /// and must not reach arithmetic (it once trapped the daemon on Xen).
    @Test("a flush or empty barrier with sector 2^64-1 (as Linux blkfront sends) succeeds")
    func flushWithSectorMinusOne() throws {
        try withHostileGuest { fe, _ in
            let none = InlineArray<11, BlkifSegment>(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0))
            let f = try raw(fe, request(BlkifOperation.flushDiskCache, id: 19, sector: UInt64.max, nseg: 0, segs: none))
            #expect(f == BlkifResponse(id: 19, operation: BlkifOperation.flushDiskCache, status: BlkifStatus.okay))
            let b = try raw(fe, request(BlkifOperation.writeBarrier, id: 20, sector: UInt64.max, nseg: 0, segs: none))
            #expect(b == BlkifResponse(id: 20, operation: BlkifOperation.writeBarrier, status: BlkifStatus.okay))
            try expectStillServing(fe)
        }
    }

    @Test("a grant that was never granted is an error, in range or beyond the table")
    func neverGranted() throws {
        try withHostileGuest { fe, bed in
            for (id, ref) in [(UInt64(19), GrantRef(8000)), (20, GrantRef(1_000_000))] {
                let segs = InlineArray<11, BlkifSegment> { _ in BlkifSegment(gref: ref, firstSect: 0, lastSect: 7) }
                let w = try raw(fe, request(BlkifOperation.write, id: id, nseg: 1, segs: segs))
                #expect(w == BlkifResponse(id: id, operation: BlkifOperation.write, status: BlkifStatus.error))
                let r = try raw(fe, request(BlkifOperation.read, id: id + 100, nseg: 1, segs: segs))
                #expect(r == BlkifResponse(id: id + 100, operation: BlkifOperation.read, status: BlkifStatus.error))
            }
            try expectStillServing(fe)
            // Counted by reason for status (the guest's own device only).
            let refused = bed.host.blockStatus.first { $0.address.frontendDomain == 1 }?.statistics.rejected
            #expect(refused?[.badGrant] == 4 && refused?.total == 4)
            #expect(bed.host.blockStatus.first { $0.address.frontendDomain == 2 }?.statistics.rejected.total == 0)
        }
    }

    @Test("a grant made to another domain is an error")
    func grantedToAnotherDomain() throws {
        try withHostileGuest { fe, _ in
            let frame = try fe.guest.allocatePage()
            let ref = try fe.guest.grantAccess(frame: frame, to: 7, readOnly: false)
            let segs = InlineArray<11, BlkifSegment> { _ in BlkifSegment(gref: ref, firstSect: 0, lastSect: 7) }
            let r = try raw(fe, request(BlkifOperation.read, id: 21, nseg: 1, segs: segs))
            #expect(r == BlkifResponse(id: 21, operation: BlkifOperation.read, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("a read-only grant used for a read (the backend must write into it) is an error")
    func readOnlyGrantForRead() throws {
        try withHostileGuest { fe, _ in
            let frame = try fe.guest.allocatePage()
            let ref = try fe.guest.grantAccess(frame: frame, to: 0, readOnly: true)
            memset(fe.guest.page(frame), 0x5A, XenPage.size)
            let segs = InlineArray<11, BlkifSegment> { _ in BlkifSegment(gref: ref, firstSect: 0, lastSect: 7) }
            let r = try raw(fe, request(BlkifOperation.read, id: 22, nseg: 1, segs: segs))
            #expect(r == BlkifResponse(id: 22, operation: BlkifOperation.read, status: BlkifStatus.error))
            // The page was not written.
            #expect(fe.guest.page(frame).load(as: UInt8.self) == 0x5A)
            // The same read-only grant is fine as the source of a write.
            let w = try raw(fe, request(BlkifOperation.write, id: 23, nseg: 1, segs: segs))
            #expect(w == BlkifResponse(id: 23, operation: BlkifOperation.write, status: BlkifStatus.okay))
            try expectStillServing(fe)
        }
    }

    /// BLKIF_OP_INDIRECT where it is not offered: IndirectRequestTests.
    @Test("unknown operations are answered EOPNOTSUPP")
    func unknownOperation() throws {
        try withHostileGuest { fe, _ in
            for (id, op) in [(UInt64(24), UInt8(99)), (25, BlkifOperation.reserved1)] {
                let r = try raw(fe, request(op, id: id, nseg: 1, segs: segments(fe, count: 1)))
                #expect(r == BlkifResponse(id: id, operation: op, status: BlkifStatus.notSupported))
            }
            try expectStillServing(fe)
        }
    }

    @Test("a write to a read-only disk is an error")
    func writeToReadOnlyDisk() throws {
        try withHostileGuest(readOnly: true) { fe, _ in
            let r = try raw(fe, request(BlkifOperation.write, id: 27, nseg: 1, segs: segments(fe, count: 1)))
            #expect(r == BlkifResponse(id: 27, operation: BlkifOperation.write, status: BlkifStatus.error))
            try expectStillServing(fe)
        }
    }

    @Test("a duplicate id in flight is refused alone; the original completes")
    func duplicateInFlightID() throws {
        try withHostileGuest { fe, _ in
            let req = request(BlkifOperation.read, id: 28, sector: 64, nseg: 11, segs: segments(fe, count: 11))
            try fe.submitRaw(req)
            try fe.submitRaw(req)
            fe.kick()
            let got = try fe.collectResponses(2)
            #expect(got.count == 2)
            #expect(got.filter { $0.status == BlkifStatus.error }.count == 1)
            #expect(got.filter { $0.status == BlkifStatus.okay }.count == 1)
            #expect(got.allSatisfy { $0.id == 28 })
            try expectStillServing(fe)
        }
    }

    @Test("req_prod far beyond the ring size disconnects that device only, with an error node")
    func producerOverflow() throws {
        try withHostileGuest { fe, bed in
            fe.publishRawRequestProducer(10_000)
            let store = bed.host.toolstack.store
            try waitUntil("the device to close") { bed.backendState(fe) == .closing }
            let error = try store.read(fe.backendPath + "/error")
            #expect(error?.contains("broke the ring protocol") == true)
            #expect(bed.host.blockStatus.first { $0.address.frontendDomain == 1 }?.lastError != nil)
        }
    }
}
