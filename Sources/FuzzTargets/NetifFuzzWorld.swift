import EngineDoubles
import Glibc
import Hypervisor
import NetBackend
import Synchronization
import XenABI

/// The memory one netif fuzz run plays in, kept between runs (allocating
/// 8.5 MiB of engine buffers per run would dominate): a guest whose pages
/// are reset to known patterns, its grant table, the in-memory TAP, the
/// engine's buffers and the checker's shadow of the data pages. Nothing
/// left from a run changes the next one: `reset()` rewrites every byte the
/// run can observe, and the engine overwrites its buffers before reading
/// them.
final class NetifFuzzWorld: @unchecked Sendable {   // used by one run at a time (the pool hands it out)
    static let domain: DomID = 7
    static let txRingFrame = 0
    static let rxRingFrame = 1
    /// Frames a grant may point at; their bytes are always below 0x80.
    static let grantableFrames = 2..<14
    /// Never granted: their bytes (0xFF) must never reach a frame.
    static let secretFrames = 14..<16
    /// The control ring (feature-ctrl-ring), whose requests edit the hash settings.
    static let controlRingFrame = 16
    static let pageCount = 17
    static let grantCount = 24
    /// A grantable frame that no grant points at holds this instead.
    static let ungrantedByte: UInt8 = 0xC3
    static let secretByte: UInt8 = 0xFF

    let guest = InMemoryGuest(domain: NetifFuzzWorld.domain, pages: NetifFuzzWorld.pageCount, grants: NetifFuzzWorld.grantCount)
    let grants: InMemoryGrantTable
    let tap = InMemoryTap()
    // Red zones around every buffer under ASan; heap buffers never throw (only a mapping can).
    let buffers = try! NetEngineBuffers(backing: .heap)
    /// The data pages as the checker last saw them.
    let shadow: UnsafeMutableRawPointer
    /// Ring pages as they were before each step: what the engine read, and
    /// what a stopped or broken engine must leave as it is.
    let txSlotsBefore = UnsafeMutableRawPointer.allocate(byteCount: XenPage.size, alignment: 64)
    let rxSlotsBefore = UnsafeMutableRawPointer.allocate(byteCount: XenPage.size, alignment: 64)
    let controlSlotsBefore = UnsafeMutableRawPointer.allocate(byteCount: XenPage.size, alignment: 64)
    /// The slots as the engine consumed them, by ring index mod 256.
    let txConsumed = UnsafeMutableRawPointer.allocate(byteCount: 256 * NetifTxRequest.size, alignment: 16)
    let rxConsumed = UnsafeMutableRawPointer.allocate(byteCount: 256 * NetifRxRequest.size, alignment: 16)

    init() {
        grants = InMemoryGrantTable(guests: [guest])
        shadow = .allocate(byteCount: Self.pageCount * XenPage.size, alignment: XenPage.size)
    }

    deinit {
        shadow.deallocate()
        txSlotsBefore.deallocate(); rxSlotsBefore.deallocate(); controlSlotsBefore.deallocate()
        txConsumed.deallocate(); rxConsumed.deallocate()
        patterns.deallocate()
    }

    /// The pattern byte of a grantable frame at `offset` (below 0x80).
    @inline(__always)
    static func pattern(frame: Int, offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: (frame &* 29 &+ offset &* 7) & 0x7f) }

    func fillGranted(_ frame: Int) {
        guest.page(frame).copyMemory(from: patterns + frame * XenPage.size, byteCount: XenPage.size)
    }

    /// Each grantable frame's granted pattern, made once.
    private let patterns: UnsafeMutableRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: NetifFuzzWorld.pageCount * XenPage.size, alignment: XenPage.size)
        for f in 0..<NetifFuzzWorld.pageCount {
            for i in 0..<XenPage.size { p.storeBytes(of: NetifFuzzWorld.pattern(frame: f, offset: i), toByteOffset: f * XenPage.size + i, as: UInt8.self) }
        }
        return p
    }()

    func fillUngranted(_ frame: Int) {
        guest.page(frame).initializeMemory(as: UInt8.self, repeating: Self.ungrantedByte, count: XenPage.size)
    }

    func reset() {
        guest.reset()
        tap.reset()
        grants.beforeCopy = nil
        for f in Self.grantableFrames { fillUngranted(f) }
        for f in Self.secretFrames { guest.page(f).initializeMemory(as: UInt8.self, repeating: Self.secretByte, count: XenPage.size) }
        syncShadow()
    }

    func syncShadow() {
        shadow.copyMemory(from: guest.memory, byteCount: Self.pageCount * XenPage.size)
    }

    // A few worlds for runs on several threads at once (Swift Testing runs in parallel).
    private static let pool = Mutex<[NetifFuzzWorld]>([])

    static func withWorld<R>(_ body: (NetifFuzzWorld) -> R) -> R {
        let world = pool.withLock { $0.popLast() } ?? NetifFuzzWorld()
        defer { pool.withLock { $0.append(world) } }
        world.reset()
        return body(world)
    }
}
