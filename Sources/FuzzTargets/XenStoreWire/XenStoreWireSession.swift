import Hypervisor
import LoopbackXenStore
import XenABI
import XenStoreWire

/// One execution's world: an in-process xenstored with a dom0 connection
/// and a connection of guest domain 5, the nodes dom0 set up around the
/// guest's home, and what is needed to check every reply the guest gets.
final class XenStoreWireSession {
    static let guest: DomID = 5

    private let server = InProcessXenStoreServer()
    private let dom0: UInt64
    private var guestConnection: UInt64
    /// The guest's input as the server should frame it, and its output.
    private var guestRequests = XenStoreFrameDecoder()
    private var guestReplies = XenStoreFrameDecoder()
    /// Requests sent, oldest first; those before `answered` have had their reply.
    private var requests: [XenStoreMessage] = []
    /// Per request, whether it reads a node the guest could not read in the
    /// step that sent it (the server answers in that step; a guest that is
    /// not reading takes the reply later, perhaps after dom0 changed the
    /// node's permissions: the reply is judged by the tree it was made from).
    private var readsSecret: [Bool] = []
    private var answered = 0
    private var unansweredCount: Int { requests.count - answered }
    /// Watches just set whose initial event (path as requested, token) is still to come.
    private var initialFirings: [[String]] = []
    /// The guest sent a stream that cannot be framed: the server must close the connection.
    private var framingBroken = false
    private var guestReads = true
    private var dom0RequestID: UInt32 = 0
    /// Nodes dom0 may have given the guest (owner 5) beyond its quota.
    private var grantedNodes = 1
    private(set) var lastTransactionID: UInt32 = 0
    private(set) var findings: [String] = []
    /// Nodes the guest could read at a step boundary while it did not take
    /// its replies: a watch event queued then is judged against the tree
    /// when it fired, not when the guest at last reads it.
    private var readableWhileQueued: Set<String> = []

    init() {
        dom0 = server.connect(as: nil)
        guestConnection = server.connect(as: Self.guest)
        setUpTree()
    }

    /// The guest's home (its own), nodes of dom0 and of domain 7 that it may
    /// not see, one it may only read, one it may only write, one it shares.
    private func setUpTree() {
        let none0 = [XenStorePermission(domain: 0, access: .none)]
        func node(_ path: String, _ value: String, _ permissions: [XenStorePermission]?) {
            dom0Request(.write, [path], value: Array(value.utf8))
            if let permissions { dom0Request(.setPerms, [path] + permissions.map(\.description)) }
        }
        node("/local/domain/5", "", [XenStorePermission(domain: 5, access: .none)])
        node("/local/domain/5/dom0-owned", "d0", none0)
        node("/local/domain/5/readonly", "ro", none0 + [XenStorePermission(domain: 5, access: .read)])
        node("/local/domain/7", "", [XenStorePermission(domain: 7, access: .none)])
        node("/local/domain/7/secret", "seven", nil)
        node("/protected/k", "dom0-secret", nil)
        node("/readable", "", none0 + [XenStorePermission(domain: 5, access: .read)])
        node("/readable/k", "r", nil)
        node("/shared", "", none0 + [XenStorePermission(domain: 5, access: .both)])
        node("/writeonly", "", none0 + [XenStorePermission(domain: 5, access: .write)])
        node("/writeonly/w", "w", nil)
    }

    // MARK: Steps

    func perform(_ step: XenStoreWireStep, index: Int) {
        let before = server.nodes
        switch step {
        case .raw(let bytes):
            guestSends(bytes)
        case .requests(let messages):
            var bytes: [UInt8] = []
            for message in messages { bytes += message.encoded() }
            guestSends(bytes)
        case .dom0(let action):
            dom0Acts(action)
        case .toggleGuestReading:
            guestReads.toggle()
        case .reconnect:
            server.close(guestConnection)
            connectGuestAgain()
        }
        let after = server.nodes
        collectGuestOutput(before: before, after: after)
        if !step.isDom0 { checkIntegrity(before: before, after: after) }
        checkBounds(before: before, after: after, guestStep: !step.isDom0)
        checkDom0Answers(index)
    }

    private func guestSends(_ bytes: [UInt8]) {
        if !framingBroken {
            guestRequests.append(contentsOf: bytes)
            do {
                while let message = try guestRequests.nextMessage() { requests.append(message) }
            } catch {
                framingBroken = true
            }
        }
        server.send(bytes, on: guestConnection)
    }

    private func dom0Acts(_ action: XenStoreWireDom0Action) {
        let reply: XenStoreMessage?
        switch action.kind {
        case .write(let value):
            reply = dom0Request(.write, [action.path], value: value)
            grantedNodes += action.path.split(separator: "/").count
        case .remove:
            reply = dom0Request(.rm, [action.path])
        case .setPermissions(let permissions):
            reply = dom0Request(.setPerms, [action.path] + permissions.map(\.description))
            grantedNodes += 1
        }
        if let reply, reply.type == .error {
            let name = XenStorePayload.text(reply.payload)
            if name != "ENOENT" { finding("dom0's \(action.kind) of \(action.path) failed: \(name)") }
        }
    }

    private func connectGuestAgain() {
        guestConnection = server.connect(as: Self.guest)
        guestRequests = XenStoreFrameDecoder()
        guestReplies = XenStoreFrameDecoder()
        requests.removeAll()
        readsSecret.removeAll()
        answered = 0
        initialFirings.removeAll()
        framingBroken = false
        guestReads = true
    }

    // MARK: dom0

    /// One privileged request; its reply must be well-formed. nil (a finding) if none came.
    @discardableResult
    private func dom0Request(_ type: XenStoreMessageType, _ strings: [String], value: [UInt8]? = nil) -> XenStoreMessage? {
        dom0RequestID &+= 1
        var payload = XenStorePayload.terminated(strings)
        if let value { payload = Array(payload.dropLast()) + [0] + value }
        let request = XenStoreMessage(type, requestID: dom0RequestID, payload: payload)
        server.send(request.encoded(), on: dom0)
        var decoder = XenStoreFrameDecoder()
        decoder.append(contentsOf: server.takeReplies(of: dom0))
        var replies: [XenStoreMessage] = []
        while let message = try? decoder.nextMessage() {
            if message.type != .watchEvent { replies.append(message) }
        }
        guard server.isOpen(dom0), replies.count == 1, let reply = replies.first,
              reply.requestID == request.requestID, reply.transactionID == 0,
              reply.rawType == request.rawType || reply.type == .error else {
            finding("dom0's \(type) \(strings) got no proper reply: \(replies.map(Self.describe))")
            return nil
        }
        return reply
    }

    /// After every step dom0 still writes and reads back correctly.
    private func checkDom0Answers(_ index: Int) {
        let value = Array("step \(index)".utf8)
        dom0Request(.write, ["/fuzz-alive"], value: value)
        if let reply = dom0Request(.read, ["/fuzz-alive"]), reply.payload != value {
            finding("dom0 read back \(Self.describe(reply)) after writing \"step \(index)\"")
        }
    }

    // MARK: The guest's replies

    /// Takes what the guest has been sent (if it reads) and checks each
    /// message: replies in request order with its req_id and tx_id, errors
    /// that name an errno, nothing of a node it may not read, no privileged
    /// operation granted; a connection closed only for a reason.
    private func collectGuestOutput(before: [String: XenStoreNode], after: [String: XenStoreNode]) {
        let open = server.isOpen(guestConnection)
        while readsSecret.count < requests.count {
            let request = requests[readsSecret.count]
            var secret = false
            if let type = request.type, Self.readTypes.contains(type), request.transactionID == 0,
               let raw = XenStorePayload.strings(request.payload).first,
               let path = XenStorePath.resolve(raw, domain: Self.guest) {
                secret = isSecret(path, before, after)
            }
            readsSecret.append(secret)
        }
        if !(guestReads || !open) {
            for nodes in [before, after] {
                for (path, node) in nodes where Self.guestAccess(node.permissions).canRead { readableWhileQueued.insert(path) }
            }
        }
        if guestReads || !open {
            // Like a client's read loop: taking replies makes room for more.
            while case let replies = server.takeReplies(of: guestConnection), !replies.isEmpty {
                guestReplies.append(contentsOf: replies)
            }
            do {
                while let message = try guestReplies.nextMessage() { check(message, before: before, after: after) }
            } catch {
                finding("the guest's reply stream cannot be framed: \(error)")
            }
            readableWhileQueued.removeAll(keepingCapacity: true)   // every queued event is judged
            if open && guestReads && !framingBroken && unansweredCount > 0 {
                finding("\(unansweredCount) requests unanswered, first \(Self.describe(requests[answered]))")
            }
            if answered == requests.count {
                requests.removeAll(keepingCapacity: true)
                readsSecret.removeAll(keepingCapacity: true)
                answered = 0
            }
        }
        if framingBroken && open {
            finding("a stream that cannot be framed left the guest's connection open")
        }
        if !open {
            if !framingBroken && guestReads {
                finding("the guest's connection was closed after well-framed input while it read its replies")
            }
            connectGuestAgain()
        }
    }

    private static let privilegedTypes: Set<XenStoreMessageType> = [.introduce, .release, .setTarget, .resume, .control, .isDomainIntroduced]
    private static let readTypes: Set<XenStoreMessageType> = [.read, .directory, .directoryPart, .getPerms]

    private func check(_ message: XenStoreMessage, before: [String: XenStoreNode], after: [String: XenStoreNode]) {
        if message.type == .watchEvent {
            let strings = XenStorePayload.strings(message.payload)
            guard strings.count == 2, message.payload.last == 0 else {
                return finding("malformed watch event \(Self.describe(message))")
            }
            if let initial = initialFirings.firstIndex(of: strings) {
                initialFirings.remove(at: initial)  // the event every new watch gets, whatever it names
            } else if let path = XenStorePath.resolve(strings[0], domain: Self.guest), isSecret(path, before, after),
                      !readableWhileQueued.contains(path) {
                finding("watch event for \(path), which the guest may not read")
            }
            return
        }
        guard unansweredCount > 0 else { return finding("reply \(Self.describe(message)) to no request") }
        let request = requests[answered]
        let secret = readsSecret[answered]
        answered += 1
        guard message.requestID == request.requestID, message.transactionID == request.transactionID,
              message.rawType == request.rawType || message.type == .error else {
            return finding("reply \(Self.describe(message)) does not match request \(Self.describe(request))")
        }
        if message.type == .error {
            guard message.payload.last == 0, XenStoreErrorName.errno(named: XenStorePayload.text(message.payload)) != nil else {
                return finding("error reply \(Self.describe(message)) names no errno")
            }
        }
        if let type = request.type, Self.privilegedTypes.contains(type), message.payload != XenStorePayload.errorReply(errno: XenStoreError.accessDenied) {
            finding("guest's \(type) answered \(Self.describe(message)), not EACCES")
        }
        if secret, let type = request.type, message.type != .error {
            let raw = XenStorePayload.strings(request.payload).first ?? ""
            finding("guest's \(type) of \(raw) (which it may not read) answered \(Self.describe(message))")
        }
        if request.type == .watch, message.type == .watch {
            initialFirings.append(Array(XenStorePayload.strings(request.payload).prefix(2)))
        }
        if request.type == .transactionStart, message.type == .transactionStart,
           let id = UInt32(XenStorePayload.text(message.payload)) {
            lastTransactionID = id
        }
    }

    // MARK: Invariants on the tree and the server's memory

    /// Access of domain 5 to a node, straight from xenstore.txt's rules: the
    /// owner (first entry) has all; a later entry naming it gives that; else the first entry's.
    private static func guestAccess(_ permissions: [XenStorePermission]) -> XenStorePermission {
        let owner = permissions[0]
        if owner.domain == UInt32(guest) { return XenStorePermission(domain: owner.domain, access: .both) }
        return permissions.dropFirst().first { $0.domain == UInt32(guest) } ?? owner
    }

    /// A node the guest could not read before the step and still cannot after it.
    private func isSecret(_ path: String, _ before: [String: XenStoreNode], _ after: [String: XenStoreNode]) -> Bool {
        guard let old = before[path], !Self.guestAccess(old.permissions).canRead else { return false }
        return after[path].map { !Self.guestAccess($0.permissions).canRead } ?? true
    }

    /// Nodes the guest may not write are not changed by its step, and gain no
    /// children; they may go only with an ancestor it may write (rm takes the
    /// subtree), and come back only as its own.
    private func checkIntegrity(before: [String: XenStoreNode], after: [String: XenStoreNode]) {
        for (path, old) in before where !Self.guestAccess(old.permissions).canWrite {
            guard let new = after[path] else {
                if !hasWritableAncestor(path, before) { finding("guest removed \(path), which it may not write") }
                continue
            }
            if new.owner == UInt32(Self.guest) && hasWritableAncestor(path, before) { continue }  // removed and made again
            if new.value != old.value || new.permissions != old.permissions {
                finding("guest changed \(path), which it may not write")
            } else if !Set(new.children).isSubset(of: old.children) {
                finding("guest created a child of \(path), which it may not write")
            }
        }
    }

    private func hasWritableAncestor(_ path: String, _ nodes: [String: XenStoreNode]) -> Bool {
        var current = path
        while let parent = XenStorePath.parent(of: current) {
            if let node = nodes[parent], Self.guestAccess(node.permissions).canWrite { return true }
            current = parent
        }
        return false
    }

    /// The guest's nodes, watches, transactions, node records, queued replies
    /// and buffered input stay within GuestQuota.
    private func checkBounds(before: [String: XenStoreNode], after: [String: XenStoreNode], guestStep: Bool) {
        let owned = server.ownedNodeCounts(of: Self.guest)
        if let most = owned.max(), most > GuestQuota.nodes + grantedNodes {
            finding("domain 5 owns \(most) nodes (quota \(GuestQuota.nodes), dom0 gave up to \(grantedNodes))")
        }
        let watches = server.watchCount(of: Self.guest)
        if watches > GuestQuota.watches { finding("domain 5 holds \(watches) watches") }
        let transactions = server.openTransactionCount(of: Self.guest)
        if transactions > GuestQuota.transactions { finding("domain 5 holds \(transactions) transactions") }
        // One request may pass the transaction's quota by the nodes it touches itself.
        if let touched = server.transactionTouchedCounts(of: Self.guest).max(), touched > GuestQuota.transactionNodes + after.count {
            finding("a transaction of domain 5 touched \(touched) nodes")
        }
        let queued = server.queuedOutputCount(of: guestConnection)
        if queued > GuestQuota.queuedOutputBytes + 64 * 1024 { finding("\(queued) bytes of replies queued for domain 5") }
        let buffered = server.bufferedInputCount(of: guestConnection)
        if buffered >= XenStoreMessageHeader.size + XenStoreLimits.payloadMax {
            finding("\(buffered) bytes of input buffered though no whole request is among them")
        }
        guard guestStep else { return }
        // Grown by the guest's step (dom0 may have made it larger before, unlimited).
        for (path, node) in after where node.recordSize > GuestQuota.nodeBytes
            && node.recordSize > before[path]?.recordSize ?? 0 {
            finding("guest left \(path) with a \(node.recordSize)-byte record")
        }
    }

    // MARK: Reporting

    private func finding(_ text: String) {
        if findings.count < 8 { findings.append(text) }
    }

    static func describe(_ message: XenStoreMessage) -> String {
        let type = message.type.map { "\($0)" } ?? "type \(message.rawType)"
        let shown = message.payload.prefix(48).map { (32..<127).contains($0) ? String(UnicodeScalar($0)) : "\\x" + String($0, radix: 16) }
        return "\(type) req \(message.requestID) tx \(message.transactionID) \"\(shown.joined())\"\(message.payload.count > 48 ? "…" : "")"
    }
}

extension XenStoreWireStep {
    var isDom0: Bool { if case .dom0 = self { true } else { false } }
}
