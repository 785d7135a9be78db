// netif.h's control ring (feature-ctrl-ring): the messages a frontend sends
// to set up receive-side hashing, and the hash types and algorithms they name.

public enum NetifCtrlType {
    public static let invalid: UInt16 = 0
    public static let getHashFlags: UInt16 = 1
    public static let setHashFlags: UInt16 = 2
    public static let setHashKey: UInt16 = 3
    public static let getHashMappingSize: UInt16 = 4
    public static let setHashMappingSize: UInt16 = 5
    public static let setHashMapping: UInt16 = 6
    public static let setHashAlgorithm: UInt16 = 7
    public static let getGrefMappingSize: UInt16 = 8
    public static let addGrefMapping: UInt16 = 9
    public static let delGrefMapping: UInt16 = 10
}

public enum NetifCtrlStatus {
    public static let success: UInt32 = 0
    public static let notSupported: UInt32 = 1
    public static let invalidParameter: UInt32 = 2
    public static let bufferOverflow: UInt32 = 3
}

/// The hash types: a bit each in SET_HASH_FLAGS, a bit number in the rx
/// hash extra's `htype` (the `_XEN_NETIF_CTRL_HASH_TYPE_*` values).
public enum NetifHashType {
    public static let ipv4Bit: UInt8 = 0
    public static let ipv4TCPBit: UInt8 = 1
    public static let ipv6Bit: UInt8 = 2
    public static let ipv6TCPBit: UInt8 = 3
    public static let ipv4: UInt32 = 1 << 0
    public static let ipv4TCP: UInt32 = 1 << 1
    public static let ipv6: UInt32 = 1 << 2
    public static let ipv6TCP: UInt32 = 1 << 3
    public static let all: UInt32 = ipv4 | ipv4TCP | ipv6 | ipv6TCP
}

public enum NetifHashAlgorithm {
    public static let none: UInt32 = 0
    public static let toeplitz: UInt32 = 1
}

/// struct xen_netif_ctrl_request.
public struct NetifCtrlRequest: Equatable, Sendable {
    public static let size = 16
    public enum Offset { public static let id = 0, type = 2, data0 = 4, data1 = 8, data2 = 12 }
    public var id: UInt16, type: UInt16
    public var data: (UInt32, UInt32, UInt32)
    public init(id: UInt16, type: UInt16, data: (UInt32, UInt32, UInt32) = (0, 0, 0)) {
        self.id = id; self.type = type; self.data = data
    }
    public init(decoding p: UnsafeRawPointer) {
        id = p.wire(Offset.id); type = p.wire(Offset.type)
        data = (p.wire(Offset.data0), p.wire(Offset.data1), p.wire(Offset.data2))
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.id, id); p.setWire(Offset.type, type)
        p.setWire(Offset.data0, data.0); p.setWire(Offset.data1, data.1); p.setWire(Offset.data2, data.2)
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.id == b.id && a.type == b.type && a.data == b.data
    }
}

/// struct xen_netif_ctrl_response.
public struct NetifCtrlResponse: Equatable, Sendable {
    public static let size = 12
    public enum Offset { public static let id = 0, type = 2, status = 4, data = 8 }
    public var id: UInt16, type: UInt16, status: UInt32, data: UInt32
    public init(id: UInt16, type: UInt16, status: UInt32, data: UInt32 = 0) {
        self.id = id; self.type = type; self.status = status; self.data = data
    }
    public init(decoding p: UnsafeRawPointer) {
        id = p.wire(Offset.id); type = p.wire(Offset.type); status = p.wire(Offset.status); data = p.wire(Offset.data)
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.id, id); p.setWire(Offset.type, type); p.setWire(Offset.status, status); p.setWire(Offset.data, data)
    }
}
