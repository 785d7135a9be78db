import Glibc
import Hypervisor
import SystemSupport

extension LoopbackToolstack {
    /// Runs `body` in a transaction and, as libxl does when
    /// `xs_transaction_end` fails with EAGAIN, runs it again from the start,
    /// after a short random pause that grows with the attempts (so that
    /// many toolstack threads contending for one node spread out), for up
    /// to `retrySeconds`. Other errors end it at once.
    func retryingTransaction<T>(_ what: String, _ body: (XenStoreTransaction) throws(XenStoreError) -> T)
        throws(XenStoreError) -> T {
        let start = MonotonicClock.seconds()
        var attempts = 0
        while true {
            attempts += 1
            do {
                return try store.withTransaction(maxAttempts: 1, body)
            } catch where error.isAgain {
                let elapsed = MonotonicClock.seconds() - start
                guard elapsed < retrySeconds else {
                    log("gave up on \(what): the transaction ended in EAGAIN \(attempts) times in \(Int(elapsed)) s")
                    throw XenStoreError(errno: XenStoreError.again,
                                        context: "\(what): transaction end, \(attempts) attempts in \(Int(elapsed)) s")
                }
                if attempts > 2 {
                    let ceiling = min(1 << min(attempts - 2, 6), 50)   // 2, 4 ... 50 ms
                    usleep(useconds_t(Int.random(in: 1...ceiling * 1000)))
                }
            }
        }
    }
}
