import Glibc
import Hypervisor
import LoopbackHypervisor
import SystemSupport
import XenABI
import XenBus

/// A hostile blkfront against a running backend: round after round it
/// mixes well-formed requests of every operation with raw slots, bad
/// grants, grants revoked under a request, indirect pages rewritten after
/// submit and duplicate ids; now and then it breaks the ring (req_prod
/// backwards or far ahead) or closes the device under requests in flight,
/// then reconnects as Linux's blkfront does (Closing, Closed,
/// Initialising). After every round it checks, from outside, what
/// `HostileRound` says a backend owes it, that the pages the backend may not
/// write are intact, and that the backend disconnects it exactly when it
/// broke the ring. `xenbackd-lab fuzz` drives it next to a `BystanderGuest`.
public final class HostileBlkfront {
    public struct Options: Sendable {
        /// Reproduces a run: round r plays with a seed derived from (seed, r).
        public var seed: UInt64
        /// A device that stays Closed when the frontend starts over after a
        /// ring breach is a failure (otherwise counted, and the toolstack
        /// creates the device again).
        public var expectReconnect = false
        /// How long to wait for InitWait after Initialising.
        public var reconnectTimeout = 1.0
        /// How long a request may go unanswered on a live ring.
        public var responseTimeout = 10.0
        /// Ring sizes tried at each connection: order 0...this.
        public var maxRingPageOrder = 2
        /// The frontend's max_indirect_segments (requests above 11 pages go indirect).
        public var indirectSegments = 32
        public init(seed: UInt64) { self.seed = seed }
    }

    public struct Counters: Sendable {
        public var rounds = 0, requests = 0, wellFormed = 0, hostile = 0
        public var responses = 0, okay = 0, error = 0, notSupported = 0, otherStatus = 0
        public var breaches = 0, closes = 0, spuriousStates = 0
        /// Offered InitWait again after Closing, Closed, Initialising.
        public var reconnects = 0
        /// Stayed Closed instead; then the toolstack created the device again.
        public var refusedReconnects = 0, recreated = 0
        /// Requests a closed or broken ring left unanswered (never taken).
        public var unansweredAtClose = 0
        public var sectorsVerified: UInt64 = 0
    }

    public struct Failure: Sendable, CustomStringConvertible {
        public var round: Int
        public var roundSeed: UInt64
        public var message: String
        public var description: String { "round \(round) (round seed \(hex(roundSeed))): \(message)" }
    }

    public let fe: LoopbackBlockFrontend
    public let options: Options
    public internal(set) var counters = Counters()
    public private(set) var failures: [Failure] = []
    let palette: HostilePalette
    var slots: HostileSlots
    var model: HostileDiskModel
    /// Makes the device anew through the toolstack (remove, wait until the
    /// daemon has let it go, add) when the backend will not offer it again.
    private let recreateDevice: () throws -> Void
    var rng: Xorshift
    private(set) var round = 0
    var roundSeed: UInt64 = 0
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.sectorSize, alignment: 16)

    public init(frontend: LoopbackBlockFrontend, options: Options, recreateDevice: @escaping () throws -> Void) throws {
        fe = frontend
        self.options = options
        self.recreateDevice = recreateDevice
        palette = try HostilePalette(guest: fe.guest, backend: 0)
        rng = Xorshift(seed: options.seed)
        slots = HostileSlots(palette: palette, sectors: 1, indirectOffer: 0)
        model = HostileDiskModel(sectors: 0)
    }

    deinit { scratch.deallocate() }

    /// The first connection (the toolstack has written the device).
    public func connect() throws {
        try connectRing()
        model = HostileDiskModel(sectors: fe.info.sectors)
    }

    /// A new connection: ring size, persistent grants (the backend maps our
    /// pages, or copies every time) and indirect requests drawn anew.
    private func connectRing() throws {
        fe.offerPersistentGrants = rng.next() % 3 != 0
        fe.maxIndirectSegments = rng.next() % 4 == 0 ? 0 : options.indirectSegments
        try fe.connect(ringPageOrder: Int(rng.next() % UInt64(options.maxRingPageOrder + 1)))
        slots = HostileSlots(palette: palette, sectors: fe.info.sectors, indirectOffer: fe.backendMaxIndirectSegments)
    }

    func fail(_ message: String) {
        failures.append(Failure(round: round, roundSeed: roundSeed, message: message))
    }

    /// The seed of round `r` of a run with `seed`.
    public static func roundSeed(_ seed: UInt64, _ r: Int) -> UInt64 {
        SplitMix64.mix(seed &+ UInt64(r) &* SplitMix64.increment)
    }

    // MARK: rounds

    enum RoundKind { case mixed, breach, close, spuriousState }

    /// Plays one round; its failures are added to `failures`.
    public func playRound() throws {
        round += 1
        counters.rounds += 1
        roundSeed = Self.roundSeed(options.seed, round)
        rng = Xorshift(seed: roundSeed)
        let pick = rng.next() % 1000
        let kind: RoundKind = pick < 4 ? .breach : pick < 8 ? .close : pick < 11 ? .spuriousState : .mixed
        switch kind {
        case .mixed: try mixedRound()
        case .breach: try breachRound()
        case .close: try closeRound()
        case .spuriousState: try spuriousStateRound()
        }
    }

    /// Requests of every kind, all answered before the round ends.
    private func mixedRound() throws {
        var r = try placeBatch()
        let ended = collect(&r, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        if ended {
            fail("the backend closed the device in a round without a ring breach: "
                 + (((try? fe.store.read(fe.backendPath + "/error")) ?? nil) ?? "no error node"))
        }
        finish(&r, ringEnded: ended)
        if ended { try reconnect(afterBreach: true) }
    }

    /// req_prod moved backwards behind requests already taken, or more than
    /// a ring ahead: the backend must disconnect this frontend (only).
    private func breachRound() throws {
        counters.breaches += 1
        var r = try placeBatch()
        let backwards = rng.next() % 2 == 0
        if backwards {
            // Only behind what the backend has taken is a breach it can see.
            _ = collect(&r, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        }
        let prod = fe.requestProducer
        let size = UInt32(fe.ringSlots)
        let value = backwards ? prod &- 1 &- UInt32(rng.next() % UInt64(size))
                              : prod &+ size &+ 1 &+ UInt32(rng.next() % (1 << 31 - UInt64(size) - 1))
        fe.publishRawRequestProducer(value)
        let closed = waitForBackend(seconds: 5, \.isClosingOrClosed)
        _ = collect(&r, until: MonotonicClock.seconds() + 0.05, stopWhenClosed: false)
        counters.unansweredAtClose += r.unanswered
        finish(&r, ringEnded: true)
        if !closed {
            fail("req_prod moved \(backwards ? "backwards" : "far ahead") (\(prod) to \(value), ring of \(size)) "
                 + "and the backend did not close the device (Closing or Closed) within 5 s")
        } else if ((try? fe.store.read(fe.backendPath + "/error")) ?? nil) == nil {
            fail("the backend closed the device after a ring breach but wrote no error node")
        }
        try reconnect(afterBreach: true)
    }

    /// The frontend closes (Closing, or Closed at once) with requests in
    /// flight: every request the backend took is answered before it is Closed.
    private func closeRound() throws {
        counters.closes += 1
        var r = try placeBatch()
        if rng.next() % 2 == 0 {
            _ = collect(&r, until: MonotonicClock.seconds() + 0.001 * Double(rng.next() % 5), stopWhenClosed: false)
        }
        try fe.store.writeState(fe.frontendPath, rng.next() % 3 == 0 ? .closed : .closing)
        let closed = waitForBackend(seconds: 5, \.isClosingOrClosed)
        _ = collect(&r, until: MonotonicClock.seconds() + 0.05, stopWhenClosed: false)
        counters.unansweredAtClose += r.unanswered
        finish(&r, ringEnded: true)
        if !closed { fail("the frontend closed and the backend did not go Closing or Closed within 5 s") }
        try reconnect(afterBreach: false)
    }

    /// The frontend writes a state out of turn while Connected and keeps using
    /// the ring (Linux's blkback ignores Initialising then).
    private func spuriousStateRound() throws {
        counters.spuriousStates += 1
        let states: [XenbusState] = [.initialising, .initWait, .initialised, .connected]
        try fe.store.writeState(fe.frontendPath, states[Int(rng.next() % UInt64(states.count))])
        var r = try placeBatch()
        let ended = collect(&r, until: MonotonicClock.seconds() + options.responseTimeout, stopWhenClosed: true)
        finish(&r, ringEnded: ended)
        if ended {
            try reconnect(afterBreach: false)
        } else {
            try fe.store.writeState(fe.frontendPath, .connected)
        }
    }

    /// Reads responses until every request is answered, the deadline, or
    /// (when asked) the backend closing the device; true if it closed.
    func collect(_ r: inout HostileRound, until deadline: Double, stopWhenClosed: Bool) -> Bool {
        var quietSince = MonotonicClock.seconds()
        while r.unanswered > 0 {
            let now = MonotonicClock.seconds()
            if now >= deadline {
                if stopWhenClosed {
                    fail("\(r.unanswered) of \(r.placed.count) requests unanswered after \(fixed(options.responseTimeout, 0)) s on a live ring")
                }
                return false
            }
            let got = (try? fe.collectRaw(timeout: min(deadline - now, 0.2)) { rsp, raw in
                counters.responses += 1
                switch rsp.status {
                case BlkifStatus.okay: counters.okay += 1
                case BlkifStatus.error: counters.error += 1
                case BlkifStatus.notSupported: counters.notSupported += 1
                default: counters.otherStatus += 1
                }
                if let f = r.record(rsp, raw: raw) { fail(f) }
            }) ?? 0
            if got > 0 { quietSince = MonotonicClock.seconds() }
            if stopWhenClosed && got == 0 && MonotonicClock.seconds() - quietSince > 0.5
                && fe.store.readState(fe.backendPath).isClosingOrClosed {
                return true
            }
        }
        return false
    }

    /// After the round: judge every answer, restore revoked grants, check the
    /// pages the backend may not write.
    private func finish(_ r: inout HostileRound, ringEnded: Bool) {
        for f in r.evaluate(model: &model, ringEnded: ringEnded, verify: verifyRead) { fail(f) }
        palette.restoreRevoked()
        if let f = palette.untouchedPagesIntact() { fail(f) }
        model.quiesced()
    }

    /// A well-formed read's data against the model.
    private func verifyRead(_ w: HostileRound.WellFormed) -> String? {
        var bad: [UInt64] = []
        for s in 0..<w.count {
            let sector = w.sector + UInt64(s)
            guard model.expected(sector, into: scratch) else { continue }
            counters.sectorsVerified += 1
            let byte = (w.first + s) * Blkif.sectorSize
            let got = fe.dataPage(slot: w.slot, segment: byte / XenPage.size) + byte % XenPage.size
            if memcmp(got, scratch, Blkif.sectorSize) != 0 { bad.append(sector) }
        }
        guard let first = bad.first else { return nil }
        return "read of sectors \(w.sector)..<\(w.sector + UInt64(w.count)) returned other data than acknowledged "
            + "in \(bad.count) sectors (first: \(first))"
    }

    // MARK: reconnecting

    /// Closing, Closed, then Initialising as Linux's blkfront does; the
    /// backend should offer InitWait again. When it does not, the toolstack
    /// creates the device again (a failure after a clean close, or after a
    /// breach with `expectReconnect`).
    private func reconnect(afterBreach: Bool) throws {
        close()
        try fe.store.writeState(fe.frontendPath, .initialising)
        if waitForBackend(seconds: options.reconnectTimeout, { $0 == .initWait }) {
            counters.reconnects += 1
        } else {
            counters.refusedReconnects += 1
            if !afterBreach || options.expectReconnect {
                fail("the device stayed \(fe.store.readState(fe.backendPath).map { "\($0)" } ?? "gone") after the frontend went "
                     + "Closing, Closed, Initialising (after \(afterBreach ? "a ring breach" : "a clean close"))")
            }
            try recreateDevice()
            counters.recreated += 1
        }
        do { try connectRing() } catch {
            // Reported, then once more on a device made anew; a second failure ends the run.
            fail("connecting again failed: \(error)")
            fe.releaseResources()
            try recreateDevice()
            counters.recreated += 1
            try connectRing()
        }
    }

    /// Closes the device as Linux's blkfront does: Closing; once the backend
    /// is Closing (or already Closed), Closed; once it is Closed, the grants
    /// and the port go.
    public func close() {
        try? fe.store.writeState(fe.frontendPath, .closing)
        if !waitForBackend(seconds: 5, \.isClosingOrClosed) {
            fail("the backend went neither Closing nor Closed within 5 s of the frontend's Closing")
        }
        try? fe.store.writeState(fe.frontendPath, .closed)
        if !waitForBackend(seconds: 5, { $0 == .closed || $0 == nil }) {
            fail("the backend did not go Closed within 5 s of the frontend's Closed")
        }
        fe.releaseResources()
    }

    /// Waits (on a watch) until the backend's state satisfies `condition`.
    func waitForBackend(seconds: Double, _ condition: (XenbusState?) -> Bool) -> Bool {
        let path = fe.backendPath
        return (try? fe.store.waitFor(path + "/state", seconds: seconds, what: "backend state") { () -> Bool? in
            condition(fe.store.readState(path)) ? true : nil
        }) ?? false
    }

    // MARK: the end

    /// Reads the whole disk back and checks every sector the model knows.
    public func verifyDisk() throws {
        var sector: UInt64 = 0
        let chunk = UInt64(fe.maxSectorsPerRequest)
        var bad = 0
        while sector < model.sectors {
            let count = Int(min(chunk, model.sectors - sector))
            let (status, data) = try fe.read(sector: sector, count: count)
            guard status == BlkifStatus.okay else {
                fail("final check: read at sector \(sector) answered \(statusName(status))")
                return
            }
            for s in 0..<count where model.expected(sector + UInt64(s), into: scratch) {
                counters.sectorsVerified += 1
                if data.withUnsafeBytes({ memcmp($0.baseAddress! + s * Blkif.sectorSize, scratch, Blkif.sectorSize) }) != 0 {
                    bad += 1
                }
            }
            sector += UInt64(count)
        }
        if bad > 0 { fail("final check: \(bad) sectors differ from what was acknowledged") }
    }

    /// Sectors whose content the model knows.
    public var knownSectors: Int { model.knownSectors }
}

extension Optional where Wrapped == XenbusState {
    /// The backend has let the device go or is doing so (Linux's backends
    /// answer a frontend's Closing with Closing and go Closed after it).
    var isClosingOrClosed: Bool { self == .closing || self == .closed }
}
