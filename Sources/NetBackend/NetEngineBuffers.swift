import Glibc
import Hypervisor
import NetworkPlumbing
import SystemSupport
import XenABI

/// Every buffer one vif queue's engine uses, allocated once (about 8.5 MiB,
/// mostly two batches of 64 KiB frames). Separate from the engine so a
/// fuzzer can hand the same buffers to a fresh engine on every run; one
/// engine at a time uses them.
public final class NetEngineBuffers {
    // Tx: one batch of packets per pass, each gathered into its own buffer.
    static let txBatch = 64
    /// Per packet: a virtio header's room, then up to 64 KiB of frame.
    static let frameOffset = 64
    static let packetStride = frameOffset + 65_536
    static let txCopyCapacity = txBatch * (TxChainRules.maxSlots + 1)

    // Rx: frames read from the TAP, copied into the guest's posted buffers.
    static let rxBatch = 64
    /// A virtio header and the largest frame a TAP with TSO hands out.
    public static let rxBufferSize = VirtioNetHeader.size + 65_550
    /// Rx slots one frame may take: its data pages (the first one shortened
    /// by the guest's headroom) and its extras (GSO, hash, XDP).
    static let maxRxSlots = 3 + 1 + (65_550 - (XenPage.size - VifRxHeadroom.maximum) + XenPage.size - 1) / XenPage.size

    let txFrames: UnsafeMutableRawPointer
    let txPackets: UnsafeMutablePointer<TxPacket>
    let txCopies: UnsafeMutableBufferPointer<GrantCopyOperation>
    /// One chain's fragments between taking and validating it.
    let txFragments: UnsafeMutablePointer<(gref: UInt32, offset: UInt16, size: UInt16)>
    /// rxBatch buffers, plus one for a frame held while the guest has no buffers.
    let rxBuffers: UnsafeMutablePointer<UnsafeMutableRawPointer>
    let rxFrames: UnsafeMutablePointer<RxFrame>
    let rxCopies: UnsafeMutableBufferPointer<GrantCopyOperation>
    /// Request ids taken for one pass's frames, in ring order.
    let rxTaken: UnsafeMutablePointer<UInt16>
    /// One pass's frames for the TAP (one buffer each, virtio header
    /// first), the packet each belongs to, and what each write returned.
    let txWrites: UnsafeMutablePointer<iovec>
    let txWriteOwners: UnsafeMutablePointer<Int32>
    let txWriteResults: UnsafeMutablePointer<Int>
    /// Each packet's answer between writing the batch and answering it.
    let txStatuses: UnsafeMutablePointer<Int16>
    /// One ring slot, copied out of shared memory before it is decoded.
    let scratch: UnsafeMutableRawPointer
    /// The bytes a frame's receive hash is computed over.
    let hashInput: UnsafeMutableRawPointer

    /// Where the frame buffers come from.
    public enum Backing: Sendable {
        /// One mapping for all of them, unmapped whole when the engine goes (the daemon).
        case mapped
        /// One heap allocation each, so AddressSanitizer fences every buffer
        /// with red zones (the fuzzers, which make the buffers once).
        case heap
    }
    private let backing: Backing
    /// Rx buffers' distance in a mapping (64-byte aligned, as from the heap).
    static let rxStride = (rxBufferSize + 63) / 64 * 64
    static var txBytes: Int { txBatch * packetStride }
    static var mappedBytes: Int { txBytes + (rxBatch + 1) * rxStride }

    /// Throws when the host has no memory for the frame buffers: that
    /// queue fails, not the daemon (the mapping is taken first, before
    /// anything that would leak).
    public init(backing: Backing = .mapped) throws(SystemError) {
        self.backing = backing
        var region: UnsafeMutableRawPointer?
        if backing == .mapped {
            region = MappedPages.map(byteCount: Self.mappedBytes)
            if region == nil { throw SystemError("mmap", errno: ENOMEM) }
        }
        rxBuffers = .allocate(capacity: Self.rxBatch + 1)
        switch backing {
        case .mapped:
            let region = region!
            txFrames = region
            for i in 0...Self.rxBatch { rxBuffers[i] = region + Self.txBytes + i * Self.rxStride }
        case .heap:
            var raw: UnsafeMutableRawPointer?
            precondition(posix_memalign(&raw, XenPage.size, Self.txBytes) == 0, "out of memory for tx buffers")
            txFrames = raw!
            for i in 0...Self.rxBatch {
                var b: UnsafeMutableRawPointer?
                precondition(posix_memalign(&b, 64, Self.rxBufferSize) == 0, "out of memory for rx buffers")
                rxBuffers[i] = b!
            }
        }
        txPackets = .allocate(capacity: Self.txBatch)
        txPackets.initialize(repeating: TxPacket(), count: Self.txBatch)
        txCopies = .allocate(capacity: Self.txCopyCapacity)
        txFragments = .allocate(capacity: TxChainRules.maxSlots)
        txFragments.initialize(repeating: (0, 0, 0), count: TxChainRules.maxSlots)
        rxFrames = .allocate(capacity: Self.rxBatch)
        rxFrames.initialize(repeating: RxFrame(), count: Self.rxBatch)
        rxCopies = .allocate(capacity: Self.rxBatch * Self.maxRxSlots)
        rxTaken = .allocate(capacity: Self.rxBatch * Self.maxRxSlots)
        txWrites = .allocate(capacity: Self.txBatch)
        txWrites.initialize(repeating: iovec(), count: Self.txBatch)
        txWriteOwners = .allocate(capacity: Self.txBatch)
        txWriteOwners.initialize(repeating: 0, count: Self.txBatch)
        txWriteResults = .allocate(capacity: Self.txBatch)
        txWriteResults.initialize(repeating: 0, count: Self.txBatch)
        txStatuses = .allocate(capacity: Self.txBatch)
        txStatuses.initialize(repeating: 0, count: Self.txBatch)
        scratch = .allocate(byteCount: 16, alignment: 16)
        hashInput = .allocate(byteCount: 64, alignment: 16)
    }

    deinit {
        switch backing {
        case .mapped:
            MappedPages.unmap(txFrames, byteCount: Self.mappedBytes)
        case .heap:
            free(txFrames)
            for i in 0...Self.rxBatch { free(rxBuffers[i]) }
        }
        txPackets.deallocate()
        txCopies.deallocate()
        txFragments.deallocate()
        rxBuffers.deallocate()
        rxFrames.deallocate()
        rxCopies.deallocate()
        rxTaken.deallocate()
        txWrites.deallocate()
        txWriteOwners.deallocate()
        txWriteResults.deallocate()
        txStatuses.deallocate()
        scratch.deallocate()
        hashInput.deallocate()
    }

    /// Where packet `i` of a tx batch is gathered.
    @inline(__always)
    func txFrame(_ i: Int) -> UnsafeMutableRawPointer { txFrames + i * Self.packetStride + Self.frameOffset }
}

/// A tx packet between taking its chain and answering it.
struct TxPacket {
    static let maxIDs = 32
    var ids = InlineArray<32, UInt16>(repeating: 0)
    /// Request slots (the first and its fragments), extras not included.
    var requestCount = 0
    var extraCount = 0
    var flags: UInt16 = 0
    var frameLength = 0
    var gsoType: UInt8 = 0
    var gsoSize: UInt16 = 0
    /// A multicast filter edit (NetifExtraType.mcastAdd or mcastDel; 0:
    /// none) and its address: the packet is a control request, answered
    /// once done and never written to the TAP.
    var multicastEdit: UInt8 = 0
    var multicastKey: UInt64 = 0
    /// NETIF_RSP_ERROR when the chain was refused on taking.
    var status: Int16 = NetifStatus.okay
    var copyStart: Int32 = 0
    var copyCount: Int32 = 0
}

/// An rx frame between taking its buffers and answering them.
struct RxFrame {
    var takenStart: Int32 = 0
    var slotCount: Int32 = 0
    var copyStart: Int32 = 0
    var length: Int32 = 0
    var header = VirtioNetHeader()
    /// Extra slots after the first data slot: GSO, then hash, then XDP.
    var gsoExtra = false
    var hashExtra = false
    var hashTypeBit: UInt8 = 0
    var hashValue: UInt32 = 0
    /// Bytes left free before the data in the first buffer (an XDP extra says so).
    var headroom: UInt16 = 0
    var extras: Int { (gsoExtra ? 1 : 0) + (hashExtra ? 1 : 0) + (headroom > 0 ? 1 : 0) }
}
