import BlockBackend
import BlockStorage
import EngineDoubles
import Hypervisor
import Testing
import XenABI

/// A guest (dom 1, one ring page at frame 0, data pages from frame 8 on,
/// granted as refs 100 + frame), an in-memory disk and an engine over them.
final class EngineBed {
    let guest = InMemoryGuest(domain: 1, pages: 64, grants: 256)
    let front: InMemoryBlkfront
    let grants: InMemoryGrantTable
    let disk: InMemoryStorage
    let engine: VbdEngine

    init(sectors: Int = 2048, queueDepth: Int = 32, maxIndirectSegments: Int = 0, persistent: Bool = false,
         storageMaxIovecs: Int? = nil, secureDiscard: Bool = false) throws {
        front = InMemoryBlkfront(guest: guest, ringPages: 1)
        grants = InMemoryGrantTable(guests: [guest])
        disk = InMemoryStorage(sizeBytes: sectors * 512, queueDepth: queueDepth)
        disk.maxIovecsPerOperation = storageMaxIovecs
        for f in 8..<64 { guest.grant(GrantRef(100 + f), frame: f) }
        let limits = DiskLimits(sectors: UInt64(sectors), readOnly: false, flush: true, barrier: true, discard: true,
                                secureDiscard: secureDiscard, maxIndirectSegments: maxIndirectSegments)
        engine = try VbdEngine(ring: front.ringAddress, pages: 1, frontendDomain: 1, grants: grants, storage: disk,
                           limits: limits, persistentGrants: persistent, indirectBouncePages: 256)
    }

    func ref(_ frame: Int) -> GrantRef { GrantRef(100 + frame) }

    /// A one-page request (8 sectors) of data frame `frame`.
    func request(_ op: UInt8, id: UInt64, sector: UInt64, frame: Int) -> BlkifRequest {
        var segs = InlineArray<11, BlkifSegment>(repeating: BlkifSegment(gref: 0, firstSect: 0, lastSect: 0))
        segs[0] = BlkifSegment(gref: ref(frame), firstSect: 0, lastSect: 7)
        return BlkifRequest(operation: op, nrSegments: 1, id: id, sectorNumber: sector, segments: segs)
    }

    func fill(frame: Int, with byte: UInt8) {
        guest.page(frame).initializeMemory(as: UInt8.self, repeating: byte, count: XenPage.size)
    }

    func pageBytes(frame: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: guest.page(frame), count: XenPage.size)) }

    func diskBytes(_ view: UnsafeMutableRawPointer, sector: Int, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: view + sector * 512, count: count * 512))
    }
}

func ok(_ id: UInt64, _ op: UInt8) -> BlkifResponse { BlkifResponse(id: id, operation: op, status: BlkifStatus.okay) }
func failed(_ id: UInt64, _ op: UInt8) -> BlkifResponse { BlkifResponse(id: id, operation: op, status: BlkifStatus.error) }

@Suite("blkback's engine, stepped by hand")
struct EngineStepTests {
    @Test("a write is answered once the storage completes it, and the ring is re-armed")
    func writeAnsweredAfterCompletion() throws {
        let bed = try EngineBed()
        bed.fill(frame: 8, with: 0xAB)
        bed.front.queue(bed.request(BlkifOperation.write, id: 7, sector: 16, frame: 8))
        bed.front.push()
        var s = bed.engine.step(.kicked)
        #expect(s.wait == .idle && !s.notify)
        #expect(bed.disk.pending.count == 1 && bed.front.responses().isEmpty)
        bed.disk.completeAll()
        s = bed.engine.step(.storageReady)
        #expect(s == VbdEngineStep(notify: true, wait: .idle))
        #expect(bed.front.responses() == [ok(7, BlkifOperation.write)])
        #expect(bed.diskBytes(bed.disk.written, sector: 16, count: 8) == [UInt8](repeating: 0xAB, count: 4096))
        #expect(bed.front.requestEvent == bed.front.requestProducer &+ 1)
        #expect(bed.engine.step(.stop) == VbdEngineStep(notify: false, wait: .drained))
    }

    /// Sequential one-page writes merge into one operation, but no larger
    /// than the storage's `maxIovecsPerOperation` (io_uring: the device's max_segments).
    @Test("merged operations stop at the storage's iovec limit", arguments: [nil, 3] as [Int?])
    func mergeStopsAtTheStorageLimit(limit: Int?) throws {
        let bed = try EngineBed(storageMaxIovecs: limit)
        for index in 0..<7 {
            bed.fill(frame: 8 + index, with: UInt8(0x10 + index))
            bed.front.queue(bed.request(BlkifOperation.write, id: UInt64(index), sector: UInt64(index * 8), frame: 8 + index))
        }
        bed.front.push()
        _ = bed.engine.step(.kicked)
        let shapes = bed.disk.pending.map { [Int($0.offset / 512), Int($0.operation.iovecCount)] }
        #expect(shapes == (limit == nil ? [[0, 7]] : [[0, 3], [24, 3], [48, 1]]))
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == (0..<7).map { ok(UInt64($0), BlkifOperation.write) })
        for index in 0..<7 {
            #expect(bed.diskBytes(bed.disk.written, sector: index * 8, count: 8)
                    == [UInt8](repeating: UInt8(0x10 + index), count: 4096))
        }
    }

    @Test("responses follow completions, not requests; a read returns what the disk holds")
    func outOfOrderCompletions() throws {
        let bed = try EngineBed()
        bed.disk.written.initializeMemory(as: UInt8.self, repeating: 0x11, count: 4096)
        bed.front.queue(bed.request(BlkifOperation.read, id: 1, sector: 0, frame: 9))
        bed.front.queue(bed.request(BlkifOperation.write, id: 2, sector: 64, frame: 10))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.disk.pending.count == 2)
        bed.disk.complete(1)
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(2, BlkifOperation.write)])
        bed.disk.complete(0)
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(1, BlkifOperation.read)])
        #expect(bed.pageBytes(frame: 9) == [UInt8](repeating: 0x11, count: 4096))
    }

    @Test("a barrier behind a write whose grant copy failed is answered, and the ring goes on")
    func barrierAfterFailedCopy() throws {
        let bed = try EngineBed()
        bed.guest.revoke(bed.ref(8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.queue(BlkifRequest(operation: BlkifOperation.writeBarrier, nrSegments: 0, id: 2, sectorNumber: 0))
        bed.front.push()
        var s = bed.engine.step(.kicked)
        // The failed write is answered at once; the barrier's flush is in flight.
        #expect(s.wait == .storage)
        #expect(bed.disk.pending.map(\.kind) == [.flush])
        bed.disk.completeAll()
        s = bed.engine.step(.storageReady)
        #expect(s.wait == .idle)
        #expect(bed.front.responses() == [failed(1, BlkifOperation.write), ok(2, BlkifOperation.writeBarrier)])
        // The next request is taken.
        bed.disk.completesAtOnce = true
        bed.front.queue(bed.request(BlkifOperation.read, id: 3, sector: 0, frame: 9))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [ok(3, BlkifOperation.read)])
    }

    @Test("a barrier waits for earlier writes, then writes and flushes: they are durable when it is answered")
    func barrierOrdering() throws {
        let bed = try EngineBed()
        bed.fill(frame: 8, with: 0x01)
        bed.fill(frame: 9, with: 0x02)
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.writeBarrier, id: 2, sector: 8, frame: 9))
        bed.front.push()
        #expect(bed.engine.step(.kicked).wait == .storage)
        #expect(bed.disk.pending.map(\.kind) == [.write])   // the barrier waits
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(1, BlkifOperation.write)])
        #expect(bed.disk.pending.map(\.kind) == [.write])   // the barrier's own write
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.disk.pending.map(\.kind) == [.flush])
        #expect(bed.front.responses().isEmpty)
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(2, BlkifOperation.writeBarrier)])
        #expect(bed.diskBytes(bed.disk.durable, sector: 0, count: 16)
                == [UInt8](repeating: 1, count: 4096) + [UInt8](repeating: 2, count: 4096))
    }

    @Test("BLKIF_DISCARD_SECURE without discard-secure is a plain discard")
    func secureDiscardIsPlain() throws {
        let bed = try EngineBed()
        bed.disk.completesAtOnce = true
        bed.disk.written.initializeMemory(as: UInt8.self, repeating: 0x77, count: 8192)
        bed.front.queue(BlkifDiscardRequest(flag: Blkif.discardSecure, id: 9, sectorNumber: 0, nrSectors: 8))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [ok(9, BlkifOperation.discard)])
        #expect(bed.diskBytes(bed.disk.written, sector: 0, count: 16)
                == [UInt8](repeating: 0, count: 4096) + [UInt8](repeating: 0x77, count: 4096))
    }

    @Test("with discard-secure, a discard flagged secure reaches the storage as a secure erase, and only that one")
    func secureDiscardReachesTheStorage() throws {
        let bed = try EngineBed(secureDiscard: true)
        bed.front.queue(BlkifDiscardRequest(flag: Blkif.discardSecure, id: 9, sectorNumber: 0, nrSectors: 8))
        bed.front.queue(BlkifDiscardRequest(flag: 0, id: 10, sectorNumber: 8, nrSectors: 8))
        bed.front.queue(BlkifDiscardRequest(flag: 0x80, id: 11, sectorNumber: 16, nrSectors: 8))   // another bit: not secure
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.disk.pending.map { [$0.operation.offset, $0.operation.length, $0.operation.secure ? 1 : 0] }
                == [[0, 4096, 1], [4096, 4096, 0], [8192, 4096, 0]])
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(9, BlkifOperation.discard), ok(10, BlkifOperation.discard),
                                          ok(11, BlkifOperation.discard)])
    }

    @Test("a storage error answers BLKIF_RSP_ERROR; a duplicate id in flight is refused alone")
    func errorsAndDuplicates() throws {
        let bed = try EngineBed()
        bed.front.queue(bed.request(BlkifOperation.write, id: 5, sector: 0, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 5, sector: 8, frame: 9))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [failed(5, BlkifOperation.write)])
        #expect(bed.disk.pending.count == 1)
        bed.disk.complete(0, errno: 5)
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [failed(5, BlkifOperation.write)])
        #expect(bed.engine.statistics.errors == 2 && bed.engine.statistics.requests == 2)
    }

    @Test("a req_prod more than a ring ahead breaks the ring: requests in flight are answered, then drained")
    func overflowBreaksTheRing() throws {
        let bed = try EngineBed()
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        bed.front.ring.publishRawRequestProducer(bed.front.requestProducer &+ 40)
        var s = bed.engine.step(.kicked)
        #expect(bed.engine.breach != nil)
        #expect(s.wait == .storage)
        bed.disk.completeAll()
        s = bed.engine.step(.storageReady)
        #expect(s.wait == .drained)
        #expect(bed.front.responses() == [ok(1, BlkifOperation.write)])
    }

    @Test("stop answers what is in flight and leaves the rest on the ring")
    func stopDrains() throws {
        let bed = try EngineBed()
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        bed.front.queue(bed.request(BlkifOperation.write, id: 2, sector: 8, frame: 9))
        bed.front.push()
        #expect(bed.engine.step(.stop).wait == .storage)
        bed.disk.completeAll()
        #expect(bed.engine.step(.storageReady) == VbdEngineStep(notify: true, wait: .drained))
        #expect(bed.front.responses() == [ok(1, BlkifOperation.write)])
        #expect(bed.disk.submittedOperations == 1)
    }
}

@Suite("blkback's engine: refused requests")
struct EngineRejectionTests {
    /// Online resize moves the end every request is checked against: the
    /// storage here holds 4096 sectors, the engine is told 2048, then 4096,
    /// then 2048 again.
    @Test("online resize: past the old end refused, served once the disk grew, refused again once it shrank")
    func resizeMovesTheEndOfTheDisk() throws {
        let bed = try EngineBed(sectors: 4096)
        bed.engine.resizeDisk(sectors: 2048)
        #expect(bed.engine.limits.sectors == 2048)
        bed.fill(frame: 8, with: 0x5A)
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 2048, frame: 8))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [failed(1, BlkifOperation.write)])
        #expect(bed.engine.statistics.rejected[.beyondEndOfDisk] == 1 && bed.disk.pending.isEmpty)

        bed.engine.resizeDisk(sectors: 4096)
        bed.front.queue(bed.request(BlkifOperation.write, id: 2, sector: 2048, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 3, sector: 4088, frame: 8))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(2, BlkifOperation.write), ok(3, BlkifOperation.write)])
        #expect(bed.diskBytes(bed.disk.written, sector: 4088, count: 8) == [UInt8](repeating: 0x5A, count: 4096))

        bed.engine.resizeDisk(sectors: 2048)
        bed.front.queue(bed.request(BlkifOperation.read, id: 4, sector: 2040, frame: 9))
        bed.front.queue(bed.request(BlkifOperation.read, id: 5, sector: 2044, frame: 9))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        // The last whole page inside is read; one crossing the new end is not.
        #expect(bed.front.responses().sorted { $0.id < $1.id } == [ok(4, BlkifOperation.read), failed(5, BlkifOperation.read)])
        #expect(bed.engine.statistics.rejected[.beyondEndOfDisk] == 2)
    }

    /// A clock the test moves: the engine reads it when a pass first takes a
    /// request and before it pushes responses.
    @Test("latency: each request carried out is timed from the pass that took it to the push of its answer; refusals are not")
    func latencyFromIntakeToPush() throws {
        let bed = try EngineBed()
        let now = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { now.deallocate() }
        now.pointee = 1_000_000_000
        bed.engine.clock = { now.pointee }
        bed.fill(frame: 8, with: 0x11)
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 2, sector: 8, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 3, sector: 1 << 40, frame: 8))   // refused
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [failed(3, BlkifOperation.write)])
        #expect(bed.engine.statistics.latency.count == 0, "a refusal is not timed")
        #expect(bed.engine.statistics.inFlight == 2, "two writes at the disk")
        now.pointee += 3_000_000   // the disk takes 3 ms
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        #expect(bed.front.responses() == [ok(1, BlkifOperation.write), ok(2, BlkifOperation.write)])
        #expect(bed.engine.statistics.inFlight == 0)
        var l = bed.engine.statistics.latency
        #expect(l.count == 2 && l[6] == 2, "2.5 ms < 3 ms <= 5 ms: bucket 6")
        #expect(l.sumNanoseconds == 6_000_000)

        bed.front.queue(bed.request(BlkifOperation.read, id: 4, sector: 0, frame: 9))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        now.pointee += 40_000
        bed.disk.completeAll()
        _ = bed.engine.step(.storageReady)
        l = bed.engine.statistics.latency
        #expect(l.count == 3 && l[0] == 1 && l[6] == 2 && l.sumNanoseconds == 6_040_000)
    }

    @Test("each refusal is counted by reason and kept for the log, with its id, operation and sector")
    func rejectionsCountedAndKept() throws {
        let bed = try EngineBed()
        bed.guest.revoke(bed.ref(9))
        bed.front.queue(BlkifRequest(operation: BlkifOperation.read, nrSegments: 12, id: 1, sectorNumber: 3))
        bed.front.queue(bed.request(BlkifOperation.write, id: 2, sector: 2048, frame: 8))
        bed.front.queue(bed.request(BlkifOperation.write, id: 3, sector: 16, frame: 9))
        bed.front.queue(BlkifRequest(operation: 77, id: 4, sectorNumber: 0))
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses() == [failed(1, BlkifOperation.read), failed(2, BlkifOperation.write),
                                          BlkifResponse(id: 4, operation: 77, status: BlkifStatus.notSupported),
                                          failed(3, BlkifOperation.write)])
        let r = bed.engine.statistics.rejected
        #expect(r[.badSegmentCount] == 1 && r[.beyondEndOfDisk] == 1 && r[.badGrant] == 1 && r[.unsupportedOperation] == 1)
        #expect(r.total == 4 && bed.engine.statistics.errors == 4)
        var kept: [VbdRejectedRequest] = []
        #expect(bed.engine.hasRejections)
        #expect(bed.engine.takeRejections { kept.append($0) } == 0)
        #expect(kept == [
            VbdRejectedRequest(reason: .badSegmentCount, id: 1, operation: BlkifOperation.read, sector: 3),
            VbdRejectedRequest(reason: .beyondEndOfDisk, id: 2, operation: BlkifOperation.write, sector: 2048),
            VbdRejectedRequest(reason: .unsupportedOperation, id: 4, operation: 77, sector: 0),
            VbdRejectedRequest(reason: .badGrant, id: 3, operation: BlkifOperation.write, sector: 16),
        ])
        #expect(!bed.engine.hasRejections)
    }

    @Test("a flood of refusals keeps the latest few and counts the rest")
    func rejectionLogIsBounded() throws {
        let bed = try EngineBed()
        for id in 0..<30 { bed.front.queue(BlkifRequest(operation: 99, id: UInt64(id), sectorNumber: 0)) }
        bed.front.push()
        _ = bed.engine.step(.kicked)
        #expect(bed.front.responses().count == 30)
        var kept = 0
        let unkept = bed.engine.takeRejections { _ in kept += 1 }
        #expect(kept == VbdEngine.rejectionLogCapacity && unkept == UInt64(30 - kept))
    }
}
