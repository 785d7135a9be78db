import Testing
import XenABI
import XenABIReference
import XenRing

/// A hostile frontend's req_prod: RING_REQUEST_PROD_OVERFLOW and the
/// RING_UNCONSUMED_REQUESTS clamp.
@Suite("RingOverflow and the room to respond")
struct OverflowTests {
    static let starts: [UInt32] = [0, UInt32.max - 5, 0x7FFF_FFFF]

    /// Builds a ring with requests in flight: the C frontend queued and
    /// pushed `size/2 + 3`, the backends (Swift, and a C mirror on the same
    /// memory) took `size/4 + 2` and answered `size/8 + 1`.
    static func busyRing(pages: Int, start: UInt32) -> (RingMemory, SwiftBack, CBack) {
        let m = RingMemory(pages: pages)
        m.initShared(at: start)
        let front = CFront(attaching: m, at: start)
        let swift = SwiftBack(m)
        let c = CBack(attaching: m, at: start)
        let size = front.size
        for i in 0..<(size / 2 + 3) { front.queue(id: UInt64(i)) }
        _ = front.push()
        for _ in 0..<(size / 4 + 2) {
            _ = swift.takeRequest()
            _ = c.takeRequest()
        }
        for i in 0..<(size / 8 + 1) {
            let rsp = expectedResponse(to: expectedRequest(id: UInt64(i)))
            swift.respond(rsp)
            c.respond(rsp)   // same slot, same bytes
        }
        return (m, swift, c)
    }

    @Test(arguments: blkifPageCounts, starts)
    func producerOverflowMatchesRingH(pages: Int, start: UInt32) {
        let (m, swift, c) = Self.busyRing(pages: pages, start: start)
        let size = swift.size
        let base = swift.ring.responseProducerPrivate
        #expect(base == c.responseProducerPrivate && swift.ring.requestConsumer == c.requestConsumer)
        #expect(swift.requestsInFlight > 0)

        var offsets: [UInt32] = Array(0...size + 3)
        offsets += [2 * size, 0x7FFF_FFFF, 0x8000_0000, UInt32.max - 1, UInt32.max]   // far ahead and behind
        for offset in offsets {
            let prod = base &+ offset
            var h = m.header
            h.reqProd = prod
            m.setHeader(h)
            let cOverflow = xar_back_request_prod_overflow(c.b, prod) != 0
            #expect(cOverflow == (offset > size), "ring.h's own check at +\(offset)")
            // Stricter than ring.h: a req_prod behind requests already taken
            // moved backwards (ring.h would take `room` stale slots).
            let behind = offset < swift.requestsInFlight
            do {
                let n = try swift.unconsumedRequests()
                #expect(!cOverflow && !behind, "req_prod +\(offset) (ring size \(size)) should throw RingOverflow")
                #expect(n == (try? c.unconsumedRequests()), "unconsumed at +\(offset): Swift \(n)")
                #expect(n <= size - swift.requestsInFlight,
                        "unconsumed \(n) exceeds the room \(size - swift.requestsInFlight) at +\(offset)")
                #expect((try? swift.finalCheck()) != nil)
            } catch {
                #expect(cOverflow || behind, "req_prod +\(offset) (ring size \(size)) threw \(error)")
                let e = error as? RingOverflow
                #expect(e?.producer == prod && e?.consumer == base && e?.size == size, "\(error)")
                let distanceBehind = swift.ring.requestConsumer &- prod
                #expect(e?.movedBackwards == (distanceBehind > 0 && distanceBehind < 1 << 31), "\(error)")
                #expect(throws: RingOverflow.self, "finalCheckForRequests at +\(offset)") {
                    try swift.finalCheck()
                }
            }
        }
    }

    @Test(arguments: blkifPageCounts, starts)
    func exactlyRingSizeAheadIsAllowed(pages: Int, start: UInt32) throws {
        let m = RingMemory(pages: pages)
        m.initShared(at: start)
        let back = SwiftBack(m)
        let size = back.size
        var h = m.header

        h.reqProd = start &+ size
        m.setHeader(h)
        #expect(try back.unconsumedRequests() == size, "a full ring is legal")

        h.reqProd = start &+ size &+ 1
        m.setHeader(h)
        #expect {
            try back.unconsumedRequests()
        } throws: { error in
            guard let e = error as? RingOverflow else { return false }
            return e.producer == start &+ size &+ 1 && e.consumer == start && e.size == size
        }

        // A producer behind the responses is as impossible as one too far ahead.
        h.reqProd = start &- 1
        m.setHeader(h)
        #expect(throws: RingOverflow.self) { try back.unconsumedRequests() }

        // Behind requests already taken, though within a ring of the
        // responses: it moved backwards, and is said so.
        h.reqProd = start &+ 2
        m.setHeader(h)
        #expect(try back.unconsumedRequests() == 2)
        back.ring.takeRequest(into: back.scratch)
        back.ring.takeRequest(into: back.scratch)
        h.reqProd = start &+ 1
        m.setHeader(h)
        #expect {
            try back.unconsumedRequests()
        } throws: { error in
            guard let e = error as? RingOverflow else { return false }
            return e.movedBackwards && e.description.contains("moved backwards")
        }

        // FrontRing.publishRawRequestProducer is the same attack from the front.
        let m2 = RingMemory(pages: pages)
        let front = SwiftFront(m2)
        let back2 = SwiftBack(m2)
        front.ring.publishRawRequestProducer(size)
        #expect(try back2.unconsumedRequests() == size)
        front.ring.publishRawRequestProducer(size + 1)
        #expect(throws: RingOverflow.self) { try back2.unconsumedRequests() }
    }

    /// The room clamp, when it binds: the backend takes everything but
    /// answers nothing; the frontend can only have `size` outstanding,
    /// so the backend never sees more than its room.
    @Test(arguments: blkifPageCounts)
    func unconsumedNeverExceedsRoom(pages: Int) throws {
        let m = RingMemory(pages: pages)
        m.initShared(at: UInt32.max - 7)
        let front = CFront(attaching: m, at: UInt32.max - 7)
        let back = SwiftBack(m)
        let size = back.size
        var id: UInt64 = 0
        var answered: UInt32 = 0
        var rng = XorShift(seed: UInt64(pages))
        for _ in 0..<2000 {
            let q = UInt32(rng.next() % UInt64(size / 2 + 2))
            for _ in 0..<min(q, front.freeRequests) { front.queue(id: id); id += 1 }
            _ = front.push()
            let n = try back.unconsumedRequests()
            #expect(n <= size - back.requestsInFlight)
            let take = UInt32(rng.next() % UInt64(n + 1))
            for _ in 0..<take { _ = back.takeRequest() }
            #expect(back.requestsInFlight <= size)
            // Answer only sometimes, so the ring fills up with in-flight requests.
            if rng.next() % 4 == 0 {
                let r = UInt32(rng.next() % UInt64(back.requestsInFlight + 1))
                for _ in 0..<r {
                    back.respond(BlkifResponse(id: UInt64(answered), operation: 0, status: 0))
                    answered += 1
                }
                _ = back.push()
                for _ in 0..<front.unconsumedResponses() { _ = front.takeResponse() }
            }
        }
    }
}
