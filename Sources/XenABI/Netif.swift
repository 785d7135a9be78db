// The network protocol of xen/io/netif.h, x86_64 layout (used by the net backend).

public enum NetifTxFlags {
    public static let csumBlank: UInt16 = 0x1
    public static let dataValidated: UInt16 = 0x2
    public static let moreData: UInt16 = 0x4
    public static let extraInfo: UInt16 = 0x8
}

public enum NetifRxFlags {
    public static let dataValidated: UInt16 = 0x1
    public static let csumBlank: UInt16 = 0x2
    public static let moreData: UInt16 = 0x4
    public static let extraInfo: UInt16 = 0x8
    public static let gsoPrefix: UInt16 = 0x10
}

public enum NetifExtraType {
    public static let none: UInt8 = 0
    public static let gso: UInt8 = 1
    public static let mcastAdd: UInt8 = 2
    public static let mcastDel: UInt8 = 3
    public static let hash: UInt8 = 4
    /// Xen's XEN_NETIF_EXTRA_TYPE_MAX (its netif.h ends at the hash type).
    public static let max: UInt8 = 5
    /// XEN_NETIF_EXTRA_TYPE_XDP, Linux's extension (its own copy of netif.h,
    /// where MAX is 6): the rx headroom a frontend asked for with
    /// `xdp-headroom`. Sent only to a frontend that asked.
    public static let xdp: UInt8 = 5
    public static let flagMore: UInt8 = 0x1
}

public enum NetifGSOType {
    public static let none: UInt8 = 0
    public static let tcpv4: UInt8 = 1
    public static let tcpv6: UInt8 = 2
}

public enum NetifStatus {
    public static let dropped: Int16 = -2
    public static let error: Int16 = -1
    public static let okay: Int16 = 0
    public static let null: Int16 = 1
}

public enum Netif {
    /// Slots a frontend may use for one packet, at least.
    public static let nrSlotsMin = 18
    public static let maxTxSize = 0xffff
    /// XEN_NETIF_MAX_XDP_HEADROOM (Linux's netif.h): the most `xdp-headroom` may say.
    public static let maxXDPHeadroom = 0x7fff
}

/// struct netif_tx_request.
public struct NetifTxRequest: Equatable, Sendable {
    public static let size = 12
    public enum Offset {
        public static let gref = 0, offset = 4, flags = 6, id = 8, size = 10
    }
    public var gref: UInt32, offset: UInt16, flags: UInt16, id: UInt16, size: UInt16
    public init(gref: UInt32, offset: UInt16, flags: UInt16, id: UInt16, size: UInt16) {
        self.gref = gref; self.offset = offset; self.flags = flags; self.id = id; self.size = size
    }
    public init(decoding p: UnsafeRawPointer) {
        gref = p.wire(Offset.gref); offset = p.wire(Offset.offset); flags = p.wire(Offset.flags)
        id = p.wire(Offset.id); size = p.wire(Offset.size)
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.gref, gref); p.setWire(Offset.offset, offset); p.setWire(Offset.flags, flags)
        p.setWire(Offset.id, id); p.setWire(Offset.size, size)
    }
}

/// struct netif_extra_info (an extra slot on the tx or rx ring).
public struct NetifExtraInfo: Sendable {
    public static let size = 8
    public enum Offset {
        public static let type = 0, flags = 1, gsoSize = 2, gsoType = 4, gsoPad = 5, gsoFeatures = 6
        public static let mcastAddr = 2, hashType = 2, hashAlgorithm = 3, hashValue = 4
    }
    public var type: UInt8, flags: UInt8
    /// The 6-byte union, raw.
    public var payload: InlineArray<6, UInt8>
    public init(type: UInt8, flags: UInt8, payload: InlineArray<6, UInt8> = .init(repeating: 0)) {
        self.type = type; self.flags = flags; self.payload = payload
    }
    public init(decoding p: UnsafeRawPointer) {
        type = p.wire(Offset.type); flags = p.wire(Offset.flags)
        payload = InlineArray { i in p.wire(2 + i) }
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.type, type); p.setWire(Offset.flags, flags)
        for i in 0..<6 { p.setWire(2 + i, payload[i]) }
    }
    public var gsoSize: UInt16 { UInt16(payload[0]) | UInt16(payload[1]) << 8 }
    public var gsoType: UInt8 { payload[2] }
}

/// struct netif_tx_response.
public struct NetifTxResponse: Equatable, Sendable {
    public static let size = 4
    public enum Offset { public static let id = 0, status = 2 }
    public var id: UInt16, status: Int16
    public init(id: UInt16, status: Int16) { self.id = id; self.status = status }
    public init(decoding p: UnsafeRawPointer) { id = p.wire(Offset.id); status = p.wire(Offset.status) }
    public func encode(to p: UnsafeMutableRawPointer) { p.setWire(Offset.id, id); p.setWire(Offset.status, status) }
}

/// struct netif_rx_request.
public struct NetifRxRequest: Equatable, Sendable {
    public static let size = 8
    public enum Offset { public static let id = 0, pad = 2, gref = 4 }
    public var id: UInt16, gref: UInt32
    public init(id: UInt16, gref: UInt32) { self.id = id; self.gref = gref }
    public init(decoding p: UnsafeRawPointer) { id = p.wire(Offset.id); gref = p.wire(Offset.gref) }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.id, id); p.setWire(Offset.pad, UInt16(0)); p.setWire(Offset.gref, gref)
    }
}

/// struct netif_rx_response.
public struct NetifRxResponse: Equatable, Sendable {
    public static let size = 8
    public enum Offset { public static let id = 0, offset = 2, flags = 4, status = 6 }
    public var id: UInt16, offset: UInt16, flags: UInt16, status: Int16
    public init(id: UInt16, offset: UInt16, flags: UInt16, status: Int16) {
        self.id = id; self.offset = offset; self.flags = flags; self.status = status
    }
    public init(decoding p: UnsafeRawPointer) {
        id = p.wire(Offset.id); offset = p.wire(Offset.offset); flags = p.wire(Offset.flags); status = p.wire(Offset.status)
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.id, id); p.setWire(Offset.offset, offset); p.setWire(Offset.flags, flags); p.setWire(Offset.status, status)
    }
}
