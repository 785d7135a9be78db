import Glibc
import SystemSupport
import Hypervisor
import XenABI
import XenStoreWire

/// A xenstore client speaking the wire protocol over a unix socket: a
/// simulated guest connects to its domain socket of the loopback xenstored,
/// dom0 code to the server's main socket. Safe to use from several threads;
/// requests may be in flight concurrently (replies are matched by req_id).
public final class XenStoreSocketClient: XenStore, @unchecked Sendable {  // `reader` is used only inside `readerLock`
    public let socketPath: String
    private let channel: ClientChannel
    private let readerLock = PThreadMutex()
    private var reader: NativeThread?

    public init(socketPath: String) throws(XenStoreError) {
        self.socketPath = socketPath
        let fd = try UnixSocket.xenStoreConnect(to: socketPath)
        do throws(XenStoreError) {
            channel = try ClientChannel(fd: fd)
        } catch {
            Glibc.close(fd)
            throw error
        }
        let channel = self.channel
        let thread = try NativeThread.forXenStore(name: "xenstore-reader") { channel.readUntilClosed() }
        readerLock.withLock { reader = thread }
    }

    deinit { close() }

    // MARK: XenStore

    public func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> String? {
        do throws(XenStoreError) {
            let value = try request(.read, XenStorePayload.terminated(path), transaction, "read \(path)")
            return String(decoding: value, as: UTF8.self)
        } catch where error.isNoEntry {
            return nil
        }
    }

    public func write(_ path: String, _ value: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        _ = try request(.write, XenStorePayload.terminated(path) + Array(value.utf8), transaction, "write \(path)")
    }

    public func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        _ = try request(.mkdir, XenStorePayload.terminated(path), transaction, "mkdir \(path)")
    }

    public func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        do throws(XenStoreError) {
            _ = try request(.rm, XenStorePayload.terminated(path), transaction, "rm \(path)")
        } catch where error.isNoEntry {
            return  // already gone (its parent too)
        }
    }

    public func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]? {
        do throws(XenStoreError) {
            let names = try request(.directory, XenStorePayload.terminated(path), transaction, "directory \(path)")
            return XenStorePayload.strings(names)
        } catch where error.errno == 7 {  // E2BIG: too many children for one reply
            return try directoryInParts(path, transaction)
        } catch where error.isNoEntry {
            return nil
        }
    }

    public func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission] {
        let reply = try request(.getPerms, XenStorePayload.terminated(path), transaction, "get-perms \(path)")
        guard let perms = XenStorePermissionList.parse(XenStorePayload.strings(reply)) else {
            throw XenStoreError(errno: XenStoreError.io, context: "malformed permissions of \(path)")
        }
        return perms
    }

    public func setPermissions(_ path: String, _ perms: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError) {
        let payload = XenStorePayload.terminated([path] + perms.map(\.description))
        _ = try request(.setPerms, payload, transaction, "set-perms \(path)")
    }

    public func startTransaction() throws(XenStoreError) -> XenStoreTransaction {
        let reply = try request(.transactionStart, XenStorePayload.terminated(""), .none, "transaction start")
        guard let id = UInt32(XenStorePayload.text(reply)), id != 0 else {
            throw XenStoreError(errno: XenStoreError.io, context: "malformed transaction id")
        }
        return XenStoreTransaction(id: id)
    }

    public func endTransaction(_ t: XenStoreTransaction, commit: Bool) throws(XenStoreError) {
        _ = try request(.transactionEnd, XenStorePayload.terminated(commit ? "T" : "F"), t, "transaction end")
    }

    public func watch(_ path: String, token: String) throws(XenStoreError) {
        _ = try request(.watch, XenStorePayload.terminated([path, token]), .none, "watch \(path)")
    }

    public func unwatch(_ path: String, token: String) throws(XenStoreError) {
        _ = try request(.unwatch, XenStorePayload.terminated([path, token]), .none, "unwatch \(path)")
    }

    public var watchFileDescriptor: Int32 { channel.eventFD }

    public func nextWatchEvent() throws(XenStoreError) -> XenStoreWatchEvent? {
        try channel.nextEvent()
    }

    /// Disconnects and waits for the reader thread. Pending and later calls fail with EIO. Idempotent.
    public func close() {
        channel.shutDown()
        let thread = readerLock.withLock { () -> NativeThread? in
            defer { reader = nil }
            return reader
        }
        thread?.join()
    }

    // MARK: Beyond the XenStore protocol

    /// "/local/domain/<domid>" as the server reports it (XS_GET_DOMAIN_PATH).
    public func domainPath(of domid: DomID) throws(XenStoreError) -> String {
        XenStorePayload.text(try request(.getDomainPath, XenStorePayload.terminated(String(domid)), .none, "get-domain-path"))
    }

    /// XS_INTRODUCE (dom0 only): the server opens the domain's socket and fires @introduceDomain.
    public func introduceDomain(_ domid: DomID) throws(XenStoreError) {
        // mfn and event channel mean nothing to the loopback xenstored.
        _ = try request(.introduce, XenStorePayload.terminated([String(domid), "0", "0"]), .none, "introduce \(domid)")
    }

    /// XS_RELEASE (dom0 only): the server drops the domain and fires @releaseDomain.
    public func releaseDomain(_ domid: DomID) throws(XenStoreError) {
        _ = try request(.release, XenStorePayload.terminated(String(domid)), .none, "release \(domid)")
    }

    /// XS_IS_DOMAIN_INTRODUCED (dom0 only).
    public func isDomainIntroduced(_ domid: DomID) throws(XenStoreError) -> Bool {
        let reply = try request(.isDomainIntroduced, XenStorePayload.terminated(String(domid)), .none, "is-domain-introduced")
        return XenStorePayload.text(reply) == "T"
    }

    /// XS_RESET_WATCHES: drops this connection's watches and transactions.
    public func resetWatches() throws(XenStoreError) {
        _ = try request(.resetWatches, XenStorePayload.terminated(""), .none, "reset-watches")
    }

    /// Sends any request and returns the reply payload; an XS_ERROR reply is thrown.
    public func request(_ type: XenStoreMessageType, payload: [UInt8],
                        transaction: XenStoreTransaction = .none) throws(XenStoreError) -> [UInt8] {
        try request(type, payload, transaction, "\(type)")
    }

    // MARK: Internals

    private func request(_ type: XenStoreMessageType, _ payload: [UInt8], _ transaction: XenStoreTransaction,
                         _ what: @autoclosure () -> String) throws(XenStoreError) -> [UInt8] {
        guard payload.count <= XenStoreLimits.payloadMax else { throw XenStoreError(errno: 7, context: what()) }  // E2BIG
        let reply = try channel.exchange(XenStoreMessage(type, transactionID: transaction.id, payload: payload))
        if reply.type == .error {
            throw XenStoreError(errno: XenStorePayload.errno(fromErrorReply: reply.payload), context: what())
        }
        guard reply.rawType == type.rawValue else {
            throw XenStoreError(errno: XenStoreError.io, context: "\(what()): reply of type \(reply.rawType)")
        }
        return reply.payload
    }

    /// XS_DIRECTORY_PART from byte offset 0 until the list's end (an empty
    /// name); starts over if the node's generation changes in between.
    private func directoryInParts(_ path: String, _ transaction: XenStoreTransaction) throws(XenStoreError) -> [String]? {
        var generation: String?
        var listing: [UInt8] = []
        while true {
            let payload = XenStorePayload.terminated([path, String(listing.count)])
            let reply: [UInt8]
            do throws(XenStoreError) {
                reply = try request(.directoryPart, payload, transaction, "directory \(path)")
            } catch where error.isNoEntry {
                return nil
            }
            guard let nul = reply.firstIndex(of: 0) else {
                throw XenStoreError(errno: XenStoreError.io, context: "malformed directory part of \(path)")
            }
            let partGeneration = String(decoding: reply[..<nul], as: UTF8.self)
            if let known = generation, known != partGeneration {
                listing.removeAll()  // the node changed between parts: start again
                generation = nil
                continue
            }
            generation = partGeneration
            let names = reply[(nul + 1)...]
            listing.append(contentsOf: names)
            // The last part ends with an extra NUL (an empty name), and so does an empty list.
            if names.count <= 1 || listing.suffix(2).elementsEqual([0, 0]) {
                return XenStorePayload.strings(listing).filter { !$0.isEmpty }
            }
        }
    }
}
