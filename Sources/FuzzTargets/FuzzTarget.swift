public protocol FuzzTarget {
    /// The name scripts/fuzz and the corpus folder use, e.g. "blkif", "netif".
    static var name: String { get }
    /// One execution: interprets the bytes as a program of actions, checks the invariants
    /// after every step, and returns the violated ones (empty: clean). Deterministic for
    /// given bytes; may reuse caches between calls only if they never change behaviour.
    static func run(_ input: UnsafeRawBufferPointer) -> [String]
}
