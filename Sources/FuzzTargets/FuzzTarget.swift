/// A fuzz target: a program interpreter over the fuzzer's bytes with
/// invariants checked after every step (docs/FUZZING.md).
public protocol FuzzTarget: SendableMetatype {
    /// The name scripts/fuzz and the corpus folder use, e.g. "blkif", "xenstore-wire".
    static var name: String { get }
    /// One execution: interprets the bytes as a program of actions, checks the invariants
    /// after every step, and returns the violated ones (empty: clean). Deterministic for
    /// given bytes; may reuse caches between calls only if they never change behaviour.
    static func run(_ input: UnsafeRawBufferPointer) -> [String]
}

/// Every target `xenbackd-fuzz`, scripts/fuzz and FuzzReplayTests know. A new
/// target is one file in Sources/FuzzTargets plus its line here.
public enum FuzzTargetRegistry {
    public static let all: [any FuzzTarget.Type] = [
        XenStoreWireTarget.self,
        XenbusFuzzTarget.self,
        NetifFuzzTarget.self,
        BlkifFuzzTarget.self,
    ]

    public static func target(named name: String) -> (any FuzzTarget.Type)? {
        all.first { $0.name == name }
    }
}
