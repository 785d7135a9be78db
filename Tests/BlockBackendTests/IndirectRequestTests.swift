import BlockBackend
import BlockFrontend
import Glibc
import Hypervisor
import NBDTestSupport
import Testing
import XenABI
import XenBus

/// A raw BLKIF_OP_INDIRECT request on slot 0's pages: its first
/// min(nseg, 512) descriptors are written into slot 0's indirect page first.
/// `grefs` nil: that page's grant alone.
private func rawIndirect(_ fe: LoopbackBlockFrontend, op: UInt8 = BlkifOperation.read, id: UInt64, sector: UInt64 = 0,
                         nseg: Int, grefs: InlineArray<8, UInt32>? = nil,
                         segment: (Int) -> BlkifSegment) throws -> BlkifResponse {
    let page = fe.indirectPage(slot: 0, page: 0)
    for i in 0..<min(nseg, Blkif.segmentsPerIndirectPage) { segment(i).encode(to: page + i * BlkifSegment.size) }
    let pages = grefs ?? InlineArray { $0 == 0 ? fe.indirectGrantRef(slot: 0, page: 0) : 0 }
    return try raw(fe) {
        BlkifIndirectRequest(indirectOp: op, nrSegments: UInt16(truncatingIfNeeded: nseg), id: id, sectorNumber: sector,
                             indirectGrefs: pages).encode(to: $0)
    }
}

/// Segment i: the whole of slot 0's data page i.
private func wholePages(_ fe: LoopbackBlockFrontend) -> (Int) -> BlkifSegment {
    { i in BlkifSegment(gref: fe.grantRef(slot: 0, segment: i), firstSect: 0, lastSect: 7) }
}

/// A byte of a sector's test pattern.
private func patternByte(_ sector: UInt64, _ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: Int(sector) &* 131 &+ i &* 7 &+ 3) }

@Suite("blkback indirect requests (feature-max-indirect-segments)")
struct IndirectRequestTests {
    /// Random reads and writes of 1 to `segments` pages (most of them
    /// indirect), checked against the workload's model, then the whole disk
    /// read back with the largest requests, then the file read without the ring.
    @Test("verified I/O with indirect requests of up to 12, 64 and 128 pages on a file, with and without persistent grants",
          arguments: [12, 64, 128], [true, false])
    func verifiedOnFile(segments: Int, persistent: Bool) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1, megabytes: 32, ringPageOrder: 1, indirectSegments: segments,
                                               persistentGrants: persistent)
        #expect(fe.backendMaxIndirectSegments == BlockBackendOptions.defaultMaxIndirectSegments)
        #expect(fe.segmentsPerRequest == segments)
        #expect(fe.persistentGrants == persistent)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: UInt64(segments) * 3 + (persistent ? 1 : 0),
                                 queueDepth: 16, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 60, operations: 800)
        #expect(s.errors == 0 && s.mismatches == 0)
        #expect(s.writes > 200 && s.reads > 200 && s.sectorsVerified > 1000)
        // 12 pages: only requests of 89 to 96 sectors (less their first page's offset) go indirect.
        #expect(fe.indirectRequestsSent > (segments == 12 ? 10 : 300))
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        try fe.disconnect()
        #expect(disk.expectHolds(w, sectors: fe.info.sectors, every: 61) > 100)
    }

    enum NBDExport: String, CaseIterable, CustomStringConvertible, Sendable {
        case memory = "nbdkit memory"
        /// A server that advertises a 64 KiB maximum request and refuses
        /// larger ones: NBDStorage splits a 512 KiB request.
        case smallMaximum = "nbdkit memory, 64 KiB maximum request"
        var description: String { rawValue }
        var arguments: [String] {
            switch self {
            case .memory: ["memory", "32M"]
            case .smallMaximum: ["--filter=blocksize-policy", "memory", "32M", "blocksize-maximum=64K",
                                 "blocksize-error-policy=error"]
            }
        }
    }

    @Test("verified I/O with indirect requests of up to 128 pages on an NBD export, with and without persistent grants",
          arguments: NBDExport.allCases, [true, false])
    func verifiedOnNBD(export: NBDExport, persistent: Bool) throws {
        let server = try NBDTestServer.nbdkit(export.arguments)
        defer { server.stop() }
        let bed = try TestBed()
        defer { bed.close() }
        let guest = try bed.host.createGuest(1, memoryPages: 40960, grantEntries: 40960)
        let fe = try bed.host.attachDisk(to: guest, .init(params: server.uri))
        fe.maxIndirectSegments = 128
        fe.offerPersistentGrants = persistent
        try fe.connect(ringPageOrder: 1)
        #expect(fe.segmentsPerRequest == 128)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: persistent ? 17 : 18, queueDepth: 16,
                                 canDiscard: fe.info.discard, canFlush: fe.info.flush)
        let s = try w.run(on: fe, seconds: 60, operations: 600)
        #expect(s.errors == 0 && s.mismatches == 0)
        #expect(s.writes > 150 && s.reads > 150)
        #expect(fe.indirectRequestsSent > 300)
        let full = try w.verifyAll(on: fe)
        #expect(full.mismatches == 0 && full.verified > 1000)
        try fe.disconnect()
    }

    @Test("the key carries the configured value, or is absent when disabled; the frontend uses min(its own, the backend's)",
          arguments: [0, 32, 128, 256])
    func publishedKey(offered: Int) throws {
        let bed = try TestBed(options: .init(maxIndirectSegments: offered))
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1, megabytes: 16, largeRequests: true)
        let store = bed.host.toolstack.store
        let backend = bed.host.toolstack.backendPath(domain: 1, devid: fe.devid)
        // Written before InitWait, as Linux blkback does: frontends may read it then.
        try waitUntil("InitWait") { store.readState(backend) == .initWait }
        #expect(try store.read(backend + "/feature-max-indirect-segments") == (offered > 0 ? String(offered) : nil))
        fe.maxIndirectSegments = 256
        try fe.connect()
        let key = try store.read(fe.backendPath + "/feature-max-indirect-segments")
        #expect(key == (offered > 0 ? String(offered) : nil))
        #expect(fe.backendMaxIndirectSegments == offered)
        #expect(fe.segmentsPerRequest == max(Blkif.maxSegmentsPerRequest, offered))
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: UInt64(offered) + 5, queueDepth: 8,
                                 canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 30, operations: 300)
        #expect(s.errors == 0 && s.mismatches == 0 && s.sectorsVerified > 0)
        #expect((fe.indirectRequestsSent > 0) == (offered > 0))
    }

    @Test("not offered: BLKIF_OP_INDIRECT is an unknown operation (EOPNOTSUPP), and the ring serves on")
    func notOffered() throws {
        let bed = try TestBed(options: .init(maxIndirectSegments: 0))
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 16)
        let grefs = InlineArray<8, UInt32> { $0 == 0 ? fe.grantRef(slot: 0, segment: 0) : 0 }
        let r = try raw(fe) {
            BlkifIndirectRequest(indirectOp: BlkifOperation.read, nrSegments: 16, id: 41, sectorNumber: 0,
                                 indirectGrefs: grefs).encode(to: $0)
        }
        #expect(r == BlkifResponse(id: 41, operation: BlkifOperation.indirect, status: BlkifStatus.notSupported))
        #expect(try fe.read(sector: 8, count: 88).status == BlkifStatus.okay)
    }

    @Test("a frontend that does not use indirect requests is served as before")
    func directFrontend() throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 16)
        #expect(fe.backendMaxIndirectSegments == BlockBackendOptions.defaultMaxIndirectSegments)
        #expect(fe.segmentsPerRequest == Blkif.maxSegmentsPerRequest)
        var w = VerifiedWorkload(sectors: fe.info.sectors, seed: 77, queueDepth: 16, canDiscard: true, canFlush: true)
        let s = try w.run(on: fe, seconds: 30, operations: 800)
        #expect(s.errors == 0 && s.mismatches == 0 && s.writes > 200 && s.reads > 200)
        #expect(fe.indirectRequestsSent == 0)
        #expect(try w.verifyAll(on: fe).mismatches == 0)
    }

    /// Segments that start and end inside their pages, in no pattern: the
    /// data of each lands at the next sectors of the disk, in both directions.
    @Test("segments of part pages: each segment's sectors go where the request says, with and without persistent grants",
          arguments: [true, false])
    func partPageSegments(persistent: Bool) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1, megabytes: 16, indirectSegments: 128, persistentGrants: persistent)
        let nseg = 100
        let layout = (0..<nseg).map { i -> (first: Int, last: Int) in
            let first = (i * 5) % 8
            return (first, first + (i * 3) % (8 - first))
        }
        let start: UInt64 = 3001
        var sector = start
        for (i, l) in layout.enumerated() {
            let page = fe.dataPage(slot: 0, segment: i)
            memset(page, 0xEE, XenPage.size)
            for s in l.first...l.last {
                for b in 0..<512 { page.storeBytes(of: patternByte(sector, b), toByteOffset: s * 512 + b, as: UInt8.self) }
                sector += 1
            }
        }
        let total = Int(sector - start)
        let segs: (Int) -> BlkifSegment = { i in
            BlkifSegment(gref: fe.grantRef(slot: 0, segment: i), firstSect: UInt8(layout[i].first), lastSect: UInt8(layout[i].last))
        }
        let w = try rawIndirect(fe, op: BlkifOperation.write, id: 51, sector: start, nseg: nseg, segment: segs)
        #expect(w == BlkifResponse(id: 51, operation: BlkifOperation.write, status: BlkifStatus.okay))
        for s in [start, start + UInt64(total / 2), start + UInt64(total - 1)] {
            #expect(disk.sector(s) == (0..<512).map { patternByte(s, $0) }, "sector \(s) on the file")
        }
        #expect(disk.sector(start - 1) == [UInt8](repeating: 0, count: 512))
        #expect(disk.sector(start + UInt64(total)) == [UInt8](repeating: 0, count: 512))
        // Read back into cleared pages with the same layout: only the segments' sectors are written.
        for i in 0..<nseg { memset(fe.dataPage(slot: 0, segment: i), 0x11, XenPage.size) }
        let r = try rawIndirect(fe, op: BlkifOperation.read, id: 52, sector: start, nseg: nseg, segment: segs)
        #expect(r == BlkifResponse(id: 52, operation: BlkifOperation.read, status: BlkifStatus.okay))
        sector = start
        var wrong = 0
        for (i, l) in layout.enumerated() {
            let page = fe.dataPage(slot: 0, segment: i)
            for s in 0..<8 {
                for b in 0..<512 {
                    let got = page.load(fromByteOffset: s * 512 + b, as: UInt8.self)
                    let want = (l.first...l.last).contains(s) ? patternByte(sector + UInt64(s - l.first), b) : 0x11
                    if got != want { wrong += 1 }
                }
            }
            sector += UInt64(l.last - l.first + 1)
        }
        #expect(wrong == 0)
    }

    /// More indirect requests in flight than the ring has indirect areas
    /// (256 segments: 16 areas for 64 slots): the rest wait on the ring and
    /// are taken as areas come free.
    @Test("more indirect requests in flight than indirect areas: every one is served, in order of the data")
    func moreRequestsThanAreas() throws {
        let bed = try TestBed(options: .init(maxIndirectSegments: 256))
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, megabytes: 64, ringPageOrder: 1, indirectSegments: 256)
        #expect(fe.segmentsPerRequest == 256)
        let perRequest = fe.maxSectorsPerRequest
        let count = min(fe.ringSlots, 48)
        var tickets: [(LoopbackBlockFrontend.Ticket, UInt64)] = []
        for r in 0..<count {
            let sector = UInt64(r * perRequest)
            let slot = fe.nextFreeSlot!
            for p in 0..<256 {
                let page = fe.dataPage(slot: slot, segment: p)
                for s in 0..<8 { page.storeBytes(of: UInt64(sector) + UInt64(p * 8 + s), toByteOffset: s * 512, as: UInt64.self) }
            }
            tickets.append((try fe.submit(.write(sector: sector, count: perRequest)), sector))
        }
        fe.kick()
        var statuses: [UInt64: Int16] = [:]
        for (t, _) in tickets where statuses[t.id] == nil {
            statuses[t.id] = try fe.wait(for: t) { statuses[$0.id] = $0.status }.status
        }
        #expect(statuses.values.allSatisfy { $0 == BlkifStatus.okay } && statuses.count == count)
        tickets = []
        for r in 0..<count {
            let sector = UInt64(r * perRequest)
            for p in 0..<256 { memset(fe.dataPage(slot: fe.nextFreeSlot!, segment: p), 0, XenPage.size) }
            tickets.append((try fe.submit(.read(sector: sector, count: perRequest)), sector))
        }
        fe.kick()
        statuses = [:]
        for (t, _) in tickets where statuses[t.id] == nil {
            statuses[t.id] = try fe.wait(for: t) { statuses[$0.id] = $0.status }.status
        }
        var wrong = 0
        for (t, sector) in tickets {
            #expect(statuses[t.id] == BlkifStatus.okay)
            for p in 0..<256 {
                let page = fe.dataPage(slot: t.slot, segment: p)
                for s in 0..<8 where page.load(fromByteOffset: s * 512, as: UInt64.self) != sector + UInt64(p * 8 + s) { wrong += 1 }
            }
        }
        #expect(wrong == 0)
        #expect(fe.indirectRequestsSent == 2 * count)
    }
}

/// Each test: guest 1 sends a bad indirect request while guest 2 does
/// verified I/O (with indirect requests of its own) on another disk; guest
/// 1 gets BLKIF_RSP_ERROR with the request's id and indirect_op (as Linux
/// blkback answers), its device stays connected and serves the next
/// request, and guest 2 sees no error.
@Suite("hostile frontend: indirect requests")
struct HostileIndirectRequestTests {
    static let offered = BlockBackendOptions.defaultMaxIndirectSegments

    func withHostileGuest(readOnly: Bool = false, persistent: Bool = true,
                          _ body: (LoopbackBlockFrontend, TestBed) throws -> Void) throws {
        let bed = try TestBed()
        defer { bed.close() }
        let (bad, _) = try bed.guestWithDisk(1, megabytes: 16, readOnly: readOnly, indirectSegments: Self.offered,
                                             persistentGrants: persistent)
        let (good, _) = try bed.guestWithDisk(2, megabytes: 16, indirectSegments: 64)
        #expect(bad.segmentsPerRequest == Self.offered && good.segmentsPerRequest == 64)
        try alongsideVerifiedGuest(good) {
            try body(bad, bed)
            // Still connected, and serving direct and indirect requests.
            #expect(bed.backendState(bad) == .connected)
            #expect(try bad.read(sector: 8, count: 8).status == BlkifStatus.okay)
            #expect(try bad.read(sector: 64, count: bad.maxSectorsPerRequest).status == BlkifStatus.okay)
        }
        #expect(good.indirectRequestsSent > 0)
    }

    func error(_ id: UInt64, _ op: UInt8) -> BlkifResponse { BlkifResponse(id: id, operation: op, status: BlkifStatus.error) }
    func okay(_ id: UInt64, _ op: UInt8) -> BlkifResponse { BlkifResponse(id: id, operation: op, status: BlkifStatus.okay) }

    @Test("nr_segments 0 is an error")
    func zeroSegments() throws {
        try withHostileGuest { fe, _ in
            for (id, op) in [(UInt64(101), BlkifOperation.read), (102, BlkifOperation.write)] {
                let r = try rawIndirect(fe, op: op, id: id, nseg: 0, segment: wholePages(fe))
                #expect(r == error(id, op))
            }
        }
    }

    @Test("nr_segments above the offered maximum is an error, up to 65535 (more pages than the request names)")
    func tooManySegments() throws {
        try withHostileGuest { fe, _ in
            // Valid descriptors for the first 128; the rest of the page is whatever it holds.
            for (k, n) in [Self.offered + 1, 256, 512, 513, 4096, 4097, 65535].enumerated() {
                let id = UInt64(110 + k)
                let r = try rawIndirect(fe, op: BlkifOperation.write, id: id, nseg: n) { i in
                    BlkifSegment(gref: fe.grantRef(slot: 0, segment: i % Self.offered), firstSect: 0, lastSect: 7)
                }
                #expect(r == error(id, BlkifOperation.write), "\(n) segments")
            }
            // The maximum itself is fine.
            let r = try rawIndirect(fe, id: 119, nseg: Self.offered, segment: wholePages(fe))
            #expect(r == okay(119, BlkifOperation.read))
        }
    }

    @Test("indirect_op other than READ and WRITE is an error, answered with that indirect_op")
    func otherIndirectOperations() throws {
        try withHostileGuest { fe, _ in
            let ops = [BlkifOperation.writeBarrier, BlkifOperation.flushDiskCache, BlkifOperation.reserved1,
                       BlkifOperation.discard, BlkifOperation.indirect, 99]
            for (k, op) in ops.enumerated() {
                let id = UInt64(120 + k)
                let r = try rawIndirect(fe, op: op, id: id, nseg: 16, segment: wholePages(fe))
                #expect(r == error(id, op), "indirect_op \(op)")
            }
        }
    }

    @Test("a bad indirect page grant is an error; grants in the unused indirect_grefs are never looked at",
          arguments: [true, false])
    func badIndirectPageGrant(persistent: Bool) throws {
        try withHostileGuest(persistent: persistent) { fe, _ in
            let elsewhere = try fe.guest.grantAccess(frame: try fe.guest.allocatePage(), to: 7, readOnly: false)
            for (k, ref) in [GrantRef(8000), 1_000_000, UInt32.max, elsewhere].enumerated() {
                let grefs = InlineArray<8, UInt32> { $0 == 0 ? ref : 0 }
                for (j, op) in [BlkifOperation.read, BlkifOperation.write].enumerated() {
                    let id = UInt64(130 + 2 * k + j)
                    let r = try rawIndirect(fe, op: op, id: id, nseg: 32, grefs: grefs, segment: wholePages(fe))
                    #expect(r == error(id, op), "indirect page grant \(ref)")
                }
            }
            // Garbage after the one page 128 segments need: ignored.
            let garbage = InlineArray<8, UInt32> { $0 == 0 ? fe.indirectGrantRef(slot: 0, page: 0) : 8000 + UInt32($0) }
            let r = try rawIndirect(fe, id: 140, nseg: Self.offered, grefs: garbage, segment: wholePages(fe))
            #expect(r == okay(140, BlkifOperation.read))
            // A read-only grant of the indirect page is enough: the backend only reads it.
            let frame = try fe.guest.allocatePage()
            let readOnly = try fe.guest.grantAccess(frame: frame, to: 0, readOnly: true)
            let descriptors = fe.guest.page(frame)
            for i in 0..<16 { wholePages(fe)(i).encode(to: descriptors + i * BlkifSegment.size) }
            let ro = try raw(fe) {
                BlkifIndirectRequest(indirectOp: BlkifOperation.read, nrSegments: 16, id: 141, sectorNumber: 0,
                                     indirectGrefs: InlineArray { $0 == 0 ? readOnly : 0 }).encode(to: $0)
            }
            #expect(ro == okay(141, BlkifOperation.read))
        }
    }

    @Test("a bad segment inside the indirect page is an error: first_sect > last_sect, last_sect 8, a bad data grant",
          arguments: [true, false])
    func badSegmentInsidePage(persistent: Bool) throws {
        try withHostileGuest(persistent: persistent) { fe, _ in
            let whole = wholePages(fe)
            func with(_ index: Int, _ bad: BlkifSegment) -> (Int) -> BlkifSegment { { $0 == index ? bad : whole($0) } }
            let g = { fe.grantRef(slot: 0, segment: $0) }
            let cases: [(Int, BlkifSegment)] = [
                (100, BlkifSegment(gref: g(100), firstSect: 5, lastSect: 4)),
                (127, BlkifSegment(gref: g(127), firstSect: 0, lastSect: 8)),
                (0, BlkifSegment(gref: g(0), firstSect: 9, lastSect: 255)),
                (50, BlkifSegment(gref: 8000, firstSect: 0, lastSect: 7)),
                (51, BlkifSegment(gref: 1_000_000, firstSect: 2, lastSect: 3)),
            ]
            for (k, (index, bad)) in cases.enumerated() {
                for (j, op) in [BlkifOperation.read, BlkifOperation.write].enumerated() {
                    let id = UInt64(150 + 2 * k + j)
                    let r = try rawIndirect(fe, op: op, id: id, nseg: Self.offered, segment: with(index, bad))
                    #expect(r == error(id, op), "segment \(index): \(bad)")
                }
            }
            // A read into a page granted read-only: the data cannot be written back.
            let frame = try fe.guest.allocatePage()
            let readOnly = try fe.guest.grantAccess(frame: frame, to: 0, readOnly: true)
            memset(fe.guest.page(frame), 0x5A, XenPage.size)
            let r = try rawIndirect(fe, id: 170, nseg: 64,
                                    segment: with(3, BlkifSegment(gref: readOnly, firstSect: 0, lastSect: 7)))
            #expect(r == error(170, BlkifOperation.read))
            #expect(fe.guest.page(frame).load(as: UInt8.self) == 0x5A)
        }
    }

    @Test("a sector range past the end of the disk, or overflowing 64 bits, is an error; one that ends at the end is served")
    func pastTheEnd() throws {
        try withHostileGuest { fe, _ in
            let sectors = fe.info.sectors
            let n = Self.offered
            let cases: [(UInt64, Int)] = [(sectors - 4, 1), (sectors, 1), (sectors - UInt64(8 * n) + 1, n),
                                          (UInt64.max - 3, 1), (UInt64.max - UInt64(8 * n) + 2, n)]
            for (k, (sector, nseg)) in cases.enumerated() {
                for (j, op) in [BlkifOperation.read, BlkifOperation.write].enumerated() {
                    let id = UInt64(180 + 2 * k + j)
                    let r = try rawIndirect(fe, op: op, id: id, sector: sector, nseg: nseg, segment: wholePages(fe))
                    #expect(r == error(id, op), "\(nseg) pages at sector \(sector)")
                }
            }
            let r = try rawIndirect(fe, id: 199, sector: sectors - UInt64(8 * n), nseg: n, segment: wholePages(fe))
            #expect(r == okay(199, BlkifOperation.read))
        }
    }

    @Test("a write to a read-only disk is an error; reads are served")
    func writeToReadOnlyDisk() throws {
        try withHostileGuest(readOnly: true) { fe, _ in
            #expect(fe.info.readOnly)
            let w = try rawIndirect(fe, op: BlkifOperation.write, id: 200, nseg: 64, segment: wholePages(fe))
            #expect(w == error(200, BlkifOperation.write))
            let r = try rawIndirect(fe, op: BlkifOperation.read, id: 201, nseg: 64, segment: wholePages(fe))
            #expect(r == okay(201, BlkifOperation.read))
        }
    }

    @Test("a duplicate id of an indirect request in flight is refused alone; the original completes")
    func duplicateInFlightID() throws {
        try withHostileGuest { fe, _ in
            let page = fe.indirectPage(slot: 0, page: 0)
            for i in 0..<Self.offered { wholePages(fe)(i).encode(to: page + i * BlkifSegment.size) }
            let request: (UnsafeMutableRawPointer) -> Void = {
                BlkifIndirectRequest(indirectOp: BlkifOperation.read, nrSegments: UInt16(Self.offered), id: 210,
                                     sectorNumber: 0,
                                     indirectGrefs: InlineArray { $0 == 0 ? fe.indirectGrantRef(slot: 0, page: 0) : 0 })
                    .encode(to: $0)
            }
            try fe.submitRaw(request)
            try fe.submitRaw(request)
            fe.kick()
            let got = try fe.collectResponses(2)
            #expect(got.count == 2)
            #expect(got.filter { $0 == error(210, BlkifOperation.read) }.count == 1)
            #expect(got.filter { $0 == okay(210, BlkifOperation.read) }.count == 1)
        }
    }
}
