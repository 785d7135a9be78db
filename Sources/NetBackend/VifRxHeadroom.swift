import CXenBackSupport

/// The room a vif's guest asked to keep free before each received frame
/// (`xdp-headroom`, Linux netfront's request when it attaches an XDP
/// program): one per vif, shared by its queues. The control thread stores
/// it at connect and on Reconfiguring; each queue's engine loads it once a
/// pass. Every frame says the headroom it got in its XDP extra slot, so a
/// change racing a pass is seen per frame by the guest.
public final class VifRxHeadroom: @unchecked Sendable {   // one atomic word
    /// The most this backend leaves: half a page, so the first buffer
    /// still holds a full 1500-byte frame (XDP asks for 256).
    public static let maximum = 2048
    private let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)

    public init(_ bytes: Int = 0) {
        precondition((0...Self.maximum).contains(bytes))
        word.initialize(to: UInt32(bytes))
    }

    deinit { word.deallocate() }

    @inline(__always)
    public var bytes: Int { Int(xb_load_acquire_u32(word)) }

    public func set(_ bytes: Int) {
        precondition((0...Self.maximum).contains(bytes))
        xb_store_release_u32(word, UInt32(bytes))
    }
}
