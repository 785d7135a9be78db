import Hypervisor
import XenStoreWire

/// What the store's mutations need of a tree: the live `NodeTree`, or a
/// transaction's `TransactionView` of it. The request code is written once
/// against this; only the transaction's side records what it looked at.
protocol NodeStore {
    /// The node at `path`; in a transaction, also noted as looked at (its
    /// generation, or its absence, is checked at commit).
    mutating func lookup(_ path: String) -> XenStoreNode?
    /// The node at `path`, not noted (a node this request already looked at or made).
    func peek(_ path: String) -> XenStoreNode?
    /// The closest existing ancestor of a missing `path` (the root always exists).
    func nearestExistingAncestor(of path: String) -> (path: String, node: XenStoreNode)
    func ownedNodeCount(of domain: UInt32) -> Int
    /// The nodes creating `path` adds: it and its missing ancestors.
    func missingNodeCount(creating path: String) -> Int
    /// Creates the missing `path` and any missing ancestors (see NodeTree.create).
    mutating func create(_ path: String, value: [UInt8], owner: DomID?, generation: UInt64)
    mutating func setValue(_ path: String, _ value: [UInt8], generation: UInt64)
    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], generation: UInt64)
    /// Removes `path` and its subtree; the removed nodes, children first.
    mutating func removeSubtree(_ path: String, generation: UInt64) -> [(path: String, node: XenStoreNode)]
}

extension NodeTree: NodeStore {
    func lookup(_ path: String) -> XenStoreNode? { self[path] }
    func peek(_ path: String) -> XenStoreNode? { self[path] }
}
