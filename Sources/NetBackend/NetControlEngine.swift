import Hypervisor
import XenABI
import XenRing

/// The control ring of one vif (netif.h's feature-ctrl-ring), with no
/// thread: takes the frontend's requests, answers each one in order, and
/// edits the vif's `VifHashSettings`. Key and table are read with a grant
/// copy into a local page, checked whole, and only then applied: a bad
/// table changes nothing. Queue 0's loop drives it when the control
/// event channel fires; a test steps it by hand.
public final class NetControlEngine {
    private var ring: BackRing
    private let grants: any GrantTableHandle
    private let frontendDomain: DomID
    public let settings: VifHashSettings
    /// One page, for a key or a table copied from the guest.
    private let page: UnsafeMutableRawPointer
    private let scratch: UnsafeMutableRawPointer
    private var brokenReason: String?
    /// Requests answered since the engine started.
    public private(set) var requestsAnswered: UInt64 = 0

    public init(ring base: UnsafeMutableRawPointer, grants: any GrantTableHandle, frontendDomain: DomID,
                settings: VifHashSettings) {
        ring = BackRing(attachingTo: base, pages: 1, entrySize: RingEntrySize.netifCtrl)
        self.grants = grants
        self.frontendDomain = frontendDomain
        self.settings = settings
        page = .allocate(byteCount: XenPage.size, alignment: 64)
        scratch = .allocate(byteCount: RingEntrySize.netifCtrl, alignment: 8)
    }

    deinit { page.deallocate(); scratch.deallocate() }

    public enum Outcome: Equatable, Sendable {
        /// Answered what was there; notify the frontend if `notify`.
        case idle(notify: Bool)
        /// The ring's indices are impossible: the vif fails.
        case broken(String)
    }

    /// Answers every request posted, then re-arms req_event.
    public func step() -> Outcome {
        if let brokenReason { return .broken(brokenReason) }
        var notify = false
        do throws(RingOverflow) {
            repeat {
                var n = try ring.unconsumedRequests()
                while n > 0 {
                    ring.takeRequest(into: scratch)
                    let request = NetifCtrlRequest(decoding: scratch)
                    answer(request).encode(to: ring.nextResponseSlot())
                    ring.commitResponse()
                    requestsAnswered &+= 1
                    n -= 1
                }
                if ring.pushResponses() { notify = true }
            } while try ring.finalCheckForRequests()
        } catch {
            brokenReason = "frontend dom\(frontendDomain) broke the netif control ring: \(error)"
            return .broken(brokenReason!)
        }
        return .idle(notify: notify)
    }

    /// The response to one request: status as netif.h and Linux netback
    /// give it (NOT_SUPPORTED for what is not hashing).
    func answer(_ r: NetifCtrlRequest) -> NetifCtrlResponse {
        var data: UInt32 = 0
        let status: UInt32
        switch r.type {
        case NetifCtrlType.setHashAlgorithm:
            let algorithm = r.data.0
            if algorithm == NetifHashAlgorithm.none || algorithm == NetifHashAlgorithm.toeplitz {
                status = settings.edit { $0.algorithm = algorithm; return NetifCtrlStatus.success }
            } else {
                status = NetifCtrlStatus.invalidParameter
            }
        case NetifCtrlType.getHashFlags:
            if settings.state.algorithm == NetifHashAlgorithm.none {
                status = NetifCtrlStatus.notSupported
            } else {
                status = NetifCtrlStatus.success
                data = NetifHashType.all
            }
        case NetifCtrlType.setHashFlags:
            let flags = r.data.0
            status = settings.edit { s in
                guard flags & ~NetifHashType.all == 0, s.algorithm != NetifHashAlgorithm.none else {
                    return NetifCtrlStatus.invalidParameter
                }
                s.flags = flags
                return NetifCtrlStatus.success
            }
        case NetifCtrlType.setHashKey:
            status = setKey(ref: r.data.0, length: r.data.1)
        case NetifCtrlType.getHashMappingSize:
            status = NetifCtrlStatus.success
            data = UInt32(VifHashSettings.maxMappingSize)
        case NetifCtrlType.setHashMappingSize:
            let size = r.data.0
            if size > UInt32(VifHashSettings.maxMappingSize) {
                status = NetifCtrlStatus.invalidParameter
            } else {
                status = settings.edit { s in
                    s.mappingSize = Int(size)
                    for i in 0..<s.mapping.count { s.mapping[i] = 0 }
                    return NetifCtrlStatus.success
                }
            }
        case NetifCtrlType.setHashMapping:
            status = setMapping(ref: r.data.0, count: r.data.1, offset: r.data.2)
        default:
            status = NetifCtrlStatus.notSupported
        }
        return NetifCtrlResponse(id: r.id, type: r.type, status: status, data: status == NetifCtrlStatus.success ? data : 0)
    }

    /// SET_HASH_KEY: up to 40 bytes from the start of the granted page;
    /// the rest of the key is zero, and length 0 clears it.
    private func setKey(ref: GrantRef, length: UInt32) -> UInt32 {
        guard length <= UInt32(ToeplitzKey.maxLength) else { return NetifCtrlStatus.bufferOverflow }
        let n = Int(length)
        if n > 0 && !copyFromGuest(ref: ref, bytes: n) { return NetifCtrlStatus.invalidParameter }
        let key = ToeplitzKey(UnsafeRawBufferPointer(start: page, count: n))
        return settings.edit { s in
            s.key = key
            s.keyLength = n
            return NetifCtrlStatus.success
        }
    }

    /// SET_HASH_MAPPING: `count` entries from the start of the granted page
    /// into the table at `offset`; each must name one of the vif's queues.
    private func setMapping(ref: GrantRef, count: UInt32, offset: UInt32) -> UInt32 {
        guard UInt64(count) * 4 <= UInt64(XenPage.size) else { return NetifCtrlStatus.bufferOverflow }
        let size = UInt64(settings.state.mappingSize)
        guard UInt64(offset) + UInt64(count) <= size else { return NetifCtrlStatus.invalidParameter }
        let n = Int(count)
        if n == 0 { return NetifCtrlStatus.success }
        guard copyFromGuest(ref: ref, bytes: n * 4) else { return NetifCtrlStatus.invalidParameter }
        let queues = UInt32(settings.queues)
        for i in 0..<n where page.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self).littleEndian >= queues {
            return NetifCtrlStatus.invalidParameter
        }
        return settings.edit { s in
            // The table may have shrunk since the check above.
            guard Int(offset) + n <= s.mappingSize else { return NetifCtrlStatus.invalidParameter }
            for i in 0..<n {
                s.mapping[Int(offset) + i] = UInt8(page.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self).littleEndian)
            }
            return NetifCtrlStatus.success
        }
    }

    private func copyFromGuest(ref: GrantRef, bytes: Int) -> Bool {
        var op = GrantCopyOperation(direction: .fromGuest, domain: frontendDomain, ref: ref, guestOffset: 0,
                                    length: UInt16(bytes), local: page)
        withUnsafeMutablePointer(to: &op) { grants.copy(UnsafeMutableBufferPointer(start: $0, count: 1)) }
        return op.status == 0
    }
}
