/// What one unprivileged domain may hold in the loopback xenstored: C
/// xenstored's default quotas (its --entry-nb, --entry-size, --watch-nb and
/// --transaction options), with its errors. dom0 has none.
package enum GuestQuota {
    /// Nodes the domain owns; creating more is ENOSPC.
    package static let nodes = 1000
    /// A node's record as the domain leaves it by a write or by creating a
    /// child: its value plus its child names (each with a NUL). ENOSPC beyond.
    package static let nodeBytes = 2048
    /// Watches over all the domain's connections; E2BIG beyond.
    package static let watches = 128
    /// Open transactions over all the domain's connections; ENOSPC beyond.
    package static let transactions = 10
    /// Nodes one transaction may touch (read, find missing, or change): a
    /// request to a transaction that has touched this many is ENOSPC (the
    /// last one taken may pass it by the nodes it touches itself).
    package static let transactionNodes = 1024
    /// Replies queued for a connection that does not read them; past this
    /// the connection is closed (the server does not grow without bound).
    package static let queuedOutputBytes = 8 * 1024 * 1024

    static let noSpace: Int32 = 28   // ENOSPC
    static let tooBig: Int32 = 7     // E2BIG
}
