import Hypervisor
import XenStoreWire

/// One xenstore node: a value, a permission list and child names.
package struct XenStoreNode: Equatable {
    package var value: [UInt8]
    /// First entry: owner and everyone else's access; later entries: per-domain grants.
    package var permissions: [XenStorePermission]
    /// Child names in creation order, as DIRECTORY lists them.
    package var children: [String]
    /// Changes whenever value, permissions or children change (DIRECTORY_PART's <gencnt>).
    package var generation: UInt64

    package var owner: UInt32 { permissions[0].domain }

    /// What GuestQuota.nodeBytes limits: the value and the child names with their NULs.
    package var recordSize: Int { value.count + children.reduce(0) { $0 + $1.utf8.count + 1 } }
}

/// The whole store as a value: copying it is how a transaction takes its
/// snapshot (copy-on-write, so the copy is paid only when one side changes).
/// Keyed by absolute path; every node's ancestors exist.
struct NodeTree {
    private(set) var nodes: [String: XenStoreNode]
    /// Nodes per owning domain (for GuestQuota.nodes), kept by every mutation below.
    private(set) var ownedNodeCounts: [UInt32: Int] = [:]

    init(rootPermissions: [XenStorePermission]) {
        nodes = [:]
        put(XenStorePath.root, XenStoreNode(value: [], permissions: rootPermissions, children: [], generation: 0))
    }

    subscript(path: String) -> XenStoreNode? { nodes[path] }

    var count: Int { nodes.count }

    func ownedNodeCount(of domain: UInt32) -> Int { ownedNodeCounts[domain, default: 0] }

    /// The nodes creating `path` adds: it and its missing ancestors.
    func missingNodeCount(creating path: String) -> Int {
        var count = 0
        var current: String? = path
        while let p = current, nodes[p] == nil {
            count += 1
            current = XenStorePath.parent(of: p)
        }
        return count
    }

    /// Stores (or, with nil, removes) a node, keeping the owner counts.
    private mutating func put(_ path: String, _ node: XenStoreNode?) {
        if let old = nodes[path] { ownedNodeCounts[old.owner, default: 0] -= 1 }
        if let node { ownedNodeCounts[node.owner, default: 0] += 1 }
        nodes[path] = node
    }

    /// The closest existing ancestor of a missing `path` (the root always exists).
    func nearestExistingAncestor(of path: String) -> (path: String, node: XenStoreNode) {
        var current = path
        while let parent = XenStorePath.parent(of: current) {
            if let node = nodes[parent] { return (parent, node) }
            current = parent
        }
        return (XenStorePath.root, nodes[XenStorePath.root]!)
    }

    /// Creates the missing `path` and any missing ancestors. Each new node
    /// copies its parent's permissions; `owner`, when given (an unprivileged
    /// creator), becomes the owner of every new node.
    mutating func create(_ path: String, value: [UInt8], owner: DomID?, generation: UInt64) {
        var missing: [String] = []
        var current = path
        while nodes[current] == nil {
            missing.append(current)
            guard let parent = XenStorePath.parent(of: current) else { break }
            current = parent
        }
        var parentPath = current
        for newPath in missing.reversed() {
            var permissions = nodes[parentPath]!.permissions
            if let owner { permissions[0].domain = UInt32(owner) }
            nodes[parentPath]!.children.append(XenStorePath.lastComponent(of: newPath))
            nodes[parentPath]!.generation = generation
            put(newPath, XenStoreNode(value: [], permissions: permissions, children: [], generation: generation))
            parentPath = newPath
        }
        nodes[path]!.value = value
    }

    mutating func setValue(_ path: String, _ value: [UInt8], generation: UInt64) {
        nodes[path]!.value = value
        nodes[path]!.generation = generation
    }

    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], generation: UInt64) {
        var node = nodes[path]!
        node.permissions = permissions
        node.generation = generation
        put(path, node)
    }

    /// Removes `path` (not the root) and everything below it. Returns the
    /// removed nodes children-first, the order in which xenstored fires their watches.
    mutating func removeSubtree(_ path: String, generation: UInt64) -> [(path: String, node: XenStoreNode)] {
        var removed: [(path: String, node: XenStoreNode)] = []
        collectSubtree(path, into: &removed)
        for (p, _) in removed { put(p, nil) }
        if let parent = XenStorePath.parent(of: path) {
            let name = XenStorePath.lastComponent(of: path)
            nodes[parent]!.children.removeAll { $0 == name }
            nodes[parent]!.generation = generation
        }
        return removed
    }

    private func collectSubtree(_ path: String, into removed: inout [(path: String, node: XenStoreNode)]) {
        guard let node = nodes[path] else { return }
        for child in node.children { collectSubtree(XenStorePath.child(child, of: path), into: &removed) }
        removed.append((path, node))
    }

    /// Puts a node as a committed transaction left it (nil: it was removed).
    mutating func replace(_ path: String, with node: XenStoreNode?) {
        put(path, node)
    }

    /// A committed transaction's child names added and removed, on the node as it is now.
    mutating func editChildren(_ path: String, _ edits: ChildEdits, generation: UInt64) {
        nodes[path]!.children = edits.applied(to: nodes[path]!.children)
        nodes[path]!.generation = generation
    }
}
