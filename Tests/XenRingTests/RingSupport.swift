import Testing
import XenABI
import XenABIReference
import XenRing

/// Page-aligned ring memory of `pages` pages, poisoned so that nothing reads
/// a slot that was never written.
///
/// @unchecked Sendable: this is raw memory shared by the two ends of a ring,
/// which in the stress test run on two threads. Every concurrent access goes
/// through the rings' acquire/release index protocol; the box itself only
/// owns the allocation.
final class RingMemory: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let pages: Int
    var byteCount: Int { pages * XenPage.size }

    init(pages: Int, poison: UInt8 = 0xCC) {
        self.pages = pages
        base = .allocate(byteCount: pages * XenPage.size, alignment: XenPage.size)
        base.initializeMemory(as: UInt8.self, repeating: poison, count: pages * XenPage.size)
    }

    deinit { base.deallocate() }

    /// The header as C reads it (struct blkif_sring field names).
    var header: Header {
        var h = xar_sring_indices()
        xar_sring_get(base, &h)
        return Header(reqProd: h.req_prod, reqEvent: h.req_event, rspProd: h.rsp_prod, rspEvent: h.rsp_event)
    }

    /// Writes the four indices through C's field names.
    func setHeader(_ h: Header) {
        var c = xar_sring_indices(req_prod: h.reqProd, req_event: h.reqEvent, rsp_prod: h.rspProd, rsp_event: h.rspEvent)
        xar_sring_set(base, &c)
    }

    /// SHARED_RING_INIT, then every index moved to `start` (events start + 1,
    /// as SHARED_RING_INIT leaves them relative to 0): a ring that has
    /// carried exactly `start` requests and responses.
    func initShared(at start: UInt32) {
        xar_sring_init(base)
        setHeader(Header(reqProd: start, reqEvent: start &+ 1, rspProd: start, rspEvent: start &+ 1))
    }

    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: base, count: byteCount)) }
}

struct Header: Equatable, Sendable, CustomStringConvertible {
    var reqProd, reqEvent, rspProd, rspEvent: UInt32
    var description: String { "req_prod \(reqProd) req_event \(reqEvent) rsp_prod \(rspProd) rsp_event \(rspEvent)" }
}

let blkifPageCounts = [1, 2, 4, 8, 16]

/// The request a frontend sends for `id`; the same formula as the C
/// frontend's xar_blkif_request_for_id (see xen_abi_reference.h).
func expectedRequest(id: UInt64) -> BlkifRequest {
    let n = 1 + Int(id % UInt64(Blkif.maxSegmentsPerRequest))
    return BlkifRequest(
        operation: id % 2 == 1 ? BlkifOperation.write : BlkifOperation.read,
        nrSegments: UInt8(n),
        handle: UInt16(truncatingIfNeeded: id &* 7 &+ 3),
        id: id,
        sectorNumber: id &* 8 &+ 0x1234_0000_0000,
        segments: InlineArray { i in
            i < n ? BlkifSegment(gref: UInt32(truncatingIfNeeded: id &* 16 &+ UInt64(i) &+ 1),
                                 firstSect: UInt8(i % 8), lastSect: 7)
                  : BlkifSegment(gref: 0, firstSect: 0, lastSect: 0)
        })
}

/// The response a backend gives to `request` in these tests.
func expectedResponse(to request: BlkifRequest) -> BlkifResponse {
    BlkifResponse(id: request.id, operation: request.operation,
                  status: request.id % 5 == 0 ? BlkifStatus.error : BlkifStatus.okay)
}

func sameRequest(_ a: BlkifRequest, _ b: BlkifRequest) -> Bool {
    guard a.operation == b.operation, a.nrSegments == b.nrSegments, a.handle == b.handle,
          a.id == b.id, a.sectorNumber == b.sectorNumber else { return false }
    for i in 0..<Blkif.maxSegmentsPerRequest where a.segments[i] != b.segments[i] { return false }
    return true
}

// MARK: - The two ends, each in a Swift and a C flavour

/// A blkif frontend: XenRing.FrontRing or ring.h's blkif_front_ring_t.
protocol RingFront: AnyObject {
    var name: String { get }
    var size: UInt32 { get }
    var freeRequests: UInt32 { get }
    /// Writes expectedRequest(id) into the next slot (not yet pushed).
    func queue(id: UInt64)
    func push() -> Bool
    func unconsumedResponses() -> UInt32
    func takeResponse() -> BlkifResponse
    func finalCheck() -> Bool
}

/// A blkif backend: XenRing.BackRing or ring.h's blkif_back_ring_t.
protocol RingBack: AnyObject {
    var name: String { get }
    var size: UInt32 { get }
    var requestsInFlight: UInt32 { get }
    /// Throws RingOverflow (Swift) or COverflow (C) on RING_REQUEST_PROD_OVERFLOW.
    func unconsumedRequests() throws -> UInt32
    func takeRequest() -> BlkifRequest
    func respond(_ response: BlkifResponse)
    func push() -> Bool
    func finalCheck() throws -> Bool
}

/// The C backend's RING_REQUEST_PROD_OVERFLOW (RingOverflow has no public initializer).
struct COverflow: Error, Equatable {
    var producer, consumer, size: UInt32
}

final class SwiftFront: RingFront {
    var ring: FrontRing
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
    var name: String { "Swift FrontRing" }

    /// FrontRing(initializing:): SHARED_RING_INIT + FRONT_RING_INIT.
    init(_ memory: RingMemory) {
        ring = FrontRing(initializing: memory.base, pages: memory.pages, entrySize: Blkif.slotSize)
    }

    deinit { scratch.deallocate() }

    var size: UInt32 { ring.size }
    var freeRequests: UInt32 { ring.freeRequests }
    func queue(id: UInt64) {
        expectedRequest(id: id).encode(to: ring.nextRequestSlot())
        ring.commitRequest()
    }
    func push() -> Bool { ring.pushRequests() }
    func unconsumedResponses() -> UInt32 { ring.unconsumedResponses() }
    func takeResponse() -> BlkifResponse {
        // takeResponse copies a whole slot (entrySize bytes), not just the response.
        ring.takeResponse(into: scratch)
        return BlkifResponse(decoding: scratch)
    }
    func finalCheck() -> Bool { ring.finalCheckForResponses() }
}

final class CFront: RingFront {
    let f: OpaquePointer
    var name: String { "C blkif_front_ring_t" }

    /// SHARED_RING_INIT + FRONT_RING_INIT.
    init(initializing memory: RingMemory) {
        f = xar_front_init(memory.base, UInt32(memory.pages))
    }

    /// FRONT_RING_ATTACH at `index` (header left as it is).
    init(attaching memory: RingMemory, at index: UInt32) {
        f = xar_front_attach(memory.base, UInt32(memory.pages), index)
    }

    deinit { xar_front_free(f) }

    var size: UInt32 { xar_front_ring_size(f) }
    var freeRequests: UInt32 { xar_front_free_requests(f) }
    var requestProducerPrivate: UInt32 { xar_front_req_prod_pvt(f) }
    var responseConsumer: UInt32 { xar_front_rsp_cons(f) }
    func queue(id: UInt64) {
        let n = xar_front_queue(f, 1, id)
        precondition(n == 1, "C front full")
    }
    func push() -> Bool { xar_front_push(f) != 0 }
    func unconsumedResponses() -> UInt32 { xar_front_unconsumed_responses(f) }
    func takeResponse() -> BlkifResponse {
        var buf = (UInt64(0), UInt64(0))   // 16 bytes, 8-aligned
        return withUnsafeMutableBytes(of: &buf) { raw in
            xar_front_take_response(f, raw.baseAddress!)
            var id: UInt64 = 0, op: UInt8 = 0, status: Int16 = 0
            xar_blkif_response_decode(raw.baseAddress!, &id, &op, &status)
            return BlkifResponse(id: id, operation: op, status: status)
        }
    }
    func finalCheck() -> Bool { xar_front_final_check(f) != 0 }
}

final class SwiftBack: RingBack {
    var ring: BackRing
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
    var name: String { "Swift BackRing" }

    /// BackRing(attachingTo:): resumes at the shared rsp_prod.
    init(_ memory: RingMemory) {
        ring = BackRing(attachingTo: memory.base, pages: memory.pages, entrySize: Blkif.slotSize)
    }

    deinit { scratch.deallocate() }

    var size: UInt32 { ring.size }
    var requestsInFlight: UInt32 { ring.requestsInFlight }
    func unconsumedRequests() throws -> UInt32 { try ring.unconsumedRequests() }
    func takeRequest() -> BlkifRequest {
        ring.takeRequest(into: scratch)
        return BlkifRequest(decoding: scratch)
    }
    func respond(_ response: BlkifResponse) {
        response.encode(to: ring.nextResponseSlot())
        ring.commitResponse()
    }
    func push() -> Bool { ring.pushResponses() }
    func finalCheck() throws -> Bool { try ring.finalCheckForRequests() }
    func finalCheck(atLeast count: UInt32) throws -> Bool { try ring.finalCheckForRequests(atLeast: count) }
}

final class CBack: RingBack {
    let b: OpaquePointer
    let memory: RingMemory
    var name: String { "C blkif_back_ring_t" }

    /// BACK_RING_INIT (index 0).
    init(initializing memory: RingMemory) {
        self.memory = memory
        b = xar_back_init(memory.base, UInt32(memory.pages))
    }

    /// BACK_RING_ATTACH at `index`.
    init(attaching memory: RingMemory, at index: UInt32) {
        self.memory = memory
        b = xar_back_attach(memory.base, UInt32(memory.pages), index)
    }

    deinit { xar_back_free(b) }

    var size: UInt32 { xar_back_ring_size(b) }
    var requestConsumer: UInt32 { xar_back_req_cons(b) }
    var responseProducerPrivate: UInt32 { xar_back_rsp_prod_pvt(b) }
    var requestsInFlight: UInt32 { requestConsumer &- responseProducerPrivate }

    func unconsumedRequests() throws -> UInt32 {
        let n = xar_back_unconsumed_requests(b)
        if n < 0 { throw overflow() }
        return UInt32(n)
    }
    func takeRequest() -> BlkifRequest {
        var slot = [UInt8](repeating: 0, count: Blkif.slotSize)
        xar_back_take_request(b, &slot)
        return cDecodeRequest(slot)
    }
    func respond(_ response: BlkifResponse) {
        xar_back_put_response(b, response.id, response.operation, response.status)
    }
    func push() -> Bool { xar_back_push(b) != 0 }
    func finalCheck() throws -> Bool {
        let r = xar_back_final_check(b)
        if r < 0 { throw overflow() }
        return r != 0
    }
    func overflow() -> COverflow {
        COverflow(producer: memory.header.reqProd, consumer: responseProducerPrivate, size: size)
    }
}

/// Reads a request with C's field names (no Swift decoding involved).
func cDecodeRequest(_ slot: [UInt8]) -> BlkifRequest {
    var op: UInt8 = 0, nseg: UInt8 = 0, handle: UInt16 = 0, id: UInt64 = 0, sector: UInt64 = 0
    var grefs = [UInt32](repeating: 0, count: 11)
    var firsts = [UInt8](repeating: 0, count: 11)
    var lasts = [UInt8](repeating: 0, count: 11)
    xar_blkif_request_decode(slot, &op, &nseg, &handle, &id, &sector, &grefs, &firsts, &lasts)
    return BlkifRequest(operation: op, nrSegments: nseg, handle: handle, id: id, sectorNumber: sector,
                        segments: InlineArray { BlkifSegment(gref: grefs[$0], firstSect: firsts[$0], lastSect: lasts[$0]) })
}

/// A small deterministic generator (xorshift64*).
struct XorShift: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}
