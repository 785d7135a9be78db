import BlockBackend
import EngineDoubles
import Hypervisor
import XenABI

/// The frontend's moves on a ring: well-formed requests whose pages carry
/// stamps, raw slots, rewrites of slots and descriptor pages, req_prod and
/// the event indices anywhere, grants changed under the backend.
extension BlkifFuzzRing {
    static let idPrefix: UInt64 = 0x5EED_0000_0000_0000

    var hasFreeSlot: Bool { requestProducerPrivate &- responseConsumer < size }

    /// Writes a well-formed request of `kind` (parameters from `bytes`)
    /// into the next slot; false when there is no room for it. `valid`:
    /// clip its range into the disk. `avoidOverlap`: a correct frontend
    /// never has two writes of one sector in flight.
    @discardableResult
    func writeRequest(_ requested: FuzzRequest.Kind, _ bytes: inout BlkifProgramBytes, valid: Bool, avoidOverlap: Bool) -> Bool {
        var kind = requested
        if kind == .indirectRead && configuration.maxIndirectSegments == 0 { kind = .read }
        if kind == .indirectWrite && configuration.maxIndirectSegments == 0 { kind = .write }
        let countByte = bytes.u8(), frameByte = bytes.u8()
        var sector = UInt64(bytes.u16()) % UInt64(Self.diskSectors)
        guard hasFreeSlot, requestCount < Self.requestCapacity, segmentCount + 32 <= Self.segmentCapacity else { return false }

        var wanted: Int
        switch kind {
        case .read, .write: wanted = 1 + Int(countByte) % Blkif.maxSegmentsPerRequest
        case .barrier: wanted = Int(countByte) % (Blkif.maxSegmentsPerRequest + 1)
        case .flush, .discard: wanted = 0
        case .indirectRead, .indirectWrite: wanted = 1 + Int(countByte) % configuration.maxIndirectSegments
        }
        var indirectFrame = -1
        if kind == .indirectRead || kind == .indirectWrite {
            guard let f = FuzzGuestLayout.indirectFrames.first(where: { !busy[$0] }) else { return false }
            indirectFrame = f
        }
        // Each segment a free frame of its own, with a sector range from one byte.
        let start = segmentCount
        var sectors: UInt64 = 0
        let frames = FuzzGuestLayout.dataFrames
        var probe = Int(frameByte) % frames.count
        for _ in 0..<frames.count where segmentCount - start < wanted {
            let f = frames.lowerBound + probe
            probe = (probe + 1) % frames.count
            guard !busy[f] else { continue }
            let b = bytes.u8()
            let first = b & 7
            let last = first + (b >> 3) % (8 - first)
            segments[segmentCount] = FuzzSegment(frame: UInt8(f), first: first, last: last)
            segmentCount += 1
            sectors += UInt64(last - first) + 1
        }
        let n = segmentCount - start
        if n == 0 && wanted > 0 { return false }

        var discardCount: UInt64 = 0
        var discardFlag: UInt8 = 0
        if kind == .discard {
            discardFlag = bytes.u8()
            discardCount = 1 + UInt64(countByte) % 64
            sectors = discardCount
        }
        if valid && sector + sectors > UInt64(Self.diskSectors) { sector = UInt64(Self.diskSectors) - sectors }
        let movesData = kind == .write || kind == .indirectWrite || (kind == .barrier && n > 0) || kind == .discard
        if avoidOverlap && movesData && overlapsWriteInFlight(sector: sector, count: sectors) {
            segmentCount = start
            return false
        }

        let r = requestCount
        let index = requestProducerPrivate
        let id = Self.idPrefix | UInt64(r)
        var request = FuzzRequest(kind: kind, responseOperation: 0, index: index, sector: sector, sectorCount: sectors,
                                  published: tick())
        request.segmentStart = Int32(start)
        request.segmentCount = Int32(n)
        request.indirectFrame = Int8(indirectFrame)
        if movesData {
            request.serial = model.newWrite(at: request.published, wildcard: false, zeros: kind == .discard) ?? 0
            if request.serial == 0 { segmentCount = start; return false }
            model.mayLand(request.serial, sector: sector, count: sectors)
        }
        fillPages(request, junk: 0x4000_0000 | UInt32(r))
        for i in start..<segmentCount { busy[Int(segments[i].frame)] = true }
        if indirectFrame >= 0 { busy[indirectFrame] = true }

        let narrow = configuration.ringProtocol == .x86_32
        let p = narrow ? wideSlot : slot(index)
        if engineHoldsUnpushed { clobbered.append(index) }
        switch kind {
        case .read, .write, .barrier, .flush:
            let operation = [BlkifOperation.read, BlkifOperation.write, BlkifOperation.writeBarrier,
                             BlkifOperation.flushDiskCache][Int(kind.rawValue)]
            request.responseOperation = operation
            var segs = InlineArray<11, BlkifSegment>(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0))
            for i in 0..<n {
                let s = segments[start + i]
                segs[i] = BlkifSegment(gref: FuzzGuestLayout.ref(Int(s.frame)), firstSect: s.first, lastSect: s.last)
            }
            // A flush's sector means nothing (Linux sends -1).
            let wireSector = kind == .flush ? UInt64(bytes.u8()) &* 0x0101_0101_0101_0101 : sector
            BlkifRequest(operation: operation, nrSegments: UInt8(n), id: id, sectorNumber: wireSector, segments: segs)
                .encode(to: p)
        case .discard:
            request.responseOperation = BlkifOperation.discard
            BlkifDiscardRequest(flag: discardFlag, id: id, sectorNumber: sector, nrSectors: discardCount).encode(to: p)
        case .indirectRead, .indirectWrite:
            let operation = kind == .indirectRead ? BlkifOperation.read : BlkifOperation.write
            request.responseOperation = operation
            let page = guest.page(indirectFrame)
            for i in 0..<n {
                let s = segments[start + i]
                BlkifSegment(gref: FuzzGuestLayout.ref(Int(s.frame)), firstSect: s.first, lastSect: s.last)
                    .encode(to: page + i * BlkifSegment.size)
            }
            var refs = InlineArray<8, UInt32>(repeating: 0)
            refs[0] = FuzzGuestLayout.ref(indirectFrame)
            BlkifIndirectRequest(indirectOp: operation, nrSegments: UInt16(n), id: id, sectorNumber: sector,
                                 indirectGrefs: refs).encode(to: p)
        }
        if narrow { BlkifX86_32.narrow(UnsafeRawPointer(wideSlot), into: slot(index)) }
        requests[r] = request
        requestCount += 1
        requestAtSlot[Int(index & (size - 1))] = Int32(r)
        requestProducerPrivate &+= 1
        for i in start..<segmentCount where tainted[Int(segments[i].frame)] {
            makeUnreliable(r, descriptorsChanged: false)
            break
        }
        if indirectFrame >= 0 && tainted[indirectFrame] { makeUnreliable(r, descriptorsChanged: true) }
        for o in 0..<offerCount where !offers[o].answered && offers[o].id == id {
            makeUnreliable(r, descriptorsChanged: true)   // raw bytes already offered this id
            break
        }
        return true
    }

    /// A write's pages carry its stamps where its segments are and junk
    /// elsewhere; a read's carry junk only (what it must replace exactly).
    private func fillPages(_ request: FuzzRequest, junk: UInt32) {
        var sector = request.sector
        let start = Int(request.segmentStart)
        for i in start..<start + Int(request.segmentCount) {
            let s = segments[i]
            let page = guest.page(Int(s.frame))
            if request.serial != 0 {
                // Stamps on the segment's sectors, junk around them.
                for k in 0..<Blkif.sectorsPerPage {
                    if k >= Int(s.first) && k <= Int(s.last) {
                        SectorStamp.fill(page + k * Blkif.sectorSize, serial: request.serial, sector: UInt32(sector))
                        sector += 1
                    } else {
                        SectorStamp.fill(page + k * Blkif.sectorSize, serial: request.serial,
                                         sector: SectorStamp.junkSector | UInt32(k))
                    }
                }
            } else {
                SectorStamp.fillJunk(page, serial: junk)
            }
            keep(Int(s.frame))
        }
    }

    private func overlapsWriteInFlight(sector: UInt64, count: UInt64) -> Bool {
        for r in 0..<requestCount where !requests[r].answered && requests[r].serial != 0 {
            let q = requests[r]
            if q.sector < sector + count && sector < q.sector + q.sectorCount { return true }
        }
        return false
    }

    /// 112 bytes of the program into the next slot.
    func writeRaw(_ bytes: inout BlkifProgramBytes) {
        guard hasFreeSlot else {
            bytes.copy(into: scratch, count: slotStride)   // the program stays aligned
            return
        }
        let p = slot(requestProducerPrivate)
        if engineHoldsUnpushed { clobbered.append(requestProducerPrivate) }
        bytes.copy(into: p, count: slotStride)
        _ = tick()
        requestAtSlot[Int(requestProducerPrivate & (size - 1))] = -1
        offerRaw(UnsafeRawPointer(p))
        requestProducerPrivate &+= 1
    }

    /// Rewrites `length` bytes at `offset` of a slot written and not yet
    /// answered (published or not). Mid-step (from the grant copy hook), the
    /// slot may already hold an unpushed response: that answer is lost.
    func tamperSlot(choice: UInt8, offset: Int, bytes: UnsafeRawBufferPointer, midStep: Bool) {
        let open = requestProducerPrivate &- responseConsumer
        guard open > 0 else { return }
        let index = responseConsumer &+ UInt32(choice) % open
        guard offset < slotStride else { return }
        let p = slot(index)
        let n = min(bytes.count, slotStride - offset)
        (p + offset).copyMemory(from: bytes.baseAddress!, byteCount: n)
        _ = tick()
        let r = Int(requestAtSlot[Int(index & (size - 1))])
        if r >= 0 && !requests[r].answered { makeUnreliable(r, descriptorsChanged: true) }
        offerRaw(UnsafeRawPointer(p))
        if midStep || engineHoldsUnpushed { clobbered.append(index) }
    }

    /// Rewrites bytes of an indirect descriptor page under the backend.
    func tamperIndirect(choice: UInt8, offset: Int, bytes: UnsafeRawBufferPointer) {
        let f = FuzzGuestLayout.indirectFrames.lowerBound + Int(choice) % FuzzGuestLayout.indirectFrames.count
        let n = min(bytes.count, XenPage.size - offset)
        (guest.page(f) + offset).copyMemory(from: bytes.baseAddress!, byteCount: n)
        _ = tick()
        for r in 0..<requestCount where !requests[r].answered && Int(requests[r].indirectFrame) == f {
            makeUnreliable(r, descriptorsChanged: true)
        }
    }

    func publish() {
        setHeader(SharedRingLayout.Offset.reqProd, requestProducerPrivate)
    }

    /// req_prod anywhere: backwards, more than a ring ahead, or any value.
    /// From then on the engine may take slots the frontend never wrote, or
    /// wrote long ago (their pages since reused): any request may be
    /// executed or answered again, so data and ids are no longer checked,
    /// only the engine's own conduct (answers well-formed, bounded, drains).
    func publishAnywhere(mode: UInt8, value: UInt32) {
        if lawful {
            lawful = false
            hostileWrite(sector: 0, count: UInt64(Self.diskSectors), zeros: false)
            taintAllFrames()
            for r in 0..<requestCount where !requests[r].answered { requests[r].tampered = true }
        }
        let current = header(SharedRingLayout.Offset.reqProd)
        switch mode % 4 {
        case 0: setHeader(SharedRingLayout.Offset.reqProd, current &- (value % 8 + 1))
        case 1: setHeader(SharedRingLayout.Offset.reqProd, requestProducerPrivate &+ size &+ value % 8)
        case 2: setHeader(SharedRingLayout.Offset.reqProd, value)
        default: setHeader(SharedRingLayout.Offset.reqProd, requestProducerPrivate &+ value % (2 * size))
        }
    }

    func setEvents(requestEvent: UInt32, responseEvent: UInt32) {
        setHeader(SharedRingLayout.Offset.reqEvent, requestEvent)
        setHeader(SharedRingLayout.Offset.rspEvent, responseEvent)
    }

    /// Grants a data or indirect frame writable or read-only, or revokes it.
    func changeGrant(choice: UInt8, mode: UInt8) {
        let frames = FuzzGuestLayout.requestFrames
        let f = frames.lowerBound + Int(choice) % frames.count
        let ref = GrantRef(FuzzGuestLayout.ref(f))
        switch mode % 3 {
        case 0: guest.revoke(ref)
        case 1: guest.grant(ref, frame: f, to: grants.ownDomain, readOnly: true)
        default:
            guest.grant(ref, frame: f, to: grants.ownDomain, readOnly: false)
            everWritable[f] = true
        }
    }
}
