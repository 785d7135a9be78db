/// An error reply from xenstore: the errno its XS_ERROR named.
public struct XenStoreError: Error, Equatable, CustomStringConvertible, Sendable {
    public var errno: Int32
    public var context: String
    public init(errno: Int32, context: String = "") { self.errno = errno; self.context = context }

    public static let noEntry: Int32 = 2      // ENOENT
    public static let again: Int32 = 11       // EAGAIN: transaction conflict
    public static let accessDenied: Int32 = 13 // EACCES
    public static let exists: Int32 = 17      // EEXIST
    public static let invalid: Int32 = 22     // EINVAL
    public static let io: Int32 = 5           // EIO: connection trouble

    public var isNoEntry: Bool { errno == Self.noEntry }
    public var isAgain: Bool { errno == Self.again }
    public var description: String {
        context.isEmpty ? "xenstore error errno \(errno)" : "xenstore error errno \(errno) (\(context))"
    }
}

/// One entry of a node's permission list, in xenstore's text form: the first
/// entry names the owner and the access of everyone not listed; each later
/// entry grants one domain an access ("n0", "r5", "w7", "b3").
public struct XenStorePermission: Equatable, Hashable, Sendable, CustomStringConvertible {
    public enum Access: Character, Sendable { case none = "n", read = "r", write = "w", both = "b" }
    public var domain: UInt32
    public var access: Access
    public init(domain: UInt32, access: Access) { self.domain = domain; self.access = access }

    public init?(_ text: some StringProtocol) {
        guard let c = text.first, let a = Access(rawValue: c), let d = UInt32(text.dropFirst()) else { return nil }
        access = a; domain = d
    }
    public var description: String { "\(access.rawValue)\(domain)" }
    public var canRead: Bool { access == .read || access == .both }
    public var canWrite: Bool { access == .write || access == .both }
}

/// A transaction id; 0 means "no transaction".
public struct XenStoreTransaction: Hashable, Sendable {
    public let id: UInt32
    public init(id: UInt32) { self.id = id }
    public static let none = XenStoreTransaction(id: 0)
}

/// A watch firing: the path that changed (or the watched path, for the
/// initial firing) and the token given to `watch`.
public struct XenStoreWatchEvent: Equatable, Sendable {
    public var path: String
    public var token: String
    public init(path: String, token: String) { self.path = path; self.token = token }
}

/// A connection to xenstore (libxenstore on Xen and on the loopback
/// hypervisor's xenstored, or our own wire client). Paths are absolute.
/// Implementations are safe to call from several threads.
public protocol XenStore: AnyObject, Sendable {
    /// The value of `path`; nil if the node does not exist.
    func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> String?
    func write(_ path: String, _ value: String, transaction: XenStoreTransaction) throws(XenStoreError)
    func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError)
    /// Removes the node and its children; removing a missing node succeeds.
    func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError)
    /// Child names; nil if the node does not exist.
    func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]?
    func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission]
    func setPermissions(_ path: String, _ perms: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError)

    func startTransaction() throws(XenStoreError) -> XenStoreTransaction
    /// Commits (or aborts). A conflicting commit throws errno EAGAIN: retry the whole transaction.
    func endTransaction(_ t: XenStoreTransaction, commit: Bool) throws(XenStoreError)

    /// Registers a watch; xenstore fires it once at once, then on every change at or below `path`.
    func watch(_ path: String, token: String) throws(XenStoreError)
    func unwatch(_ path: String, token: String) throws(XenStoreError)
    /// Readable when a watch event is queued.
    var watchFileDescriptor: Int32 { get }
    /// The next queued watch event, or nil if none is queued (never blocks).
    func nextWatchEvent() throws(XenStoreError) -> XenStoreWatchEvent?
    func close()
}

public extension XenStore {
    func read(_ path: String) throws(XenStoreError) -> String? { try read(path, transaction: .none) }
    func write(_ path: String, _ value: String) throws(XenStoreError) { try write(path, value, transaction: .none) }
    func mkdir(_ path: String) throws(XenStoreError) { try mkdir(path, transaction: .none) }
    func remove(_ path: String) throws(XenStoreError) { try remove(path, transaction: .none) }
    func directory(_ path: String) throws(XenStoreError) -> [String]? { try directory(path, transaction: .none) }
    func permissions(_ path: String) throws(XenStoreError) -> [XenStorePermission] { try permissions(path, transaction: .none) }
    func setPermissions(_ path: String, _ perms: [XenStorePermission]) throws(XenStoreError) {
        try setPermissions(path, perms, transaction: .none)
    }

    /// Runs `body` in a transaction, retrying it from the start on EAGAIN.
    func withTransaction<T>(maxAttempts: Int = 32, _ body: (XenStoreTransaction) throws(XenStoreError) -> T) throws(XenStoreError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            let t = try startTransaction()
            let result: T
            do { result = try body(t) } catch {
                try? endTransaction(t, commit: false)
                throw error
            }
            do {
                try endTransaction(t, commit: true)
                return result
            } catch where error.isAgain && attempt < maxAttempts {
                continue
            }
        }
    }
}
