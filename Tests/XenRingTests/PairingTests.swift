import Testing
import XenABI
import XenABIReference
import XenRing

/// The Swift rings paired with ring.h's, driven by the same random script as
/// an all-C pair: every decision (free slots, unconsumed counts, notify
/// results, final checks) and the shared header after every step must be
/// what ring.h's macros produce, and every request must arrive once, in
/// order and intact, and be answered.
@Suite("XenRing against ring.h, both pairings")
struct PairingTests {
    static let steps = 4000
    /// Free-running index starts: fresh, 40 before the 2^32 wrap, and just
    /// below the signed boundary.
    static let starts: [UInt32] = [0, UInt32.max - 40, 0x7FFF_FFF0]

    static func seed(_ pages: Int, _ start: UInt32, _ salt: UInt64) -> UInt64 {
        (UInt64(pages) << 40) ^ UInt64(start) ^ (salt << 52) ^ 0xA5A5
    }

    /// The all-C run of the same script: the expected trace.
    static func reference(pages: Int, start: UInt32, seed: UInt64) -> ScenarioResult {
        let memory = RingMemory(pages: pages)
        memory.initShared(at: start)
        return runScenario(front: CFront(attaching: memory, at: start), back: CBack(attaching: memory, at: start),
                           memory: memory, start: start, firstID: 1000, seed: seed, steps: steps,
                           label: "C front + C back, \(pages) pages from \(start)")
    }

    @Test("Swift BackRing with a C frontend", arguments: blkifPageCounts, starts)
    func swiftBackWithCFront(pages: Int, start: UInt32) {
        let seed = Self.seed(pages, start, 1)
        let expected = Self.reference(pages: pages, start: start, seed: seed)

        let memory = RingMemory(pages: pages)
        memory.initShared(at: start)
        let front = CFront(attaching: memory, at: start)
        let back = SwiftBack(memory)
        #expect(back.size == front.size, "RING_SIZE at \(pages) pages")
        #expect(back.ring.requestConsumer == start && back.ring.responseProducerPrivate == start,
                "BackRing attaches at rsp_prod")
        let label = "C front + Swift back, \(pages) pages from \(start)"
        let got = runScenario(front: front, back: back, memory: memory, start: start, firstID: 1000,
                              seed: seed, steps: Self.steps, label: label)
        expectSameTrace(got.trace, expected.trace, label)

        #expect(got.requests == got.responses)
        #expect(got.requests > 4 * UInt64(back.size), "\(label): only \(got.requests) requests, want many laps")
        if start > UInt32.max - 1000 {
            #expect(UInt64(start) + got.requests > UInt64(UInt32.max), "\(label): indices did not wrap")
        }
        #expect(got.notifications.toBack > 0 && got.notifications.toFront > 0)
    }

    // The other pairings start at index 0 only: FrontRing can only be created
    // by FrontRing(initializing:), which starts both private indices at 0
    // (there is no FRONT_RING_ATTACH equivalent to resume at another index).
    // Its modular index arithmetic near 2^32 is covered by the notify-decision
    // grid in NotificationTests (old req_prod and req_event set across the wrap).

    @Test("Swift FrontRing with a C backend", arguments: blkifPageCounts)
    func swiftFrontWithCBack(pages: Int) {
        let seed = Self.seed(pages, 0, 2)
        let expected = Self.reference(pages: pages, start: 0, seed: seed)

        let memory = RingMemory(pages: pages)
        let front = SwiftFront(memory)
        let back = CBack(initializing: memory)
        #expect(front.size == back.size, "RING_SIZE at \(pages) pages")
        let label = "Swift front + C back, \(pages) pages"
        let got = runScenario(front: front, back: back, memory: memory, start: 0, firstID: 1000,
                              seed: seed, steps: Self.steps, label: label)
        expectSameTrace(got.trace, expected.trace, label)
        #expect(got.requests == got.responses)
        #expect(got.requests > 4 * UInt64(back.size), "\(label): only \(got.requests) requests")
    }

    @Test("Swift FrontRing with Swift BackRing", arguments: blkifPageCounts)
    func swiftFrontWithSwiftBack(pages: Int) {
        let seed = Self.seed(pages, 0, 3)
        let expected = Self.reference(pages: pages, start: 0, seed: seed)

        let memory = RingMemory(pages: pages)
        let front = SwiftFront(memory)
        let back = SwiftBack(memory)
        let label = "Swift front + Swift back, \(pages) pages"
        let got = runScenario(front: front, back: back, memory: memory, start: 0, firstID: 1000,
                              seed: seed, steps: Self.steps, label: label)
        expectSameTrace(got.trace, expected.trace, label)
    }

    @Test("FrontRing(initializing:) leaves the memory exactly as SHARED_RING_INIT + FRONT_RING_INIT",
          arguments: blkifPageCounts)
    func frontInitMatchesC(pages: Int) {
        let swiftMemory = RingMemory(pages: pages, poison: 0x5A)
        let cMemory = RingMemory(pages: pages, poison: 0x5A)
        let swift = SwiftFront(swiftMemory)
        let c = CFront(initializing: cMemory)
        #expect(swiftMemory.bytes == cMemory.bytes, "header or slots differ after init")
        #expect(swiftMemory.header == Header(reqProd: 0, reqEvent: 1, rspProd: 0, rspEvent: 1))
        #expect(swift.size == c.size && swift.freeRequests == c.freeRequests)
        #expect(swift.size == UInt32(SharedRingLayout.slots(pages: pages, entrySize: Blkif.slotSize)))
    }

    @Test("BackRing(attachingTo:) resumes at rsp_prod and writes nothing", arguments: PairingTests.starts)
    func backAttach(start: UInt32) {
        let memory = RingMemory(pages: 2)
        memory.setHeader(Header(reqProd: start &+ 3, reqEvent: 7, rspProd: start, rspEvent: 9))
        let before = memory.bytes
        let back = SwiftBack(memory)
        #expect(memory.bytes == before)
        #expect(back.ring.requestConsumer == start)
        #expect(back.ring.responseProducerPrivate == start)
        #expect(back.requestsInFlight == 0)
        #expect((try? back.unconsumedRequests()) == 3)

        let c = CBack(attaching: memory, at: start)
        #expect((try? c.unconsumedRequests()) == 3)
    }

    @Test("ring sizes equal ring.h's RING_SIZE for blkif and netif entry sizes")
    func ringSizes() {
        for pages in blkifPageCounts {
            let memory = RingMemory(pages: pages)
            let c = CBack(initializing: memory)
            let blk = BackRing(attachingTo: memory.base, pages: pages, entrySize: Blkif.slotSize)
            #expect(blk.size == c.size, "blkif at \(pages) pages")
            #expect(blk.entrySize == Blkif.slotSize)
            let tx = BackRing(attachingTo: memory.base, pages: pages, entrySize: RingEntrySize.netifTx)
            #expect(tx.size == xar_ring_size_on_buffer(Int32(XAR_RING_NETIF_TX), UInt32(pages)), "netif tx at \(pages)")
            let rx = BackRing(attachingTo: memory.base, pages: pages, entrySize: RingEntrySize.netifRx)
            #expect(rx.size == xar_ring_size_on_buffer(Int32(XAR_RING_NETIF_RX), UInt32(pages)), "netif rx at \(pages)")
        }
    }
}
