import Hypervisor
import XenABI
import XenStoreWire

/// A successful request's reply, and the watch whose initial firing follows it.
struct RequestReply {
    var payload: [UInt8]
    var newWatch: Watch? = nil

    static let ok = RequestReply(payload: XenStorePayload.ok)
}

extension ServerCore {
    /// Answers one request: the reply (or XS_ERROR) echoes req_id and tx_id.
    /// Watch events caused by a change are queued before the reply, as xenstored does.
    func respond(to message: XenStoreMessage, from connection: ClientConnection) {
        var reply = XenStoreMessage(rawType: message.rawType, requestID: message.requestID,
                                    transactionID: message.transactionID)
        var newWatch: Watch?
        do throws(XenStoreError) {
            let result = try perform(message, from: connection)
            guard result.payload.count <= XenStoreLimits.payloadMax else { throw XenStoreError(errno: 7) }  // E2BIG
            reply.payload = result.payload
            newWatch = result.newWatch
        } catch {
            reply.rawType = XenStoreMessageType.error.rawValue
            reply.payload = XenStorePayload.errorReply(errno: error.errno)
        }
        queue(reply, to: connection)
        if let newWatch {
            queueWatchEvent(path: newWatch.requestedPath, token: newWatch.token, to: connection)
        }
    }

    private func perform(_ message: XenStoreMessage, from connection: ClientConnection) throws(XenStoreError) -> RequestReply {
        let requester = connection.requester
        let payload = message.payload
        // Checked up front (and kept out of the `database` calls below, which mutate it).
        let tx = try transaction(message, connection)
        switch message.type {
        case .read:
            let path = try pathArgument(payload, requester)
            return RequestReply(payload: try database.read(path, by: requester, transaction: tx))

        case .write:
            guard let (rawPath, value) = XenStorePayload.splitFirstString(payload) else { throw invalid }
            let path = try resolve(rawPath, requester)
            fire(try database.write(path, value, by: requester, transaction: tx))
            return .ok

        case .mkdir:
            let path = try pathArgument(payload, requester)
            fire(try database.mkdir(path, by: requester, transaction: tx))
            return .ok

        case .rm:
            let path = try pathArgument(payload, requester)
            fire(try database.remove(path, by: requester, transaction: tx))
            return .ok

        case .directory:
            let path = try pathArgument(payload, requester)
            let listing = try database.directory(path, by: requester, transaction: tx)
            return RequestReply(payload: XenStorePayload.terminated(listing.children))

        case .directoryPart:
            return RequestReply(payload: try directoryPart(message, connection))

        case .getPerms:
            let path = try pathArgument(payload, requester)
            let perms = try database.permissions(path, by: requester, transaction: tx)
            return RequestReply(payload: XenStorePermissionList.encode(perms))

        case .setPerms:
            let strings = XenStorePayload.strings(payload)
            guard strings.count >= 2, let perms = XenStorePermissionList.parse(Array(strings.dropFirst())) else { throw invalid }
            let path = try resolve(strings[0], requester)
            fire(try database.setPermissions(path, perms, by: requester, transaction: tx))
            return .ok

        case .watch:
            return try addWatch(payload, connection)

        case .unwatch:
            let strings = XenStorePayload.strings(payload)
            guard strings.count >= 2 else { throw invalid }
            let path = try resolve(strings[0], requester, allowSpecial: true)
            guard let index = connection.watches.firstIndex(where: { $0.absolutePath == path && $0.token == strings[1] }) else {
                throw XenStoreError(errno: XenStoreError.noEntry)
            }
            connection.watches.remove(at: index)
            return .ok

        case .transactionStart:
            guard message.transactionID == 0 else { throw XenStoreError(errno: 16) }  // EBUSY: no nesting
            let id = try database.startTransaction(owner: connection.id, by: requester)
            return RequestReply(payload: XenStorePayload.terminated(String(id)))

        case .transactionEnd:
            let commit: Bool
            switch XenStorePayload.singleString(payload) {
            case "T": commit = true
            case "F": commit = false
            default: throw invalid
            }
            fire(try database.endTransaction(message.transactionID, owner: connection.id, commit: commit))
            return .ok

        case .getDomainPath:
            return RequestReply(payload: XenStorePayload.terminated(XenStorePath.domainPath(of: try domainArgument(payload))))

        case .isDomainIntroduced:
            try requirePrivilege(requester)
            return RequestReply(payload: XenStorePayload.terminated(isIntroduced(try domainArgument(payload)) ? "T" : "F"))

        case .introduce:
            try requirePrivilege(requester)
            let strings = XenStorePayload.strings(payload)  // domid, mfn, event channel: only domid matters here
            guard strings.count >= 3, let domid = DomID(strings[0]) else { throw invalid }
            try introduce(domid)
            return .ok

        case .release:
            try requirePrivilege(requester)
            try release(try domainArgument(payload))
            return .ok

        case .resetWatches:
            connection.watches.removeAll()
            database.abortTransactions(owner: connection.id)
            return .ok

        case .control:
            try requirePrivilege(requester)
            return .ok

        case .resume, .setTarget:
            try requirePrivilege(requester)
            throw XenStoreError(errno: 38)  // ENOSYS: the loopback hypervisor has no use for them

        case .watchEvent, .error, .invalid, nil:
            throw invalid
        }
    }

    /// DIRECTORY_PART "<path>\0<byte offset>\0": replies "<generation>\0" and
    /// the child list from that byte offset, as much as fits, with an extra
    /// NUL (an empty name) once the list's end is included.
    private func directoryPart(_ message: XenStoreMessage, _ connection: ClientConnection) throws(XenStoreError) -> [UInt8] {
        let strings = XenStorePayload.strings(message.payload)
        guard strings.count == 2, let offset = Int(strings[1]), offset >= 0 else { throw invalid }
        let path = try resolve(strings[0], connection.requester)
        let tx = try transaction(message, connection)
        let listing = try database.directory(path, by: connection.requester, transaction: tx)
        let all = XenStorePayload.terminated(listing.children)
        var reply = XenStorePayload.terminated(String(listing.generation))
        guard offset < all.count else { return reply + [0] }
        let room = XenStoreLimits.payloadMax - reply.count - 1
        var end = offset
        // Whole names only, from the offset, while they fit.
        while end < all.count {
            let nameEnd = all[end...].firstIndex(of: 0)! + 1
            if nameEnd - offset > room { break }
            end = nameEnd
        }
        reply.append(contentsOf: all[offset..<end])
        if end == all.count { reply.append(0) }
        return reply
    }

    private func addWatch(_ payload: [UInt8], _ connection: ClientConnection) throws(XenStoreError) -> RequestReply {
        let strings = XenStorePayload.strings(payload)
        guard strings.count >= 2 else { throw invalid }
        let watch = Watch(requestedPath: strings[0],
                          absolutePath: try resolve(strings[0], connection.requester, allowSpecial: true),
                          token: strings[1])
        if connection.watches.contains(where: { $0.absolutePath == watch.absolutePath && $0.token == watch.token }) {
            throw XenStoreError(errno: XenStoreError.exists)
        }
        if !connection.requester.isPrivileged && watchCount(of: connection.requester) >= GuestQuota.watches {
            throw XenStoreError(errno: GuestQuota.tooBig)
        }
        connection.watches.append(watch)
        return RequestReply(payload: XenStorePayload.ok, newWatch: watch)
    }

    /// Watches held by all of `requester`'s connections (the quota is per domain).
    func watchCount(of requester: Requester) -> Int {
        connections.values.reduce(0) { $0 + ($1.requester == requester ? $1.watches.count : 0) }
    }

    // MARK: Watch firing

    /// Queues an event for every watch a trigger matches. Unprivileged
    /// connections only hear about nodes they may read, and never about the
    /// special paths.
    func fire(_ triggers: [WatchTrigger]) {
        guard !triggers.isEmpty else { return }
        for connection in connections.values where !connection.watches.isEmpty {
            let requester = connection.requester
            for trigger in triggers {
                guard requester.isPrivileged || trigger.permissionLists.contains(where: { requester.may(.read, $0) }) else {
                    continue
                }
                for watch in connection.watches where watch.matches(trigger) {
                    let path = watch.isRelative
                        ? XenStorePath.relative(trigger.path, toDomain: requester.domain) ?? trigger.path
                        : trigger.path
                    queueWatchEvent(path: path, token: watch.token, to: connection)
                }
            }
        }
    }

    // MARK: Arguments

    private var invalid: XenStoreError { XenStoreError(errno: XenStoreError.invalid) }

    private func resolve(_ raw: String, _ requester: Requester, allowSpecial: Bool = false) throws(XenStoreError) -> String {
        guard let path = XenStorePath.resolve(raw, domain: requester.domain, allowSpecial: allowSpecial) else { throw invalid }
        return path
    }

    /// The single path a request carries ("path\0").
    private func pathArgument(_ payload: [UInt8], _ requester: Requester) throws(XenStoreError) -> String {
        guard let raw = XenStorePayload.singleString(payload) else { throw invalid }
        return try resolve(raw, requester)
    }

    private func domainArgument(_ payload: [UInt8]) throws(XenStoreError) -> DomID {
        guard let text = XenStorePayload.singleString(payload), let domid = DomID(text) else { throw invalid }
        return domid
    }

    /// The request's transaction id, which must be one this connection opened
    /// (0: none). Requests that take no transaction ignore the field.
    private func transaction(_ message: XenStoreMessage, _ connection: ClientConnection) throws(XenStoreError) -> UInt32 {
        guard let type = message.type, Self.typesTakingTransaction.contains(type) else { return 0 }
        let id = message.transactionID
        guard id == 0 || database.transactionExists(id, owner: connection.id) else {
            throw XenStoreError(errno: XenStoreError.noEntry)
        }
        return id
    }

    private static let typesTakingTransaction: Set<XenStoreMessageType> = [
        .read, .write, .mkdir, .rm, .directory, .directoryPart, .getPerms, .setPerms,
    ]

    private func requirePrivilege(_ requester: Requester) throws(XenStoreError) {
        guard requester.isPrivileged else { throw XenStoreError(errno: XenStoreError.accessDenied) }
    }
}
