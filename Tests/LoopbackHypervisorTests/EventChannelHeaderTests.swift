@testable import LoopbackHypervisor
import Testing

@Suite("loopback event channels: the table's header")
struct EventChannelHeaderTests {
    /// What a second opener sees at every step of the first one's
    /// formatting: while the number of ports is 0 it waits; once it is not,
    /// the version and the next-handle counter must already be there, or
    /// its first fetch-add takes handle 0 and the formatter's store of 1
    /// then hands the same handle out again.
    @Test("the number of ports is published last, after the version and the next-handle counter")
    func portCountLast() {
        let header = UnsafeMutableRawPointer.allocate(byteCount: EventChannelTable.headerSize, alignment: 8)
        defer { header.deallocate() }
        header.initializeMemory(as: UInt8.self, repeating: 0, count: EventChannelTable.headerSize)
        header.storeBytes(of: EventChannelTable.magic, as: UInt32.self)   // claimed (one thread here: plain accesses)
        var views: [(ports: UInt32, version: UInt32, nextHandle: UInt32)] = []
        EventChannelTable.formatHeader(header) {
            func field(_ offset: Int) -> UInt32 { header.load(fromByteOffset: offset, as: UInt32.self) }
            views.append((field(8), field(4), field(12)))
        }
        #expect(views.map(\.ports) == [0, 0, EventChannelTable.defaultPortCount])
        for v in views where v.ports != 0 {
            #expect(v.version == EventChannelTable.version && v.nextHandle == 1)
        }
    }
}
