import BlockFrontend
import Glibc
import NBDTestSupport
import XenABI
import XenBus

/// Whole 4 KiB writes over a region of a disk, each block's data a function
/// of (block, version), up to `depth` in flight on distinct blocks: the I/O
/// kept running across a migration or a daemon's death, and checked
/// afterwards, by checksum, from a client of the export that never went
/// through a ring (`verify(with:)`).
///
/// For each block the model keeps the last acknowledged version and the
/// versions sent after it that were never acknowledged (answered with an
/// error, or never answered): the block must hold the acknowledged data or
/// one of those.
struct StampedWrites {
    let firstSector: UInt64
    let blocks: Int
    let depth: Int
    private var acknowledged: [Int: UInt32] = [:]
    private var unsure: [Int: [UInt32]] = [:]
    private var inFlight: [UInt64: (block: Int, version: UInt32)] = [:]
    private var nextVersion: UInt32 = 1
    private var rng: Xorshift
    private(set) var acknowledgedCount = 0
    private(set) var errors = 0

    init(firstSector: UInt64, blocks: Int, depth: Int = 8, seed: UInt64) {
        precondition(blocks > depth, "more blocks than writes in flight")
        self.firstSector = firstSector
        self.blocks = blocks
        self.depth = depth
        rng = Xorshift(seed: seed)
    }

    var inFlightCount: Int { inFlight.count }

    /// The 4096 bytes of `block` at `version`.
    static func data(block: Int, version: UInt32) -> [UInt8] {
        var x = UInt64(block) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(version) &* 0xD6E8_FEB8_6659_FD93 | 1
        var bytes = [UInt8](repeating: 0, count: 4096)
        bytes.withUnsafeMutableBytes { raw in
            for i in 0..<512 {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                raw.storeBytes(of: x, toByteOffset: i * 8, as: UInt64.self)
            }
        }
        return bytes
    }

    /// Tops the ring up to `depth` writes in flight, on blocks not in flight.
    mutating func fill(_ fe: LoopbackBlockFrontend) throws {
        while inFlight.count < depth, fe.nextFreeSlot != nil {
            var block = Int(rng.next() % UInt64(blocks))
            while inFlight.values.contains(where: { $0.block == block }) { block = (block + 1) % blocks }
            try submit(fe, block: block, version: nextVersion)
            nextVersion += 1
        }
        fe.kick()
    }

    private mutating func submit(_ fe: LoopbackBlockFrontend, block: Int, version: UInt32) throws {
        guard let slot = fe.nextFreeSlot else { throw FrontendError("no free slot") }
        fe.copyIn(slot: slot, first: 0, from: Self.data(block: block, version: version))
        let ticket = try fe.submit(.write(sector: firstSector + UInt64(block) * 8, count: 8))
        inFlight[ticket.id] = (block, version)
    }

    /// Takes the responses there are (waiting up to `timeout` for the first);
    /// how many.
    @discardableResult
    mutating func collect(_ fe: LoopbackBlockFrontend, timeout: Double) throws -> Int {
        var answered: [(UInt64, Int16)] = []
        let count = try fe.collect(timeout: timeout) { answered.append(($0.id, $0.status)) }
        for (id, status) in answered {
            guard let write = inFlight.removeValue(forKey: id) else { continue }
            if status == BlkifStatus.okay {
                acknowledged[write.block] = write.version
                unsure[write.block] = nil
                acknowledgedCount += 1
            } else {
                errors += 1
                unsure[write.block, default: []].append(write.version)
            }
        }
        return count
    }

    /// Keeps `depth` writes in flight until `count` more were acknowledged;
    /// returns with the last ones still in flight.
    mutating func run(on fe: LoopbackBlockFrontend, acknowledging count: Int) throws {
        let target = acknowledgedCount + count
        while acknowledgedCount < target {
            try fill(fe)
            if try collect(fe, timeout: 10) == 0 { throw FrontendError("no response within 10 s") }
            if errors > 0 { return }
        }
    }

    /// Waits for everything in flight to be answered.
    mutating func drain(_ fe: LoopbackBlockFrontend) throws {
        while !inFlight.isEmpty {
            if try collect(fe, timeout: 10) == 0 { throw FrontendError("\(inFlight.count) writes unanswered after 10 s") }
        }
    }

    /// Forgets the writes still in flight (their ring is gone): they may or
    /// may not have reached the export. Returns them, oldest first.
    mutating func abandonInFlight() -> [(block: Int, version: UInt32)] {
        let left = inFlight.values.sorted { $0.version < $1.version }
        for write in left { unsure[write.block, default: []].append(write.version) }
        inFlight = [:]
        return left
    }

    /// Sends writes again on another ring, as blkfront re-issues after a
    /// migration the requests its old backend never answered.
    mutating func resubmit(_ writes: [(block: Int, version: UInt32)], on fe: LoopbackBlockFrontend) throws {
        for write in writes {
            while fe.nextFreeSlot == nil { try collect(fe, timeout: 10) }
            try submit(fe, block: write.block, version: write.version)
        }
        fe.kick()
    }

    /// Reads every block written from `reader` and compares checksums with
    /// the model; the blocks that hold what was acknowledged (or a later
    /// unacknowledged write) and those that do not.
    func verify(with reader: some DiskContentReader) throws -> (checked: Int, wrong: [Int]) {
        var checked = 0
        var wrong: [Int] = []
        let zeros = fnv1a64([UInt8](repeating: 0, count: 4096))
        for block in Set(acknowledged.keys).union(unsure.keys).sorted() {
            let found = try reader.checksum(offset: (firstSector + UInt64(block) * 8) * 512, length: 4096)
            var allowed = (unsure[block] ?? []).map { fnv1a64(Self.data(block: block, version: $0)) }
            if let version = acknowledged[block] {
                allowed.append(fnv1a64(Self.data(block: block, version: version)))
                checked += 1
            } else {
                allowed.append(zeros)   // never acknowledged: maybe never written (the disk starts zeroed)
            }
            if !allowed.contains(found) { wrong.append(block) }
        }
        return (checked, wrong)
    }
}

/// Closes a frontend the way a suspending guest's does, but with requests
/// still on the ring: Closing, wait until the backend is Closing (it answers
/// what it had taken, takes nothing more, flushes and lets the disk go),
/// take the responses it left on the ring, Closed, release the ring.
func closeWithRequestsInFlight(_ fe: LoopbackBlockFrontend, writes: inout StampedWrites) throws {
    try fe.store.writeState(fe.frontendPath, .closing)
    try waitUntil("the backend to close") {
        let state = fe.store.readState(fe.backendPath)
        return state == .closing || state == .closed || state == nil
    }
    while try writes.collect(fe, timeout: 0.05) > 0 {}
    try fe.store.writeState(fe.frontendPath, .closed)
    fe.releaseResources()
}

/// Every sector the workload's model knows, read from `reader` (a client of
/// the export that never went through a ring) and compared; how many were
/// checked and how many differed.
func verifyWorkload(_ workload: VerifiedWorkload, with reader: some DiskContentReader) throws -> (checked: Int, mismatches: Int) {
    let expected = UnsafeMutableRawPointer.allocate(byteCount: 512, alignment: 16)
    defer { expected.deallocate() }
    var checked = 0, mismatches = 0
    let chunkSectors: UInt64 = 2048
    var sector: UInt64 = 0
    while sector < workload.sectors {
        let count = min(chunkSectors, workload.sectors - sector)
        let data = try reader.read(offset: sector * 512, length: Int(count) * 512)
        for s in 0..<count where workload.expectedSector(sector + s, into: expected) {
            let same = data.withUnsafeBytes { memcmp($0.baseAddress! + Int(s) * 512, expected, 512) == 0 }
            if !same { mismatches += 1 }
            checked += 1
        }
        sector += count
    }
    return (checked, mismatches)
}
