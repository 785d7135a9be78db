import BlockBackend
import BlockStorage
import EngineDoubles
import Hypervisor
import Testing
import XenABI

/// Found by the blkif fuzz target (kill -9, restart, a guest that broke
/// the ring meanwhile): requests replayed from the journal must start even
/// when the ring cannot be read any further.
@Suite("the ring journal's replay, on a ring the guest broke")
struct JournalReplayTests {
    @Test("an indirect request replayed after kill -9 runs and is answered though req_prod is now past a ring ahead")
    func replayedIndirectOnBrokenRing() throws {
        let bed = try EngineBed(maxIndirectSegments: 16)
        let memory = JournalMemory()
        let first = try bed.engine(journal: memory.journal(), recover: false)
        BlkifSegment(gref: bed.ref(8), firstSect: 0, lastSect: 7).encode(to: bed.guest.page(20))
        var refs = InlineArray<8, UInt32>(repeating: 0)
        refs[0] = bed.ref(20)
        bed.front.queue(BlkifIndirectRequest(indirectOp: BlkifOperation.write, nrSegments: 1, id: 1, sectorNumber: 0,
                                             indirectGrefs: refs))
        bed.front.push()
        _ = first.step(.kicked)
        #expect(bed.disk.pending.count == 1)
        bed.disk.dropPending()   // kill -9 before the write reached the disk
        bed.front.ring.publishRawRequestProducer(bed.front.requestProducer &+ 40)

        let second = try bed.engine(journal: memory.journal(), recover: true)
        #expect(second.requestsToReplay == 1)
        var s = second.step(.kicked)
        #expect(second.breach != nil)
        // It used to wait for storage with nothing in flight: never answered, never drained.
        #expect(s.wait == .storage && bed.disk.pending.count == 1)
        bed.disk.completeAll()
        s = second.step(.storageReady)
        #expect(s.wait == .drained)
        #expect(bed.front.responses() == [ok(1, BlkifOperation.write)])
    }
}
