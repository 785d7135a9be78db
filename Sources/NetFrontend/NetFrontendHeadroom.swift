import Synchronization
import SystemSupport
import XenABI
import XenBus

/// Whether the frontend ever asked for rx headroom: the queues' pumps read
/// it to take XDP extra slots, which the backend sends only then.
final class HeadroomAsked: Sendable {
    private let flag = Atomic<Bool>(false)
    var value: Bool { flag.load(ordering: .acquiring) }
    func set() { flag.store(true, ordering: .releasing) }
}

extension LoopbackNetFrontend {
    /// Asks the backend to leave `bytes` free before each received frame,
    /// as Linux netfront does when an XDP program is attached (256) or
    /// removed (0), and in its order: state Reconfiguring, then
    /// `xdp-headroom`, then wait for the backend's Reconfigured, then
    /// Connected again and wait for the backend's Connected. Frames then
    /// come with an XDP extra slot and their data that far into the first
    /// buffer (counted in `rxHeadroomFrames`; a first buffer's offset that
    /// differs from its extra, in `rxHeadroomMismatches`).
    public func setRxHeadroom(_ bytes: Int, timeout: Double = 10) throws {
        guard isConnected else { throw NetFrontendError.notConnected }
        guard backendFeatures.xdpHeadroom else { throw NetFrontendError.backendLacks(feature: "feature-xdp-headroom") }
        if bytes > 0 { headroomAsked.set() }
        let deadline = MonotonicClock.seconds() + timeout
        try store.writeState(frontendPath, .reconfiguring)
        try store.write(frontendPath + "/xdp-headroom", String(bytes))
        try waitForBackend(deadline: deadline, what: "backend Reconfigured") { state -> Bool? in
            switch state {
            case .reconfigured?: return true
            case .closing?, .closed?, nil:
                throw refused((try? store.read(backendPath + "/error")).flatMap { $0 } ?? "backend \(state.map { "\($0)" } ?? "gone")")
            default: return nil
            }
        }
        try store.writeState(frontendPath, .connected)
        try waitForBackend(deadline: deadline, what: "backend Connected after Reconfigured") { state -> Bool? in
            state == .connected ? true : nil
        }
    }
}
