import EngineDoubles
import Glibc
import NetworkPlumbing
import Testing

@Suite("InMemoryInterfaces, the vif interface double")
struct InMemoryInterfacesTests {
    @Test("refuses what the kernel refuses: bad names, a taken name or a bridge's, TSO without csum, a queue attached twice")
    func refusals() throws {
        let factory = InMemoryInterfaces()
        for name in ["", "a b", "eth0/1", "vif%d", "sixteen-bytes-ab", ".."] {
            #expect(throws: NetworkError.self, "\(name)") { try factory.create(name: name, queues: 1) }
        }
        #expect(throws: NetworkError.alreadyExists("xenbr0")) { try factory.create(name: "xenbr0", queues: 1) }
        let vif = try factory.create(name: "vif1.0", queues: 2)
        #expect(throws: NetworkError.alreadyExists("vif1.0")) { try factory.create(name: "vif1.0", queues: 1) }
        #expect(throws: NetworkError.self) { try vif.setOffloads(csum: false, tso4: true, tso6: false) }
        #expect(throws: NetworkError.self) { try vif.setQueueAttached(1, true) }
        try vif.setQueueAttached(1, false)
        #expect(throws: NetworkError.self) { try vif.addToBridge("xenbr1") }
        try vif.addToBridge("xenbr0")
        #expect(throws: NetworkError.self) { try vif.setMTU(65536) }
        vif.close()
    }

    @Test("a queue keeps frame boundaries; close closes every socket and frees the name")
    func queuesAndClose() throws {
        let factory = InMemoryInterfaces()
        let vif = try factory.create(name: "vif1.0", queues: 2)
        #expect(factory.liveInterfaces == 1 && factory.openDescriptors == 4)
        let memory = try #require(factory.interface(named: "vif1.0"))
        #expect(memory.carrier && !memory.isUp && memory.attached == [true, true])

        let queue = vif.queue(1)
        #expect(queue.vnetHeaderSize == VirtioNetHeader.size)
        for frame in [[UInt8](repeating: 1, count: 60), [2, 3]] {
            var copy = frame
            let n = try copy.withUnsafeMutableBytes { raw in
                var v = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
                return try withUnsafePointer(to: &v) { try queue.write(UnsafeBufferPointer(start: $0, count: 1)) }
            }
            #expect(n == frame.count)
        }
        var buffer = [UInt8](repeating: 0, count: 128)
        #expect(buffer.withUnsafeMutableBytes { recv(memory.peer(1), $0.baseAddress, $0.count, 0) } == 60)
        #expect(buffer.withUnsafeMutableBytes { recv(memory.peer(1), $0.baseAddress, $0.count, 0) } == 2)
        #expect(try buffer.withUnsafeMutableBytes { try queue.read(into: $0) } == nil)

        vif.close()
        vif.close()
        #expect(factory.liveInterfaces == 0 && factory.openDescriptors == 0 && memory.isClosed)
        #expect(throws: NetworkError.self) { try vif.setCarrier(true) }
        _ = try factory.create(name: "vif1.0", queues: 1)
        #expect(factory.created == 2)
    }
}
