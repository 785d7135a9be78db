import CXenBackSupport
import XenABI

/// The frontend broke the ring protocol: its producer index claims more
/// requests than the ring can hold. Its device is disconnected, never trusted.
public struct RingOverflow: Error, Equatable, CustomStringConvertible, Sendable {
    public var producer: UInt32
    /// rsp_prod_pvt: responses written.
    public var consumer: UInt32
    /// req_cons: requests taken.
    public var requestConsumer: UInt32
    public var size: UInt32
    public init(producer: UInt32, consumer: UInt32, requestConsumer: UInt32, size: UInt32) {
        self.producer = producer; self.consumer = consumer; self.requestConsumer = requestConsumer; self.size = size
    }
    /// req_prod went back below requests already taken (within half the index space).
    public var movedBackwards: Bool { requestConsumer &- producer > 0 && requestConsumer &- producer < 1 << 31 }
    public var description: String {
        movedBackwards
            ? "req_prod \(producer) moved backwards, below the \(requestConsumer) requests already taken"
            : "req_prod \(producer) is more than \(size) slots ahead of rsp_prod_pvt \(consumer)"
    }
}

/// The shared page(s) of one ring: the 64-byte header and the slots.
/// Field access goes through acquire/release atomics because the other end
/// writes this memory concurrently.
@usableFromInline
struct SharedRingMemory {
    @usableFromInline let base: UnsafeMutableRawPointer
    @usableFromInline let entrySize: Int
    /// Number of slots (a power of two).
    @usableFromInline let size: UInt32

    init(base: UnsafeMutableRawPointer, pages: Int, entrySize: Int) {
        precondition(pages >= 1 && pages <= 1 << SharedRingLayout.maxPageOrder && pages & (pages - 1) == 0,
                     "ring pages must be 1, 2, 4, 8 or 16")
        self.base = base
        self.entrySize = entrySize
        self.size = UInt32(SharedRingLayout.slots(pages: pages, entrySize: entrySize))
    }

    @inline(__always) @usableFromInline func load(_ offset: Int) -> UInt32 { xb_load_acquire_u32(base + offset) }
    @inline(__always) @usableFromInline func store(_ offset: Int, _ v: UInt32) { xb_store_release_u32(base + offset, v) }

    @inline(__always) @usableFromInline
    func slot(_ index: UInt32) -> UnsafeMutableRawPointer {
        base + SharedRingLayout.Offset.ring + Int(index & (size - 1)) * entrySize
    }
}

/// The backend's view of a shared ring (the back half of ring.h's
/// DEFINE_RING_TYPES): consume requests, produce responses.
///
/// Usage, per wakeup:
///
///     while true {
///         let n = try ring.unconsumedRequests()      // throws RingOverflow
///         for _ in 0..<n { ring.takeRequest(into: scratch); ... }
///         ... write responses with ring.nextResponseSlot() / commitResponse()
///         if ring.pushResponses() { notify }
///         if try !ring.finalCheckForRequests() { break }   // re-arm req_event, sleep
///     }
public struct BackRing: ~Copyable {
    @usableFromInline let shared: SharedRingMemory
    /// req_cons: next request slot to read.
    public private(set) var requestConsumer: UInt32
    /// rsp_prod_pvt: responses written but not yet published.
    public private(set) var responseProducerPrivate: UInt32

    public var size: UInt32 { shared.size }
    public var entrySize: Int { shared.entrySize }

    /// Attaches to a ring the frontend has initialised (SHARED_RING_INIT),
    /// resuming at the indices the shared page holds: responses published so
    /// far are the point both ends agree on.
    public init(attachingTo base: UnsafeMutableRawPointer, pages: Int, entrySize: Int) {
        shared = SharedRingMemory(base: base, pages: pages, entrySize: entrySize)
        let published = shared.load(SharedRingLayout.Offset.rspProd)
        requestConsumer = published
        responseProducerPrivate = published
    }

    /// Attaches to a ring this backend served before (its journal says
    /// which requests it took): responses resume at the published rsp_prod,
    /// requests at `requestConsumer`.
    public init(attachingTo base: UnsafeMutableRawPointer, pages: Int, entrySize: Int, requestConsumer: UInt32) {
        shared = SharedRingMemory(base: base, pages: pages, entrySize: entrySize)
        self.requestConsumer = requestConsumer
        responseProducerPrivate = shared.load(SharedRingLayout.Offset.rspProd)
    }

    /// The rsp_prod both ends see (published responses).
    public var publishedResponses: UInt32 { shared.load(SharedRingLayout.Offset.rspProd) }

    /// RING_UNCONSUMED_REQUESTS after a RING_REQUEST_PROD_OVERFLOW check:
    /// how many requests may be taken now. Reads req_prod, then a read
    /// barrier, so the slots below it are safe to copy.
    @inline(__always)
    public func unconsumedRequests() throws(RingOverflow) -> UInt32 {
        let producer = shared.load(SharedRingLayout.Offset.reqProd)   // acquire = read barrier
        if producer &- responseProducerPrivate > shared.size {
            throw RingOverflow(producer: producer, consumer: responseProducerPrivate, requestConsumer: requestConsumer,
                               size: shared.size)
        }
        let requests = producer &- requestConsumer
        // Behind requests already taken (yet within a ring of rsp_prod_pvt):
        // moved backwards. Taken as it is, it would read response slots.
        if requests > shared.size {
            throw RingOverflow(producer: producer, consumer: responseProducerPrivate, requestConsumer: requestConsumer,
                               size: shared.size)
        }
        // Never take more than we have room to answer (RING_REQUEST_CONS_OVERFLOW).
        let room = shared.size &- (requestConsumer &- responseProducerPrivate)
        return min(requests, room)
    }

    /// Copies the next request slot into private memory (`entrySize` bytes)
    /// and consumes it. Call only after `unconsumedRequests()` said it exists.
    @inline(__always)
    public mutating func takeRequest(into destination: UnsafeMutableRawPointer) {
        xb_copy_from_shared(destination, shared.slot(requestConsumer), shared.entrySize)
        requestConsumer &+= 1
    }

    /// The slot for the next response; write it, then `commitResponse()`.
    @inline(__always)
    public func nextResponseSlot() -> UnsafeMutableRawPointer {
        shared.slot(responseProducerPrivate)
    }

    @inline(__always)
    public mutating func commitResponse() {
        responseProducerPrivate &+= 1
    }

    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publishes written responses
    /// (write barrier, then rsp_prod) and says whether the frontend asked to
    /// be notified (full barrier before reading rsp_event).
    @inline(__always)
    public func pushResponses() -> Bool {
        let old = shared.load(SharedRingLayout.Offset.rspProd)
        let new = responseProducerPrivate
        if old == new { return false }
        shared.store(SharedRingLayout.Offset.rspProd, new)           // release = write barrier
        xb_mb()
        let event = shared.load(SharedRingLayout.Offset.rspEvent)
        return new &- event < new &- old
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: before sleeping, set req_event so the
    /// frontend notifies on its next request, then look once more. True if
    /// requests arrived meanwhile (do not sleep).
    public func finalCheckForRequests() throws(RingOverflow) -> Bool {
        if try unconsumedRequests() > 0 { return true }
        shared.store(SharedRingLayout.Offset.reqEvent, requestConsumer &+ 1)
        xb_mb()
        return try unconsumedRequests() > 0
    }

    /// The final check for a consumer that needs `count` requests at once
    /// (an rx frame waiting for enough buffers): true if they are there;
    /// else sets req_event to the next request the frontend will publish,
    /// so every new one notifies (Linux's xenvif_rx_ring_slots_available),
    /// and looks once more.
    public func finalCheckForRequests(atLeast count: UInt32) throws(RingOverflow) -> Bool {
        if try unconsumedRequests() >= count { return true }
        shared.store(SharedRingLayout.Offset.reqEvent, shared.load(SharedRingLayout.Offset.reqProd) &+ 1)
        xb_mb()
        return try unconsumedRequests() >= count
    }

    /// Requests taken but not yet answered.
    public var requestsInFlight: UInt32 { requestConsumer &- responseProducerPrivate }
}

/// The frontend's view of a shared ring: produce requests, consume responses.
/// Used by our own frontends (tests, demo, benchmark) on the loopback hypervisor.
public struct FrontRing: ~Copyable {
    @usableFromInline let shared: SharedRingMemory
    /// req_prod_pvt: requests written but not yet published.
    public private(set) var requestProducerPrivate: UInt32
    /// rsp_cons: next response slot to read.
    public private(set) var responseConsumer: UInt32

    public var size: UInt32 { shared.size }
    public var entrySize: Int { shared.entrySize }

    /// SHARED_RING_INIT + FRONT_RING_INIT: zeroes the header and starts
    /// every index at `startIndex` (0 as ring.h does; tests start near 2^32
    /// to cross the wrap).
    public init(initializing base: UnsafeMutableRawPointer, pages: Int, entrySize: Int, startIndex: UInt32 = 0) {
        base.initializeMemory(as: UInt8.self, repeating: 0, count: SharedRingLayout.headerSize)
        shared = SharedRingMemory(base: base, pages: pages, entrySize: entrySize)
        shared.store(SharedRingLayout.Offset.reqProd, startIndex)
        shared.store(SharedRingLayout.Offset.rspProd, startIndex)
        shared.store(SharedRingLayout.Offset.reqEvent, startIndex &+ 1)
        shared.store(SharedRingLayout.Offset.rspEvent, startIndex &+ 1)
        requestProducerPrivate = startIndex
        responseConsumer = startIndex
    }

    /// Free request slots (RING_FULL when 0).
    public var freeRequests: UInt32 { shared.size &- (requestProducerPrivate &- responseConsumer) }

    /// The slot for the next request; write it, then `commitRequest()`.
    public func nextRequestSlot() -> UnsafeMutableRawPointer { shared.slot(requestProducerPrivate) }
    public mutating func commitRequest() { requestProducerPrivate &+= 1 }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
    public func pushRequests() -> Bool {
        let old = shared.load(SharedRingLayout.Offset.reqProd)
        let new = requestProducerPrivate
        if old == new { return false }
        shared.store(SharedRingLayout.Offset.reqProd, new)
        xb_mb()
        let event = shared.load(SharedRingLayout.Offset.reqEvent)
        return new &- event < new &- old
    }

    /// Responses published and not yet consumed.
    public func unconsumedResponses() -> UInt32 {
        shared.load(SharedRingLayout.Offset.rspProd) &- responseConsumer
    }

    /// Copies the next response's whole slot (`entrySize` bytes, the size of
    /// the request/response union) into `destination` and consumes it.
    public mutating func takeResponse(into destination: UnsafeMutableRawPointer) {
        xb_copy_from_shared(destination, shared.slot(responseConsumer), shared.entrySize)
        responseConsumer &+= 1
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES: arms rsp_event, then looks again.
    public func finalCheckForResponses() -> Bool {
        if unconsumedResponses() > 0 { return true }
        shared.store(SharedRingLayout.Offset.rspEvent, responseConsumer &+ 1)
        xb_mb()
        return unconsumedResponses() > 0
    }

    /// Test hook for hostile-frontend tests: publish an arbitrary req_prod.
    public func publishRawRequestProducer(_ value: UInt32) {
        shared.store(SharedRingLayout.Offset.reqProd, value)
        xb_mb()
    }
}
