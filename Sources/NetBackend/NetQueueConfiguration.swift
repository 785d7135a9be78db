import Hypervisor

/// What the frontend said it can take (its feature-* keys), deciding what
/// the TAP may hand us and how frames are delivered on the rx ring.
public struct FrontendNetFeatures: Equatable, Sendable {
    /// `feature-sg`: a frame may span several rx buffers.
    public var scatterGather: Bool
    /// `feature-gso-tcpv4` / `-tcpv6`: TCP super-frames with a GSO extra slot.
    public var gsoTCPv4: Bool
    public var gsoTCPv6: Bool
    /// Not `feature-no-csum-offload`: partial IPv4 checksums (NETRXF_csum_blank).
    public var checksumOffload: Bool
    /// `feature-ipv6-csum-offload`: partial IPv6 checksums too.
    public var ipv6ChecksumOffload: Bool

    public init(scatterGather: Bool = false, gsoTCPv4: Bool = false, gsoTCPv6: Bool = false,
                checksumOffload: Bool = true, ipv6ChecksumOffload: Bool = false) {
        self.scatterGather = scatterGather; self.gsoTCPv4 = gsoTCPv4; self.gsoTCPv6 = gsoTCPv6
        self.checksumOffload = checksumOffload; self.ipv6ChecksumOffload = ipv6ChecksumOffload
    }
}

/// One queue's rings, ports and limits (single-queue vifs have one).
public struct NetQueueConfiguration: Sendable {
    public var frontendDomain: DomID
    public var txRingRef: GrantRef
    public var rxRingRef: GrantRef
    /// The frontend's unbound port(s): `event-channel`, or
    /// `event-channel-tx` and `event-channel-rx` (split).
    public var txRemotePort: EventChannelPort
    public var rxRemotePort: EventChannelPort
    public var frontend: FrontendNetFeatures
    /// The vif's `rate`: bytes per period, period in microseconds.
    public var rate: (bytes: UInt64, microseconds: UInt64)?
    /// With a frame waiting and no rx buffer posted for this long, frames
    /// for the guest are dropped (and counted) instead of held, until it
    /// posts buffers again. Before that the TAP's own bounded queue holds
    /// them (the kernel drops beyond txqueuelen).
    public var rxStallMilliseconds: Int
    /// The vif's multicast filter, shared by its queues (a fresh one, off,
    /// unless the driver hands the connection's).
    public var multicastFilter = VifMulticastFilter(enabled: false)
    /// The vif's receive-hash settings, when the guest gave a control ring
    /// (shared by its queues; nil: no hashing, the kernel's steering).
    public var hashSettings: VifHashSettings?
    /// This queue's number among the vif's (the hash table's values).
    public var queueIndex = 0
    /// The room the guest asked for before each received frame (shared by
    /// the vif's queues; `xdp-headroom`).
    public var rxHeadroom = VifRxHeadroom()

    public var splitEventChannels: Bool { txRemotePort != rxRemotePort }

    public init(frontendDomain: DomID, txRingRef: GrantRef, rxRingRef: GrantRef, txRemotePort: EventChannelPort,
                rxRemotePort: EventChannelPort, frontend: FrontendNetFeatures,
                rate: (bytes: UInt64, microseconds: UInt64)? = nil, rxStallMilliseconds: Int = 1000) {
        self.frontendDomain = frontendDomain; self.txRingRef = txRingRef; self.rxRingRef = rxRingRef
        self.txRemotePort = txRemotePort; self.rxRemotePort = rxRemotePort; self.frontend = frontend
        self.rate = rate; self.rxStallMilliseconds = rxStallMilliseconds
    }
}
