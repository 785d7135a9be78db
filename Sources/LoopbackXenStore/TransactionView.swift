import Hypervisor
import XenStoreWire

/// Generation noted for a node a transaction found missing.
let missingGeneration = UInt64.max

/// Child names a transaction added to or removed from a live node it did
/// not otherwise look at (the parent of a node it created or removed). At
/// commit they are applied to the node's children as they are then, so
/// transactions creating siblings under one directory do not conflict on
/// it; a change of the node's permissions or its removal still does.
struct ChildEdits {
    /// The node's permissions when first edited (they decided the access).
    var permissions: [XenStorePermission]
    var added: [String] = []
    var removed: Set<String> = []

    mutating func add(_ name: String) { added.append(name) }

    mutating func remove(_ name: String) {
        if let i = added.firstIndex(of: name) { added.remove(at: i) } else { removed.insert(name) }
    }

    func applied(to children: [String]) -> [String] {
        (removed.isEmpty ? children : children.filter { !removed.contains($0) }) + added
    }
}

/// A node as a transaction left it.
enum ChangedNode {
    case present(XenStoreNode)
    case removed
}

/// What a transaction looked at and changed, over the live tree (C
/// xenstored's accessed-node list): it conflicts only on those nodes.
struct TransactionNodes {
    /// Generation of each node looked at, as it was then (missingGeneration: absent).
    var seen: [String: UInt64] = [:]
    /// Nodes changed, created or removed (each looked at first, so also in `seen`).
    var changed: [String: ChangedNode] = [:]
    /// Live directories that only gained or lost children (see ChildEdits).
    var childEdits: [String: ChildEdits] = [:]

    /// Nodes touched (GuestQuota.transactionNodes).
    var touchedCount: Int { seen.count + childEdits.keys.count(where: { seen[$0] == nil }) }

    func hasTouched(_ path: String) -> Bool { seen[path] != nil || childEdits[path] != nil }
}

/// A transaction's view of the store: its own changes over the live tree
/// as it is now (not a snapshot from the transaction's start: as in C
/// xenstored, a node first looked at shows its current contents, and only a
/// change after that look is a conflict). Made for one request; `live`
/// must not change while it exists.
struct TransactionView: NodeStore {
    let live: NodeTree
    var nodes: TransactionNodes

    mutating func lookup(_ path: String) -> XenStoreNode? {
        if nodes.seen[path] == nil { nodes.seen[path] = live[path]?.generation ?? missingGeneration }
        return peek(path)
    }

    func peek(_ path: String) -> XenStoreNode? {
        switch nodes.changed[path] {
        case .present(let node)?: return node
        case .removed?: return nil
        case nil:
            guard var node = live[path] else { return nil }
            if let edits = nodes.childEdits[path] { node.children = edits.applied(to: node.children) }
            return node
        }
    }

    func nearestExistingAncestor(of path: String) -> (path: String, node: XenStoreNode) {
        var current = path
        while let parent = XenStorePath.parent(of: current) {
            if let node = peek(parent) { return (parent, node) }
            current = parent
        }
        return (XenStorePath.root, peek(XenStorePath.root)!)
    }

    func ownedNodeCount(of domain: UInt32) -> Int {
        var count = live.ownedNodeCount(of: domain)
        for (path, change) in nodes.changed {
            if live[path]?.owner == domain { count -= 1 }
            if case .present(let node) = change, node.owner == domain { count += 1 }
        }
        return count
    }

    func missingNodeCount(creating path: String) -> Int {
        var count = 0
        var current: String? = path
        while let p = current, peek(p) == nil {
            count += 1
            current = XenStorePath.parent(of: p)
        }
        return count
    }

    mutating func create(_ path: String, value: [UInt8], owner: DomID?, generation: UInt64) {
        var missing: [String] = []
        var current = path
        // The missing nodes are looked at; the existing ancestor only gains a child.
        while peek(current) == nil {
            _ = lookup(current)
            missing.append(current)
            guard let parent = XenStorePath.parent(of: current) else { break }
            current = parent
        }
        var parentPath = current
        for newPath in missing.reversed() {
            var permissions = peek(parentPath)!.permissions
            if let owner { permissions[0].domain = UInt32(owner) }
            addChild(XenStorePath.lastComponent(of: newPath), to: parentPath, generation: generation)
            nodes.changed[newPath] = .present(XenStoreNode(value: [], permissions: permissions, children: [], generation: generation))
            parentPath = newPath
        }
        update(path) { $0.value = value }
    }

    mutating func setValue(_ path: String, _ value: [UInt8], generation: UInt64) {
        update(path) { $0.value = value; $0.generation = generation }
    }

    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], generation: UInt64) {
        update(path) { $0.permissions = permissions; $0.generation = generation }
    }

    mutating func removeSubtree(_ path: String, generation: UInt64) -> [(path: String, node: XenStoreNode)] {
        var removed: [(path: String, node: XenStoreNode)] = []
        collectSubtree(path, into: &removed)
        for (p, _) in removed {
            nodes.changed[p] = .removed
            nodes.childEdits[p] = nil
        }
        if let parent = XenStorePath.parent(of: path) {
            let name = XenStorePath.lastComponent(of: path)
            if case .present(var node)? = nodes.changed[parent] {
                node.children.removeAll { $0 == name }
                node.generation = generation
                nodes.changed[parent] = .present(node)
            } else {
                nodes.childEdits[parent, default: ChildEdits(permissions: live[parent]!.permissions)].remove(name)
            }
        }
        return removed
    }

    // MARK: Internals

    /// Changes an existing node: its view (child edits folded in) becomes
    /// the transaction's own copy, put in place whole at commit.
    private mutating func update(_ path: String, _ body: (inout XenStoreNode) -> Void) {
        var node = peek(path)!
        body(&node)
        nodes.changed[path] = .present(node)
        nodes.childEdits[path] = nil
    }

    private mutating func addChild(_ name: String, to parent: String, generation: UInt64) {
        if case .present(var node)? = nodes.changed[parent] {
            node.children.append(name)
            node.generation = generation
            nodes.changed[parent] = .present(node)
        } else {
            nodes.childEdits[parent, default: ChildEdits(permissions: live[parent]!.permissions)].add(name)
        }
    }

    /// Every node of the subtree, children first, each looked at (a change
    /// of any of them before commit is a conflict, as in C xenstored).
    private mutating func collectSubtree(_ path: String, into removed: inout [(path: String, node: XenStoreNode)]) {
        guard let node = lookup(path) else { return }
        for child in node.children { collectSubtree(XenStorePath.child(child, of: path), into: &removed) }
        removed.append((path, node))
    }
}
