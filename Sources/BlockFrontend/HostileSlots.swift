import Hypervisor
import XenABI

/// Raw ring slots a hostile frontend writes: random bytes, and requests of
/// any operation, segment count, sector range, id and grant that are
/// nearly right (they reach deeper into the backend's checks). Segment
/// grants always come from the `HostilePalette`, so whatever the backend
/// does with them cannot touch a page the guest checks.
public struct HostileSlots {
    public let palette: HostilePalette
    public let sectors: UInt64
    /// The backend's feature-max-indirect-segments (0: not offered).
    public let indirectOffer: Int

    public init(palette: HostilePalette, sectors: UInt64, indirectOffer: Int) {
        self.palette = palette
        self.sectors = sectors
        self.indirectOffer = indirectOffer
    }

    public enum Kind: CaseIterable, Sendable {
        case randomBytes, direct, discard, indirect
    }

    /// Writes one raw request of `kind` with `id` into the slot at `p`.
    public func make(_ kind: Kind, id: UInt64, into p: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        switch kind {
        case .randomBytes: randomBytes(id: id, into: p, &rng)
        case .direct: direct(id: id, into: p, &rng)
        case .discard: discard(id: id, into: p, &rng)
        case .indirect: indirect(id: id, into: p, &rng)
        }
    }

    /// The sectors a backend that follows blkif.h could write for the
    /// request in slot `p` (nil: none), read from the slot itself: any
    /// WRITE, WRITE_BARRIER, DISCARD or INDIRECT, over its whole possible extent.
    public static func reach(of p: UnsafeRawPointer) -> (start: UInt64, count: UInt64)? {
        let op = p.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
        let start = p.loadUnaligned(fromByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self)
        switch op {
        case BlkifOperation.write, BlkifOperation.writeBarrier:
            let n = p.load(fromByteOffset: BlkifRequest.Offset.nrSegments, as: UInt8.self)
            return (start, UInt64(n) * UInt64(Blkif.sectorsPerPage))
        case BlkifOperation.discard:
            return (start, p.loadUnaligned(fromByteOffset: BlkifDiscardRequest.Offset.nrSectors, as: UInt64.self))
        case BlkifOperation.indirect:
            let n = p.loadUnaligned(fromByteOffset: BlkifIndirectRequest.Offset.nrSegments, as: UInt16.self)
            return (start, UInt64(n) * UInt64(Blkif.sectorsPerPage))
        default:
            return nil
        }
    }

    // MARK: the kinds

    private func randomBytes(id: UInt64, into p: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        for i in 0..<(Blkif.slotSize / 8) { p.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
        if rng.next() % 2 == 0 {   // a sector somewhere near the disk, so some get past the range check
            p.storeBytes(of: rng.next() % (sectors * 2), toByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self)
        }
        p.storeBytes(of: id, toByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
        // Whatever the bytes say, the grants named are the palette's or beyond the table.
        let op = p.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
        if op <= BlkifOperation.flushDiskCache {
            for i in 0..<Blkif.maxSegmentsPerRequest { saneRef(p + BlkifRequest.Offset.seg + i * BlkifSegment.size, &rng) }
        } else if op == BlkifOperation.indirect {
            for i in 0..<Blkif.maxIndirectPagesPerRequest { saneRef(p + BlkifIndirectRequest.Offset.indirectGrefs + 4 * i, &rng) }
        }
    }

    /// Keeps a random reference only when it cannot name a real grant.
    private func saneRef(_ at: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        let ref = at.loadUnaligned(as: GrantRef.self)
        if Int(ref) < palette.tableSize || rng.next() % 2 == 0 { at.storeBytes(of: palette.anyRef(&rng), as: GrantRef.self) }
    }

    private func direct(id: UInt64, into p: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        let ops: [UInt8] = [BlkifOperation.read, BlkifOperation.read, BlkifOperation.write, BlkifOperation.write,
                            BlkifOperation.writeBarrier, BlkifOperation.flushDiskCache, BlkifOperation.reserved1]
        let op = rng.next() % 8 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : ops[Int(rng.next() % UInt64(ops.count))]
        let n = segmentCount(&rng)
        let segments = InlineArray<11, BlkifSegment> { _ in segment(&rng) }
        BlkifRequest(operation: op, nrSegments: n, handle: rng.next() % 10 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : 0,
                     id: id, sectorNumber: sector(&rng), segments: segments).encode(to: p)
    }

    private func discard(id: UInt64, into p: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        let count: UInt64 = switch rng.next() % 20 {
        case 0: 0
        case 1, 2, 3: rng.next() >> (rng.next() % 64)
        default: 1 + rng.next() % 2048
        }
        BlkifDiscardRequest(flag: UInt8(truncatingIfNeeded: rng.next() % 4 == 0 ? rng.next() : rng.next() % 2),
                            id: id, sectorNumber: sector(&rng), nrSectors: count).encode(to: p)
    }

    private func indirect(id: UInt64, into p: UnsafeMutableRawPointer, _ rng: inout Xorshift) {
        let ops: [UInt8] = [BlkifOperation.read, BlkifOperation.read, BlkifOperation.write, BlkifOperation.write,
                            BlkifOperation.writeBarrier, BlkifOperation.flushDiskCache, BlkifOperation.discard, BlkifOperation.indirect]
        let op = rng.next() % 10 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : ops[Int(rng.next() % UInt64(ops.count))]
        let offer = max(indirectOffer, Blkif.maxSegmentsPerRequest)
        let n: UInt16 = switch rng.next() % 20 {
        case 0: 0
        case 1, 2: UInt16(offer + 1 + Int(rng.next() % 64))
        case 3, 4: UInt16(truncatingIfNeeded: rng.next())
        default: UInt16(1 + rng.next() % UInt64(offer))
        }
        let grefs = InlineArray<8, UInt32> { i in rng.next() % 5 == 0 ? palette.anyRef(&rng) : palette.descriptors[i].ref }
        BlkifIndirectRequest(indirectOp: op, nrSegments: n, id: id, sectorNumber: sector(&rng), indirectGrefs: grefs).encode(to: p)
        let described = min(Int(n), Blkif.maxIndirectPagesPerRequest * Blkif.segmentsPerIndirectPage)
        for i in 0..<described {
            let page = palette.pointer(palette.descriptors[i / Blkif.segmentsPerIndirectPage])
            segment(&rng).encode(to: page + i % Blkif.segmentsPerIndirectPage * BlkifSegment.size)
        }
    }

    /// Rewrites `count` segment descriptors at `p` (an indirect page of a
    /// request already on the ring) with nearly right ones naming the
    /// palette's grants or `own` (the request's own data pages).
    public func rewriteDescriptors(at p: UnsafeMutableRawPointer, count: Int, own: [GrantRef], _ rng: inout Xorshift) {
        for i in 0..<count {
            var s = segment(&rng)
            if !own.isEmpty && rng.next() % 2 == 0 { s.gref = own[Int(rng.next() % UInt64(own.count))] }
            s.encode(to: p + i * BlkifSegment.size)
        }
    }

    // MARK: fields

    private func segmentCount(_ rng: inout Xorshift) -> UInt8 {
        switch rng.next() % 20 {
        case 0: 0
        case 1, 2: UInt8(12 + rng.next() % 244)
        default: UInt8(1 + rng.next() % UInt64(Blkif.maxSegmentsPerRequest))
        }
    }

    private func segment(_ rng: inout Xorshift) -> BlkifSegment {
        let first = rng.next() % 10 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : UInt8(rng.next() % 8)
        let last = rng.next() % 7 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : max(first, UInt8(rng.next() % 8))
        return BlkifSegment(gref: palette.anyRef(&rng), firstSect: first, lastSect: last)
    }

    /// Mostly inside the disk, some across its end, some absurd.
    private func sector(_ rng: inout Xorshift) -> UInt64 {
        switch rng.next() % 20 {
        case 0: UInt64.max - rng.next() % 64
        case 1: rng.next()
        case 2, 3: sectors - min(sectors, 1 + rng.next() % 64)
        default: rng.next() % sectors
        }
    }
}
