import Glibc
import SystemSupport
import XenABI

/// A guest with two NICs on the same bridge, passing verified frames
/// between them on a thread of its own while a hostile guest misbehaves
/// on that bridge (`xenbackd-lab fuzz --net`). Each pass sends 8 frames of
/// 60-1514 bytes (`BystanderFrame`: a sequence number and a checksum over
/// every byte), alternately from each NIC to the other (every fourth one
/// broadcast, so other guests' rx rings get traffic too), and reads them
/// at the other NIC. A frame that arrives is intact, or that is a failure;
/// a frame may be late (counted when it arrives) or lost (counted, bounded
/// by the caller); a well-formed frame is answered OKAY or DROPPED.
public final class NetBystander: Sendable {
    public struct Summary: Sendable {
        public var sent = 0, verified = 0, lost = 0, late = 0, corrupted = 0, foreign = 0, duplicates = 0
        public var txDropped = 0, txErrors = 0
        public init() {}
    }

    private let thread: NativeThread
    private let state: NetBystanderState

    /// `a`, `b`: connected raw frontends (no TAP, rx buffers posted by the
    /// frontend) with their MACs. Streams are named by `streams`.
    public init(_ a: LoopbackNetFrontend, macA: [UInt8], _ b: LoopbackNetFrontend, macB: [UInt8], seed: UInt64) throws {
        let state = NetBystanderState()
        let box = NetBystanderBox(a: a, b: b)
        thread = try NativeThread(name: "net-bystander") {
            var w = NetBystanderWorkload(ends: [(box.a, macA), (box.b, macB)], seed: seed)
            do {
                try w.prepare()
                while !state.stopped {
                    try w.pass()
                    usleep(2_000)   // a steady trickle, not a core's worth: the machine is shared
                    state.update(w.summary, progressed: w.progressedLastPass)
                }
                w.drainAtEnd()
                state.update(w.summary, progressed: false)
            } catch {
                state.fail("\(error)")
            }
        }
        self.state = state
    }

    public var progress: (summary: Summary, lastProgress: Double, failures: [String]) { state.snapshot() }

    /// Stops the traffic, waits for the last frames, and returns what it saw.
    public func finish() -> (summary: Summary, failures: [String]) {
        state.stop()
        thread.join()
        let s = state.snapshot()
        return (s.summary, s.failures)
    }
}

/// The two frontends, handed to the bystander's thread, which alone uses them.
final class NetBystanderBox: @unchecked Sendable {
    let a: LoopbackNetFrontend, b: LoopbackNetFrontend
    init(a: LoopbackNetFrontend, b: LoopbackNetFrontend) { self.a = a; self.b = b }
}

final class NetBystanderState: @unchecked Sendable {   // every var below is guarded by `lock`
    private let lock = PThreadMutex()
    private var summary = NetBystander.Summary()
    private var failures: [String] = []
    private var lastProgress = MonotonicClock.seconds()
    private var stopping = false

    var stopped: Bool { lock.withLock { stopping } }
    func stop() { lock.withLock { stopping = true } }
    func fail(_ m: String) { lock.withLock { failures.append(m) } }
    func update(_ s: NetBystander.Summary, progressed: Bool) {
        lock.withLock {
            summary = s
            if progressed { lastProgress = MonotonicClock.seconds() }
        }
    }
    func snapshot() -> (summary: NetBystander.Summary, lastProgress: Double, failures: [String]) {
        lock.withLock { (summary, lastProgress, failures) }
    }
}

/// The bystander's traffic, on its own thread.
struct NetBystanderWorkload {
    struct End {
        let fe: LoopbackNetFrontend
        let mac: [UInt8]
        let stream: UInt32
        var pages: [UnsafeMutableRawPointer] = []
        var refs: [UInt32] = []
        var sequence: UInt64 = 0
        /// Frames sent to the other end, not seen there yet: sequence → pass sent.
        var awaited: [UInt64: Int] = [:]
    }

    var ends: [End]
    var summary = NetBystander.Summary()
    private(set) var progressedLastPass = false
    private var rng: SplitMix64
    private var passNumber = 0
    static let framesPerPass = 8
    /// Passes after which a frame not seen is lost (late ones may still come).
    static let lostAfterPasses = 50

    init(ends e: [(LoopbackNetFrontend, [UInt8])], seed: UInt64) {
        ends = e.enumerated().map { i, x in End(fe: x.0, mac: x.1, stream: 0xB5_0000 | UInt32(i)) }
        rng = SplitMix64(seed: seed)
    }

    mutating func prepare() throws {
        for i in ends.indices {
            for _ in 0..<Self.framesPerPass {
                let p = try ends[i].fe.grantTxPage()
                ends[i].pages.append(p.bytes)
                ends[i].refs.append(p.ref)
            }
        }
    }

    mutating func pass() throws {
        passNumber += 1
        let before = summary.verified
        var perEnd = [[TxSlot]](repeating: [], count: ends.count)
        for k in 0..<Self.framesPerPass {
            let from = k % ends.count, to = (k + 1) % ends.count
            let length = BystanderFrame.minLength + rng.below(BystanderFrame.maxLength - BystanderFrame.minLength + 1)
            let broadcast = k % 4 == 3
            let seq = ends[from].sequence
            ends[from].sequence += 1
            let slot = perEnd[from].count
            BystanderFrame.write(into: ends[from].pages[slot], destination: broadcast ? [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] : ends[to].mac,
                                 source: ends[from].mac, stream: ends[from].stream, sequence: seq, length: length)
            perEnd[from].append(.request(NetifTxRequest(gref: ends[from].refs[slot], offset: 0, flags: 0, id: UInt16(slot), size: UInt16(length))))
            ends[from].awaited[seq] = passNumber
            summary.sent += 1
        }
        for i in ends.indices where !perEnd[i].isEmpty {
            ends[i].fe.pushTxSlots(perEnd[i])
            for r in try ends[i].fe.waitTxResponses(perEnd[i].count, timeout: 10) {
                if r.status == NetifStatus.dropped { summary.txDropped += 1 }
                else if r.status != NetifStatus.okay { summary.txErrors += 1 }
            }
        }
        // Read at each end until what was sent to it arrived, or 1 s.
        let deadline = MonotonicClock.seconds() + 1
        for i in ends.indices {
            let peer = (i + 1) % ends.count
            while ends[peer].awaited.values.contains(passNumber), MonotonicClock.seconds() < deadline {
                guard let got = try ends[i].fe.receiveRaw(timeout: max(0.001, deadline - MonotonicClock.seconds())) else { break }
                take(got.frame, at: i)
            }
            // And whatever else is there now.
            while let got = try ends[i].fe.receiveRaw(timeout: 0) { take(got.frame, at: i) }
        }
        for i in ends.indices {
            for (seq, sent) in ends[i].awaited where passNumber - sent >= Self.lostAfterPasses {
                ends[i].awaited[seq] = nil
                summary.lost += 1
            }
        }
        progressedLastPass = summary.verified > before
    }

    /// At the end: a last look for late frames; what is still missing is lost.
    mutating func drainAtEnd() {
        let deadline = MonotonicClock.seconds() + 1
        for i in ends.indices {
            let peer = (i + 1) % ends.count
            while !ends[peer].awaited.isEmpty, MonotonicClock.seconds() < deadline,
                  let got = try? ends[i].fe.receiveRaw(timeout: 0.05) {
                take(got.frame, at: i)
            }
        }
        for i in ends.indices {
            summary.lost += ends[i].awaited.count
            ends[i].awaited = [:]
        }
    }

    private mutating func take(_ frame: [UInt8], at i: Int) {
        // Judged only when it comes from the other end's MAC: a frame that
        // merely looks like ours may be another guest's forgery.
        let peer = (i + 1) % ends.count
        guard frame.count >= 12, Array(frame[6..<12]) == ends[peer].mac else {
            summary.foreign += 1
            return
        }
        switch BystanderFrame.check(frame) {
        case .notOurs: summary.foreign += 1
        case .corrupted: summary.corrupted += 1
        case .intact(let stream, let seq):
            guard stream == ends[peer].stream else { summary.foreign += 1; return }
            if let sent = ends[peer].awaited.removeValue(forKey: seq) {
                summary.verified += 1
                if sent != passNumber { summary.late += 1 }
            } else if seq < ends[peer].sequence {
                summary.duplicates += 1   // seen before, or given up on as lost
            } else {
                summary.corrupted += 1    // a sequence never sent
            }
        }
    }
}
