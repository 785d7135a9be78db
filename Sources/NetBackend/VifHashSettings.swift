import CXenBackSupport
import Synchronization
import XenABI

/// What the guest set on its control ring for receive-side hashing
/// (netif.h): the algorithm, the hash types, the Toeplitz key and the table
/// from hash to queue. One per vif, shared by its queues: the control
/// engine edits it under a lock (rare); each queue's engine copies it into
/// its own `RxHashPolicy` when the generation moves, which it reads once a
/// pass without a lock.
public final class VifHashSettings: @unchecked Sendable {   // state under `lock`; generation atomic
    /// Linux netback's XEN_NETBK_MAX_HASH_MAPPING_SIZE.
    public static let maxMappingSize = 128

    public struct State: Sendable {
        public var algorithm = NetifHashAlgorithm.none
        public var flags: UInt32 = 0
        public var key = ToeplitzKey()
        public var keyLength = 0
        public var mappingSize = 0
        public var mapping = InlineArray<128, UInt8>(repeating: 0)

        /// For status: "none" or "toeplitz".
        public var algorithmName: String { algorithm == NetifHashAlgorithm.toeplitz ? "toeplitz" : "none" }
        /// For status: the hash types on ("ipv4", "ipv4-tcp", "ipv6", "ipv6-tcp").
        public var typeNames: [String] {
            [(NetifHashType.ipv4, "ipv4"), (NetifHashType.ipv4TCP, "ipv4-tcp"), (NetifHashType.ipv6, "ipv6"),
             (NetifHashType.ipv6TCP, "ipv6-tcp")].filter { flags & $0.0 != 0 }.map(\.1)
        }
    }

    /// The vif's queues: every mapping entry names one of them.
    public let queues: Int
    private let lock = Mutex<State>(State())
    private let generationWord = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)

    public init(queues: Int) {
        self.queues = queues
        generationWord.initialize(to: 0)
    }

    deinit { generationWord.deallocate() }

    /// Moves on every change.
    @inline(__always)
    public var generation: UInt64 { xb_load_acquire_u64(generationWord) }

    public var state: State { lock.withLock { $0 } }

    /// Changes the state; `change` returns the control status, and the
    /// generation moves when it is SUCCESS.
    public func edit(_ change: (inout State) -> UInt32) -> UInt32 {
        lock.withLock { s in
            let status = change(&s)
            if status == NetifCtrlStatus.success {
                xb_store_release_u64(generationWord, xb_load_acquire_u64(generationWord) &+ 1)
            }
            return status
        }
    }
}

/// One queue's copy of the vif's hash settings, refreshed between passes.
public struct RxHashPolicy {
    public private(set) var generation: UInt64 = 0
    public private(set) var state = VifHashSettings.State()

    public init() {}

    /// Hashing is on: the guest chose Toeplitz and at least one type.
    @inline(__always)
    public var hashing: Bool { state.algorithm == NetifHashAlgorithm.toeplitz && state.flags != 0 }

    /// Copies the settings if they changed since the last look.
    @inline(__always)
    public mutating func refresh(from settings: VifHashSettings) {
        let g = settings.generation
        guard g != generation else { return }
        state = settings.state
        generation = g
    }

    /// The queue a frame with `hash` goes to (netif.h: through the table,
    /// or the hash modulo the queues without one).
    @inline(__always)
    public func queue(for hash: UInt32, queues: Int) -> Int {
        state.mappingSize == 0 ? Int(hash % UInt32(queues)) : Int(state.mapping[Int(hash % UInt32(state.mappingSize))])
    }
}
