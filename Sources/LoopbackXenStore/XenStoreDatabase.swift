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

/// The watch triggers a transaction's changes will fire at commit.
struct TransactionTriggers {
    private(set) var triggers: [WatchTrigger] = []
    /// Where each (path, exactOnly) is in `triggers`.
    private var index: [String: Int] = [:]

    /// Adds a request's triggers. A node changed again keeps one trigger
    /// (xenstored fires once per node at commit) with the permissions
    /// before its first change and after its last, so the list grows with
    /// the nodes changed, not with the requests.
    mutating func merge(_ new: [WatchTrigger]) {
        for trigger in new {
            let key = (trigger.exactOnly ? "=" : "+") + trigger.path
            if let i = index[key] {
                triggers[i].permissionLists = [triggers[i].permissionLists.first, trigger.permissionLists.last].compactMap { $0 }
            } else {
                index[key] = triggers.count
                triggers.append(trigger)
            }
        }
    }
}

/// An open transaction: the nodes it looked at and changed (a view over
/// the live tree, not a copy of it) and the triggers it will fire.
struct OpenTransaction {
    var owner: UInt64
    /// Who started it (GuestQuota counts a domain's transactions and nodes).
    var requester: Requester
    var nodes = TransactionNodes()
    var triggers = TransactionTriggers()
}

/// One change request, applied to the live tree or to a transaction's view.
enum Mutation {
    case write(String, [UInt8])
    case mkdir(String)
    case remove(String)
    case setPermissions(String, [XenStorePermission])
}

/// The store's contents and its transactions, with xenstored's access rules.
/// Mutations return the watch triggers to fire now (none inside a transaction:
/// those fire when it commits). Transactions conflict as in C xenstored,
/// only on the nodes they looked at, or finer (see ChildEdits).
struct XenStoreDatabase {
    private(set) var tree: NodeTree
    /// Bumped by every change; a node's generation is the value at its last change.
    private var sequence: UInt64 = 0
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
        try change(.write(path, value), by: requester, transaction: transaction)
    }

    mutating func mkdir(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        try change(.mkdir(path), by: requester, transaction: transaction)
    }

    /// Removes `path` and its subtree. A missing node is fine while its parent exists.
    mutating func remove(_ path: String, by requester: Requester, transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        guard path != XenStorePath.root else { throw XenStoreError(errno: XenStoreError.invalid) }
        return try change(.remove(path), by: requester, transaction: transaction)
    }

    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], by requester: Requester,
                                 transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        try change(.setPermissions(path, permissions), by: requester, transaction: transaction)
    }

    // MARK: Transactions

    mutating func startTransaction(owner: UInt64, by requester: Requester) throws(XenStoreError) -> UInt32 {
        if !requester.isPrivileged
            && transactions.values.count(where: { $0.requester == requester }) >= GuestQuota.transactions {
            throw XenStoreError(errno: GuestQuota.noSpace)
        }
        repeat { lastTransactionID &+= 1 } while lastTransactionID == 0 || transactions[lastTransactionID] != nil
        transactions[lastTransactionID] = OpenTransaction(owner: owner, requester: requester)
        return lastTransactionID
    }

    /// Commits or aborts. A commit fails with EAGAIN if a node the
    /// transaction looked at (read, listed, found missing, changed) is not
    /// as it was then, or a directory it only added children to or removed
    /// children from is gone or has other permissions; otherwise its
    /// changes go live and its watch triggers are returned.
    mutating func endTransaction(_ id: UInt32, owner: UInt64, commit: Bool) throws(XenStoreError) -> [WatchTrigger] {
        guard let transaction = transactions[id], transaction.owner == owner else {
            throw XenStoreError(errno: XenStoreError.noEntry)
        }
        transactions[id] = nil
        guard commit else { return [] }
        let nodes = transaction.nodes
        let again = XenStoreError(errno: XenStoreError.again)
        for (path, generation) in nodes.seen where (tree[path]?.generation ?? missingGeneration) != generation {
            throw again
        }
        for (path, edits) in nodes.childEdits where tree[path]?.permissions != edits.permissions {
            throw again
        }
        try checkQuota(committing: transaction)
        sequence += 1
        for (path, change) in nodes.changed {
            switch change {
            case .present(var node):
                node.generation = sequence
                tree.replace(path, with: node)
            case .removed:
                tree.replace(path, with: nil)
            }
        }
        for (path, edits) in nodes.childEdits { tree.editChildren(path, edits, generation: sequence) }
        return transaction.triggers.triggers
    }

    /// Drops a closed connection's transactions (or all of them, on RESET_WATCHES).
    mutating func abortTransactions(owner: UInt64) {
        transactions = transactions.filter { $0.value.owner != owner }
    }

    func transactionExists(_ id: UInt32, owner: UInt64) -> Bool {
        transactions[id]?.owner == owner
    }

    var openTransactionCount: Int { transactions.count }

    /// Nodes a domain owns, live and as each of its open transactions sees
    /// them (for checks of the quota from outside, e.g. the fuzz target).
    func ownedNodeCounts(of domain: UInt32) -> [Int] {
        [tree.ownedNodeCount(of: domain)]
            + transactions.values.map { TransactionView(live: tree, nodes: $0.nodes).ownedNodeCount(of: domain) }
    }

    func openTransactionCount(of requester: Requester) -> Int {
        transactions.values.count { $0.requester == requester }
    }

    /// Nodes each of the requester's open transactions has touched.
    func transactionTouchedCounts(of requester: Requester) -> [Int] {
        transactions.values.filter { $0.requester == requester }.map(\.nodes.touchedCount)
    }

    // MARK: Internals

    /// A guest's commit may not take it past GuestQuota.nodes, whatever it
    /// created meanwhile outside the transaction (each was checked alone),
    /// nor grow a directory it added children to past GuestQuota.nodeBytes.
    private func checkQuota(committing transaction: OpenTransaction) throws(XenStoreError) {
        let requester = transaction.requester
        guard !requester.isPrivileged else { return }
        let noSpace = XenStoreError(errno: GuestQuota.noSpace)
        let domain = UInt32(requester.domain)
        var added = 0
        for (path, change) in transaction.nodes.changed {
            if case .present(let node) = change, node.owner == domain { added += 1 }
            if tree[path]?.owner == domain { added -= 1 }
        }
        if added > 0 && tree.ownedNodeCount(of: domain) + added > GuestQuota.nodes { throw noSpace }
        for (path, edits) in transaction.nodes.childEdits where !edits.added.isEmpty {
            var node = tree[path]!
            node.children = edits.applied(to: node.children)
            if node.recordSize > GuestQuota.nodeBytes { throw noSpace }
        }
    }

    /// Runs `body` on the transaction's view of the store (its nodes moved
    /// in and back, so neither they nor the live tree are copied).
    private mutating func inTransaction<T>(
        _ id: UInt32, _ body: (inout TransactionView, Requester) throws(XenStoreError) -> T
    ) throws(XenStoreError) -> T {
        guard var open = transactions.removeValue(forKey: id) else { throw XenStoreError(errno: XenStoreError.noEntry) }
        var view = TransactionView(live: tree, nodes: TransactionNodes())
        swap(&view.nodes, &open.nodes)
        defer {
            swap(&view.nodes, &open.nodes)
            transactions[id] = open
        }
        return try body(&view, open.requester)
    }

    /// A node for a read-only request, noted as looked at when inside a transaction.
    private mutating func lookup(_ path: String, _ requester: Requester, _ need: Requester.Need,
                                 _ transaction: UInt32) throws(XenStoreError) -> XenStoreNode {
        guard transaction != 0 else { return try Self.checked(&tree, path, requester, need) }
        return try inTransaction(transaction) { (view, owner) throws(XenStoreError) in
            if !view.nodes.hasTouched(path) { try Self.checkTransactionQuota(view.nodes, owner, adding: 1) }
            return try Self.checked(&view, path, requester, need)
        }
    }

    /// Runs one mutation on the live tree or in the transaction's view.
    /// Live changes are stamped with a new sequence number and return their
    /// triggers; a transaction's are kept for its commit.
    private mutating func change(_ mutation: Mutation, by requester: Requester,
                                 transaction: UInt32) throws(XenStoreError) -> [WatchTrigger] {
        sequence += 1
        let generation = sequence
        var triggers: [WatchTrigger] = []
        if transaction == 0 {
            try Self.apply(mutation, to: &tree, by: requester, generation: generation, triggers: &triggers)
            return triggers
        }
        guard var open = transactions.removeValue(forKey: transaction) else { throw XenStoreError(errno: XenStoreError.noEntry) }
        var view = TransactionView(live: tree, nodes: TransactionNodes())
        swap(&view.nodes, &open.nodes)
        defer {
            swap(&view.nodes, &open.nodes)
            open.triggers.merge(triggers)
            transactions[transaction] = open
        }
        // A full transaction takes no more changes (one may pass the quota by its own nodes).
        try Self.checkTransactionQuota(view.nodes, open.requester, adding: 1)
        try Self.apply(mutation, to: &view, by: requester, generation: generation, triggers: &triggers)
        return []
    }

    /// One mutation with xenstored's checks; every check comes before any
    /// change, so a refused request leaves the store (or view) as it was.
    private static func apply<S: NodeStore>(_ mutation: Mutation, to store: inout S, by requester: Requester,
                                            generation: UInt64, triggers: inout [WatchTrigger]) throws(XenStoreError) {
        switch mutation {
        case .write(let path, let value):
            if let node = store.lookup(path) {
                guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
                if !requester.isPrivileged && node.recordSize - node.value.count + value.count > GuestQuota.nodeBytes {
                    throw XenStoreError(errno: GuestQuota.noSpace)
                }
                store.setValue(path, value, generation: generation)
            } else {
                try create(path, value, in: &store, by: requester, generation: generation)
            }
            triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [store.peek(path)!.permissions]))

        case .mkdir(let path):
            if let node = store.lookup(path) {
                guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
                return
            }
            try create(path, [], in: &store, by: requester, generation: generation)
            triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [store.peek(path)!.permissions]))

        case .remove(let path):
            guard let node = store.lookup(path) else {
                // Removing a missing node is fine while its parent exists and may be written.
                let error = missingNodeError(store, path, requester, .write)
                if error.isNoEntry, store.lookup(XenStorePath.parent(of: path)!) != nil { return }
                throw error
            }
            guard requester.may(.write, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
            for (removedPath, removedNode) in store.removeSubtree(path, generation: generation) {
                triggers.append(WatchTrigger(path: removedPath, exactOnly: removedPath != path,
                                             permissionLists: [removedNode.permissions]))
            }

        case .setPermissions(let path, let permissions):
            let node = try checked(&store, path, requester, .write)
            // Only the owner (or dom0) may change permissions, and a guest may not give a node away.
            guard requester.isPrivileged || requester.isOwner(of: node.permissions) else {
                throw XenStoreError(errno: XenStoreError.accessDenied)
            }
            guard requester.isPrivileged || permissions[0].domain == node.permissions[0].domain else {
                throw XenStoreError(errno: 1)  // EPERM
            }
            store.setPermissions(path, permissions, generation: generation)
            triggers.append(WatchTrigger(path: path, exactOnly: false, permissionLists: [node.permissions, permissions]))
        }
    }

    /// A guest's transaction touches at most GuestQuota.transactionNodes nodes.
    private static func checkTransactionQuota(_ nodes: TransactionNodes, _ requester: Requester,
                                              adding count: Int) throws(XenStoreError) {
        if !requester.isPrivileged && nodes.touchedCount + count > GuestQuota.transactionNodes {
            throw XenStoreError(errno: GuestQuota.noSpace)
        }
    }

    /// The node, if it exists and `requester` has `need` on it.
    private static func checked<S: NodeStore>(_ store: inout S, _ path: String, _ requester: Requester,
                                              _ need: Requester.Need) throws(XenStoreError) -> XenStoreNode {
        guard let node = store.lookup(path) else { throw missingNodeError(store, path, requester, need) }
        guard requester.may(need, node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
        return node
    }

    /// The error for a missing node: ENOENT only if the nearest existing
    /// ancestor grants `need`, else EACCES (as xenstored, which does not reveal
    /// whether a node exists below a parent the requester may not see).
    private static func missingNodeError<S: NodeStore>(_ store: S, _ path: String, _ requester: Requester,
                                                       _ need: Requester.Need) -> XenStoreError {
        let ancestor = store.nearestExistingAncestor(of: path)
        return XenStoreError(errno: requester.may(need, ancestor.node.permissions) ? XenStoreError.noEntry : XenStoreError.accessDenied)
    }

    /// A guest's new nodes must keep it within GuestQuota.nodes, and every
    /// record they make or grow within GuestQuota.nodeBytes: the existing
    /// ancestor gains a child name, each new node but the last holds one, the
    /// last holds the value.
    private static func checkQuota<S: NodeStore>(creating path: String, _ value: [UInt8],
                                                 below ancestor: (path: String, node: XenStoreNode),
                                                 in store: S, by requester: Requester) throws(XenStoreError) {
        let noSpace = XenStoreError(errno: GuestQuota.noSpace)
        if store.ownedNodeCount(of: UInt32(requester.domain)) + store.missingNodeCount(creating: path) > GuestQuota.nodes {
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
    private static func create<S: NodeStore>(_ path: String, _ value: [UInt8], in store: inout S, by requester: Requester,
                                             generation: UInt64) throws(XenStoreError) {
        let ancestor = store.nearestExistingAncestor(of: path)
        guard requester.may(.write, ancestor.node.permissions) else { throw XenStoreError(errno: XenStoreError.accessDenied) }
        if !requester.isPrivileged {
            try checkQuota(creating: path, value, below: ancestor, in: store, by: requester)
        }
        let owner: DomID? = requester.isPrivileged ? nil : requester.domain
        store.create(path, value: value, owner: owner, generation: generation)
    }
}
