/// The values each disk sector may hold, given the writes a frontend has
/// sent and their answers, under blkif's rules: requests in flight at the
/// same time run in any order; a write answered OKAY has landed, and only
/// writes that overlapped it in time may have landed after it; a discard
/// leaves zeros or the old value; a write answered with an error may or may
/// not have landed. A request the checker cannot vouch for (raw bytes, a
/// slot or descriptor page rewritten under the backend) is a "wildcard":
/// any value, until a later write supersedes it.
///
/// Time is an epoch counter the ring bumps at every event. Each sector
/// keeps a few candidates, each with the epoch it stopped being one, so a
/// read published at epoch e accepts any candidate still valid after e.
/// All memory is allocated once; `reset` starts a run.
final class SectorModel {
    struct Write {
        /// Epoch its slot was written (it may run from then on).
        var published: UInt32
        /// Epoch it was answered (any status); `.max` while in flight.
        var answered: UInt32
        var wildcard: Bool
        /// Its value is zeros (a discard; serial 0: the fresh disk).
        var zeros: Bool
    }
    struct Candidate {
        var serial: UInt32
        /// Epoch it stopped being possible; `.max` while it is.
        var removed: UInt32
    }

    static let perSector = 8
    static let writeCapacity = 2048
    let sectors: Int
    private(set) var writes: UnsafeMutablePointer<Write>
    private(set) var writeCount = 1
    private let candidates: UnsafeMutablePointer<Candidate>
    private let counts: UnsafeMutablePointer<UInt8>
    /// Candidates were lost for want of room: anything goes from then on.
    private let saturated: UnsafeMutablePointer<Bool>
    /// Some write or discard may have touched the sector.
    let touched: UnsafeMutablePointer<Bool>
    /// The touched sectors, in the order they were first touched.
    let touchedList: UnsafeMutablePointer<Int32>
    private(set) var touchedCount = 0
    /// Bit p: a sector of 4 KiB page p is touched (disks of up to 64 pages).
    private(set) var touchedPages: UInt64 = 0
    /// A hostile write found the write table full: every value is allowed.
    private(set) var overflowed = false
    /// The oldest epoch a check still in flight may ask about (for compaction).
    var oldestOpenEpoch: () -> UInt32 = { 0 }

    init(sectors: Int) {
        precondition(sectors <= 64 * 8, "touchedPages holds 64 pages")
        self.sectors = sectors
        writes = .allocate(capacity: Self.writeCapacity)
        candidates = .allocate(capacity: sectors * Self.perSector)
        counts = .allocate(capacity: sectors)
        saturated = .allocate(capacity: sectors)
        touched = .allocate(capacity: sectors)
        touchedList = .allocate(capacity: sectors)
        touched.initialize(repeating: true, count: sectors)
        for s in 0..<sectors { touchedList[s] = Int32(s) }
        touchedCount = sectors
        reset()
    }

    deinit {
        writes.deallocate(); candidates.deallocate(); counts.deallocate()
        saturated.deallocate(); touched.deallocate(); touchedList.deallocate()
    }

    func reset() {
        writes[0] = Write(published: 0, answered: 0, wildcard: false, zeros: true)
        writeCount = 1
        overflowed = false
        // Only touched sectors changed since the last reset (every change
        // below goes through `touch`); init passes with all of them touched.
        for i in 0..<touchedCount {
            let s = Int(touchedList[i])
            candidates[s * Self.perSector] = Candidate(serial: 0, removed: .max)
            counts[s] = 1
            saturated[s] = false
            touched[s] = false
        }
        touchedCount = 0
        touchedPages = 0
    }

    /// A new write (or discard, or wildcard) slot-written at `epoch`; nil when the table is full.
    func newWrite(at epoch: UInt32, wildcard: Bool, zeros: Bool) -> UInt32? {
        guard writeCount < Self.writeCapacity else {
            // A hostile write the model cannot hold: nothing can be vouched for any more.
            if wildcard || zeros { overflowed = true }
            return nil
        }
        writes[writeCount] = Write(published: epoch, answered: .max, wildcard: wildcard, zeros: zeros)
        writeCount += 1
        return UInt32(writeCount - 1)
    }

    /// The write may land on `sector ..< sector + count` (clipped to the disk).
    func mayLand(_ serial: UInt32, sector: UInt64, count: UInt64) {
        guard sector < UInt64(sectors) else { return }
        let end = Int(min(UInt64(sectors), sector + min(count, UInt64(sectors))))
        for s in Int(sector)..<end { add(serial, to: s) }
    }

    private func touch(_ s: Int) {
        guard !touched[s] else { return }
        touched[s] = true
        touchedList[touchedCount] = Int32(s)
        touchedCount += 1
        touchedPages |= 1 << UInt64(s / 8)
    }

    private func add(_ serial: UInt32, to s: Int) {
        touch(s)
        guard !saturated[s] else { return }
        let base = s * Self.perSector
        var n = Int(counts[s])
        for i in 0..<n where candidates[base + i].serial == serial && candidates[base + i].removed == .max { return }
        if n == Self.perSector {
            n = compact(s)
            if n == Self.perSector {
                saturated[s] = true
                return
            }
        }
        candidates[base + n] = Candidate(serial: serial, removed: .max)
        counts[s] = UInt8(n + 1)
    }

    /// Drops candidates no open check can ask about any more.
    private func compact(_ s: Int) -> Int {
        let base = s * Self.perSector
        let oldest = oldestOpenEpoch()
        var kept = 0
        for i in 0..<Int(counts[s]) where candidates[base + i].removed > oldest {
            candidates[base + kept] = candidates[base + i]
            kept += 1
        }
        counts[s] = UInt8(kept)
        return kept
    }

    func markWildcard(_ serial: UInt32) { writes[Int(serial)].wildcard = true }

    func answered(_ serial: UInt32, at epoch: UInt32) { writes[Int(serial)].answered = epoch }

    /// Write `serial` was answered OKAY at `epoch` for its range: the values
    /// of writes answered before it was published are gone.
    func acknowledge(_ serial: UInt32, sector: UInt64, count: UInt64, at epoch: UInt32) {
        let w = writes[Int(serial)]
        guard !w.wildcard, !w.zeros, sector < UInt64(sectors) else { return }
        let end = Int(min(UInt64(sectors), sector + count))
        for s in Int(sector)..<end {
            let base = s * Self.perSector
            for i in 0..<Int(counts[s]) where candidates[base + i].removed == .max && candidates[base + i].serial != serial {
                if writes[Int(candidates[base + i].serial)].answered < w.published {
                    candidates[base + i].removed = epoch
                    touch(s)
                }
            }
        }
    }

    /// Whether `bytes` may be what sector `s` held at some time after `epoch`.
    func allows(_ bytes: UnsafeRawPointer, sector s: Int, since epoch: UInt32) -> Bool {
        if saturated[s] || overflowed { return true }
        let base = s * Self.perSector
        // Wildcards first: bytes a hostile request may have put there are not even looked at.
        for i in 0..<Int(counts[s]) where candidates[base + i].removed > epoch {
            if writes[Int(candidates[base + i].serial)].wildcard { return true }
        }
        guard let value = SectorStamp.serial(of: bytes, sector: UInt32(s)) else { return false }
        for i in 0..<Int(counts[s]) where candidates[base + i].removed > epoch {
            let c = candidates[base + i].serial
            if value == c || (value == 0 && writes[Int(c)].zeros) { return true }
        }
        return false
    }

    /// What the model allows for sector `s` now, for a finding's text.
    func describe(_ s: Int) -> String {
        let base = s * Self.perSector
        var parts: [String] = []
        for i in 0..<Int(counts[s]) {
            let c = candidates[base + i]
            parts.append("\(c.serial)\(c.removed == .max ? "" : "(gone@\(c.removed))")")
        }
        return "[" + parts.joined(separator: " ") + "]"
    }
}
