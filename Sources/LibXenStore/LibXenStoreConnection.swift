import CLibXenStore
import Glibc
import Hypervisor

/// A xenstore connection through Xen's own libxenstore: on real Xen it
/// reaches xenstored (or /dev/xen/xenbus); with a socket path it reaches the
/// loopback hypervisor's xenstored the same way.
///
/// libxenstore serialises requests per handle and, after the first watch,
/// runs a reader thread of its own that queues events behind `xs_fileno`'s pipe.
public final class LibXenStoreConnection: XenStore, @unchecked Sendable {  // `handle` is read under `handleLock`'s shared side and cleared under its exclusive side (close)
    private let handleLock = ReadWriteLock()
    private var handle: OpaquePointer?
    /// libxenstore's watch pipe: readable while watch events are queued.
    public let watchFileDescriptor: Int32

    /// XENSTORED_PATH is process-wide: opens that set it must not overlap.
    private static let environmentLock = ReadWriteLock()

    /// Opens libxenstore's default connection, or the xenstored listening at
    /// `socketPath` (XENSTORED_PATH is set for the duration of xs_open, then
    /// restored; setenv is not thread-safe against concurrent getenv, so a
    /// process that only ever uses one server may rather export it once).
    public init(socketPath: String?) throws(XenStoreError) {
        let (opened, openErrno) = Self.environmentLock.withWriteLock { () -> (OpaquePointer?, Int32) in
            guard let socketPath else {
                let h = xs_open(0)
                return (h, errno)
            }
            let previous = getenv("XENSTORED_PATH").map { String(cString: $0) }
            if previous == socketPath {
                let h = xs_open(0)  // already pointing there: leave the environment alone
                return (h, errno)
            }
            setenv("XENSTORED_PATH", socketPath, 1)
            let h = xs_open(0)
            let openErrno = errno
            if let previous { setenv("XENSTORED_PATH", previous, 1) } else { unsetenv("XENSTORED_PATH") }
            return (h, openErrno)
        }
        guard let opened else {
            throw XenStoreError(errno: openErrno, context: "xs_open \(socketPath ?? "(default)")")
        }
        // Made now so that it exists before any watch fires.
        let fd = xs_fileno(opened)
        guard fd >= 0 else {
            let saved = errno
            xs_close(opened)
            throw XenStoreError(errno: saved, context: "xs_fileno")
        }
        handle = opened
        watchFileDescriptor = fd
    }

    deinit { close() }

    public func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> String? {
        try withHandle { (h) throws(XenStoreError) -> String? in
            var length: UInt32 = 0
            guard let value = xs_read(h, transaction.id, path, &length) else {
                if errno == ENOENT { return nil }
                throw failure("xs_read \(path)")
            }
            defer { free(value) }
            return String(decoding: UnsafeRawBufferPointer(start: value, count: Int(length)), as: UTF8.self)
        }
    }

    public func write(_ path: String, _ value: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            let bytes = Array(value.utf8)
            let ok = bytes.withUnsafeBytes { xs_write(h, transaction.id, path, $0.baseAddress, UInt32($0.count)) }
            guard ok else { throw failure("xs_write \(path)") }
        }
    }

    public func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            guard xs_mkdir(h, transaction.id, path) else { throw failure("xs_mkdir \(path)") }
        }
    }

    public func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            // ENOENT: the parent is missing too, so the node is certainly gone.
            guard xs_rm(h, transaction.id, path) || errno == ENOENT else { throw failure("xs_rm \(path)") }
        }
    }

    public func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]? {
        try withHandle { (h) throws(XenStoreError) -> [String]? in
            var count: UInt32 = 0
            guard let list = xs_directory(h, transaction.id, path, &count) else {
                if errno == ENOENT { return nil }
                throw failure("xs_directory \(path)")
            }
            defer { free(list) }  // one allocation holds the pointers and the names
            return (0..<Int(count)).map { String(cString: list[$0]!) }
        }
    }

    public func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission] {
        try withHandle { (h) throws(XenStoreError) -> [XenStorePermission] in
            var count: UInt32 = 0
            guard let perms = xs_get_permissions(h, transaction.id, path, &count) else {
                throw failure("xs_get_permissions \(path)")
            }
            defer { free(perms) }
            return (0..<Int(count)).map { Self.permission(from: perms[$0]) }
        }
    }

    public func setPermissions(_ path: String, _ perms: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            var entries = perms.map(Self.libxenstorePermission)
            let ok = entries.withUnsafeMutableBufferPointer {
                xs_set_permissions(h, transaction.id, path, $0.baseAddress, UInt32($0.count))
            }
            guard ok else { throw failure("xs_set_permissions \(path)") }
        }
    }

    public func startTransaction() throws(XenStoreError) -> XenStoreTransaction {
        try withHandle { (h) throws(XenStoreError) -> XenStoreTransaction in
            let id = xs_transaction_start(h)
            guard id != 0 else { throw failure("xs_transaction_start") }
            return XenStoreTransaction(id: id)
        }
    }

    public func endTransaction(_ t: XenStoreTransaction, commit: Bool) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            // The C flag is "abort".
            guard xs_transaction_end(h, t.id, !commit) else { throw failure("xs_transaction_end") }
        }
    }

    public func watch(_ path: String, token: String) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            guard xs_watch(h, path, token) else { throw failure("xs_watch \(path)") }
        }
    }

    public func unwatch(_ path: String, token: String) throws(XenStoreError) {
        try withHandle { (h) throws(XenStoreError) in
            guard xs_unwatch(h, path, token) else { throw failure("xs_unwatch \(path)") }
        }
    }

    public func nextWatchEvent() throws(XenStoreError) -> XenStoreWatchEvent? {
        try withHandle { (h) throws(XenStoreError) -> XenStoreWatchEvent? in
            guard let strings = xs_check_watch(h) else {
                if errno == EAGAIN { return nil }
                throw failure("xs_check_watch")
            }
            defer { free(strings) }  // one allocation, like xs_directory's
            return XenStoreWatchEvent(path: String(cString: strings[Int(XS_WATCH_PATH.rawValue)]!),
                                      token: String(cString: strings[Int(XS_WATCH_TOKEN.rawValue)]!))
        }
    }

    /// Closes the handle (and stops libxenstore's reader thread). Later calls fail with EIO. Idempotent.
    public func close() {
        handleLock.withWriteLock {
            if let handle { xs_close(handle) }
            handle = nil
        }
    }

    // MARK: Internals

    private func withHandle<T>(_ body: (OpaquePointer) throws(XenStoreError) -> T) throws(XenStoreError) -> T {
        try handleLock.withReadLock { () throws(XenStoreError) -> T in
            guard let handle else { throw XenStoreError(errno: XenStoreError.io, context: "xenstore connection closed") }
            return try body(handle)
        }
    }

    /// The errno libxenstore left, as a XenStoreError.
    private func failure(_ what: String) -> XenStoreError {
        XenStoreError(errno: errno, context: what)
    }

    private static func permission(from entry: xs_permissions) -> XenStorePermission {
        let read = entry.perms & UInt32(XS_PERM_READ) != 0
        let write = entry.perms & UInt32(XS_PERM_WRITE) != 0
        let access: XenStorePermission.Access = read ? (write ? .both : .read) : (write ? .write : .none)
        return XenStorePermission(domain: entry.id, access: access)
    }

    private static func libxenstorePermission(_ perm: XenStorePermission) -> xs_permissions {
        var bits = UInt32(XS_PERM_NONE)
        if perm.canRead { bits |= UInt32(XS_PERM_READ) }
        if perm.canWrite { bits |= UInt32(XS_PERM_WRITE) }
        return xs_permissions(id: perm.domain, perms: bits)
    }
}

/// A pthread read-write lock: many concurrent calls, one exclusive close.
final class ReadWriteLock: @unchecked Sendable {  // the pthread lock is heap-allocated so it never moves; it synchronises itself
    private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)

    init() { pthread_rwlock_init(lock, nil) }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func withReadLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func withWriteLock<T>(_ body: () -> T) -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return body()
    }
}
