import Glibc
import Hypervisor
import LoopbackHypervisor
import Synchronization
import SystemSupport
import XenABI
import XenRing

/// The control ring of a connection (netif.h "Control ring",
/// feature-ctrl-ring): one page of 16-byte slots granted to the backend,
/// one data page for what a request names by grant (a hash key, a hash
/// table), and an event channel of its own. Only the caller of
/// `LoopbackNetFrontend.controlRequest` touches it (the pumps never do),
/// one request at a time.
final class NetFrontendControlRing {   // confined to the thread that makes control requests
    let events: LoopbackEventChannels
    let port: EventChannelPort
    let ringGrant: GrantRef
    let dataGrant: GrantRef
    /// The data page (granted read-only: the backend copies from it).
    let data: UnsafeMutableRawPointer
    private var ring: FrontRing
    private let pages: GuestPages
    private let scratch = UnsafeMutableRawPointer.allocate(byteCount: RingEntrySize.netifCtrl, alignment: 8)
    private var nextID: UInt16 = 0
    /// Requests sent since connect.
    private(set) var requestsSent: UInt64 = 0

    /// Allocates and grants both pages and an unbound port for the backend.
    init(guest: LoopbackGuestDomain, backendDomain: DomID) throws(HypervisorError) {
        let pages = GuestPages(guest: guest, grantee: backendDomain)
        let events: LoopbackEventChannels
        do {
            events = try guest.openEventChannels()
        } catch {
            scratch.deallocate()
            throw error
        }
        do throws(HypervisorError) {
            let (ringFrame, ringRef) = try pages.grant(readOnly: false)
            let (dataFrame, dataRef) = try pages.grant(readOnly: true)
            port = try events.allocateUnbound(remoteDomain: backendDomain)
            ring = FrontRing(initializing: guest.page(ringFrame), pages: 1, entrySize: RingEntrySize.netifCtrl)
            ringGrant = ringRef
            dataGrant = dataRef
            data = guest.page(dataFrame)
        } catch {
            pages.release()
            events.close()
            scratch.deallocate()
            throw error
        }
        self.pages = pages
        self.events = events
    }

    deinit { scratch.deallocate() }

    /// Revokes both grants, frees the pages, closes the port. Unusable afterwards.
    func release() {
        pages.release()
        events.close()
    }

    /// Puts one request with a fresh id, publishes it, notifies, and waits
    /// for its response (woken by the event channel, looking at rsp_prod at
    /// least every 20 ms whatever the backend notifies). Late responses to
    /// earlier requests that timed out are skipped; ours must echo its id
    /// and type.
    func request(type: UInt16, data: (UInt32, UInt32, UInt32), timeout: Double) throws(NetFrontendError) -> NetifCtrlResponse {
        guard ring.freeRequests > 0 else { throw .noRoom("control ring: every slot awaits a response") }
        let id = nextID
        nextID &+= 1
        NetifCtrlRequest(id: id, type: type, data: data).encode(to: ring.nextRequestSlot())
        ring.commitRequest()
        _ = ring.pushRequests()
        requestsSent &+= 1
        // Always notify: the backend serves the ring only when its port fires.
        try? events.notify(port)
        let deadline = MonotonicClock.seconds() + timeout
        while true {
            if ring.unconsumedResponses() > 0 || ring.finalCheckForResponses() {
                // Responses come in request order: while earlier requests
                // (that timed out) are unanswered, this one is theirs.
                let older = ring.requestProducerPrivate &- ring.responseConsumer > 1
                ring.takeResponse(into: scratch)
                if older { continue }
                let r = NetifCtrlResponse(decoding: scratch)
                guard r.id == id, r.type == type else {
                    throw .badControlResponse("sent id \(id) type \(type), got id \(r.id) type \(r.type) status \(r.status)")
                }
                return r
            }
            let left = deadline - MonotonicClock.seconds()
            if left <= 0 { throw .timeout("the control response to type \(type) (id \(id))") }
            var pfd = pollfd(fd: events.fileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, Int32(min(left, 0.02) * 1000) + 1)
            while let p = try? events.nextPending() { try? events.unmask(p) }
        }
    }
}

/// What this frontend set on its control ring for receive-side hashing, as
/// the backend answered SUCCESS to it: written by the control requests'
/// thread, read by the pumps (each keeps a copy, refreshed when the
/// generation moves) to check the hash extras they receive.
///
/// A setting is recorded once the backend has answered it, so a frame
/// hashed under the new setting that arrives before the answer is counted
/// a mismatch: change settings while no hashed traffic flows.
final class ReceiveHashCheck: Sendable {
    struct Settings: Sendable {
        var algorithm = NetifHashAlgorithm.none
        var flags: UInt32 = 0
        var key = ToeplitzKey()
    }

    private let settings = Mutex(Settings())
    private let generationWord = Atomic<UInt64>(0)

    var generation: UInt64 { generationWord.load(ordering: .acquiring) }
    var current: Settings { settings.withLock { $0 } }

    func edit(_ change: (inout Settings) -> Void) {
        settings.withLock { s in
            change(&s)
            generationWord.wrappingAdd(1, ordering: .releasing)
        }
    }

    /// Back to netif.h's defaults (a new connection).
    func reset() { edit { $0 = Settings() } }
}

/// One queue's checker of received hash extras: recomputes the hash over
/// the frame's own bytes with the settings we gave.
final class ReceiveHashVerifier {   // confined like its queue
    private let check: ReceiveHashCheck
    private var generation: UInt64 = .max
    private var settings = ReceiveHashCheck.Settings()
    /// The longest headers hashed: Ethernet, a 60-byte IPv4 header, ports.
    private static let windowSize = 128
    private let window = UnsafeMutableRawPointer.allocate(byteCount: ReceiveHashVerifier.windowSize, alignment: 16)
    private let input = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 16)

    init(check: ReceiveHashCheck) { self.check = check }
    deinit { window.deallocate(); input.deallocate() }

    /// Whether `extra` is the hash the settings give `fragments` (an
    /// Ethernet frame of `length` bytes).
    func matches(_ extra: NetifExtraInfo, fragments: FrameFragments, length: Int) -> Bool {
        let g = check.generation
        if g != generation {
            settings = check.current
            generation = g
        }
        guard settings.algorithm == NetifHashAlgorithm.toeplitz,
              UInt32(extra.payload[1]) == settings.algorithm else { return false }
        let n = min(length, Self.windowSize)
        fragments.copy(from: 0, count: n, into: window)
        guard let hashed = NetifHashInput.extract(frame: window, length: n, flags: settings.flags, into: input),
              hashed.typeBit == extra.payload[0] else { return false }
        let value = UInt32(extra.payload[2]) | UInt32(extra.payload[3]) << 8
            | UInt32(extra.payload[4]) << 16 | UInt32(extra.payload[5]) << 24
        return settings.key.hash(input, count: hashed.count) == value
    }
}

// MARK: control requests

extension LoopbackNetFrontend {
    /// Whether this connection has a control ring.
    public var hasControlRing: Bool { control != nil }

    /// The control ring's grant and our port for it (published as
    /// `ctrl-ring-ref` and `event-channel-ctrl`); nil without one.
    public var controlRingGrant: GrantRef? { control?.ringGrant }
    public var controlEventChannelPort: EventChannelPort? { control?.port }

    /// Control requests sent since connect.
    public var controlRequestsSent: UInt64 { control?.requestsSent ?? 0 }

    /// Sends one control request and waits for its response (netif.h
    /// "Control ring"): a fresh id, checked with the type in the response.
    /// From the thread that connects, while the pumps run (they never touch
    /// the control ring). Throws `.noControlRing` without one, `.timeout`
    /// when no response comes within `timeout` seconds.
    public func controlRequest(type: UInt16, data: (UInt32, UInt32, UInt32) = (0, 0, 0),
                               timeout: Double = 5) throws -> NetifCtrlResponse {
        guard let control else { throw NetFrontendError.noControlRing }
        return try control.request(type: type, data: data, timeout: timeout)
    }

    /// XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM (NetifHashAlgorithm.*). Returns the status.
    @discardableResult
    public func setHashAlgorithm(_ algorithm: UInt32, timeout: Double = 5) throws -> UInt32 {
        let r = try controlRequest(type: NetifCtrlType.setHashAlgorithm, data: (algorithm, 0, 0), timeout: timeout)
        if r.status == NetifCtrlStatus.success { hashCheck.edit { $0.algorithm = algorithm } }
        return r.status
    }

    /// XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS (NetifHashType bits). Returns the status.
    @discardableResult
    public func setHashFlags(_ flags: UInt32, timeout: Double = 5) throws -> UInt32 {
        let r = try controlRequest(type: NetifCtrlType.setHashFlags, data: (flags, 0, 0), timeout: timeout)
        if r.status == NetifCtrlStatus.success { hashCheck.edit { $0.flags = flags } }
        return r.status
    }

    /// XEN_NETIF_CTRL_TYPE_SET_HASH_KEY: the key goes at the start of the
    /// data page (at most a page). Returns the status.
    @discardableResult
    public func setHashKey(_ key: [UInt8], timeout: Double = 5) throws -> UInt32 {
        guard let control else { throw NetFrontendError.noControlRing }
        guard key.count <= XenPage.size else { throw NetFrontendError.noRoom("a \(key.count)-byte key in one page") }
        key.withUnsafeBytes { if let base = $0.baseAddress { control.data.copyMemory(from: base, byteCount: key.count) } }
        let r = try controlRequest(type: NetifCtrlType.setHashKey, data: (control.dataGrant, UInt32(key.count), 0),
                                   timeout: timeout)
        if r.status == NetifCtrlStatus.success && key.count <= ToeplitzKey.maxLength {
            hashCheck.edit { $0.key = ToeplitzKey(key) }
        }
        return r.status
    }

    /// XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE. Returns the status.
    @discardableResult
    public func setHashMappingSize(_ size: UInt32, timeout: Double = 5) throws -> UInt32 {
        try controlRequest(type: NetifCtrlType.setHashMappingSize, data: (size, 0, 0), timeout: timeout).status
    }

    /// XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING: `entries` (queue numbers,
    /// little-endian) at the start of the data page, for the table from
    /// `offset`. Returns the status.
    @discardableResult
    public func setHashMapping(_ entries: [UInt32], offset: UInt32 = 0, timeout: Double = 5) throws -> UInt32 {
        guard let control else { throw NetFrontendError.noControlRing }
        guard entries.count * 4 <= XenPage.size else { throw NetFrontendError.noRoom("\(entries.count) table entries in one page") }
        for (i, e) in entries.enumerated() { control.data.storeBytes(of: e.littleEndian, toByteOffset: i * 4, as: UInt32.self) }
        return try controlRequest(type: NetifCtrlType.setHashMapping, data: (control.dataGrant, UInt32(entries.count), offset),
                                  timeout: timeout).status
    }
}
