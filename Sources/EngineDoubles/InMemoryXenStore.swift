import Glibc
import Hypervisor

/// A xenstore in plain memory for stepping the control plane with no
/// daemon, socket or thread: nodes, watches (fired into a queue the test
/// drains through `nextWatchEvent`, as XenbusControlLoop does) and
/// transactions that apply at once (there is no other writer to conflict
/// with). Permissions are stored, not enforced. One thread at a time.
public final class InMemoryXenStore: XenStore, @unchecked Sendable {   // single-threaded by contract
    private var nodes: [String: String] = [:]
    private var perms: [String: [XenStorePermission]] = [:]
    private var watches: [(path: String, token: String)] = []
    private var events: [XenStoreWatchEvent] = []
    private var nextTransaction: UInt32 = 1
    /// Watch events fired and not yet taken.
    public var pendingEvents: Int { events.count }
    /// Every write, for tests that look at what was written.
    public private(set) var writes = 0
    /// Writes at or under this path fail with EACCES (a xenstored that
    /// refuses), for tests of what a failed write leaves.
    public var refusesWritesUnder: String?

    public init() { nodes["/"] = "" }

    public var watchFileDescriptor: Int32 { -1 }

    /// Forgets everything (a fuzzer reusing the store).
    public func reset() {
        nodes = ["/": ""]
        perms = [:]
        watches = []
        events = []
        writes = 0
    }

    private static func parent(_ path: String) -> String? {
        guard path != "/", let slash = path.lastIndex(of: "/") else { return nil }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    private func fire(_ path: String) {
        for w in watches where path == w.path || path.hasPrefix(w.path.hasSuffix("/") ? w.path : w.path + "/") {
            events.append(XenStoreWatchEvent(path: path, token: w.token))
        }
    }

    private func create(_ path: String) {
        var missing: [String] = []
        var p: String? = path
        while let q = p, nodes[q] == nil { missing.append(q); p = Self.parent(q) }
        for q in missing.reversed() { nodes[q] = ""; fire(q) }
    }

    public func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> String? { nodes[path] }

    public func write(_ path: String, _ value: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        guard path.hasPrefix("/") else { throw XenStoreError(errno: XenStoreError.invalid, context: path) }
        if let refused = refusesWritesUnder, path == refused || path.hasPrefix(refused + "/") {
            throw XenStoreError(errno: EACCES, context: path)
        }
        create(path)
        nodes[path] = value
        writes += 1
        fire(path)
    }

    public func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) { create(path) }

    public func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        let prefix = path.hasSuffix("/") ? path : path + "/"
        let gone = nodes.keys.filter { $0 == path || $0.hasPrefix(prefix) }
        for k in gone { nodes[k] = nil; perms[k] = nil }
        guard !gone.isEmpty else { return }
        fire(path)
        // Watches below the removed node fire too, as in xenstored.
        for w in watches where w.path.hasPrefix(prefix) { events.append(XenStoreWatchEvent(path: w.path, token: w.token)) }
    }

    public func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]? {
        guard nodes[path] != nil else { return nil }
        let prefix = path == "/" ? "/" : path + "/"
        return nodes.keys.compactMap { k -> String? in
            guard k.hasPrefix(prefix), k.count > prefix.count else { return nil }
            let rest = k.dropFirst(prefix.count)
            return rest.contains("/") ? nil : String(rest)
        }.sorted()
    }

    public func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission] {
        guard nodes[path] != nil else { throw XenStoreError(errno: XenStoreError.noEntry, context: path) }
        return perms[path] ?? [XenStorePermission(domain: 0, access: .none)]
    }

    public func setPermissions(_ path: String, _ p: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError) {
        guard nodes[path] != nil else { throw XenStoreError(errno: XenStoreError.noEntry, context: path) }
        perms[path] = p
    }

    public func startTransaction() throws(XenStoreError) -> XenStoreTransaction {
        nextTransaction &+= 1
        return XenStoreTransaction(id: nextTransaction)
    }

    public func endTransaction(_ t: XenStoreTransaction, commit: Bool) throws(XenStoreError) {}

    public func watch(_ path: String, token: String) throws(XenStoreError) {
        watches.append((path, token))
        events.append(XenStoreWatchEvent(path: path, token: token))   // the initial firing
    }

    public func unwatch(_ path: String, token: String) throws(XenStoreError) {
        watches.removeAll { $0.path == path && $0.token == token }
    }

    public func nextWatchEvent() throws(XenStoreError) -> XenStoreWatchEvent? {
        events.isEmpty ? nil : events.removeFirst()
    }

    public func close() {}
}
