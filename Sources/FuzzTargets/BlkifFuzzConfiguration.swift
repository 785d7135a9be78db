import XenABI

/// The shape of ring A in one program, from the program's first two bytes.
struct BlkifFuzzConfiguration: Equatable {
    var ringPages: Int
    var persistentGrants: Bool
    /// feature-max-indirect-segments offered (0: no indirect requests).
    var maxIndirectSegments: Int
    var secureDiscard: Bool
    /// Small, so that requests wait in the engine's backlog.
    var queueDepth: Int
    /// Where the frontend starts its indices: near 0 or just below 2^32.
    var startIndex: UInt32
    /// The storage's `maxIovecsPerOperation` (io_uring's max_segments): merges stop there.
    var storageMaxIovecs: Int? = nil
    /// The frontend's ABI: x86_32 (108-byte slots) one run in 16.
    var ringProtocol: BlkifProtocol = .x86_64

    static func decode(_ bytes: inout BlkifProgramBytes) -> Self {
        let a = bytes.u8(), b = bytes.u8()
        let nearWrap = a & 0x40 != 0
        let offset = UInt32(b >> 4) &* 5
        return Self(ringPages: [1, 1, 2, 4][Int(a & 3)],
                    persistentGrants: a & 4 != 0,
                    maxIndirectSegments: [0, 16, 32, 16][Int(a >> 3) & 3],
                    secureDiscard: a & 0x20 != 0,
                    queueDepth: 2 + Int(b & 15) % 15,
                    startIndex: nearWrap ? UInt32.max &- offset : offset,
                    storageMaxIovecs: a & 0x80 != 0 ? 3 : nil,
                    // b & 15 == 15 gives the same depth as 0: the spare encoding picks x86_32.
                    ringProtocol: b & 15 == 15 ? .x86_32 : .x86_64)
    }

    /// Ring B's: a plain well-behaved frontend, a little different from A.
    var bystander: Self {
        Self(ringPages: 1, persistentGrants: !persistentGrants, maxIndirectSegments: 16, secureDiscard: false,
             queueDepth: 4, startIndex: startIndex &+ 0x8000_0000, storageMaxIovecs: storageMaxIovecs == nil ? 16 : nil)
    }
}

/// Frames of a fuzzed guest: the ring, indirect descriptor pages, data
/// pages (the last two start granted read-only), and sentinel pages that
/// are never granted and must never change. Data and indirect frame f is
/// granted as ref f + 16; ring refs are revoked once the engine has the
/// ring, so no request can name them.
enum FuzzGuestLayout {
    static let ringFrames = 4
    static let indirectFrames = 4..<8
    static let dataFrames = 8..<32
    static let readOnlyFrames = 30..<32
    static let sentinelFrames = 32..<34
    /// Indirect and data frames: what requests name.
    static let requestFrames = indirectFrames.lowerBound..<dataFrames.upperBound
    static let pages = 34
    static let grants = 64
    static let refOffset = 16
    static let sentinelByte: UInt8 = 0x5A

    static func ref(_ frame: Int) -> UInt32 { UInt32(frame + refOffset) }

    /// The data or indirect frame a ref names, if any.
    static func frame(_ ref: UInt32) -> Int? {
        let f = Int(ref) - refOffset
        return requestFrames.contains(f) ? f : nil
    }
}
