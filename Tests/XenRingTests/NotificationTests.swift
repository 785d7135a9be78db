import Testing
import XenABI
import XenABIReference
import XenRing

/// Event-index arithmetic (req_event / rsp_event hold-off) against ring.h.
@Suite("Notification decisions and suppression")
struct NotificationTests {
    /// Event values relative to the new producer index: just behind, at,
    /// and ahead of it, plus the far ends of the 32-bit circle.
    static let eventDeltas: [UInt32] = (-6...6).map { UInt32(bitPattern: Int32($0)) }
        + [0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, UInt32.max / 3]

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY vs FrontRing.pushRequests for
    /// every (published, private, req_event) combination of a grid that
    /// crosses the 2^32 wrap (old req_prod = new - d wraps when d > new).
    @Test func frontPushDecisionsEqualRingH() {
        var cases = 0
        for k: UInt32 in [0, 1, 2, 3, 31, 32] {          // requests queued since init (new = k)
            for d: UInt32 in [0, 1, 2, 3, 5, 32, 0x8000_0000] {   // old req_prod = new - d
                for delta in Self.eventDeltas {
                    let old = k &- d
                    let event = k &+ delta
                    let header = Header(reqProd: old, reqEvent: event, rspProd: 0, rspEvent: 1)

                    let sm = RingMemory(pages: 1)
                    let swift = SwiftFront(sm)
                    for i in 0..<k { swift.queue(id: UInt64(i)) }
                    sm.setHeader(header)
                    let swiftNotify = swift.push()

                    let cm = RingMemory(pages: 1)
                    let c = CFront(initializing: cm)
                    for i in 0..<k { c.queue(id: UInt64(i)) }
                    cm.setHeader(header)
                    let cNotify = c.push()

                    #expect(swiftNotify == cNotify,
                            "push requests: old \(old) new \(k) req_event \(event): Swift \(swiftNotify), C \(cNotify)")
                    #expect(sm.header == cm.header, "header after push: Swift \(sm.header), C \(cm.header)")
                    cases += 1
                }
            }
        }
        #expect(cases > 500)
    }

    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY vs BackRing.pushResponses, with
    /// the back ring attached at indices on both sides of the wrap.
    @Test(arguments: [UInt32(0), 0x7FFF_FFFF, UInt32.max - 1, UInt32.max])
    func backPushDecisionsEqualRingH(start: UInt32) {
        for k: UInt32 in [0, 1, 2, 3, 32] {                // responses written (new = start + k)
            for d: UInt32 in [0, 1, 2, 3, 5, 32, 0x8000_0000] {   // old rsp_prod = new - d
                for delta in Self.eventDeltas {
                    let new = start &+ k
                    let header = Header(reqProd: new, reqEvent: new &+ 1, rspProd: new &- d, rspEvent: new &+ delta)

                    let sm = RingMemory(pages: 1)
                    sm.initShared(at: start)
                    let swift = SwiftBack(sm)
                    for i in 0..<k { swift.respond(BlkifResponse(id: UInt64(i), operation: 0, status: 0)) }
                    sm.setHeader(header)
                    let swiftNotify = swift.push()

                    let cm = RingMemory(pages: 1)
                    cm.initShared(at: start)
                    let c = CBack(attaching: cm, at: start)
                    for i in 0..<k { c.respond(BlkifResponse(id: UInt64(i), operation: 0, status: 0)) }
                    cm.setHeader(header)
                    let cNotify = c.push()

                    #expect(swiftNotify == cNotify,
                            "push responses: old \(header.rspProd) new \(new) rsp_event \(header.rspEvent): Swift \(swiftNotify), C \(cNotify)")
                    #expect(sm.header == cm.header, "header after push: Swift \(sm.header), C \(cm.header)")
                }
            }
        }
    }

    // MARK: suppression, both directions

    /// A script with the outcomes ring.h prescribes. It is run on the all-C
    /// pair too, which validates the script itself.
    static func suppressionScript(front: RingFront, back: RingBack, memory: RingMemory, start s: UInt32,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        func expectEq<T: Equatable>(_ a: T, _ b: T, _ what: String) {
            #expect(a == b, "\(front.name) + \(back.name) from \(s): \(what): got \(a), want \(b)",
                    sourceLocation: sourceLocation)
        }
        var id: UInt64 = 1
        func queue(_ n: Int) { for _ in 0..<n { front.queue(id: id); id += 1 } }
        func take(_ n: UInt32) throws {
            expectEq(try back.unconsumedRequests(), n, "unconsumed requests")
            for _ in 0..<n { back.respond(expectedResponse(to: back.takeRequest())) }
        }
        func consume(_ n: UInt32) {
            expectEq(front.unconsumedResponses(), n, "unconsumed responses")
            for _ in 0..<n { _ = front.takeResponse() }
        }

        // --- frontend -> backend ---
        // Fresh ring: req_event = start + 1, so the first push notifies.
        queue(1); expectEq(front.push(), true, "first push")
        // The backend has not re-armed: more pushes stay silent.
        queue(1); expectEq(front.push(), false, "second push before the backend re-arms")
        queue(2); expectEq(front.push(), false, "third push before the backend re-arms")
        expectEq(front.push(), false, "push with nothing new")
        // The backend drains, then its final check finds nothing and re-arms.
        try take(4)
        expectEq(try back.finalCheck(), false, "final check on an empty ring")
        expectEq(memory.header.reqEvent, s &+ 5, "req_event after the final check (req_cons + 1)")
        queue(1); expectEq(front.push(), true, "push after the backend re-armed")
        queue(1); expectEq(front.push(), false, "push after that")
        // Final check with work pending says so and leaves req_event alone.
        expectEq(try back.finalCheck(), true, "final check with 2 requests pending")
        expectEq(memory.header.reqEvent, s &+ 5, "req_event untouched when work is pending")
        try take(2)
        // Batching: the backend asks to be woken only at the third request from now.
        var h = memory.header
        h.reqEvent = h.reqProd &+ 3
        memory.setHeader(h)
        queue(1); expectEq(front.push(), false, "batch 1/3")
        queue(1); expectEq(front.push(), false, "batch 2/3")
        queue(1); expectEq(front.push(), true, "batch 3/3")
        // A push that jumps over req_event notifies too.
        try take(3)
        h = memory.header
        h.reqEvent = h.reqProd &+ 2
        memory.setHeader(h)
        queue(4); expectEq(front.push(), true, "push of 4 over req_event = req_prod + 2")
        try take(4)

        // --- backend -> frontend (13 responses are written, none pushed yet) ---
        // rsp_event is still start + 1 from the init: the first push notifies.
        expectEq(back.push(), true, "first response push")
        consume(13)
        expectEq(front.finalCheck(), false, "front final check on no responses")
        expectEq(memory.header.rspEvent, s &+ 14, "rsp_event after the final check (rsp_cons + 1)")
        queue(3); _ = front.push(); try take(3)   // 3 responses written, unpushed
        expectEq(back.push(), true, "response push after the frontend re-armed")
        queue(1); _ = front.push(); try take(1)
        expectEq(back.push(), false, "second response push before the frontend re-arms")
        expectEq(front.finalCheck(), true, "front final check with 4 responses pending")
        expectEq(memory.header.rspEvent, s &+ 14, "rsp_event untouched when responses are pending")
        consume(4)
        // Batching on the frontend side.
        h = memory.header
        h.rspEvent = h.rspProd &+ 2
        memory.setHeader(h)
        queue(2); _ = front.push()
        expectEq(try back.unconsumedRequests(), 2, "unconsumed requests")
        back.respond(expectedResponse(to: back.takeRequest()))
        expectEq(back.push(), false, "response batch 1/2")
        back.respond(expectedResponse(to: back.takeRequest()))
        expectEq(back.push(), true, "response batch 2/2")
        consume(2)
        expectEq(back.push(), false, "response push with nothing new")
    }

    @Test(arguments: [UInt32(0), UInt32.max - 2, UInt32.max - 15])
    func suppressionCFrontSwiftBack(start: UInt32) throws {
        let m = RingMemory(pages: 1)
        m.initShared(at: start)
        try Self.suppressionScript(front: CFront(attaching: m, at: start), back: SwiftBack(m), memory: m, start: start)
    }

    @Test(arguments: [UInt32(0), UInt32.max - 2, UInt32.max - 15])
    func suppressionCFrontCBack(start: UInt32) throws {
        let m = RingMemory(pages: 1)
        m.initShared(at: start)
        try Self.suppressionScript(front: CFront(attaching: m, at: start), back: CBack(attaching: m, at: start),
                                   memory: m, start: start)
    }

    @Test func suppressionSwiftFrontCBack() throws {
        let m = RingMemory(pages: 1)
        let front = SwiftFront(m)
        try Self.suppressionScript(front: front, back: CBack(initializing: m), memory: m, start: 0)
    }

    @Test func suppressionSwiftFrontSwiftBack() throws {
        let m = RingMemory(pages: 1)
        let front = SwiftFront(m)
        try Self.suppressionScript(front: front, back: SwiftBack(m), memory: m, start: 0)
    }

    // MARK: final checks

    /// RING_FINAL_CHECK_FOR_REQUESTS at the very top of the index space:
    /// req_event = req_cons + 1 wraps to 0.
    @Test func finalCheckForRequestsArmsAcrossTheWrap() throws {
        for start in [UInt32.max, UInt32.max - 1] {
            let m = RingMemory(pages: 1)
            m.initShared(at: start)
            let back = SwiftBack(m)
            #expect(try back.finalCheck() == false)
            #expect(m.header.reqEvent == start &+ 1)

            let cm = RingMemory(pages: 1)
            cm.initShared(at: start)
            let c = CBack(attaching: cm, at: start)
            #expect(try c.finalCheck() == false)
            #expect(m.header == cm.header)

            // A request published after the check is seen by the next one.
            let front = CFront(attaching: m, at: start)
            front.queue(id: 9)
            #expect(front.push(), "the armed req_event makes the frontend notify")
            #expect(try back.finalCheck() == true)
        }
    }

    /// The final check of a consumer that needs several requests at once
    /// (netback's rx, a frame waiting for enough buffers): fewer is no work,
    /// and req_event is set to the next request published, across the wrap too.
    @Test func finalCheckForSeveralRequestsArmsAtTheNextOne() throws {
        for start: UInt32 in [0, UInt32.max - 1] {
            let m = RingMemory(pages: 1)
            m.initShared(at: start)
            let back = SwiftBack(m)
            let front = CFront(attaching: m, at: start)
            front.queue(id: 1)
            _ = front.push()
            #expect(try back.finalCheck(atLeast: 2) == false)
            #expect(m.header.reqEvent == start &+ 2)
            front.queue(id: 2)
            #expect(front.push(), "the next request notifies")
            #expect(try back.finalCheck(atLeast: 2) == true)
        }
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES. (FrontRing always starts at index 0,
    /// so unlike the request side this cannot be placed at the wrap.)
    @Test func finalCheckForResponses() {
        let m = RingMemory(pages: 1)
        let front = SwiftFront(m)
        #expect(front.finalCheck() == false)
        #expect(m.header.rspEvent == 1)
        let cm = RingMemory(pages: 1)
        let c = CFront(initializing: cm)
        #expect(c.finalCheck() == false)
        #expect(m.header == cm.header)

        // With a response published, the check reports work and leaves rsp_event.
        let back = SwiftBack(m)
        front.queue(id: 1)
        _ = front.push()
        #expect((try? back.unconsumedRequests()) == 1)
        back.respond(expectedResponse(to: back.takeRequest()))
        #expect(back.push(), "rsp_event = rsp_cons + 1 asks for this notification")
        let before = m.header.rspEvent
        #expect(front.finalCheck() == true)
        #expect(m.header.rspEvent == before)
    }
}
