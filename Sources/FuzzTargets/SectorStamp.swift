/// What the checker writes into guest pages so that any sector read back
/// says which write it came from: a sector written by write `serial` at
/// disk sector `sector` holds 64 words derived from both. Serial 0 is the
/// all-zero sector (a fresh or discarded one). Bytes of a page that no
/// segment moves hold "junk" stamps whose sector field (≥ 0xE000_0000)
/// names no disk sector, so a sector taken from the wrong place is caught.
enum SectorStamp {
    static let words = 64
    static let junkSector: UInt32 = 0xE000_0000

    @inline(__always)
    static func word(_ serial: UInt32, _ sector: UInt32, _ i: Int) -> UInt64 {
        (UInt64(serial) << 32 | UInt64(sector)) &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15
    }

    static func fill(_ p: UnsafeMutableRawPointer, serial: UInt32, sector: UInt32) {
        for i in 0..<words { p.storeBytes(of: word(serial, sector, i), toByteOffset: i * 8, as: UInt64.self) }
    }

    // Differences are OR-ed and compared once: a fuzzer build traces every
    // comparison, and one per word made these loops most of a run.
    static func matches(_ p: UnsafeRawPointer, serial: UInt32, sector: UInt32) -> Bool {
        var difference: UInt64 = 0
        for i in 0..<words { difference |= p.load(fromByteOffset: i * 8, as: UInt64.self) ^ word(serial, sector, i) }
        return difference == 0
    }

    static func isZero(_ p: UnsafeRawPointer, bytes: Int) -> Bool {
        var bits: UInt64 = 0
        for i in 0..<bytes / 8 { bits |= p.load(fromByteOffset: i * 8, as: UInt64.self) }
        return bits == 0
    }

    /// The serial the bytes of disk sector `sector` carry: 0 for zeros, nil
    /// for anything that is neither zeros nor a whole stamp of this sector.
    static func serial(of p: UnsafeRawPointer, sector: UInt32) -> UInt32? {
        let first = p.load(as: UInt64.self)
        if first == 0 { return isZero(p, bytes: 512) ? 0 : nil }
        let serial = UInt32(truncatingIfNeeded: first >> 32)
        guard UInt32(truncatingIfNeeded: first) == sector, serial != 0, matches(p, serial: serial, sector: sector) else {
            return nil
        }
        return serial
    }

    /// Fills a whole page with junk of `serial` (what a read must not leave
    /// behind outside its segments).
    static func fillJunk(_ page: UnsafeMutableRawPointer, serial: UInt32) {
        for k in 0..<8 { fill(page + k * 512, serial: serial, sector: junkSector | UInt32(k)) }
    }

    static func isJunk(_ sector: UnsafeRawPointer, serial: UInt32, slot k: Int) -> Bool {
        matches(sector, serial: serial, sector: junkSector | UInt32(k))
    }
}
