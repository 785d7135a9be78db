import Hypervisor
import XenABI
import XenRing

/// The guest's half of a blkif ring in an `InMemoryGuest`: the shared ring
/// on frames 0..<ringPages (granted as refs 0..<ringPages), requests
/// written into slots (well-formed or raw bytes), responses read back.
public final class InMemoryBlkfront {
    public let guest: InMemoryGuest
    public let ringPages: Int
    public private(set) var ring: FrontRing
    public let backendDomain: DomID

    public init(guest: InMemoryGuest, ringPages: Int = 1, backendDomain: DomID = 0, startIndex: UInt32 = 0,
                slotSize: Int = Blkif.slotSize) {
        self.guest = guest
        self.ringPages = ringPages
        self.backendDomain = backendDomain
        for p in 0..<ringPages { guest.grant(GrantRef(p), frame: p, to: backendDomain) }
        ring = FrontRing(initializing: guest.page(0), pages: ringPages, entrySize: slotSize, startIndex: startIndex)
    }

    public var ringAddress: UnsafeMutableRawPointer { guest.page(0) }
    public var ringRefs: [GrantRef] { (0..<ringPages).map { GrantRef($0) } }

    /// Writes a request into the next slot (not yet published).
    public func queue(_ r: BlkifRequest) {
        r.encode(to: ring.nextRequestSlot())
        ring.commitRequest()
    }

    public func queue(_ r: BlkifDiscardRequest) {
        r.encode(to: ring.nextRequestSlot())
        ring.commitRequest()
    }

    public func queue(_ r: BlkifIndirectRequest) {
        r.encode(to: ring.nextRequestSlot())
        ring.commitRequest()
    }

    /// Writes raw bytes (at most a slot's) into the next slot.
    public func queueRaw(_ bytes: UnsafeRawBufferPointer) {
        let slot = ring.nextRequestSlot()
        slot.initializeMemory(as: UInt8.self, repeating: 0, count: Blkif.slotSize)
        if let b = bytes.baseAddress { slot.copyMemory(from: b, byteCount: min(bytes.count, Blkif.slotSize)) }
        ring.commitRequest()
    }

    /// Publishes queued requests; true if the backend asked to be notified.
    @discardableResult
    public func push() -> Bool { ring.pushRequests() }

    /// Takes every published response, whole slots (for padding checks) or decoded.
    public func takeResponses(_ body: (BlkifResponse, UnsafeRawPointer) -> Void) {
        let slot = UnsafeMutableRawPointer.allocate(byteCount: Blkif.slotSize, alignment: 16)
        defer { slot.deallocate() }
        while ring.unconsumedResponses() > 0 {
            ring.takeResponse(into: slot)
            body(BlkifResponse(decoding: slot), UnsafeRawPointer(slot))
        }
    }

    public func responses() -> [BlkifResponse] {
        var out: [BlkifResponse] = []
        takeResponses { r, _ in out.append(r) }
        return out
    }

    // The shared header, for tests that check the backend's indices.
    public var requestEvent: UInt32 { ringAddress.load(fromByteOffset: SharedRingLayout.Offset.reqEvent, as: UInt32.self) }
    public var responseProducer: UInt32 { ringAddress.load(fromByteOffset: SharedRingLayout.Offset.rspProd, as: UInt32.self) }
    public var requestProducer: UInt32 { ringAddress.load(fromByteOffset: SharedRingLayout.Offset.reqProd, as: UInt32.self) }
}
