import Hypervisor
import XenStoreWire

/// A change that may fire watches: the changed path, and the permission
/// lists under which an unprivileged watcher must be able to read it.
struct WatchTrigger {
    var path: String
    /// Removal of a node below the removed root: fires only watches on exactly
    /// this path (watches above it already fire for the root's path).
    var exactOnly: Bool
    /// Empty for the special paths, which only privileged watchers see.
    var permissionLists: [[XenStorePermission]]

    static func special(_ path: String) -> WatchTrigger {
        WatchTrigger(path: path, exactOnly: true, permissionLists: [])
    }
}

/// What one request (or a transaction so far) touched.
struct AccessLog {
    /// Nodes read (including listings and nodes found missing).
    var read: Set<String> = []
    /// Nodes created, changed or removed (including parents whose child list changed).
    var written: Set<String> = []
    var triggers: [WatchTrigger] = []
    /// Where each (path, exactOnly) is in `triggers`, once merged into a transaction's log.
    private var triggerIndex: [String: Int] = [:]

    /// Nodes read or written.
    var touchedCount: Int { read.count + written.count(where: { !read.contains($0) }) }

    /// Adds a request's log to a transaction's. A node changed again keeps
    /// one trigger (xenstored fires once per node at commit) with the
    /// permissions before its first change and after its last, so the log
    /// grows with the nodes touched, not with the requests.
    mutating func merge(_ other: AccessLog) {
        read.formUnion(other.read)
        written.formUnion(other.written)
        for trigger in other.triggers {
            let key = (trigger.exactOnly ? "=" : "+") + trigger.path
            if let i = triggerIndex[key] {
                triggers[i].permissionLists = [triggers[i].permissionLists.first, trigger.permissionLists.last].compactMap { $0 }
            } else {
                triggerIndex[key] = triggers.count
                triggers.append(trigger)
            }
        }
    }
}

/// An open transaction: a snapshot of the tree taken at its start, changed
/// in place by its requests, and what they touched.
struct OpenTransaction {
    var owner: UInt64
    /// Who started it (GuestQuota counts a domain's transactions and nodes).
    var requester: Requester
    var startSequence: UInt64
    var tree: NodeTree
    var log = AccessLog()
    /// Set when the changes it must be checked against were no longer all
    /// remembered (XenStoreDatabase.trackedChangesLimit): its commit is EAGAIN.
    var mustRetry = false
}

/// The store's contents and its transactions, with xenstored's access rules.
/// Mutations return the watch triggers to fire now (none inside a transaction:
/// those fire when it commits).
struct XenStoreDatabase {
    private(set) var tree: NodeTree
    /// Bumped by every change; a node's generation is the value at its last change.
    private var sequence: UInt64 = 0
    /// Sequence at which each path last changed outside a transaction's own
    /// snapshot; kept only while transactions are open (for conflict checks).
    private var changedAt: [String: UInt64] = [:]
    /// At most this many paths in `changedAt`: a guest holding a transaction
    /// open while it changes ever new paths would grow it without bound. Past
    /// it, every open transaction will fail its commit with EAGAIN (clients
    /// retry) and the record starts afresh.
    static let trackedChangesLimit = 16384
    private var transactions: [UInt32: OpenTransaction] = [:]
    private var lastTransactionID: UInt32 = 0

    init() {
        tree = NodeTree(rootPermissions: [XenStorePermission(domain: 0, access: .none)])
        for path in ["/tool/xenstored", "/local/domain/0"] {
            _ = try? write(path, [], by: .dom0, transaction: 0)
        }
    }

    // MARK: Requests

    mutating func read(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [UInt8] {
        try lookup(path, requester, .read, transaction).value
    }

    /// Child names and the node's generation.
    mutating func directory(_ path: String, by requester: Requester, transaction: UInt32)
        throws(XenStoreError) -> (children: [String], generation: UInt64)
    {
        let node = try lookup(path, requester, .read, transaction)
        return (node.children, node.generation)
    }

    mutating func permissions(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [XenStorePermission] {
        try lookup(path, requester, .read, transaction).permissions
    }

    mutating func write(_ path: String, _ value: [UInt8], by requester: Requester,
                        transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        try change(transaction) { (tree, generation, log) throws(XenStoreError) in
            if let node = tree[path] {
                guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
                if !requester.isPrivileged && node.recordSize - node.value.count + value.count > GuestQuota.nodeBytes {
                    throw XenStoreError(errno: GuestQuota.noSpace)
                }
                tree.setValue(path, value, generation: generation)
                log.written.insert(path)
            } else {
                try Self.create(path, value, in: &tree, by: requester, generation: generation, log: &log)
            }
            log.triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [tree[path]!.permissions]))
        }
    }

    mutating func mkdir(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        try change(transaction) { (tree, generation, log) throws(XenStoreError) in
            if let node = tree[path] {
                guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
                log.read.insert(path)
                return
            }
            try Self.create(path, [], in: &tree, by: requester, generation: generation, log: &log)
            log.triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [tree[path]!.permissions]))
        }
    }

    /// Removes `path` and its subtree. A missing node is fine while its parent exists.
    mutating func remove(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        guard path != XenStorePath.root else { throw XenStoreError(errno: XenStoreError.invalid) }
        return try change(transaction) { (tree, generation, log) throws(XenStoreError) in
            log.read.insert(path)
            guard let node = tree[path] else {
                // Removing a missing node is fine while its parent exists and may be written.
                let error = Self.missingNodeError(tree, path, requester, .write)
                if error.isNoEntry, tree[XenStorePath.parent(of: path)!] != nil { return }
                throw error
            }
            guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
            let removed = tree.removeSubtree(path, generation: generation)
            log.written.insert(XenStorePath.parent(of: path)!)
            for (removedPath, removedNode) in removed {
                log.written.insert(removedPath)
                log.triggers.append(WatchTrigger(path: removedPath, exactOnly: removedPath != path,
                                                 permissionLists: [removedNode.permissions]))
            }
        }
    }

    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], by requester: Requester,
                                 transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        try change(transaction) { (tree, generation, log) throws(XenStoreError) in
            let node = try Self.checked(tree, path, requester, .write)
            // Only the owner (or dom0) may change permissions, and a guest may not give a node away.
            guard requester.isPrivileged || requester.isOwner(of: node.permissions) else {
                throw XenStoreError(errno: XenStoreError.accessDenied)
            }
            guard requester.isPrivileged || permissions[0].domain == node.permissions[0].domain else {
                throw XenStoreError(errno: 1)  // EPERM
            }
            tree.setPermissions(path, permissions, generation: generation)
            log.written.insert(path)
            log.triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [node.permissions, permissions]))
        }
    }

    // MARK: Transactions

    mutating func startTransaction(owner: UInt64, by requester: Requester) throws(XenStoreError) -> UInt32 {
        if !requester.isPrivileged
            && transactions.values.count(where: { $0.requester == requester }) >= GuestQuota.transactions {
            throw XenStoreError(errno: GuestQuota.noSpace)
        }
        repeat { lastTransactionID &+= 1 } while lastTransactionID == 0 || transactions[lastTransactionID] != nil
        transactions[lastTransactionID] = OpenTransaction(owner: owner, requester: requester, startSequence: sequence, tree: tree)
        return lastTransactionID
    }

    /// Commits or aborts. A commit fails with EAGAIN if a node the transaction
    /// read or wrote was changed by someone else since it started; otherwise
    /// its changed nodes replace the live ones and its watch triggers are returned.
    mutating func endTransaction(_ id: UInt32, owner: UInt64, commit: Bool) throws(XenStoreError) -> [WatchTrigger] {
        guard let transaction = transactions[id], transaction.owner == owner else {
            throw XenStoreError(errno: XenStoreError.noEntry)
        }
        transactions[id] = nil
        defer { forgetChangesNoTransactionNeeds() }
        guard commit else { return [] }
        let touched = transaction.log.read.union(transaction.log.written)
        if transaction.mustRetry || touched.contains(where: { changedAt[$0, default: 0] > transaction.startSequence }) {
            throw XenStoreError(errno: XenStoreError.again)
        }
        try checkNodeQuota(committing: transaction)
        sequence += 1
        for path in transaction.log.written {
            var node = transaction.tree[path]
            node?.generation = sequence
            tree.replace(path, with: node)
            recordChange(path)
        }
        return transaction.log.triggers
    }

    /// Drops a closed connection's transactions (or all of them, on RESET_WATCHES).
    mutating func abortTransactions(owner: UInt64) {
        transactions = transactions.filter { $0.value.owner != owner }
        forgetChangesNoTransactionNeeds()
    }

    func transactionExists(_ id: UInt32, owner: UInt64) -> Bool {
        transactions[id]?.owner == owner
    }

    var openTransactionCount: Int { transactions.count }

    /// Nodes a domain owns, live and in each of its open transactions (for
    /// checks of the quota from outside, e.g. the fuzz target).
    func ownedNodeCounts(of domain: UInt32) -> [Int] {
        [tree.ownedNodeCount(of: domain)] + transactions.values.map { $0.tree.ownedNodeCount(of: domain) }
    }

    func openTransactionCount(of requester: Requester) -> Int {
        transactions.values.count { $0.requester == requester }
    }

    // MARK: Internals

    /// A guest's commit may not take it past GuestQuota.nodes, whatever it
    /// created meanwhile outside the transaction (each was checked alone).
    private func checkNodeQuota(committing transaction: OpenTransaction) throws(XenStoreError) {
        let requester = transaction.requester
        guard !requester.isPrivileged else { return }
        let domain = UInt32(requester.domain)
        var added = 0
        for path in transaction.log.written {
            if transaction.tree[path]?.owner == domain { added += 1 }
            if tree[path]?.owner == domain { added -= 1 }
        }
        if added > 0 && tree.ownedNodeCount(of: domain) + added > GuestQuota.nodes {
            throw XenStoreError(errno: GuestQuota.noSpace)
        }
    }

    /// A node for a read-only request, recorded as read when inside a transaction.
    private mutating func lookup(_ path: String, _ requester: Requester, _ need: Requester.Need,
                                 _ transaction: UInt32) throws(XenStoreError) -> XenStoreNode {
        guard transaction != 0 else { return try Self.checked(tree, path, requester, need) }
        guard let open = transactions[transaction] else { throw XenStoreError(errno: XenStoreError.noEntry) }
        if !open.log.read.contains(path) {
            try Self.checkTransactionQuota(open, adding: 1)
            transactions[transaction]!.log.read.insert(path)
        }
        return try Self.checked(transactions[transaction]!.tree, path, requester, need)
    }

    /// Runs one mutation on the live tree or on the transaction's snapshot.
    /// Live changes are stamped with a new sequence number and return their
    /// triggers; transaction changes are kept for commit.
    private mutating func change(
        _ transaction: UInt32,
        _ body: (inout NodeTree, UInt64, inout AccessLog) throws(XenStoreError) -> Void
    ) throws(XenStoreError) -> [WatchTrigger] {
        var log = AccessLog()
        sequence += 1
        if transaction == 0 {
            try body(&tree, sequence, &log)
            for path in log.written { recordChange(path) }
            return log.triggers
        }
        guard var open = transactions.removeValue(forKey: transaction) else {
            throw XenStoreError(errno: XenStoreError.noEntry)
        }
        defer { transactions[transaction] = open }  // put back whether or not the body throws
        // A full transaction takes no more changes (one may pass the quota by its own nodes).
        try Self.checkTransactionQuota(open, adding: 1)
        do throws(XenStoreError) {
            try body(&open.tree, sequence, &log)
        } catch {
            open.log.read.formUnion(log.read)
            throw error
        }
        open.log.merge(log)
        return []
    }

    /// A guest's transaction touches at most GuestQuota.transactionNodes nodes.
    private static func checkTransactionQuota(_ open: OpenTransaction, adding count: Int) throws(XenStoreError) {
        if !open.requester.isPrivileged && open.log.touchedCount + count > GuestQuota.transactionNodes {
            throw XenStoreError(errno: GuestQuota.noSpace)
        }
    }

    private mutating func recordChange(_ path: String) {
        guard !transactions.isEmpty else { return }
        if changedAt.count >= Self.trackedChangesLimit && changedAt[path] == nil {
            for id in transactions.keys { transactions[id]!.mustRetry = true }
            changedAt.removeAll()
        }
        changedAt[path] = sequence
    }

    /// Paths remembered for the open transactions' conflict checks.
    var trackedChangeCount: Int { changedAt.count }

    /// Nodes each of the requester's open transactions has touched.
    func transactionTouchedCounts(of requester: Requester) -> [Int] {
        transactions.values.filter { $0.requester == requester }.map(\.log.touchedCount)
    }

    private mutating func forgetChangesNoTransactionNeeds() {
        guard let oldest = transactions.values.map(\.startSequence).min() else {
            changedAt.removeAll()
            return
        }
        changedAt = changedAt.filter { $0.value > oldest }
    }

    /// The node, if it exists and `requester` has `need` on it.
    private static func checked(_ tree: NodeTree, _ path: String, _ requester: Requester,
                                _ need: Requester.Need) throws(XenStoreError) -> XenStoreNode {
        guard let node = tree[path] else { throw missingNodeError(tree, path, requester, need) }
        guard requester.may(need, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
        return node
    }

    /// The error for a missing node: ENOENT only if the nearest existing
    /// ancestor grants `need`, else EACCES (as xenstored, which does not reveal
    /// whether a node exists below a parent the requester may not see).
    private static func missingNodeError(_ tree: NodeTree, _ path: String, _ requester: Requester,
                                         _ need: Requester.Need) -> XenStoreError {
        let ancestor = tree.nearestExistingAncestor(of: path)
        return XenStoreError(errno: requester.may(need, ancestor.node.permissions) ? XenStoreError.noEntry : XenStoreError.accessDenied)
    }

    /// A guest's new nodes must keep it within GuestQuota.nodes, and every
    /// record they make or grow within GuestQuota.nodeBytes: the existing
    /// ancestor gains a child name, each new node but the last holds one, the
    /// last holds the value.
    private static func checkQuota(creating path: String, _ value: [UInt8], below ancestor: (path: String, node: XenStoreNode),
                                   in tree: NodeTree, by requester: Requester) throws(XenStoreError) {
        let noSpace = XenStoreError(errno: GuestQuota.noSpace)
        if tree.ownedNodeCount(of: UInt32(requester.domain)) + tree.missingNodeCount(creating: path) > GuestQuota.nodes {
            throw noSpace
        }
        guard value.count <= GuestQuota.nodeBytes else { throw noSpace }
        var child = path
        while let parent = XenStorePath.parent(of: child) {
            let entry = XenStorePath.lastComponent(of: child).utf8.count + 1
            let parentRecord = parent == ancestor.path ? ancestor.node.recordSize : 0
            if parentRecord + entry > GuestQuota.nodeBytes { throw noSpace }
            if parent == ancestor.path { break }
            child = parent
        }
    }

    /// Creates a missing node after checking write access on its nearest existing ancestor.
    private static func create(_ path: String, _ value: [UInt8], in tree: inout NodeTree, by requester: Requester,
                               generation: UInt64, log: inout AccessLog) throws(XenStoreError) {
        let ancestor = tree.nearestExistingAncestor(of: path)
        guard requester.may(.write, ancestor.node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
        if !requester.isPrivileged {
            // Checked before anything changes: the live tree is changed in place.
            try checkQuota(creating: path, value, below: ancestor, in: tree, by: requester)
        }
        let owner: DomID? = requester.isPrivileged ? nil : requester.domain
        for changed in tree.create(path, value: value, owner: owner, generation: generation) {
            log.written.insert(changed)
        }
    }
}
