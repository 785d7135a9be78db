import Hypervisor
import LoopbackXenStore
import XenABI
import XenStoreWire

/// "xenstore-wire": the loopback xenstored's parser and server fed whatever
/// an unprivileged guest (domain 5) may send on its connection, with dom0
/// acting in between; the invariants are checked after every step
/// (docs/FUZZING.md lists them).
public enum XenStoreWireTarget: FuzzTarget {
    public static let name = "xenstore-wire"
    /// Enough for every path to quotas (a step may send 1100 requests), short enough to stay fast.
    static let maximumSteps = 64

    public static func run(_ input: UnsafeRawBufferPointer) -> [String] {
        var program = FuzzInput(input)
        let session = XenStoreWireSession()
        var steps = 0
        while !program.isExhausted && session.findings.isEmpty && steps < maximumSteps {
            let step = XenStoreWireStep.decode(&program, lastTransactionID: session.lastTransactionID)
            session.perform(step, index: steps)
            steps += 1
        }
        return session.findings
    }
}
