/// Why the loop calls `NetQueueEngine.step`. Every input but `.stop` runs
/// one pass over both rings; the input says what woke the loop.
public enum NetEngineInput: Equatable, Sendable {
    /// The queue's event channel fired (the guest posted tx or rx requests).
    case kicked
    /// The TAP has frames for the guest.
    case tapReadable
    /// A deadline the last step asked for was reached, or more work was
    /// pending (`idle` false): run another pass.
    case tick
    /// Stop taking requests, answer every one taken, report `.drained`.
    case stop
}

/// What the loop does after one step.
public struct NetEngineStep: Equatable, Sendable {
    public enum Outcome: Equatable, Sendable {
        case running
        /// After `.stop`: every request taken has been answered.
        case drained
        /// The frontend broke the netif protocol; the engine no longer
        /// touches its rings. The reason is for the log and xenstore.
        case broken(String)
    }

    /// Responses were pushed on the tx ring and the frontend asked to be told.
    public var notifyTx = false
    /// The same for the rx ring.
    public var notifyRx = false
    /// Whether the TAP should be polled: false while a frame waits for rx
    /// buffers (backpressure: the kernel's bounded queue holds the rest).
    public var pollTap = true
    /// When to step again with `.tick` even if nothing happens (the credit
    /// scheduler's refill, the rx stall limit), in the `now` clock; nil: none.
    public var deadline: Int?
    /// Both rings are served and req_event is re-armed after a final check:
    /// the loop may sleep until an input or the deadline. False: step again
    /// at once.
    public var idle = true
    public var outcome = Outcome.running

    public init() {}
}
