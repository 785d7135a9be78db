import CXenBackSupport
import Glibc
import NetworkPlumbing
import SystemSupport
import Testing

@Suite struct FrameTests {
    /// Two TAPs on a bridge, inside a namespace; returns them up and enslaved.
    private func bridgedPair(_ ns: NamespaceThread, queuesOfSecond: Int = 1) throws -> (TapDevice, TapDevice) {
        try ns.run { () throws -> (TapDevice, TapDevice) in
            try NetworkInterface.createBridge("xbr0")
            let a = try TapDevice.create(name: "vif1.0")
            let b = try TapDevice.create(name: "vif2.0", queues: queuesOfSecond)
            for name in ["vif1.0", "vif2.0"] {
                try NetworkInterface.addToBridge(interface: name, bridge: "xbr0")
                try NetworkInterface.setUp(true, name: name)
            }
            try NetworkInterface.setUp(true, name: "xbr0")
            return (a, b)
        }
    }

    @Test func frameCrossesTheBridgeByteForByte() throws {
        try withNetworkNamespace { ns in
            let (a, b) = try bridgedPair(ns)
            defer { a.close(); b.close() }
            let header = VirtioNetHeader()   // no checksum to do, no GSO
            let frame = broadcastFrame(source: [0x02, 0, 0, 0, 0, 1], payload: (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            // Header and two fragments gathered by one writev.
            let written = try header.bytes.withUnsafeBytes { h in
                try frame.withUnsafeBytes { f in
                    try a.write(h, UnsafeRawBufferPointer(rebasing: f[0..<100]), UnsafeRawBufferPointer(rebasing: f[100...]))
                }
            }
            #expect(written == VirtioNetHeader.size + frame.count)
            let received = try receiveFrame(on: [b.queue(0)]) { isTestFrame($0) }
            let got = try #require(received)
            #expect(Array(got.frame[VirtioNetHeader.size...]) == frame)
            let gotHeader = try #require(got.frame.withUnsafeBytes { VirtioNetHeader(bytes: $0) })
            #expect(gotHeader.gsoType == VirtioNetHeader.gsoNone)
            #expect(gotHeader.flags & VirtioNetHeader.flagNeedsChecksum == 0)
            #expect(gotHeader.numBuffers == 0)

            // And back, read with readv into a header and a frame buffer.
            let reply = broadcastFrame(source: [0x02, 0, 0, 0, 0, 2], payload: Array(repeating: 0x5a, count: 46))
            try header.bytes.withUnsafeBytes { h in
                try reply.withUnsafeBytes { f in _ = try b.write(h, f) }
            }
            var headerBytes = [UInt8](repeating: 0xff, count: VirtioNetHeader.size)
            var frameBytes = [UInt8](repeating: 0, count: 2048)
            let deadline = MonotonicClock.seconds() + 5
            var length: Int?
            while MonotonicClock.seconds() < deadline {
                var pfd = pollfd(fd: a.queueFileDescriptors[0], events: Int16(POLLIN), revents: 0)
                _ = poll(&pfd, 1, 100)
                let n = try headerBytes.withUnsafeMutableBytes { h in
                    try frameBytes.withUnsafeMutableBytes { f in
                        let vectors = [iovec(iov_base: h.baseAddress, iov_len: h.count), iovec(iov_base: f.baseAddress, iov_len: f.count)]
                        return try vectors.withUnsafeBufferPointer { try a.queue(0).read($0) }
                    }
                }
                if let n, frameBytes[12] == 0x88, frameBytes[13] == 0xb5 { length = n; break }
            }
            let n = try #require(length)
            #expect(n == VirtioNetHeader.size + reply.count)
            #expect(Array(frameBytes[0..<reply.count]) == reply)
            #expect(headerBytes.withUnsafeBytes { VirtioNetHeader(bytes: $0) } == VirtioNetHeader())
        }
    }

    @Test func carrierDownStopsForwarding() throws {
        try withNetworkNamespace { ns in
            let (a, b) = try bridgedPair(ns)
            defer { a.close(); b.close() }
            // The carrier changes at once (IFLA_CARRIER, sysfs), but the bridge
            // port follows through the kernel's linkwatch work, asynchronously
            // (measured below): until then frames still go to the port.
            try b.setCarrier(false)
            #expect(try ns.run { try NetworkInterface.hasCarrier("vif2.0") } == false)
            let disabledAfter = try waitForPortState("vif2.0", "0", in: ns)
            let frame = broadcastFrame(source: [0x02, 0, 0, 0, 0, 3], payload: Array(repeating: 1, count: 50))
            try VirtioNetHeader().bytes.withUnsafeBytes { h in try frame.withUnsafeBytes { f in _ = try a.write(h, f) } }
            #expect(try receiveFrame(on: [b.queue(0)], timeout: 0.5) { isTestFrame($0) } == nil)
            try b.setCarrier(true)
            let forwardingAfter = try waitForPortState("vif2.0", "3", in: ns)
            print("bridge port disabled \(disabledAfter) ms after carrier off, forwarding \(forwardingAfter) ms after carrier on")
            try VirtioNetHeader().bytes.withUnsafeBytes { h in try frame.withUnsafeBytes { f in _ = try a.write(h, f) } }
            #expect(try receiveFrame(on: [b.queue(0)]) { isTestFrame($0) } != nil)
        }
    }

    @Test func multiQueueTap() throws {
        try withNetworkNamespace { ns in
            let (a, b) = try bridgedPair(ns, queuesOfSecond: 2)
            defer { a.close(); b.close() }
            #expect(b.queueCount == 2)
            let fds = b.queueFileDescriptors
            #expect(fds.count == 2 && fds[0] != fds[1])
            for q in 0..<2 { #expect(try b.interfaceFlags(queue: q) & xb_IFF_MULTI_QUEUE != 0) }

            // Frames written into either queue reach the other TAP.
            for q in 0..<2 {
                let frame = broadcastFrame(source: [0x02, 0, 0, 0, 1, UInt8(q)], payload: Array(repeating: UInt8(q), count: 60))
                try VirtioNetHeader().bytes.withUnsafeBytes { h in try frame.withUnsafeBytes { f in _ = try b.write(queue: q, h, f) } }
                let got = try #require(try receiveFrame(on: [a.queue(0)]) { isTestFrame($0) && $0[VirtioNetHeader.size + 11] == UInt8(q) })
                #expect(Array(got.frame[VirtioNetHeader.size...]) == frame)
            }
            // Frames towards it arrive, each on one of its queues, every one exactly once.
            let count = 64
            for i in 0..<count {
                // Varying source MAC and payload so the flow hash spreads them.
                let frame = broadcastFrame(source: [0x02, 0, 0, 0, 2, UInt8(i)], payload: [UInt8(i)] + Array(repeating: 0, count: 59))
                try VirtioNetHeader().bytes.withUnsafeBytes { h in try frame.withUnsafeBytes { f in _ = try a.write(h, f) } }
            }
            var seen = Set<UInt8>()
            var perQueue = [0, 0]
            while seen.count < count {
                guard let got = try receiveFrame(on: [b.queue(0), b.queue(1)], where: { isTestFrame($0) && $0[VirtioNetHeader.size + 10] == 2 }) else { break }
                #expect(seen.insert(got.frame[VirtioNetHeader.size + 11]).inserted)
                perQueue[got.queue] += 1
            }
            #expect(seen.count == count)
            #expect(perQueue.reduce(0, +) == count)
        }
    }
}

/// Waits (up to 5 s) until the bridge port's STP state in sysfs is `state`
/// (0 disabled, 3 forwarding); returns how long that took in milliseconds.
func waitForPortState(_ port: String, _ state: String, in ns: NamespaceThread) throws -> Int {
    try ns.run { () throws -> Int in
        let start = MonotonicClock.nanoseconds()
        while try readSmallFile("/sys/class/net/\(port)/brport/state") != state {
            guard MonotonicClock.nanoseconds() - start < 5_000_000_000 else {
                throw CommandFailed(description: "bridge port \(port) never reached state \(state)")
            }
            usleep(5000)
        }
        return (MonotonicClock.nanoseconds() - start) / 1_000_000
    }
}
