import Glibc
import XenABI
import SystemSupport

/// A mixed workload (writes, reads, flushes, discards of random sizes and
/// offsets) that checks every byte it reads against a model of the disk.
/// Data written to a sector is a pure function of (sector, version), so the
/// model stores one version number per sector, not the data.
public struct VerifiedWorkload {
    public struct Mix: Sendable {
        public var write = 45, read = 45, flush = 4, discard = 6
        public init() {}
    }
    public struct Summary: Sendable, CustomStringConvertible {
        public var writes = 0, reads = 0, flushes = 0, discards = 0
        public var bytesWritten: UInt64 = 0, bytesRead: UInt64 = 0
        public var sectorsVerified: UInt64 = 0
        public var mismatches = 0
        public var errors = 0
        public var seconds = 0.0
        public init() {}
        public var description: String {
            let mb = Double(bytesWritten + bytesRead) / 1e6
            return "\(writes) writes, \(reads) reads, \(flushes) flushes, \(discards) discards; "
                + "\(sectorsVerified) sectors verified, \(mismatches) mismatches, \(errors) errors; "
                + "\(fixed(mb)) MB in \(fixed(seconds)) s (\(fixed(mb / max(seconds, 1e-9))) MB/s, "
                + "\(fixed(Double(writes + reads + flushes + discards) / max(seconds, 1e-9), 0)) requests/s)"
        }
    }

    /// Version 0: never written (reads as what `initialContent` says);
    /// UInt32.max: discarded (reads as zeros).
    private var versions: [UInt32]
    private var nextVersion: UInt32 = 1
    private var rng: Xorshift
    /// The workload's sectors are the disk's `firstSector..<firstSector + sectors`
    /// (workloads on several rings of one disk each keep to their own range).
    public let firstSector: UInt64
    public let sectors: UInt64
    public var mix = Mix()
    public var queueDepth: Int
    /// The most segments (pages) of a read or write; nil: as many as the
    /// frontend's requests carry (`segmentsPerRequest`: above 11 when it
    /// agreed on indirect requests, which then carry every larger one).
    public var segmentsPerRequest: Int?
    private let canDiscard: Bool
    private let canFlush: Bool

    public init(sectors: UInt64, firstSector: UInt64 = 0, seed: UInt64, queueDepth: Int = 16, canDiscard: Bool, canFlush: Bool) {
        self.firstSector = firstSector
        self.sectors = sectors
        self.versions = [UInt32](repeating: 0, count: Int(sectors))
        self.rng = Xorshift(seed: seed)
        self.queueDepth = queueDepth
        self.canDiscard = canDiscard
        self.canFlush = canFlush
    }

    /// The 512 bytes a sector holds at a version: an 8-byte pattern mixing both.
    public static func fill(_ p: UnsafeMutableRawPointer, sector: UInt64, version: UInt32) {
        var x = sector &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(version) &* 0xC2B2_AE3D_27D4_EB4F
        for i in 0..<(Blkif.sectorSize / 8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            p.storeBytes(of: x, toByteOffset: i * 8, as: UInt64.self)
        }
    }

    /// Writes into `p` the 512 bytes the model expects at `sector`; false
    /// when the model does not know (never written).
    public func expectedSector(_ sector: UInt64, into p: UnsafeMutableRawPointer) -> Bool {
        guard sector >= firstSector, sector - firstSector < sectors else { return false }
        let v = versions[Int(sector - firstSector)]
        if v == 0 { return false }
        if v == UInt32.max { memset(p, 0, Blkif.sectorSize) } else { Self.fill(p, sector: sector, version: v) }
        return true
    }

    private struct InFlight {
        var ticket: BlockFrontendRing.Ticket
        var kind: UInt8
        var sector: UInt64
        var count: Int
        var first: Int
        var version: UInt32
    }

    /// Runs for `seconds` (or `operations` requests), calling `progress`
    /// about once a second. Throws on a protocol failure; data mismatches
    /// are counted in the summary.
    public mutating func run(on fe: LoopbackBlockFrontend, seconds: Double, operations: Int = .max,
                             progress: (Summary) -> Void = { _ in }) throws -> Summary {
        guard let ring = fe.queues.first else { throw FrontendError("not connected") }
        return try run(on: ring, seconds: seconds, operations: operations, progress: progress)
    }

    /// `run` on one ring of a disk (its other rings may be driven by other threads).
    public mutating func run(on fe: BlockFrontendRing, seconds: Double, operations: Int = .max,
                             progress: (Summary) -> Void = { _ in }) throws -> Summary {
        var summary = Summary()
        var inFlight: [InFlight] = []
        let start = MonotonicClock.seconds()
        var lastProgress = start
        var issued = 0
        let depth = min(queueDepth, fe.ringSlots)
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.sectorSize, alignment: 16)
        defer { scratch.deallocate() }
        while true {
            let now = MonotonicClock.seconds()
            let stopping = now - start >= seconds || issued >= operations
            if stopping && inFlight.isEmpty { break }
            while !stopping && inFlight.count < depth && issued < operations {
                guard let op = try issue(on: fe, avoiding: inFlight) else { break }
                inFlight.append(op)
                issued += 1
            }
            fe.kick()
            try fe.collect(timeout: 10) { rsp in
                guard let i = inFlight.firstIndex(where: { $0.ticket.id == rsp.id }) else {
                    summary.errors += 1
                    return
                }
                let op = inFlight.remove(at: i)
                complete(op, status: rsp.status, fe: fe, scratch: scratch, summary: &summary)
            }
            if now - lastProgress >= 1 {
                lastProgress = now
                summary.seconds = now - start
                progress(summary)
            }
        }
        summary.seconds = MonotonicClock.seconds() - start
        return summary
    }

    private mutating func issue(on fe: BlockFrontendRing, avoiding busy: [InFlight]) throws -> InFlight? {
        let total = mix.write + mix.read + mix.flush + mix.discard
        var pick = Int(rng.next() % UInt64(total))
        var kind: UInt8
        if pick < mix.write { kind = BlkifOperation.write } else {
            pick -= mix.write
            if pick < mix.read { kind = BlkifOperation.read } else {
                pick -= mix.read
                kind = pick < mix.flush ? BlkifOperation.flushDiskCache : BlkifOperation.discard
            }
        }
        if kind == BlkifOperation.flushDiskCache && !canFlush { kind = BlkifOperation.read }
        if kind == BlkifOperation.discard && !canDiscard { kind = BlkifOperation.write }
        if kind == BlkifOperation.flushDiskCache {
            let t = try fe.submit(.flush)
            return InFlight(ticket: t, kind: kind, sector: 0, count: 0, first: 0, version: 0)
        }
        // A range that overlaps nothing in flight, so the model stays exact.
        for _ in 0..<8 {
            let first = Int(rng.next() % 8)
            let pagesPerRequest = min(segmentsPerRequest ?? fe.segmentsPerRequest, fe.segmentsPerRequest)
            let maxCount = kind == BlkifOperation.discard ? 256 : pagesPerRequest * Blkif.sectorsPerPage - first
            let count = 1 + Int(rng.next() % UInt64(maxCount))
            guard UInt64(count) <= sectors else { continue }
            let sector = rng.next() % (sectors - UInt64(count) + 1)
            if busy.contains(where: { $0.count > 0 && sector < $0.sector + UInt64($0.count) && $0.sector < sector + UInt64(count) }) {
                continue
            }
            switch kind {
            case BlkifOperation.write:
                let version = nextVersion
                nextVersion += 1
                guard let slot = fe.nextFreeSlot else { return nil }
                for s in 0..<count {
                    let byte = (first + s) * Blkif.sectorSize
                    Self.fill(fe.dataPage(slot: slot, segment: byte / XenPage.size) + byte % XenPage.size,
                              sector: firstSector + sector + UInt64(s), version: version)
                }
                let t = try fe.submit(.write(sector: firstSector + sector, count: count, firstSectorInPage: first))
                precondition(t.slot == slot)
                return InFlight(ticket: t, kind: kind, sector: sector, count: count, first: first, version: version)
            case BlkifOperation.read:
                let t = try fe.submit(.read(sector: firstSector + sector, count: count, firstSectorInPage: first))
                return InFlight(ticket: t, kind: kind, sector: sector, count: count, first: first, version: 0)
            default:
                let t = try fe.submit(.discard(sector: firstSector + sector, count: UInt64(count)))
                return InFlight(ticket: t, kind: kind, sector: sector, count: count, first: 0, version: 0)
            }
        }
        return nil
    }

    private mutating func complete(_ op: InFlight, status: Int16, fe: BlockFrontendRing,
                                   scratch: UnsafeMutableRawPointer, summary: inout Summary) {
        guard status == BlkifStatus.okay else {
            summary.errors += 1
            // A failed write or discard may have reached the disk or not:
            // its range is unknown from now on.
            if op.kind == BlkifOperation.write || op.kind == BlkifOperation.discard {
                for s in 0..<op.count { versions[Int(op.sector) + s] = 0 }
            }
            return
        }
        switch op.kind {
        case BlkifOperation.write:
            for s in 0..<op.count { versions[Int(op.sector) + s] = op.version }
            summary.writes += 1
            summary.bytesWritten += UInt64(op.count * Blkif.sectorSize)
        case BlkifOperation.read:
            summary.reads += 1
            summary.bytesRead += UInt64(op.count * Blkif.sectorSize)
            for s in 0..<op.count {
                let sector = op.sector + UInt64(s)
                let v = versions[Int(sector)]
                if v == 0 { continue }   // never written: content unknown to the model
                if v == UInt32.max {
                    memset(scratch, 0, Blkif.sectorSize)
                } else {
                    Self.fill(scratch, sector: firstSector + sector, version: v)
                }
                let byte = (op.first + s) * Blkif.sectorSize
                let got = fe.dataPage(slot: op.ticket.slot, segment: byte / XenPage.size) + byte % XenPage.size
                if memcmp(got, scratch, Blkif.sectorSize) != 0 { summary.mismatches += 1 }
                summary.sectorsVerified += 1
            }
        case BlkifOperation.discard:
            for s in 0..<op.count { versions[Int(op.sector) + s] = UInt32.max }
            summary.discards += 1
        default:
            summary.flushes += 1
        }
    }

    /// Reads the whole disk and checks every sector the model knows.
    /// `knownOnly`: reads only the requests' worth of sectors that hold one
    /// (a quick read-back of what a short workload wrote or discarded).
    public func verifyAll(on fe: LoopbackBlockFrontend, knownOnly: Bool = false,
                          progress: (UInt64) -> Void = { _ in }) throws -> (verified: UInt64, mismatches: Int) {
        guard let ring = fe.queues.first else { throw FrontendError("not connected") }
        return try verifyAll(on: ring, knownOnly: knownOnly, progress: progress)
    }

    /// `verifyAll` through one ring of a disk.
    public func verifyAll(on fe: BlockFrontendRing, knownOnly: Bool = false,
                          progress: (UInt64) -> Void = { _ in }) throws -> (verified: UInt64, mismatches: Int) {
        var verified: UInt64 = 0
        var mismatches = 0
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.sectorSize, alignment: 16)
        defer { scratch.deallocate() }
        var sector: UInt64 = 0
        let chunk = UInt64(fe.maxSectorsPerRequest)
        while sector < sectors {
            let count = Int(min(chunk, sectors - sector))
            if knownOnly && !versions[Int(sector)..<(Int(sector) + count)].contains(where: { $0 != 0 }) {
                sector += UInt64(count)
                continue
            }
            let (status, data) = try fe.read(sector: firstSector + sector, count: count)
            guard status == BlkifStatus.okay else {
                throw FrontendError("read at sector \(firstSector + sector) failed: \(status)")
            }
            for s in 0..<count {
                let v = versions[Int(sector) + s]
                if v == 0 { continue }
                if v == UInt32.max {
                    memset(scratch, 0, Blkif.sectorSize)
                } else {
                    Self.fill(scratch, sector: firstSector + sector + UInt64(s), version: v)
                }
                let same = data.withUnsafeBytes { memcmp($0.baseAddress! + s * Blkif.sectorSize, scratch, Blkif.sectorSize) == 0 }
                if !same { mismatches += 1 }
                verified += 1
            }
            sector += UInt64(count)
            if sector % (chunk * 1024) == 0 { progress(sector) }
        }
        return (verified, mismatches)
    }
}

/// A small fast PRNG for workloads (SystemRandomNumberGenerator is slow in hot loops).
public struct Xorshift: Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed == 0 ? 0x2545_F491_4F6C_DD1D : seed }
    public mutating func next() -> UInt64 {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return state
    }
}
