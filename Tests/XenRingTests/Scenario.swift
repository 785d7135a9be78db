import Testing
import XenABI
import XenRing

/// One observable outcome of a ring operation. Two pairings of ends that
/// run the same random script must produce identical traces.
enum Event: Equatable, CustomStringConvertible {
    case queued(count: UInt32, freeAfter: UInt32)
    case pushedRequests(notify: Bool)
    case unconsumedRequests(UInt32)
    case overflow
    case tookRequest(id: UInt64)
    case responded(id: UInt64)
    case pushedResponses(notify: Bool)
    case finalCheckRequests(work: Bool)
    case unconsumedResponses(UInt32)
    case tookResponse(id: UInt64, status: Int16)
    case finalCheckResponses(work: Bool)
    case header(Header)

    var description: String {
        switch self {
        case let .queued(n, free): "queued \(n), free \(free)"
        case let .pushedRequests(n): "push requests -> notify \(n)"
        case let .unconsumedRequests(n): "unconsumed requests \(n)"
        case .overflow: "RingOverflow"
        case let .tookRequest(id): "took request \(id)"
        case let .responded(id): "responded \(id)"
        case let .pushedResponses(n): "push responses -> notify \(n)"
        case let .finalCheckRequests(w): "final check for requests -> \(w)"
        case let .unconsumedResponses(n): "unconsumed responses \(n)"
        case let .tookResponse(id, s): "took response \(id) status \(s)"
        case let .finalCheckResponses(w): "final check for responses -> \(w)"
        case let .header(h): h.description
        }
    }
}

struct ScenarioResult {
    var trace: [Event] = []
    var requests: UInt64 = 0
    var responses: UInt64 = 0
    var notifications = (toBack: 0, toFront: 0)
}

/// Drives a front and a back over one ring with a seeded random script of
/// ring operations, checks content, order and the room invariant as it goes,
/// and records every decision and the shared header after every step. At the
/// end it drains the ring so every request is answered and consumed.
func runScenario(front: RingFront, back: RingBack, memory: RingMemory, start: UInt32, firstID: UInt64,
                 seed: UInt64, steps: Int, label: String,
                 sourceLocation: SourceLocation = #_sourceLocation) -> ScenarioResult {
    var rng = XorShift(seed: seed)
    var result = ScenarioResult()
    let size = back.size
    var nextQueueID = firstID       // frontend: next id to queue
    var nextTakeID = firstID        // backend: next id it must see
    var nextResponseID = firstID    // frontend: next id it must get back
    var taken: [BlkifRequest] = []  // backend: taken, not answered (FIFO)
    var failures = 0

    func fail(_ message: String) {
        failures += 1
        if failures <= 5 { Issue.record("\(label): \(message)", sourceLocation: sourceLocation) }
    }

    func amount(_ r: UInt64, limit: UInt32) -> UInt32 {
        // Mostly small batches, sometimes up to and past the ring size.
        let want = r & 3 == 0 ? UInt32((r >> 2) % UInt64(size + 3)) : UInt32((r >> 2) % 4)
        return min(want, limit)
    }

    func backUnconsumed() -> UInt32? {
        do {
            let n = try back.unconsumedRequests()
            result.trace.append(.unconsumedRequests(n))
            let room = size &- back.requestsInFlight
            if n > room { fail("unconsumedRequests \(n) exceeds the room to respond \(room)") }
            return n
        } catch {
            result.trace.append(.overflow)
            fail("unexpected \(error)")
            return nil
        }
    }

    func takeRequests(_ n: UInt32) {
        for _ in 0..<n {
            let r = back.takeRequest()
            result.trace.append(.tookRequest(id: r.id))
            if r.id != nextTakeID {
                fail("\(back.name) took request \(r.id), expected \(nextTakeID) (lost, duplicated or reordered)")
            } else if !sameRequest(r, expectedRequest(id: r.id)) {
                fail("request \(r.id) arrived with different content")
            }
            nextTakeID &+= 1
            taken.append(r)
            result.requests += 1
        }
    }

    func respond(_ n: Int) {
        for _ in 0..<n {
            let r = taken.removeFirst()
            back.respond(expectedResponse(to: r))
            result.trace.append(.responded(id: r.id))
        }
    }

    func takeResponses(_ n: UInt32) {
        for _ in 0..<n {
            let rsp = front.takeResponse()
            result.trace.append(.tookResponse(id: rsp.id, status: rsp.status))
            let want = expectedResponse(to: expectedRequest(id: nextResponseID))
            if rsp != want { fail("\(front.name) got \(rsp), expected \(want)") }
            nextResponseID &+= 1
            result.responses += 1
        }
    }

    for _ in 0..<steps where failures == 0 {
        let op = rng.next() % 9
        let r = rng.next()
        switch op {
        case 0, 1:   // frontend queues a batch
            let n = amount(r, limit: front.freeRequests)
            for _ in 0..<n { front.queue(id: nextQueueID); nextQueueID &+= 1 }
            result.trace.append(.queued(count: n, freeAfter: front.freeRequests))
        case 2:      // frontend pushes
            let notify = front.push()
            if notify { result.notifications.toBack += 1 }
            result.trace.append(.pushedRequests(notify: notify))
        case 3:      // backend consumes some of what it sees
            if let n = backUnconsumed() { takeRequests(amount(r, limit: n)) }
        case 4:      // backend answers some of what it took
            respond(Int(amount(r, limit: UInt32(taken.count))))
        case 5:      // backend publishes responses
            let notify = back.push()
            if notify { result.notifications.toFront += 1 }
            result.trace.append(.pushedResponses(notify: notify))
        case 6:      // backend about to sleep
            do {
                result.trace.append(.finalCheckRequests(work: try back.finalCheck()))
            } catch {
                result.trace.append(.overflow)
                fail("unexpected \(error)")
            }
        case 7:      // frontend consumes responses
            let n = front.unconsumedResponses()
            result.trace.append(.unconsumedResponses(n))
            takeResponses(amount(r, limit: n))
        default:     // frontend about to sleep
            result.trace.append(.finalCheckResponses(work: front.finalCheck()))
        }
        result.trace.append(.header(memory.header))
    }

    // Drain: push everything, answer everything, consume everything.
    var rounds = 0
    while failures == 0 && nextResponseID != nextQueueID && rounds < 10_000 {
        rounds += 1
        result.trace.append(.pushedRequests(notify: front.push()))
        if let n = backUnconsumed() { takeRequests(n) }
        respond(taken.count)
        result.trace.append(.pushedResponses(notify: back.push()))
        let n = front.unconsumedResponses()
        result.trace.append(.unconsumedResponses(n))
        takeResponses(n)
        result.trace.append(.header(memory.header))
    }
    if failures == 0 {
        if nextResponseID != nextQueueID { fail("drain did not finish") }
        if front.freeRequests != size { fail("ring not empty after drain: \(front.freeRequests) free of \(size)") }
        if (try? back.unconsumedRequests()) != 0 || back.requestsInFlight != 0 { fail("backend not idle after drain") }
        let h = memory.header
        if h.reqProd != start &+ UInt32(truncatingIfNeeded: result.requests) || h.rspProd != h.reqProd {
            fail("final header \(h) after \(result.requests) requests from index \(start)")
        }
    }
    if failures > 5 { Issue.record("\(label): \(failures - 5) more failures", sourceLocation: sourceLocation) }
    return result
}

/// Compares a trace with the all-C reference trace; reports the first difference.
func expectSameTrace(_ tested: [Event], _ reference: [Event], _ label: String,
                     sourceLocation: SourceLocation = #_sourceLocation) {
    let n = min(tested.count, reference.count)
    for i in 0..<n where tested[i] != reference[i] {
        let from = max(0, i - 4)
        let context = (from..<i).map { "  \(reference[$0])" }.joined(separator: "\n")
        Issue.record("""
            \(label): differs from ring.h at event \(i): got \(tested[i]), C did \(reference[i])
            preceding events:
            \(context)
            """, sourceLocation: sourceLocation)
        return
    }
    #expect(tested.count == reference.count, "\(label): \(tested.count) events, C \(reference.count)",
            sourceLocation: sourceLocation)
}
