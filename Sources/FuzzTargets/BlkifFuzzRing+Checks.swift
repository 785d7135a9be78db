import BlockBackend
import EngineDoubles
import Glibc
import XenABI

/// The invariants of one ring, checked after every step and at the end.
extension BlkifFuzzRing {
    func report(_ invariant: String, _ details: @autoclosure () -> String) {
        findings.report(name, invariant, details())
    }

    /// Steps the engine, takes the responses it pushed, and checks them and the step.
    func step(_ input: VbdEngineInput, armIfIdle: Bool) {
        inStep = true
        let s = engine.step(input, armIfIdle: armIfIdle)
        inStep = false
        afterStep(s)
    }

    /// Takes the responses a step pushed and checks them and the step.
    func afterStep(_ s: VbdEngineStep) {
        lastWait = s.wait
        collectResponses()
        checkStep(s)
        clobbered.removeAll(keepingCapacity: true)
        engineHoldsUnpushed = false
        settleIfQuiet()
    }

    /// The polling loop's cheap look: it may reap and answer (pushed by the next step).
    func pollForWork() {
        _ = engine.hasWork()
        checkBounds(reaped: false)
    }

    func collectResponses() {
        let produced = header(SharedRingLayout.Offset.rspProd)
        let waiting = produced &- responseConsumer
        guard waiting <= size else {
            // A frontend that published more than a ring ahead of its rsp_cons had its answers overwritten.
            if lawful { report("responses stay within the ring", "rsp_prod \(produced) is \(waiting) past rsp_cons \(responseConsumer)") }
            responseConsumer = produced
            return
        }
        if lawful {
            let published = header(SharedRingLayout.Offset.reqProd)
            if produced &- startIndex > published &- startIndex {
                report("responses never outnumber published requests", "rsp_prod \(produced), req_prod \(published)")
            }
        }
        while responseConsumer != produced {
            let index = responseConsumer
            responseConsumer &+= 1
            // Same slot, whatever the lap (a frontend that moved req_prod anywhere has rsp_cons past its own slots).
            if clobbered.contains(where: { ($0 ^ index) & (size - 1) == 0 }) {
                lostResponse = true   // the guest overwrote this slot during the step
                continue
            }
            if trace {
                print("  \(name) response at \(index): id \(hex(slot(index).load(as: UInt64.self))) op \(slot(index).load(fromByteOffset: 8, as: UInt8.self))")
            }
            checkResponse(UnsafeRawPointer(slot(index)))
        }
    }

    private func checkResponse(_ p: UnsafeRawPointer) {
        let id = p.load(fromByteOffset: BlkifResponse.Offset.id, as: UInt64.self)
        let operation = p.load(fromByteOffset: BlkifResponse.Offset.operation, as: UInt8.self)
        let status = p.load(fromByteOffset: BlkifResponse.Offset.status, as: Int16.self)
        // blkif_response: id u64 @0, operation u8 @8, padding @9, status i16 @10, padding @12..15.
        let padding = p.load(fromByteOffset: 9, as: UInt8.self)
        let tail = p.load(fromByteOffset: 12, as: UInt32.self)
        if padding != 0 || tail != 0 {
            report("response padding is zero (XSA-216)", "byte 9 = \(padding), bytes 12..15 = \(tail) (id \(hex(id)))")
        }
        if !(BlkifStatus.notSupported...BlkifStatus.okay).contains(status) {
            report("response status is OKAY, ERROR or EOPNOTSUPP", "status \(status) for id \(hex(id))")
        }
        if drained { report("no response after the engine drained", "id \(hex(id)) operation \(operation)") }
        var known = false
        if id & ~0xFFFF_FFFF == Self.idPrefix, Int(id & 0xFFFF_FFFF) < requestCount {
            let r = Int(id & 0xFFFF_FFFF)
            known = true
            if !requests[r].answered && requests[r].responseOperation == operation {
                answer(r, status: status)
                return
            }
            if !lawful { return }
        }
        for o in 0..<offerCount where !offers[o].answered && offers[o].id == id && offers[o].operation == operation {
            offers[o].answered = true
            return
        }
        // Offers not all recorded, or slots taken that the frontend never wrote: cannot tell.
        guard offerCount < Self.offerCapacity, lawful else { return }
        report("every response answers an id in flight, once",
               "id \(hex(id)) operation \(operation) status \(status)\(known ? " (answered before or another operation)" : "")")
    }

    private func answer(_ r: Int, status: Int16) {
        requests[r].answered = true
        let now = tick()
        let q = requests[r]
        if q.serial != 0 { model.answered(q.serial, at: now) }
        if status == BlkifStatus.notSupported && !q.tampered {
            report("offered operations are never answered EOPNOTSUPP", "request \(r) kind \(q.kind)")
        }
        if status == BlkifStatus.okay {
            if q.serial != 0 { model.acknowledge(q.serial, sector: q.sector, count: q.sectorCount, at: now) }
            if q.isRead && !q.unreliable { checkRead(r) }
            if (q.kind == .flush || q.kind == .barrier) && !q.tampered { checkDurable(since: q.published, request: r) }
        }
        // A rewritten request's answer may be its other version's: its
        // pages stay taken until the ring is quiet (else the guest reuses
        // a page the request still reads into).
        if !q.tampered { release(r) }
    }

    /// Every sector a read returned is one the disk may have held while it
    /// was in flight, and nothing else of its pages changed.
    private func checkRead(_ r: Int) {
        let q = requests[r]
        var sector = Int(q.sector)
        let start = Int(q.segmentStart)
        for i in start..<start + Int(q.segmentCount) {
            let s = segments[i]
            let page = guest.page(Int(s.frame))
            for k in 0..<Blkif.sectorsPerPage {
                let bytes = UnsafeRawPointer(page + k * Blkif.sectorSize)
                if k >= Int(s.first) && k <= Int(s.last) {
                    if !model.allows(bytes, sector: sector, since: q.published) {
                        report("every sector a read returns is one the disk may hold",
                               "read \(r) sector \(sector) got \(describe(bytes, sector: sector)), model \(model.describe(sector)) since \(q.published)")
                        return
                    }
                    sector += 1
                } else if !SectorStamp.isJunk(bytes, serial: 0x4000_0000 | UInt32(r), slot: k) {
                    report("a read writes only its segments' sectors", "read \(r) frame \(s.frame) sector slot \(k)")
                    return
                }
            }
        }
    }

    /// The first sector the model touched whose bytes in `view` (the disk's
    /// written or durable image) it does not allow since `epoch`, or nil.
    private func sectorOutsideModel(_ view: UnsafeMutableRawPointer, since epoch: UInt32) -> Int? {
        for i in 0..<model.touchedCount {
            let s = Int(model.touchedList[i])
            if !model.allows(UnsafeRawPointer(view + s * Blkif.sectorSize), sector: s, since: epoch) { return s }
        }
        return nil
    }

    /// After a flush or barrier is answered OKAY, the durable view holds
    /// every write acknowledged before it was written (or a later value).
    private func checkDurable(since epoch: UInt32, request r: Int) {
        if let s = sectorOutsideModel(disk.durable, since: epoch) {
            let bytes = UnsafeRawPointer(disk.durable + s * Blkif.sectorSize)
            report("after a flush or barrier, writes acknowledged before it are durable",
                   "request \(r) sector \(s) durable \(describe(bytes, sector: s)), model \(model.describe(s)) since \(epoch)")
        }
    }

    func describe(_ bytes: UnsafeRawPointer, sector: Int) -> String {
        if let serial = SectorStamp.serial(of: bytes, sector: UInt32(sector)) { return "write \(serial)" }
        let w = bytes.load(as: UInt64.self)
        return "foreign bytes (serial \(w >> 32), sector \(w & 0xFFFF_FFFF))"
    }

    private func checkStep(_ s: VbdEngineStep) {
        switch s.wait {
        case .idle:
            let requestEvent = header(SharedRingLayout.Offset.reqEvent)
            let produced = header(SharedRingLayout.Offset.reqProd)
            if lawful && !stopped && engine.breach == nil && requestEvent != produced &+ 1 {
                report("an idle engine re-armed req_event after taking every request",
                       "req_event \(requestEvent), req_prod \(produced)")
            }
        case .storage:
            if disk.pending.isEmpty {
                report("a ring waiting for storage has storage in flight (else it stalls)",
                       "outstanding \(engine.outstanding), storageInFlight \(engine.storageInFlight)")
            }
        case .drained:
            if engine.outstanding != 0 { report("drained means nothing outstanding", "outstanding \(engine.outstanding)") }
            if !stopped && engine.breach == nil { report("drained only when stopped or broken", "") }
            drained = true
        case .busy, .ringEmpty:
            break
        }
        checkBounds()
    }

    /// Memory the engine holds is what it allocated for the ring, whatever the guest does.
    /// `reaped`: after a step, which reaps every completion there is.
    func checkBounds(reaped: Bool = true) {
        if disk.completionSignalResetsInFlight > reportedResetsInFlight {
            reportedResetsInFlight = disk.completionSignalResetsInFlight
            report("the completion signal is reset only with nothing in flight (else a completion's wakeup is lost)",
                   "storage pending \(disk.pending.count), storageInFlight \(engine.storageInFlight)")
        }
        if engine.outstanding > engine.ringSlots {
            report("requests held are bounded by the ring", "\(engine.outstanding) > \(engine.ringSlots)")
        }
        if (reaped && engine.storageInFlight != disk.pending.count) || engine.storageInFlight > disk.queueDepth {
            report("storage operations in flight are the storage's, within its depth",
                   "engine \(engine.storageInFlight), storage \(disk.pending.count), depth \(disk.queueDepth)")
        }
        let pagesInFlight = engine.ringSlots * Blkif.maxSegmentsPerRequest
            + engine.indirectAreas * (configuration.maxIndirectSegments + 1)
        if engine.persistentlyMappedPages > pagesInFlight {
            report("persistently mapped pages are bounded by what the ring holds",
                   "\(engine.persistentlyMappedPages) > \(pagesInFlight)")
        }
    }

    /// The end of the program: complete everything, check that no request
    /// was dropped, stop, drain, and compare disk and guest with the model.
    func finish() {
        // Each round completes at least one storage operation while any is
        // in flight, so every request the ring can hold (a barrier takes two
        // rounds: its write, then its flush) is answered within this many;
        // a fixed 64 was too few for a 128-slot ring on a queue depth of 2.
        let roundLimit = 64 + 3 * engine.ringSlots
        if !stopped && engine.breach == nil {
            for _ in 0..<roundLimit where findings.items.isEmpty {
                if disk.pending.isEmpty {
                    step(.kicked, armIfIdle: true)
                } else {
                    disk.completeAll()
                    step(.storageReady, armIfIdle: true)
                }
                if disk.pending.isEmpty && lastWait == .idle { break }
            }
            let produced = header(SharedRingLayout.Offset.reqProd)
            let answered = header(SharedRingLayout.Offset.rspProd)
            if lawful && engine.breach == nil && findings.items.isEmpty && produced != answered {
                report("no request is dropped while the ring lives",
                       "req_prod \(produced), rsp_prod \(answered), outstanding \(engine.outstanding), wait \(lastWait)")
            }
        }
        guard findings.items.isEmpty else { return }
        stopped = true
        step(.stop, armIfIdle: true)
        var rounds = 0
        while lastWait != .drained && rounds < roundLimit && findings.items.isEmpty {
            disk.completeAll()
            step(.storageReady, armIfIdle: true)
            rounds += 1
        }
        if lastWait != .drained { report("stop drains", "wait \(lastWait) after \(rounds) rounds, pending \(disk.pending.count)") }
        guard findings.items.isEmpty else { return }
        let taken = header(SharedRingLayout.Offset.rspProd) &- startIndex
        if lawful && !lostResponse && !leftInJournal {
            for r in 0..<requestCount where !requests[r].answered && !requests[r].tampered
                && requests[r].index &- startIndex < taken {
                report("every request taken is answered", "request \(r) (\(requests[r].kind)) at index \(requests[r].index)")
                return
            }
        }
        // Sectors nothing may have written are zeros (a page at a time, one
        // comparison each; a page no write or discard reached is zeros by
        // the storage's reset, so only the others are compared).
        for page in 0..<Self.diskSectors / Blkif.sectorsPerPage where model.touchedPages & (1 << UInt64(page)) == 0
            && !disk.isUntouched(byteOffset: page * XenPage.size) {
            if memcmp(disk.written + page * XenPage.size, zeroPage, XenPage.size) != 0 {
                report("the disk holds what the model allows", "page \(page), never written, is not zeros")
                return
            }
        }
        if let s = sectorOutsideModel(disk.written, since: epoch) {
            let bytes = UnsafeRawPointer(disk.written + s * Blkif.sectorSize)
            report("the disk holds what the model allows", "sector \(s): \(describe(bytes, sector: s)), model \(model.describe(s))")
            return
        }
        checkGuestPages()
    }

    /// Pages never granted, and pages never granted writable, keep the guest's bytes.
    func checkGuestPages() {
        for f in FuzzGuestLayout.sentinelFrames where memcmp(guest.page(f), sentinelPage, XenPage.size) != 0 {
            report("pages never granted never change", "frame \(f)")
            return
        }
        for f in FuzzGuestLayout.readOnlyFrames where !everWritable[f] && memcmp(guest.page(f), keptCopy(f), XenPage.size) != 0 {
            report("pages never granted writable never change", "frame \(f)")
            return
        }
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
