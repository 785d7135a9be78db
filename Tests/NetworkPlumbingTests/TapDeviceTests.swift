import CXenBackSupport
import Glibc
import NetworkPlumbing
import SystemSupport
import Testing

@Suite struct TapDeviceTests {
    @Test func settingsCarrierAndBridgePort() throws {
        try withNetworkNamespace { ns in
            let tap = try ns.run { try TapDevice.create(name: "vif1.0") }
            defer { tap.close() }
            #expect(tap.queueCount == 1)
            #expect(tap.vnetHeaderSize == 12)
            let flags = try tap.interfaceFlags()
            #expect(flags & xb_IFF_TAP != 0)
            #expect(flags & xb_IFF_NO_PI != 0)
            #expect(flags & xb_IFF_VNET_HDR != 0)
            #expect(flags & xb_IFF_MULTI_QUEUE == 0)
            let fd = tap.queueFileDescriptors[0]
            #expect(fcntl(fd, F_GETFL) & O_NONBLOCK != 0)
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
            var size: Int32 = 0
            #expect(xb_ioctl_pointer(fd, xb_TUNGETVNETHDRSZ, &size) == 0)
            #expect(size == 12)

            let mac: [UInt8] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]
            let (readMAC, mtus, up) = try ns.run { () throws -> ([UInt8], [Int], Bool) in
                try NetworkInterface.setMAC(mac, name: "vif1.0")
                let before = try NetworkInterface.mtu(of: "vif1.0")
                try NetworkInterface.setMTU(9000, name: "vif1.0")
                let after = try NetworkInterface.mtu(of: "vif1.0")
                let wasUp = try NetworkInterface.isUp("vif1.0")
                try NetworkInterface.setUp(true, name: "vif1.0")
                let nowUp = try NetworkInterface.isUp("vif1.0")
                return (try NetworkInterface.mac(of: "vif1.0"), [before, after], !wasUp && nowUp)
            }
            #expect(readMAC == mac)
            #expect(mtus == [1500, 9000])
            #expect(up)
            #expect(throws: NetworkError.self) { try ns.run { try NetworkInterface.setMAC([1, 2, 3], name: "vif1.0") } }

            // Carrier, seen in the namespace's sysfs and through rtnetlink.
            let carrier = try ns.run { () throws -> [String] in
                var seen: [String] = []
                for state in [false, true, false] {
                    try tap.setCarrier(state)
                    seen.append(try readSmallFile("/sys/class/net/vif1.0/carrier")
                        + (try NetworkInterface.hasCarrier("vif1.0") ? "+" : "-"))
                }
                return seen
            }
            #expect(carrier == ["0-", "1+", "0-"])

            // What `ip` sees from outside the namespace.
            let shown = try ip(["-n", ns.namespace, "-o", "link", "show", "vif1.0"])
            #expect(shown.contains("mtu 9000"))
            #expect(shown.contains("link/ether fe:ff:ff:ff:ff:ff"))
            #expect(shown.contains("NO-CARRIER"))
            #expect(shown.contains(",UP"))

            // A bridge port and back.
            let (master, sysfsMaster, ipShown, afterRemoval, removedLink) = try ns.run {
                () throws -> (String?, String?, String, String?, String?) in
                try NetworkInterface.createBridge("xbr0")
                try NetworkInterface.addToBridge(interface: "vif1.0", bridge: "xbr0")
                let master = try NetworkInterface.master(of: "vif1.0")
                let link = readLink("/sys/class/net/vif1.0/master")
                let shown = try ip(["-o", "link", "show", "vif1.0"])   // a child of this thread: same namespace
                try NetworkInterface.removeFromBridge(interface: "vif1.0", bridge: "xbr0")
                let after = try NetworkInterface.master(of: "vif1.0")
                let removedLink = readLink("/sys/class/net/vif1.0/master")
                try NetworkInterface.deleteBridge("xbr0")
                return (master, link, shown, after, removedLink)
            }
            #expect(master == "xbr0")
            #expect(sysfsMaster?.hasSuffix("/xbr0") == true)
            #expect(ipShown.contains("master xbr0"))
            #expect(afterRemoval == nil)
            #expect(removedLink == nil)
            #expect(try ns.run { try NetworkInterface.exists("xbr0") } == false)

            // Offloads: what the kernel may hand us.
            try tap.setOffloads(csum: true, tso4: true, tso6: true)
            try tap.setOffloads(csum: false, tso4: false, tso6: false)
            #expect(throws: NetworkError.invalidArgument("TSO offloads need checksum offload")) {
                try tap.setOffloads(csum: false, tso4: true, tso6: false)
            }
        }
    }

    @Test func errorsNameTheCallAndErrno() throws {
        try withNetworkNamespace { ns in
            do {
                try ns.run { try NetworkInterface.setMTU(9000, name: "vif9.9") }
                Issue.record("setMTU on a missing interface succeeded")
            } catch let error as NetworkError {
                #expect(error == .system(call: "SIOCSIFMTU", interface: "vif9.9", errno: ENODEV))
                #expect("\(error)" == "SIOCSIFMTU (vif9.9): No such device (errno 19)")
            }
            #expect(try ns.run { try NetworkInterface.exists("vif9.9") } == false)
            #expect(try ns.run { try NetworkInterface.master(of: "lo") } == nil)
            // Someone else's interface of that name is never adopted.
            let tap = try ns.run { try TapDevice.create(name: "vif2.0") }
            defer { tap.close() }
            #expect(throws: NetworkError.alreadyExists("vif2.0")) { try ns.run { try TapDevice.create(name: "vif2.0") } }
            try ns.run { try NetworkInterface.createBridge("xbr1") }
            #expect(throws: NetworkError.alreadyExists("xbr1")) { try ns.run { try TapDevice.create(name: "xbr1") } }
        }
    }

    @Test func closingRemovesTheInterface() throws {
        try withNetworkNamespace { ns in
            let exists = try ns.run { () throws -> [Bool] in
                try NetworkInterface.createBridge("xbr0")
                let tap = try TapDevice.create(name: "vif7.0", queues: 2)
                try NetworkInterface.addToBridge(interface: "vif7.0", bridge: "xbr0")
                let before = try NetworkInterface.exists("vif7.0")
                tap.close()
                tap.close()   // idempotent
                let after = try NetworkInterface.exists("vif7.0")
                // Dropping the last reference closes too.
                do { _ = try TapDevice.create(name: "vif8.0") }
                let dropped = try NetworkInterface.exists("vif8.0")
                // The name is free again.
                let again = try TapDevice.create(name: "vif7.0")
                defer { again.close() }
                return [before, after, dropped, try NetworkInterface.exists("vif7.0")]
            }
            #expect(exists == [true, false, false, true])
            #expect(try ip(["-n", ns.namespace, "-o", "link", "show", "master", "xbr0"]).isEmpty)
        }
    }
}
