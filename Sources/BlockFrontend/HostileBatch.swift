import Glibc
import Hypervisor
import XenABI

/// Placing one round's requests on the ring: what each kind is and what
/// the guest may expect of it (`HostileRound.Role`), with the disk model
/// told at once of every write it cannot follow.
extension HostileBlkfront {
    /// A well-formed request's slot as placed, to place it again (same id).
    struct Placed {
        var bytes: [UInt8]
        var id: UInt64
        var request: HostileRound.WellFormed
    }

    /// Up to a ring of requests of random kinds, published (with a kick now
    /// and then midway); grants revoked and indirect pages rewritten after.
    func placeBatch() throws -> HostileRound {
        var r = HostileRound()
        var placed: [Placed] = []
        var afterKick: [() -> Void] = []
        // At most a ring of requests: each is answered before the next round.
        let n = 1 + Int(rng.next() % UInt64(min(fe.ringSlots, 48)))
        for _ in 0..<n where r.placed.count < n {
            let pick = rng.next() % 100
            switch pick {
            case 0..<50:
                if let p = try placeWellFormed(&r) { placed.append(p) }
            case 50..<58: try placeRaw(.randomBytes, id: freshID(), &r)
            case 58..<68: try placeRaw(.direct, id: freshID(), &r)
            case 68..<73: try placeRaw(.discard, id: freshID(), &r)
            case 73..<79: try placeRaw(.indirect, id: freshID(), &r)
            case 79..<85: try placeRefusedGrant(&r)
            case 85..<89: afterKick.append(try placeRevokedGrant(&r))
            case 89..<93:
                if let rewrite = try placeRewrittenIndirect(&r) { afterKick.append(rewrite) }
            case 93..<95:
                if n - r.placed.count >= Self.longestStream, let p = try placeStream(&r) { placed.append(contentsOf: p) }
            case 95..<97:
                // The very slot of a well-formed request again: its id twice in flight.
                if let p = placed.randomElement(using: &rng) {
                    try fe.submitRaw { $0.copyMemory(from: p.bytes, byteCount: Blkif.slotSize) }
                    r.place(id: p.id, .wellFormed(p.request))
                    counters.requests += 1; counters.hostile += 1
                }
            default:
                // Any raw request under an id already in flight.
                if let id = r.ids.randomElement(using: &rng) {
                    try placeRaw(HostileSlots.Kind.allCases.randomElement(using: &rng)!, id: id, &r)
                }
            }
            if rng.next() % 8 == 0 { fe.kick() }
        }
        fe.kick()
        for action in afterKick { action() }
        return r
    }

    /// Ids of raw requests: random, and now and then small or near the top
    /// (which may meet each other: the backend refuses a duplicate in flight).
    private func freshID() -> UInt64 {
        switch rng.next() % 20 {
        case 0: rng.next() % 16
        case 1: UInt64.max - rng.next() % 16
        default: rng.next()
        }
    }

    private func placeRaw(_ kind: HostileSlots.Kind, id: UInt64, _ r: inout HostileRound) throws {
        try fe.submitRaw { p in
            slots.make(kind, id: id, into: p, &rng)
            if let reach = HostileSlots.reach(of: p) { model.hostileWrite(start: reach.start, count: reach.count) }
        }
        r.place(id: id, .hostile)
        counters.requests += 1; counters.hostile += 1
    }

    /// Well-formed by our blkfront: every operation, indirect when large.
    private func placeWellFormed(_ r: inout HostileRound) throws -> Placed? {
        let sectors = fe.info.sectors
        typealias Kind = HostileRound.WellFormed.Kind
        let pick = rng.next() % 100
        let kind: Kind = pick < 40 ? .read : pick < 80 ? .write : pick < 86 ? .barrier : pick < 91 ? .flush : .discard
        var first = 0
        var count = 0
        switch kind {
        case .read, .write:
            first = Int(rng.next() % UInt64(Blkif.sectorsPerPage))
            let most = fe.maxSectorsPerRequest - first
            count = 1 + Int(rng.next() % UInt64(rng.next() % 2 == 0 ? min(16, most) : most))
        case .barrier:
            count = rng.next() % 5 == 0 ? 0 : 1 + Int(rng.next() % UInt64(Blkif.maxSegmentsPerRequest * Blkif.sectorsPerPage))
        case .discard:
            count = 1 + Int(rng.next() % 2048)
        case .flush:
            break
        }
        count = min(count, Int(sectors))
        var sector: UInt64 = 0
        if count > 0 {
            var found = false
            for _ in 0..<8 {
                sector = rng.next() % (sectors - UInt64(count) + 1)
                if !r.overlapsBusy(sector..<sector + UInt64(count)) { found = true; break }
            }
            guard found else { return nil }
        } else if kind == .barrier {
            sector = rng.next() % 2 == 0 ? UInt64.max : rng.next() % sectors   // Linux sends -1 for empty ones
        }
        return try placeWellFormed(kind, sector: sector, count: count, first: first, &r)
    }

    /// Places one well-formed request of `kind` (data for writes and barriers
    /// written first) and registers what the guest expects of it.
    private func placeWellFormed(_ kind: HostileRound.WellFormed.Kind, sector: UInt64, count: Int, first: Int,
                                 _ r: inout HostileRound) throws -> Placed? {
        guard let slot = fe.nextFreeSlot, let p = fe.nextRequestSlot else { return nil }
        let info = fe.info
        var w = HostileRound.WellFormed(kind: kind, slot: slot, sector: sector, count: count, first: first, version: 0,
                                        expected: BlkifStatus.okay, operation: BlkifOperation.read)
        let op: LoopbackBlockFrontend.Operation
        switch kind {
        case .read:
            op = .read(sector: sector, count: count, firstSectorInPage: first)
        case .write, .barrier:
            w.version = model.newVersion()
            for s in 0..<count {
                let byte = (first + s) * Blkif.sectorSize
                VerifiedWorkload.fill(fe.dataPage(slot: slot, segment: byte / XenPage.size) + byte % XenPage.size,
                                      sector: sector &+ UInt64(s), version: w.version)
            }
            if kind == .write {
                op = .write(sector: sector, count: count, firstSectorInPage: first)
                w.operation = BlkifOperation.write
            } else {
                op = .barrier(sector: sector, count: count)
                w.operation = BlkifOperation.writeBarrier
                w.expected = info.barrier ? BlkifStatus.okay : BlkifStatus.notSupported
            }
        case .flush:
            op = .flush
            w.operation = BlkifOperation.flushDiskCache
            w.expected = info.flush ? BlkifStatus.okay : BlkifStatus.notSupported
        case .discard:
            // The secure flag is ignored when discard-secure is not offered (blkif.h).
            op = .discard(sector: sector, count: UInt64(count), secure: rng.next() % 3 == 0)
            w.operation = BlkifOperation.discard
            w.expected = info.discard ? BlkifStatus.okay : BlkifStatus.notSupported
        }
        let t = try fe.submit(op)
        r.place(id: t.id, .wellFormed(w))
        counters.requests += 1; counters.wellFormed += 1
        return Placed(bytes: Array(UnsafeRawBufferPointer(start: p, count: Blkif.slotSize)), id: t.id, request: w)
    }

    /// Reads or writes of whole pages that continue each other on the disk
    /// (the backend merges such a batch into one operation), now and then
    /// with a request whose grant it must refuse in the middle of the chain.
    static let longestStream = 6

    private func placeStream(_ r: inout HostileRound) throws -> [Placed]? {
        let write = rng.next() % 2 == 0
        let pieces = (0..<(2 + Int(rng.next() % UInt64(Self.longestStream - 1)))).map { _ in
            (pages: 1 + Int(rng.next() % UInt64(Blkif.maxSegmentsPerRequest)), refused: rng.next() % 6 == 0)
        }
        let length = UInt64(pieces.reduce(0) { $0 + $1.pages } * Blkif.sectorsPerPage)
        guard length <= fe.info.sectors, fe.freeSlotCount >= pieces.count else { return nil }
        var sector = rng.next() % (fe.info.sectors - length + 1)
        guard !r.overlapsBusy(sector..<sector + length) else { return nil }
        var placed: [Placed] = []
        for piece in pieces {
            let count = piece.pages * Blkif.sectorsPerPage
            if piece.refused {
                try placeRefusedGrant(write: write, sector: sector, pages: piece.pages, &r)
            } else if let p = try placeWellFormed(write ? .write : .read, sector: sector, count: count, first: 0, &r) {
                placed.append(p)
            }
            sector += UInt64(count)
        }
        return placed
    }

    /// A direct read or write, right but for a grant the backend may not use
    /// for it (never granted, granted to another domain, read-only for a read).
    private func placeRefusedGrant(_ r: inout HostileRound) throws {
        let write = rng.next() % 2 == 0
        let n = 1 + Int(rng.next() % UInt64(Blkif.maxSegmentsPerRequest))
        let sector = rng.next() % (fe.info.sectors - UInt64(n * Blkif.sectorsPerPage) + 1)
        try placeRefusedGrant(write: write, sector: sector, pages: n, &r)
    }

    private func placeRefusedGrant(write: Bool, sector: UInt64, pages n: Int, _ r: inout HostileRound) throws {
        let bad = Int(rng.next() % UInt64(n))
        let refused = write ? palette.refusedForAll(&rng) : palette.refusedForRead(&rng)
        let segments = InlineArray<11, BlkifSegment> { i in
            BlkifSegment(gref: i == bad ? refused : palette.scratch[i].ref, firstSect: 0, lastSect: 7)
        }
        let id = freshID()
        try fe.submitRaw {
            BlkifRequest(operation: write ? BlkifOperation.write : BlkifOperation.read, nrSegments: UInt8(n), id: id,
                         sectorNumber: sector, segments: segments).encode(to: $0)
        }
        if write { model.hostileWrite(start: sector, count: UInt64(n * Blkif.sectorsPerPage)) }
        r.place(id: id, .refusedGrant)
        counters.requests += 1; counters.hostile += 1
    }

    /// A direct read or write on pages whose grants go away under it (most
    /// after the kick, racing the backend's copy); any answer will do.
    private func placeRevokedGrant(_ r: inout HostileRound) throws -> () -> Void {
        let write = rng.next() % 2 == 0
        let n = 1 + Int(rng.next() % UInt64(Blkif.maxSegmentsPerRequest))
        let sector = rng.next() % (fe.info.sectors - UInt64(n * Blkif.sectorsPerPage) + 1)
        let segments = InlineArray<11, BlkifSegment> { i in
            BlkifSegment(gref: palette.revocable[i].ref, firstSect: 0, lastSect: 7)
        }
        let id = freshID()
        try fe.submitRaw {
            BlkifRequest(operation: write ? BlkifOperation.write : BlkifOperation.read, nrSegments: UInt8(n), id: id,
                         sectorNumber: sector, segments: segments).encode(to: $0)
        }
        if write { model.hostileWrite(start: sector, count: UInt64(n * Blkif.sectorsPerPage)) }
        r.place(id: id, .hostile)
        counters.requests += 1; counters.hostile += 1
        let victims = (0..<n).filter { _ in rng.next() % 2 == 0 }
        let revoke = { [palette] in for i in victims.isEmpty ? [0] : victims { palette.revoke(i) } }
        if rng.next() % 4 == 0 {
            revoke()
            return {}
        }
        return revoke
    }

    /// An indirect read or write from our blkfront whose descriptor page is
    /// rewritten after it was placed (before or after the kick: the XSA-155
    /// double fetch); any answer will do, the data is not checked.
    private func placeRewrittenIndirect(_ r: inout HostileRound) throws -> (() -> Void)? {
        let most = fe.maxSectorsPerRequest
        let direct = Blkif.maxSegmentsPerRequest * Blkif.sectorsPerPage
        guard most > direct, let slot = fe.nextFreeSlot else { return nil }
        let first = Int(rng.next() % UInt64(Blkif.sectorsPerPage))
        let count = direct + 1 - first + Int(rng.next() % UInt64(most - direct))
        let sector = rng.next() % (fe.info.sectors - UInt64(count) + 1)
        let write = rng.next() % 2 == 0
        let t = try fe.submit(write ? .write(sector: sector, count: count, firstSectorInPage: first)
                                    : .read(sector: sector, count: count, firstSectorInPage: first))
        let pages = (first + count + Blkif.sectorsPerPage - 1) / Blkif.sectorsPerPage
        if write { model.hostileWrite(start: sector, count: UInt64(pages * Blkif.sectorsPerPage)) }
        r.place(id: t.id, .hostile)
        counters.requests += 1; counters.hostile += 1
        let own = (0..<pages).map { fe.grantRef(slot: slot, segment: $0) }
        let rewrite = { [self] in
            slots.rewriteDescriptors(at: fe.indirectPage(slot: slot, page: 0), count: pages, own: own, &rng)
        }
        if rng.next() % 4 == 0 {
            rewrite()
            return {}
        }
        return rewrite
    }
}

extension Xorshift: RandomNumberGenerator {}
