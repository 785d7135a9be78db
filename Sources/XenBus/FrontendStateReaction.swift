import XenABI

/// What a backend does when it reads its frontend's `state`: the xenbus
/// state table of Linux's blkback and netback (design-anchors 4.2), shared
/// by every device type so that vbd and vif cannot drift apart.
public enum FrontendStateReaction: Equatable, Sendable {
    /// Nothing to do in this pair of states.
    case none
    /// Read the frontend's keys, map and bind, go Connected.
    case connect
    /// Stop serving (every request answered, rings unmapped), then write
    /// this state: Closing to answer a frontend's Closing, Closed once the
    /// frontend is Closed (or gone).
    case close(XenbusState)
    /// The frontend starts over after a close or a failure: offer the
    /// device again (InitWait).
    case offerAgain
    /// The frontend changes settings under a running connection (Linux
    /// netfront attaching an XDP program): read them again, Reconfigured.
    case reconfigure
    /// The frontend is Connected again after that: Connected.
    case endReconfigure

    /// - frontend: nil when the `state` node is missing or malformed (a
    ///   vanished frontend counts as Closed, and so does Unknown).
    /// - mayOfferAgain: false for a device that cannot work whatever the
    ///   frontend does (bad toolstack keys, a failed hotplug script).
    /// - connectsAtInitialised: blkfront publishes its ring at Initialised;
    ///   netfront goes from Initialising straight to Connected, and netback
    ///   waits for that.
    /// - online: the toolstack's `online` key; 0 while it removes the
    ///   device. Then nothing is offered again, and a frontend that is not
    ///   using the device (never connected, or gone) gets Closed at once, as
    ///   QEMU's xen-bus does, so that the toolstack's removal need not wait
    ///   for a guest that will never answer.
    /// - reconfigures: the device type takes Reconfiguring under a
    ///   connection (netback's xdp-headroom); blkback has no such thing.
    public init(frontend: XenbusState?, backend: XenbusState, mayOfferAgain: Bool,
                connectsAtInitialised: Bool = true, online: Bool = true, reconfigures: Bool = false) {
        if !online, backend != .closed {
            switch frontend ?? .closed {
            case .initialising, .initWait, .unknown, .closed, .reconfiguring, .reconfigured:
                self = .close(.closed)
                return
            case .initialised, .connected, .closing:
                break   // an active frontend is closed the usual way
            }
        }
        switch frontend ?? .closed {
        case .initialised:
            self = backend == .initWait && connectsAtInitialised && online ? .connect : .none
        case .connected:
            if backend == .reconfigured && reconfigures {
                self = .endReconfigure
                return
            }
            self = backend == .initWait && online ? .connect : .none
        case .closing:
            // A Closed backend (failed, say) has nothing left to close.
            self = backend == .closing || backend == .closed ? .none : .close(.closing)
        case .closed, .unknown:
            self = backend == .closed ? .none : .close(.closed)
        case .initialising:
            // Linux blkback: Initialising while Closed gives InitWait. We
            // also take a frontend that skipped Closed after our Closing.
            self = (backend == .closed || backend == .closing) && mayOfferAgain && online ? .offerAgain : .none
        case .reconfiguring:
            self = backend == .connected && reconfigures && online ? .reconfigure : .none
        case .initWait, .reconfigured:
            self = .none
        }
    }
}
