import Glibc
import XenABI

/// What a hostile guest knows of its own disk: for each sector, the version
/// its last acknowledged well-formed write left there (data is
/// `VerifiedWorkload.fill(sector, version)`), zeros after an acknowledged
/// discard, or nothing. Conservative by construction: a sector any hostile
/// request could have written (a raw slot, a rewritten indirect page, a
/// revoked grant, a request left unanswered at a close) is unknown until a
/// well-formed write is acknowledged there with no hostile write in flight
/// over it.
public struct HostileDiskModel {
    /// 0: unknown; `zeroed`: discarded; anything else: a version.
    private var versions: [UInt32]
    private var nextVersion: UInt32 = 1
    /// Ranges hostile writes in flight may touch (cleared once nothing is in flight).
    private var pendingHostile: [Range<UInt64>] = []
    public let sectors: UInt64
    static let zeroed = UInt32.max

    public init(sectors: UInt64) {
        self.sectors = sectors
        versions = [UInt32](repeating: 0, count: Int(sectors))
    }

    /// The version a new well-formed write carries.
    public mutating func newVersion() -> UInt32 {
        defer { nextVersion = nextVersion == Self.zeroed - 1 ? 1 : nextVersion + 1 }
        return nextVersion
    }

    /// The part of [start, start+count) inside the disk (count may be absurd).
    public func clamp(start: UInt64, count: UInt64) -> Range<UInt64> {
        guard start < sectors else { return sectors..<sectors }
        let end = count > sectors - start ? sectors : start + count
        return start..<end
    }

    /// A request that may write [start, start+count) in ways the model cannot
    /// follow was just put on the ring.
    public mutating func hostileWrite(start: UInt64, count: UInt64) {
        let r = clamp(start: start, count: count)
        guard !r.isEmpty else { return }
        pendingHostile.append(r)
        forget(r)
    }

    /// Sectors whose content is unknown from now on (a failed or unanswered write).
    public mutating func forget(_ r: Range<UInt64>) {
        for s in r { versions[Int(s)] = 0 }
    }

    /// Nothing is in flight any more: no hostile write can land later.
    public mutating func quiesced() { pendingHostile.removeAll(keepingCapacity: true) }

    /// A well-formed write of `version` to `r` was acknowledged.
    public mutating func written(_ r: Range<UInt64>, version: UInt32) {
        set(r, to: version)
    }

    /// A well-formed discard of `r` was acknowledged (it reads back as zeros,
    /// as on the files the loopback world serves).
    public mutating func discarded(_ r: Range<UInt64>) {
        set(r, to: Self.zeroed)
    }

    private mutating func set(_ r: Range<UInt64>, to v: UInt32) {
        if pendingHostile.contains(where: { $0.overlaps(r) }) {
            forget(r)
        } else {
            for s in r { versions[Int(s)] = v }
        }
    }

    /// Writes into `p` the 512 bytes expected at `sector`; false when unknown.
    public func expected(_ sector: UInt64, into p: UnsafeMutableRawPointer) -> Bool {
        let v = versions[Int(sector)]
        if v == 0 { return false }
        if v == Self.zeroed { memset(p, 0, Blkif.sectorSize) } else { VerifiedWorkload.fill(p, sector: sector, version: v) }
        return true
    }

    /// Sectors the model knows.
    public var knownSectors: Int { versions.reduce(0) { $0 + ($1 == 0 ? 0 : 1) } }
}
