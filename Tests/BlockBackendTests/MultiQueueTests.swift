import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import Hypervisor
import LoopbackHost
import Testing
import XenABI
import XenBus

/// Multi-queue blkif (blkif.h's multi-queue-max-queues / multi-queue-num-queues):
/// one ring per queue, each served by its own data plane on its own
/// handle of the disk, with our blkfront driving each ring from a thread.
@Suite("multi-queue blkif")
struct MultiQueueTests {
    @Test("verified I/O on every ring at once, each ring's writes read back through ring 0 and found in the file",
          arguments: [1, 2, 4])
    func verifiedOnEveryRing(queues: Int) throws {
        let bed = try TestBed(options: .init(maxQueues: 4))
        defer { bed.close() }
        let (fe, disk) = try bed.guestWithDisk(1, megabytes: 32, ringPageOrder: 1, queues: queues)
        let store = bed.host.toolstack.store
        #expect(try store.read(fe.backendPath + "/multi-queue-max-queues") == "4")
        #expect(fe.queues.count == queues)
        // As Linux blkfront: the count and queue-N/ only with more than one ring.
        #expect(try store.read(fe.frontendPath + "/multi-queue-num-queues") == (queues > 1 ? "\(queues)" : nil))
        #expect(try store.read(fe.frontendPath + "/queue-0/event-channel") == (queues > 1 ? "\(fe.queues[0].port)" : nil))
        #expect(try bed.connectedBlockStatus().queues == queues)

        // Each ring on its own thread and its own quarter of the disk.
        let span = fe.info.sectors / UInt64(queues)
        let guests = fe.queues.enumerated().map { index, ring in
            BystanderGuest(ring: ring, disk: fe.info, firstSector: UInt64(index) * span, sectors: span,
                           seed: UInt64(40 + index), queueDepth: 16)
        }
        usleep(1_500_000)
        var total = 0
        for (index, guest) in guests.enumerated() {
            let (summary, failure) = guest.finish()
            #expect(failure == nil, "ring \(index)")
            #expect(summary.errors == 0 && summary.mismatches == 0, "ring \(index): \(summary)")
            #expect(summary.writes > 20 && summary.reads > 20, "ring \(index): \(summary)")
            total += summary.writes + summary.reads
        }
        // Every ring carried requests, as the backend counts them.
        let served = bed.host.blockStatus.first?.statistics.requests ?? 0
        #expect(served >= UInt64(total))

        // What rings 1... wrote, read through ring 0 and checked in the file.
        for index in 0..<queues {
            var w = VerifiedWorkload(sectors: span, firstSector: UInt64(index) * span, seed: UInt64(90 + index),
                                     queueDepth: 8, canDiscard: false, canFlush: true)
            _ = try w.run(on: fe.queues[index], seconds: 30, operations: 60)
            let back = try w.verifyAll(on: fe.queues[0], knownOnly: true)
            #expect(back.mismatches == 0 && back.verified > 0, "ring \(index)'s writes through ring 0")
            #expect(disk.expectHolds(w, sectors: fe.info.sectors, every: 7) > 0, "ring \(index)'s writes in the file")
        }
        try fe.disconnect()
        #expect(bed.backendState(fe) == .closed)
    }

    @Test("a frontend asking for more rings than offered gets what the backend offers; a backend offering one writes no key")
    func frontendGetsWhatIsOffered() throws {
        let bed = try TestBed(options: .init(maxQueues: 2))
        defer { bed.close() }
        let (fe, _) = try bed.guestWithDisk(1, queues: 4)
        #expect(fe.backendMaxQueues == 2)
        #expect(fe.queues.count == 2)
        #expect(try fe.queues[1].write(sector: 8, data: [UInt8](repeating: 0x5a, count: 512)) == BlkifStatus.okay)
        #expect(try fe.read(sector: 8, count: 1).data == [UInt8](repeating: 0x5a, count: 512))

        let single = try TestBed(options: .init(maxQueues: 1))
        defer { single.close() }
        let (one, _) = try single.guestWithDisk(2, queues: 4)
        #expect(try single.host.toolstack.store.read(one.backendPath + "/multi-queue-max-queues") == nil)
        #expect(one.queues.count == 1)
        #expect(try single.host.toolstack.store.read(one.frontendPath + "/multi-queue-num-queues") == nil)
    }

    /// Keys a frontend may get wrong; each refusal names what was wrong,
    /// and the next guest connects.
    @Test("bad multi-queue keys are refused with a reason, and other guests connect",
          arguments: [
            (["multi-queue-num-queues": "5"], "multi-queue-num-queues 5 is not within 1...4"),
            (["multi-queue-num-queues": "0"], "multi-queue-num-queues 0 is not within 1...4"),
            (["multi-queue-num-queues": "many"], "multi-queue-num-queues"),
            (["queue-1/event-channel": nil], "missing queue-1/event-channel"),
            (["queue-1/ring-ref": nil], "missing queue-1/ring-ref"),
          ] as [([String: String?], String)])
    func badKeysRefused(overrides: [String: String?], reason: String) throws {
        let bed = try TestBed(options: .init(maxQueues: 4))
        defer { bed.close() }
        let (fe, _) = try bed.guestWithAttachedDisk(1)
        fe.requestedQueues = 2
        fe.publishOverrides = overrides
        #expect(throws: FrontendError.self) { try fe.connect() }
        let error = try bed.host.toolstack.store.read(fe.backendPath + "/error")
        #expect(error?.contains(reason) == true, "error: \(error ?? "none")")
        fe.releaseResources()
        let (other, _) = try bed.guestWithDisk(2, queues: 2)
        #expect(try other.queues[1].read(sector: 0, count: 8).status == BlkifStatus.okay)
    }
}
