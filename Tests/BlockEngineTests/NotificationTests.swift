import BlockBackend
import EngineDoubles
import Testing
import XenABI
import XenRing

/// blkif's event suppression (ring.h): the backend notifies only when the
/// frontend's rsp_event says it waits for a response the pass published,
/// once per pass however many it published; and it asks for a
/// notification (req_event) only when it goes idle.
@Suite("blkback's notifications")
struct NotificationTests {
    private func setResponseEvent(_ bed: EngineBed, _ value: UInt32) {
        bed.front.ringAddress.storeBytes(of: value, toByteOffset: SharedRingLayout.Offset.rspEvent, as: UInt32.self)
    }

    @Test("no notify to a frontend that did not ask; one per pass to one that did, whatever the pass answered")
    func notifiesOnlyWhenAsked() throws {
        let bed = try EngineBed()
        for i in 0..<4 { bed.front.queue(bed.request(BlkifOperation.write, id: UInt64(i), sector: UInt64(i) * 64, frame: 8 + i)) }
        bed.front.push()
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.disk.pending.count == 4)   // apart on the disk: not merged
        // A frontend that polls its ring: it asks for no event yet.
        setResponseEvent(bed, bed.front.responseProducer &+ 100)
        bed.disk.completeAll()
        let quiet = bed.engine.step(.storageReady)
        #expect(!quiet.notify, "the frontend asked for no event")
        #expect(bed.front.responses().count == 4)

        // It waits for the next response now: four answers, one event.
        setResponseEvent(bed, bed.front.responseProducer &+ 1)
        for i in 0..<4 { bed.front.queue(bed.request(BlkifOperation.read, id: UInt64(10 + i), sector: UInt64(i) * 64, frame: 12 + i)) }
        bed.front.push()
        _ = bed.engine.step(.kicked)
        bed.disk.completeAll()
        let asked = bed.engine.step(.storageReady)
        #expect(asked.notify)
        #expect(bed.front.responses().count == 4)
        // Nothing more published: no second event.
        #expect(!bed.engine.step(.kicked).notify)
    }

    @Test("req_event is re-armed only when the ring goes idle, not while requests keep coming")
    func requestEventOnlyWhenIdle() throws {
        let bed = try EngineBed()
        let before = bed.front.requestEvent
        bed.front.queue(bed.request(BlkifOperation.write, id: 1, sector: 0, frame: 8))
        bed.front.push()
        // A step that may poll next leaves req_event alone: the frontend's
        // next request then costs it no notification.
        let polling = bed.engine.step(.kicked, armIfIdle: false)
        #expect(polling.wait == .ringEmpty)
        #expect(bed.front.requestEvent == before)
        let armed = bed.engine.step(.kicked, armIfIdle: true)
        #expect(armed.wait == .idle)
        #expect(bed.front.requestEvent == bed.front.requestProducer &+ 1)
    }

    @Test("storage that finished inside submit has its completion signal reset before the loop sleeps, and never with I/O in flight")
    func completionSignalResetBeforeSleeping() throws {
        let bed = try EngineBed()
        // Finished inside submit (tmpfs, a RAM disk): reaped by the pass's
        // poll, so the signal it left is reset once, before going idle.
        bed.disk.completesAtOnce = true
        for i in 0..<3 { bed.front.queue(bed.request(BlkifOperation.write, id: UInt64(i), sector: UInt64(i) * 64, frame: 8 + i)) }
        bed.front.push()
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.front.responses() == (0..<3).map { ok(UInt64($0), BlkifOperation.write) })
        #expect(bed.disk.completionSignalResets == 1)
        // Nothing reaped since: no further reset.
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.disk.completionSignalResets == 1)

        // Finished later and reported by the loop: that reap reset it.
        bed.disk.completesAtOnce = false
        bed.front.queue(bed.request(BlkifOperation.read, id: 9, sector: 0, frame: 12))
        bed.front.push()
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.disk.pending.count == 1)
        bed.disk.completeAll()
        #expect(bed.engine.step(.storageReady).wait == .idle)
        #expect(bed.front.responses() == [ok(9, BlkifOperation.read)])
        #expect(bed.disk.completionSignalResets == 1)

        // Reaped by a poll while another operation is still in flight: not
        // reset then (its completion would be lost), only once both are done.
        for (id, sector) in [(10, 256), (11, 512)] {
            bed.front.queue(bed.request(BlkifOperation.write, id: UInt64(id), sector: UInt64(sector), frame: 13))
        }
        bed.front.push()
        #expect(bed.engine.step(.kicked, armIfIdle: false).wait == .ringEmpty)
        #expect(bed.disk.pending.count == 2)
        bed.disk.complete(0)
        #expect(bed.engine.hasWork())
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.disk.completionSignalResets == 1)
        bed.disk.complete(0)
        #expect(bed.engine.hasWork())
        #expect(bed.engine.step(.kicked).wait == .idle)
        #expect(bed.front.responses() == [ok(10, BlkifOperation.write), ok(11, BlkifOperation.write)])
        #expect(bed.disk.completionSignalResets == 2)
        #expect(bed.disk.completionSignalResetsInFlight == 0)
    }
}
