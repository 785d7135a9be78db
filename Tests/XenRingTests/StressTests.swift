import Foundation
import Synchronization
import Testing
import XenABI
import XenRing

/// What the two threads share besides the ring pages: a simulated event
/// channel in each direction (a counter the notifier bumps and the sleeper
/// watches), a start flag, and an abort flag for the time bound.
final class EventChannels: Sendable {
    let toBack = Atomic<UInt32>(0)
    let toFront = Atomic<UInt32>(0)
    let frontReady = Atomic<Bool>(false)
    let abort = Atomic<Bool>(false)
}

struct ThreadReport: Sendable {
    var completed: UInt64 = 0
    var notificationsSent = 0
    var sleeps = 0
    var failures: [String] = []
}

/// Runs `body` on a fresh thread (not the cooperative pool, since it spins).
func onThread<T: Sendable>(_ name: String, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.name = name
        thread.start()
    }
}

/// Sleeps like a ring end waiting for its event channel: returns when the
/// counter moves past `seen`, or false at the deadline / on abort.
func waitForEvent(_ channel: borrowing Atomic<UInt32>, seen: inout UInt32, shared: EventChannels,
                  deadline: ContinuousClock.Instant) -> Bool {
    var spins = 0
    while true {
        let now = channel.load(ordering: .acquiring)
        if now != seen { seen = now; return true }
        spins += 1
        if spins & 63 == 0 {
            if shared.abort.load(ordering: .relaxed) || ContinuousClock.now > deadline { return false }
            sched_yield()
        }
    }
}

@Suite("Two-thread stress")
struct StressTests {
    static let requests: UInt64 = 1_000_000
    /// Only a deadlock (a lost wakeup) should reach it: a healthy run takes
    /// 2 s alone, but took over 60 s on CI's two loaded cores beside the
    /// 40-device scale test (811,721 of 1,000,000 done at 60 s).
    static let timeLimit: Duration = .seconds(240)

    /// Request ids are scrambled (an odd multiplier is a bijection) so that
    /// a slot holding a stale id cannot pass for the right one.
    static func id(_ n: UInt64) -> UInt64 { n &* 0x9E37_79B9_7F4A_7C15 }

    /// Swift FrontRing on one thread, Swift BackRing on another, a 1-page
    /// ring (32 slots), each end working in random batches of 1...8,
    /// sleeping only after a final check and waking only by notification:
    /// a lost wakeup deadlocks and hits the time bound; a lost, duplicated,
    /// reordered or torn request fails the content checks.
    /// Run from index 0 and from just below 2^32, so the indices wrap mid-run.
    /// The two cases one after the other: each keeps two threads busy.
    @Test(.serialized, arguments: [UInt32(0), UInt32.max - 40])
    func millionRequestsThroughOnePage(startIndex: UInt32) async throws {
        let memory = RingMemory(pages: 1)
        let shared = EventChannels()
        let n = Self.requests
        let deadline = ContinuousClock.now + Self.timeLimit
        let started = ContinuousClock.now

        async let frontReport = onThread("front") { () -> ThreadReport in
            var report = ThreadReport()
            var ring = FrontRing(initializing: memory.base, pages: memory.pages, entrySize: Blkif.slotSize,
                                 startIndex: startIndex)
            shared.frontReady.store(true, ordering: .releasing)
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
            defer { scratch.deallocate() }
            var seen = [Bool](repeating: false, count: Int(n))
            var sent: UInt64 = 0
            var received: UInt64 = 0
            var lastEvent: UInt32 = 0
            func fail(_ s: String) {
                report.failures.append(s)
                shared.abort.store(true, ordering: .relaxed)
            }
            if ring.requestProducerPrivate != startIndex || ring.responseConsumer != startIndex {
                fail("front ring did not start at \(startIndex)")
            }
            var rng = XorShift(seed: 0xF00D)
            while received < n && report.failures.isEmpty {
                var progressed = false
                // Small random batches, so that the two ends overlap instead
                // of taking turns with a full ring.
                var batch = rng.next() % 8 + 1
                while sent < n && ring.freeRequests > 0 && batch > 0 {
                    batch -= 1
                    let slot = ring.nextRequestSlot()
                    // Only the fields the backend checks, to keep the loop cheap in debug builds.
                    let id = Self.id(sent)
                    slot.storeBytes(of: UInt8(sent & 1), toByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
                    slot.storeBytes(of: id.littleEndian, toByteOffset: BlkifRequest.Offset.id, as: UInt64.self)
                    slot.storeBytes(of: (~id).littleEndian, toByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self)
                    ring.commitRequest()
                    sent += 1
                    progressed = true
                }
                if progressed && ring.pushRequests() {
                    shared.toBack.add(1, ordering: .releasing)
                    report.notificationsSent += 1
                }
                while ring.unconsumedResponses() > 0 {
                    ring.takeResponse(into: scratch)
                    let rsp = BlkifResponse(decoding: scratch)
                    let want = Self.id(received)
                    if rsp.id != want || rsp.status != BlkifStatus.okay || rsp.operation != UInt8(received & 1) {
                        fail("response \(received): got \(rsp), expected id \(want)")
                        break
                    }
                    let index = Int(received)
                    if seen[index] { fail("id \(want) answered twice") }
                    seen[index] = true
                    received += 1
                    progressed = true
                }
                if progressed || received == n { continue }
                if ring.finalCheckForResponses() { continue }
                report.sleeps += 1
                if !waitForEvent(shared.toFront, seen: &lastEvent, shared: shared, deadline: deadline) {
                    fail("no notification (sent \(sent), received \(received)): timed out or aborted")
                }
            }
            report.completed = received
            if report.failures.isEmpty && !seen.allSatisfy({ $0 }) { report.failures.append("an id never came back") }
            return report
        }

        async let backReport = onThread("back") { () -> ThreadReport in
            var report = ThreadReport()
            func fail(_ s: String) {
                report.failures.append(s)
                shared.abort.store(true, ordering: .relaxed)
            }
            while !shared.frontReady.load(ordering: .acquiring) {
                if ContinuousClock.now > deadline { fail("front never initialised the ring"); return report }
                sched_yield()
            }
            var ring = BackRing(attachingTo: memory.base, pages: memory.pages, entrySize: Blkif.slotSize)
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
            defer { scratch.deallocate() }
            var answered: UInt64 = 0
            var lastEvent: UInt32 = 0
            var rng = XorShift(seed: 0xBEEF)
            do {
                while answered < n && report.failures.isEmpty {
                    let available = try ring.unconsumedRequests()
                    if available > ring.size - ring.requestsInFlight {
                        fail("unconsumed \(available) exceeds room \(ring.size - ring.requestsInFlight)")
                    }
                    if available > 0 {
                        for _ in 0..<min(available, UInt32(rng.next() % 8 + 1)) {
                            ring.takeRequest(into: scratch)
                            let id = UInt64(littleEndian: scratch.loadUnaligned(fromByteOffset: BlkifRequest.Offset.id, as: UInt64.self))
                            let sector = UInt64(littleEndian: scratch.loadUnaligned(fromByteOffset: BlkifRequest.Offset.sectorNumber, as: UInt64.self))
                            let op = scratch.load(fromByteOffset: BlkifRequest.Offset.operation, as: UInt8.self)
                            let want = Self.id(answered)
                            if id != want || sector != ~want || op != UInt8(answered & 1) {
                                fail("request \(answered): id \(id) sector \(sector) op \(op), expected id \(want)")
                                break
                            }
                            BlkifResponse(id: id, operation: op, status: BlkifStatus.okay).encode(to: ring.nextResponseSlot())
                            ring.commitResponse()
                            answered += 1
                        }
                        if ring.pushResponses() {
                            shared.toFront.add(1, ordering: .releasing)
                            report.notificationsSent += 1
                        }
                        continue
                    }
                    if try ring.finalCheckForRequests() { continue }
                    report.sleeps += 1
                    if !waitForEvent(shared.toBack, seen: &lastEvent, shared: shared, deadline: deadline) {
                        fail("no notification (answered \(answered)): timed out or aborted")
                    }
                }
            } catch {
                fail("\(error)")
            }
            report.completed = answered
            return report
        }

        let (front, back) = await (frontReport, backReport)
        let elapsed = ContinuousClock.now - started
        for f in front.failures { Issue.record("front thread: \(f)") }
        for f in back.failures { Issue.record("back thread: \(f)") }
        #expect(front.completed == n, "front received \(front.completed) of \(n)")
        #expect(back.completed == n, "back answered \(back.completed) of \(n)")
        print("stress: \(n) requests through a 1-page ring in \(elapsed); notifications front->back \(front.notificationsSent), back->front \(back.notificationsSent); sleeps front \(front.sleeps), back \(back.sleeps)")
    }
}
