import CXenBackSupport
import Glibc
import SystemSupport

/// Interface settings and bridge ports, through ioctls on a datagram socket
/// and rtnetlink: never by running `ip` or `brctl`.
///
/// Every call opens its own short-lived socket, so it acts on the network
/// namespace of the calling *thread* (a thread that entered another namespace
/// with `NetworkNamespace.enter` works inside that one). These are control
/// plane calls; none of them is on a frame's path.
public enum NetworkInterface {
    // MARK: - Reading

    /// The interface's index (SIOCGIFINDEX).
    public static func index(of name: String) throws(NetworkError) -> Int32 {
        var request = try interfaceRequest(name)
        try controlIoctl(xb_SIOCGIFINDEX, &request, call: "SIOCGIFINDEX", interface: name)
        return request.ifr_ifru.ifru_ivalue
    }

    /// The name of the interface with index `index` (SIOCGIFNAME).
    public static func name(ofIndex index: Int32) throws(NetworkError) -> String {
        var request = ifreq()
        request.ifr_ifru.ifru_ivalue = index
        try controlIoctl(xb_SIOCGIFNAME, &request, call: "SIOCGIFNAME", interface: "index \(index)")
        return interfaceName(of: request)
    }

    /// True if an interface of that name exists in the calling thread's namespace.
    public static func exists(_ name: String) throws(NetworkError) -> Bool {
        do {
            _ = try index(of: name)
            return true
        } catch let error {
            if error.errno == ENODEV { return false }
            throw error
        }
    }

    public static func mtu(of name: String) throws(NetworkError) -> Int {
        var request = try interfaceRequest(name)
        try controlIoctl(xb_SIOCGIFMTU, &request, call: "SIOCGIFMTU", interface: name)
        return Int(request.ifr_ifru.ifru_mtu)
    }

    /// The hardware address (SIOCGIFHWADDR), 6 bytes for Ethernet.
    public static func mac(of name: String) throws(NetworkError) -> [UInt8] {
        var request = try interfaceRequest(name)
        try controlIoctl(xb_SIOCGIFHWADDR, &request, call: "SIOCGIFHWADDR", interface: name)
        return withUnsafeBytes(of: request.ifr_ifru.ifru_hwaddr.sa_data) { Array($0.prefix(6)) }
    }

    /// IFF_UP (administratively up).
    public static func isUp(_ name: String) throws(NetworkError) -> Bool {
        try flags(of: name) & xb_IFF_UP != 0
    }

    /// The bridge (or other master) `name` is a port of, nil if none
    /// (IFLA_MASTER from rtnetlink; /sys/class/net/IF/master shows the
    /// namespace sysfs was mounted in, not the caller's).
    public static func master(of name: String) throws(NetworkError) -> String? {
        guard let masterIndex = try linkState(of: name).masterIndex else { return nil }
        return try self.name(ofIndex: masterIndex)
    }

    /// IFLA_CARRIER: whether the link has carrier (a TAP: attached and
    /// `setCarrier(true)`).
    public static func hasCarrier(_ name: String) throws(NetworkError) -> Bool {
        guard let carrier = try linkState(of: name).carrier else {
            throw .badNetlinkReply("no IFLA_CARRIER for \(name)")
        }
        return carrier
    }

    // MARK: - Changing

    /// SIOCSIFHWADDR with an Ethernet address (exactly 6 bytes).
    public static func setMAC(_ mac: [UInt8], name: String) throws(NetworkError) {
        guard mac.count == 6 else { throw .invalidArgument("a MAC address has 6 bytes, got \(mac.count)") }
        var request = try interfaceRequest(name)
        request.ifr_ifru.ifru_hwaddr.sa_family = sa_family_t(xb_ARPHRD_ETHER)
        withUnsafeMutableBytes(of: &request.ifr_ifru.ifru_hwaddr.sa_data) { raw in
            for i in 0..<6 { raw[i] = mac[i] }
        }
        try controlIoctl(xb_SIOCSIFHWADDR, &request, call: "SIOCSIFHWADDR", interface: name)
    }

    /// SIOCSIFMTU. The kernel checks the device's range (a TAP: 68...65535;
    /// a bridge port may not exceed what the bridge allows).
    public static func setMTU(_ mtu: Int, name: String) throws(NetworkError) {
        guard mtu > 0, mtu <= Int(Int32.max) else { throw .invalidArgument("MTU \(mtu)") }
        var request = try interfaceRequest(name)
        request.ifr_ifru.ifru_mtu = Int32(mtu)
        try controlIoctl(xb_SIOCSIFMTU, &request, call: "SIOCSIFMTU", interface: name)
    }

    /// Sets or clears IFF_UP (SIOCGIFFLAGS, then SIOCSIFFLAGS).
    public static func setUp(_ up: Bool, name: String) throws(NetworkError) {
        var request = try interfaceRequest(name)
        try controlIoctl(xb_SIOCGIFFLAGS, &request, call: "SIOCGIFFLAGS", interface: name)
        let old = request.ifr_ifru.ifru_flags
        let new = up ? old | xb_IFF_UP : old & ~xb_IFF_UP
        if new == old { return }
        request.ifr_ifru.ifru_flags = new
        try controlIoctl(xb_SIOCSIFFLAGS, &request, call: "SIOCSIFFLAGS", interface: name)
    }

    // MARK: - Bridges

    /// Makes `interface` a port of `bridge` (SIOCBRADDIF with its index).
    public static func addToBridge(interface: String, bridge: String) throws(NetworkError) {
        try bridgePort(xb_SIOCBRADDIF, call: "SIOCBRADDIF", interface: interface, bridge: bridge)
    }

    /// Removes `interface` from `bridge` (SIOCBRDELIF with its index).
    public static func removeFromBridge(interface: String, bridge: String) throws(NetworkError) {
        try bridgePort(xb_SIOCBRDELIF, call: "SIOCBRDELIF", interface: interface, bridge: bridge)
    }

    /// Creates a bridge (SIOCBRADDBR), down, STP off: ports forward as soon
    /// as they and the bridge are up. For tests and the demo: on a Xen host
    /// the bridge (xenbr0) is the administrator's.
    public static func createBridge(_ name: String) throws(NetworkError) {
        try bridgeByName(xb_SIOCBRADDBR, call: "SIOCBRADDBR", name: name)
    }

    /// Deletes a bridge (SIOCBRDELBR); the kernel refuses (EBUSY) while it is up.
    public static func deleteBridge(_ name: String) throws(NetworkError) {
        try bridgeByName(xb_SIOCBRDELBR, call: "SIOCBRDELBR", name: name)
    }

    // MARK: - rtnetlink

    /// What RTM_GETLINK says about one interface.
    public struct LinkState: Equatable, Sendable {
        public var index: Int32
        /// ifi_flags: the full 32 bits (IFF_LOWER_UP included, which
        /// SIOCGIFFLAGS's 16-bit field cannot carry).
        public var flags: UInt32
        public var mtu: Int?
        public var masterIndex: Int32?
        public var carrier: Bool?
        /// IF_OPER_* (6 = up, 2 = down, 7 = dormant).
        public var operState: UInt8?
    }

    /// RTM_GETLINK for `name` in the calling thread's namespace.
    public static func linkState(of name: String) throws(NetworkError) -> LinkState {
        let ifindex = try index(of: name)
        let fd = try networkCall("socket(AF_NETLINK)", interface: name) {
            socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), xb_NETLINK_ROUTE)
        }
        defer { Glibc.close(fd) }

        let headerSize = Int(xb_sizeof_nlmsghdr)          // 16
        let infoSize = Int(xb_sizeof_ifinfomsg)           // 16
        let requestSize = headerSize + infoSize
        let sequence: UInt32 = 1
        var request = [UInt8](repeating: 0, count: requestSize)
        request.withUnsafeMutableBytes { raw in
            // struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
            raw.storeBytes(of: UInt32(requestSize), toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: xb_RTM_GETLINK, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: xb_NLM_F_REQUEST, toByteOffset: 6, as: UInt16.self)
            raw.storeBytes(of: sequence, toByteOffset: 8, as: UInt32.self)
            // struct ifinfomsg { u8 family; u8 pad; u16 type; i32 index; u32 flags; u32 change; }
            raw.storeBytes(of: UInt8(AF_UNSPEC), toByteOffset: headerSize, as: UInt8.self)
            raw.storeBytes(of: ifindex, toByteOffset: headerSize + 4, as: Int32.self)
        }
        let sent = request.withUnsafeBytes { raw in
            Result { () throws(SystemError) in try Syscall.send(fd, raw.baseAddress, raw.count) }
        }
        switch sent {
        case .success(let count) where count == requestSize: break
        case .success: throw .system(call: "send(RTM_GETLINK)", interface: name, errno: EMSGSIZE)
        case .failure(let error): throw .system(call: "send(RTM_GETLINK)", interface: name, errno: error.code)
        }

        return try withUnsafeTemporaryAllocation(byteCount: 32768, alignment: 8) { (buffer) throws(NetworkError) -> LinkState in
            let received: Int
            do throws(SystemError) {
                received = try Syscall.recv(fd, buffer.baseAddress, buffer.count)
            } catch {
                throw .system(call: "recv(RTM_GETLINK)", interface: name, errno: error.code)
            }
            let raw = UnsafeRawBufferPointer(buffer)
            var offset = 0
            while offset + headerSize <= received {
                let length = Int(raw.load(fromByteOffset: offset, as: UInt32.self))
                let type = raw.load(fromByteOffset: offset + 4, as: UInt16.self)
                guard length >= headerSize, offset + length <= received else {
                    throw .badNetlinkReply("message of \(length) bytes at \(offset) in \(received)")
                }
                if type == xb_NLMSG_ERROR {
                    let code = raw.load(fromByteOffset: offset + headerSize, as: Int32.self)
                    throw .system(call: "RTM_GETLINK", interface: name, errno: -code)
                }
                if type == xb_RTM_NEWLINK {
                    guard length >= headerSize + infoSize else { throw .badNetlinkReply("short RTM_NEWLINK") }
                    var state = LinkState(
                        index: raw.load(fromByteOffset: offset + headerSize + 4, as: Int32.self),
                        flags: raw.load(fromByteOffset: offset + headerSize + 8, as: UInt32.self))
                    var attribute = offset + headerSize + infoSize
                    let end = offset + length
                    while attribute + 4 <= end {
                        // struct rtattr { u16 len; u16 type; } + payload, 4-aligned
                        let attributeLength = Int(raw.load(fromByteOffset: attribute, as: UInt16.self))
                        let attributeType = raw.load(fromByteOffset: attribute + 2, as: UInt16.self) & 0x3fff
                        guard attributeLength >= 4, attribute + attributeLength <= end else { break }
                        let payload = attribute + 4
                        let payloadLength = attributeLength - 4
                        switch attributeType {
                        case xb_IFLA_MTU where payloadLength >= 4:
                            state.mtu = Int(raw.load(fromByteOffset: payload, as: UInt32.self))
                        case xb_IFLA_MASTER where payloadLength >= 4:
                            state.masterIndex = raw.load(fromByteOffset: payload, as: Int32.self)
                        case xb_IFLA_CARRIER where payloadLength >= 1:
                            state.carrier = raw[payload] != 0
                        case xb_IFLA_OPERSTATE where payloadLength >= 1:
                            state.operState = raw[payload]
                        default:
                            break
                        }
                        attribute += (attributeLength + 3) & ~3
                    }
                    return state
                }
                offset += (length + 3) & ~3
            }
            throw .badNetlinkReply("no RTM_NEWLINK for \(name)")
        }
    }

    // MARK: - The ioctl, wrapped once

    /// Runs one interface ioctl on a fresh AF_UNIX datagram socket (any
    /// socket reaches dev_ioctl and the bridge ioctls; AF_UNIX works in a
    /// namespace without IPv4 too).
    private static func controlIoctl(_ request: UInt, _ argument: UnsafeMutableRawPointer, call: String,
                                     interface: String) throws(NetworkError) {
        let fd = try networkCall("socket(AF_UNIX)", interface: interface) {
            socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        defer { Glibc.close(fd) }
        _ = try networkCall(call, interface: interface) { xb_ioctl_pointer(fd, request, argument) }
    }

    private static func flags(of name: String) throws(NetworkError) -> Int16 {
        var request = try interfaceRequest(name)
        try controlIoctl(xb_SIOCGIFFLAGS, &request, call: "SIOCGIFFLAGS", interface: name)
        return request.ifr_ifru.ifru_flags
    }

    private static func bridgePort(_ ioctl: UInt, call: String, interface: String, bridge: String) throws(NetworkError) {
        let portIndex = try index(of: interface)
        var request = try interfaceRequest(bridge)
        request.ifr_ifru.ifru_ivalue = portIndex
        try controlIoctl(ioctl, &request, call: call, interface: "\(interface) on bridge \(bridge)")
    }

    private static func bridgeByName(_ ioctl: UInt, call: String, name: String) throws(NetworkError) {
        try InterfaceName.validate(name)
        try withUnsafeTemporaryAllocation(byteCount: Int(xb_IFNAMSIZ), alignment: 1) { (raw) throws(NetworkError) in
            raw.initializeMemory(as: UInt8.self, repeating: 0)
            for (i, byte) in name.utf8.enumerated() { raw[i] = byte }
            try controlIoctl(ioctl, raw.baseAddress!, call: call, interface: name)
        }
    }
}

/// An `ifreq` with `ifr_name` set to a validated `name`.
func interfaceRequest(_ name: String) throws(NetworkError) -> ifreq {
    try InterfaceName.validate(name)
    var request = ifreq()
    withUnsafeMutableBytes(of: &request.ifr_ifrn.ifrn_name) { raw in
        for (i, byte) in name.utf8.enumerated() { raw[i] = byte }
    }
    return request
}

/// `ifr_name` of an `ifreq` (the kernel NUL-terminates it).
func interfaceName(of request: ifreq) -> String {
    withUnsafeBytes(of: request.ifr_ifrn.ifrn_name) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
    }
}
