import CXenBackSupport
import Glibc
import SystemSupport
import XenABI

/// What a ring's engine must remember across a `kill -9` that the shared
/// ring cannot tell: which requests it took and which it answered. Responses
/// go out in completion order, so rsp_prod alone does not say which slots
/// were answered: resuming there would run an answered write again (after
/// the guest reused its page) and never answer a request still in flight.
///
/// The journal lives in memory that outlives the process (a file in a
/// tmpfs, mapped shared: `open(file:)`) and holds, in a fixed layout:
/// - a header: magic, layout version, record count, the ring's identity,
///   and `consumed`, the ring index up to which requests were taken;
/// - one record per request taken and not yet answered *and published*:
///   its ring index, a private copy of its slot, and once answered the
///   response's index, operation and status.
///
/// Every field that decides recovery is written with a release store after
/// the bytes it vouches for, so a process killed between any two stores
/// leaves a journal that recovery reads correctly (see `recover`).
public final class VbdRingJournal {
    enum Header {
        static let magic = 0, version = 4, recordCount = 8, consumed = 12, identity = 16
        static let size = 64
    }
    enum Record {
        static let state = 0, ringIndex = 4, responseIndex = 8, status = 12, operation = 14
        static let request = 16
        static let size = 16 + Blkif.slotSize
    }
    enum State: UInt32 { case free = 0, taken = 1, answered = 2 }
    static let magicValue: UInt32 = 0x4A42_5858   // "XXBJ"
    static let versionValue: UInt32 = 1

    private let memory: UnsafeMutableRawPointer
    private let byteCount: Int
    private let unmapOnDeinit: Bool
    public let recordCount: Int

    /// Records for a ring of `ringSlots`: requests taken and answered but not
    /// yet published are bounded by the ring twice over (responses written
    /// in a pass are published at its end).
    public static func byteCount(ringSlots: Int) -> Int { Header.size + 2 * ringSlots * Record.size }

    /// Over `memory` (at least `byteCount(ringSlots:)` bytes, owned by the
    /// caller): a test's plain memory, or what `open(file:)` maps.
    public init(memory: UnsafeMutableRawPointer, byteCount: Int, ringSlots: Int) {
        precondition(byteCount >= Self.byteCount(ringSlots: ringSlots))
        self.memory = memory
        self.byteCount = byteCount
        self.recordCount = 2 * ringSlots
        unmapOnDeinit = false
    }

    private init(mapped: UnsafeMutableRawPointer, byteCount: Int, ringSlots: Int) {
        memory = mapped
        self.byteCount = byteCount
        recordCount = 2 * ringSlots
        unmapOnDeinit = true
    }

    deinit {
        if unmapOnDeinit { munmap(memory, byteCount) }
    }

    /// Maps (creating it if needed) the journal file of one ring.
    public static func open(file path: String, ringSlots: Int) throws(JournalError) -> VbdRingJournal {
        let bytes = byteCount(ringSlots: ringSlots)
        let fd = try journalCall("open", path: path) { Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
        defer { Glibc.close(fd) }
        var st = stat()
        _ = try journalCall("fstat", path: path) { fstat(fd, &st) }
        if st.st_size != bytes {
            // A journal of another ring size is not this ring's: start empty.
            _ = try journalCall("ftruncate", path: path) { ftruncate(fd, 0) }
            _ = try journalCall("ftruncate", path: path) { ftruncate(fd, off_t(bytes)) }
        }
        guard let m = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), m != MAP_FAILED else {
            throw JournalError(operation: "mmap", path: path, errno: errno)
        }
        return VbdRingJournal(mapped: m, byteCount: bytes, ringSlots: ringSlots)
    }

    // MARK: header

    @inline(__always) private func load(_ offset: Int) -> UInt32 { xb_load_acquire_u32(memory + offset) }
    @inline(__always) private func store(_ offset: Int, _ v: UInt32) {
        #if DEBUG || XENBACKD_FUZZ
        beforeStore?()
        #endif
        xb_store_release_u32(memory + offset, v)
    }

    #if DEBUG || XENBACKD_FUZZ
    /// Runs before every store that recovery reads (header and record
    /// fields): a test or the fuzzer stops the world there, as a kill -9
    /// between two stores would. Not in release builds (the daemon's).
    public var beforeStore: (() -> Void)?
    #endif

    /// The journal was written for a ring of this identity by this layout.
    public func holdsRing(identity: UInt64) -> Bool {
        load(Header.magic) == Self.magicValue && load(Header.version) == Self.versionValue
            && Int(load(Header.recordCount)) == recordCount
            && xb_load_acquire_u64(memory + Header.identity) == identity
    }

    /// Starts an empty journal for a ring whose next request is `consumed`.
    public func format(identity: UInt64, consumed: UInt32) {
        store(Header.magic, 0)   // invalid while being formatted
        for r in 0..<recordCount { store(recordOffset(r) + Record.state, State.free.rawValue) }
        store(Header.version, Self.versionValue)
        store(Header.recordCount, UInt32(recordCount))
        xb_store_release_u64(memory + Header.identity, identity)
        store(Header.consumed, consumed)
        store(Header.magic, Self.magicValue)
    }

    var consumed: UInt32 { load(Header.consumed) }

    // MARK: records

    @inline(__always) private func recordOffset(_ r: Int) -> Int { Header.size + r * Record.size }

    func state(_ r: Int) -> State { State(rawValue: load(recordOffset(r) + Record.state)) ?? .free }
    func ringIndex(_ r: Int) -> UInt32 { load(recordOffset(r) + Record.ringIndex) }
    func responseIndex(_ r: Int) -> UInt32 { load(recordOffset(r) + Record.responseIndex) }
    func request(_ r: Int) -> UnsafeMutableRawPointer { memory + recordOffset(r) + Record.request }
    func response(_ r: Int) -> (operation: UInt8, status: Int16) {
        let base = memory + recordOffset(r)
        return (base.load(fromByteOffset: Record.operation, as: UInt8.self),
                base.load(fromByteOffset: Record.status, as: Int16.self))
    }

    /// Request `ringIndex`, copied at `slot`, is taken into record `r`; then
    /// the ring's consumer moves past it. Killed between the two stores, the
    /// record is not yet committed (its index is not below `consumed`) and
    /// the request, still in its ring slot, is taken again.
    @inline(__always)
    func recordTaken(_ r: Int, ringIndex: UInt32, slot: UnsafeRawPointer) {
        let base = recordOffset(r)
        (memory + base + Record.request).copyMemory(from: slot, byteCount: Blkif.slotSize)
        store(base + Record.ringIndex, ringIndex)
        store(base + Record.state, State.taken.rawValue)
        store(Header.consumed, ringIndex &+ 1)
    }

    /// Record `r` is answered by response `responseIndex` (written to the
    /// ring next, published at the end of the pass).
    @inline(__always)
    func recordAnswered(_ r: Int, responseIndex: UInt32, operation: UInt8, status: Int16) {
        let base = recordOffset(r)
        store(base + Record.responseIndex, responseIndex)
        // Status (2 bytes) and operation share one word: plain stores, made
        // visible by the state's release store. A 4-byte store of the status
        // once wrote zeros over the operation, and every answer sent again
        // after a kill said BLKIF_OP_READ.
        (memory + base + Record.status).storeBytes(of: status, as: Int16.self)
        (memory + base + Record.operation).storeBytes(of: operation, as: UInt8.self)
        store(base + Record.state, State.answered.rawValue)
    }

    /// The response of `r` is published: the record is free again.
    @inline(__always)
    func release(_ r: Int) { store(recordOffset(r) + Record.state, State.free.rawValue) }
}

/// A system call on the journal at `path`, made through Syscall; its failure a JournalError naming it.
private func journalCall<Result: BinaryInteger>(
    _ call: StaticString, path: String, _ body: () -> Result
) throws(JournalError) -> Result {
    do {
        return try Syscall.retryingOnInterrupt(call, body)
    } catch {
        throw JournalError(operation: error.call, path: path, errno: error.code)
    }
}

public struct JournalError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var path: String
    public var errno: Int32
    public var description: String { "ring journal \(path): \(operation) failed: \(String(cString: strerror(errno)))" }
}

/// What a journal says about a ring after a kill, read against the shared
/// ring's published responses.
struct JournalRecovery {
    /// Taken and never answered: to run again, oldest first.
    var replay: [Int32] = []
    /// Answered, not published: to answer again, in response order.
    var reanswer: [Int32] = []
    /// Free records.
    var free: [Int32] = []
    var consumed: UInt32 = 0
}

extension VbdRingJournal {
    /// Classifies every record against `published` (the shared rsp_prod).
    /// Nil when the journal cannot be this ring's (indices out of reach).
    func recover(published: UInt32, ringSize: UInt32) -> JournalRecovery? {
        let consumed = self.consumed
        let window = UInt32(recordCount)
        guard consumed &- published <= window else { return nil }
        var out = JournalRecovery()
        out.consumed = consumed
        var replay: [(UInt32, Int32)] = []
        var reanswer: [(UInt32, Int32)] = []
        for r in 0..<recordCount {
            // How long ago the request was taken: a request can stay in flight
            // while any number of later ones are taken and answered, so this
            // age is not bounded by the ring; only `consumed` itself marks a
            // record whose take was not committed (killed between the stores).
            let age = consumed &- ringIndex(r)
            switch state(r) {
            case .taken where age != 0:
                replay.append((age, Int32(r)))
            case .answered:
                // Answered in the last pass: written at or after rsp_prod (not
                // published, answer again) or just before it (published).
                let ahead = responseIndex(r) &- published
                if ahead < window { reanswer.append((ahead, Int32(r))) } else { release(r); out.free.append(Int32(r)) }
            default:
                // Free, or taken but not committed (the request is still on the ring).
                if state(r) != .free { release(r) }
                out.free.append(Int32(r))
            }
        }
        out.replay = replay.sorted { $0.0 > $1.0 }.map(\.1)        // older first
        out.reanswer = reanswer.sorted { $0.0 < $1.0 }.map(\.1)
        return out
    }
}
