import Glibc
import Hypervisor
import SystemSupport
import XenABI

/// Raw test hooks, for hostile-frontend tests: a frontend made without a
/// TAP has no pump, and the test writes tx slots itself and reads what the
/// backend answers. Called from one thread at a time. With several queues
/// they drive queue 0 (the others get their rx buffers posted at connect
/// and are otherwise left alone).
extension LoopbackNetFrontend {
    /// Queue 0, when the caller (not a pump) owns it.
    private func rawQueue() throws(NetFrontendError) -> NetFrontendQueue {
        guard let q = queues.first else { throw .notConnected }
        guard pumps.isEmpty else { throw .pumpOwnsRings }
        return q
    }

    private func publishStatistics(_ q: NetFrontendQueue) { statisticsBox.publish(q.stats, queue: 0) }

    /// A zeroed page granted read-only to the backend, for the test to fill
    /// and name in requests. Revoked and freed at disconnect.
    public func grantTxPage() throws -> (frame: UInt32, ref: GrantRef, bytes: UnsafeMutableRawPointer) {
        try rawQueue().grantRawTxPage()
    }

    /// Writes `slots` verbatim into consecutive tx ring slots, publishes
    /// them, and notifies if the backend asked (req_event). The ring must
    /// have room for them all (a test's mistake otherwise: it traps).
    public func pushTxSlots(_ slots: [TxSlot]) {
        let q: NetFrontendQueue
        do { q = try rawQueue() } catch { preconditionFailure("pushTxSlots: \(error)") }
        precondition(UInt32(slots.count) <= q.tx.freeRequests,
                     "pushTxSlots: \(slots.count) slots, \(q.tx.freeRequests) free in the tx ring")
        for slot in slots {
            switch slot {
            case .request(let r): q.putTxRequest(r, pooled: false)
            case .extra(let e): q.putTxExtra(e)
            }
        }
        q.pushTx()
        publishStatistics(q)
    }

    /// Free slots in queue 0's tx and rx rings (0 when not connected).
    public var txRingFree: Int { queues.first.map { Int($0.tx.freeRequests) } ?? 0 }
    public var rxRingFree: Int { queues.first.map { Int($0.rx.freeRequests) } ?? 0 }

    /// Queue 0's tx and rx req_prod_pvt (what a breach moves away from).
    public var txRequestProducer: UInt32 { queues.first?.tx.requestProducerPrivate ?? 0 }
    public var rxRequestProducer: UInt32 { queues.first?.rx.requestProducerPrivate ?? 0 }

    /// Like `pushTxSlots`, but publishing without any notification when
    /// `notify` is false (a frontend that forgets to kick; `kick` later).
    public func pushTxSlots(_ slots: [TxSlot], notify: Bool) {
        guard !notify else { return pushTxSlots(slots) }
        let q: NetFrontendQueue
        do { q = try rawQueue() } catch { preconditionFailure("pushTxSlots: \(error)") }
        precondition(UInt32(slots.count) <= q.tx.freeRequests, "pushTxSlots: no room")
        for slot in slots {
            switch slot {
            case .request(let r): q.putTxRequest(r, pooled: false)
            case .extra(let e): q.putTxExtra(e)
            }
        }
        _ = q.tx.pushRequests()
    }

    /// Writes raw rx requests (any id, any grant) after whatever is posted,
    /// and publishes them; notifies when asked and the backend wants it.
    /// Only for a frontend made with `postRxBuffers` off, whose rx ring the
    /// caller owns: the queue's own buffers are never posted then.
    public func pushRxRequests(_ requests: [NetifRxRequest], notify: Bool = true) throws {
        let q = try rawQueue()
        guard !options.postRxBuffers else { throw NetFrontendError.noRoom("raw rx requests with postRxBuffers on") }
        guard UInt32(requests.count) <= q.rx.freeRequests else {
            throw NetFrontendError.noRoom("\(requests.count) rx requests, \(q.rx.freeRequests) ring slots free")
        }
        for r in requests {
            r.encode(to: q.rx.nextRequestSlot())
            q.rx.commitRequest()
        }
        if q.rx.pushRequests() && notify { q.notify(q.rxPort) }
    }

    /// The rx responses published now (never more than requests outstanding),
    /// each slot's 8 bytes raw: the caller tells data from extra-info slots.
    public func takeRawRxResponses() throws -> [InlineArray<8, UInt8>] {
        let q = try rawQueue()
        let n = min(q.rx.unconsumedResponses(), q.rx.requestProducerPrivate &- q.rx.responseConsumer)
        var out: [InlineArray<8, UInt8>] = []
        let slot = UnsafeMutableRawPointer.allocate(byteCount: q.rx.entrySize, alignment: 8)
        defer { slot.deallocate() }
        for _ in 0..<n {
            q.rx.takeResponse(into: slot)
            out.append(InlineArray { i in slot.load(fromByteOffset: i, as: UInt8.self) })
        }
        _ = q.rx.finalCheckForResponses()
        return out
    }

    /// Notifies the backend on queue 0's port(s).
    public func kick() throws {
        let q = try rawQueue()
        q.notify(q.txPort)
        if q.rxPort != q.txPort { q.notify(q.rxPort) }
    }

    /// Publishes any rx req_prod (a broken frontend) and notifies.
    public func publishRawRxRequestProducer(_ value: UInt32) throws {
        let q = try rawQueue()
        q.rx.publishRawRequestProducer(value)
        q.notify(q.rxPort)
    }

    /// Sleeps until an event arrives on queue 0's port(s), or `timeout`
    /// passes (arming tx rsp_event first); false if nothing came.
    public func waitForEvents(timeout: Double) throws -> Bool {
        let q = try rawQueue()
        if q.tx.finalCheckForResponses() || q.rx.finalCheckForResponses() { return true }
        var pfd = pollfd(fd: q.events.fileDescriptor, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, Int32(max(timeout, 0) * 1000)) > 0
        q.drainEvents()
        return ready
    }

    /// Publishes any tx req_prod (a broken frontend) and notifies.
    public func publishRawTxRequestProducer(_ value: UInt32) throws {
        let q = try rawQueue()
        q.tx.publishRawRequestProducer(value)
        q.notify(q.txPort)
    }

    /// The tx responses available now, without waiting.
    public func takeTxResponses() throws -> [NetifTxResponse] {
        let q = try rawQueue()
        var out: [NetifTxResponse] = []
        q.reapTxResponses { out.append($0) }
        publishStatistics(q)
        return out
    }

    /// Waits for `count` tx responses, in ring order (an extra slot's comes
    /// back with status NETIF_RSP_NULL); throws a timeout if fewer arrive.
    public func waitTxResponses(_ count: Int, timeout: Double) throws -> [NetifTxResponse] {
        let q = try rawQueue()
        var out: [NetifTxResponse] = []
        let deadline = MonotonicClock.seconds() + timeout
        defer { publishStatistics(q) }
        while out.count < count {
            q.reapTxResponses(limit: count - out.count) { out.append($0) }
            if out.count >= count { break }
            _ = q.tx.finalCheckForResponses()
            if q.txResponsesWaiting { continue }
            guard waitForEvent(q, deadline: deadline) else {
                throw NetFrontendError.timeout("\(count) tx responses (got \(out.count): \(out))")
            }
        }
        return out
    }

    /// Posts `n` more rx buffers (pages granted writable to the backend),
    /// whatever `options.postRxBuffers` says.
    public func postRxBuffers(_ n: Int) throws {
        let q = try rawQueue()
        guard n <= q.rxFreeBuffers, UInt32(n) <= q.rx.freeRequests else {
            throw NetFrontendError.noRoom("\(n) rx buffers: \(q.rxFreeBuffers) free, \(q.rx.freeRequests) ring slots free")
        }
        q.postRx(limit: n)
        publishStatistics(q)
    }

    /// Rx buffers posted and not answered yet.
    public var rxBuffersOutstanding: Int { queues.first?.rxOutstanding ?? 0 }

    /// Reads one frame the backend delivered: its bytes (a NETRXF_more_data
    /// chain joined), the flags of its first response and its GSO extra.
    /// Packets with an error status or a malformed chain are skipped (and
    /// counted in `statistics.rxErrors`). The buffers are posted again when
    /// `options.postRxBuffers` is on. Nil when nothing came within `timeout`.
    public func receiveRaw(timeout: Double) throws -> (frame: [UInt8], flags: UInt16, gso: NetifExtraInfo?)? {
        let q = try rawQueue()
        let deadline = MonotonicClock.seconds() + timeout
        defer { publishStatistics(q) }
        while true {
            var got: (frame: [UInt8], flags: UInt16, gso: NetifExtraInfo?)?
            q.receive(limit: 1) { p in got = (p.bytes(), p.flags, p.gso) }
            if options.postRxBuffers { q.postRx() }
            if let got { return got }
            _ = q.rx.finalCheckForResponses()
            if q.rxResponsesWaiting { continue }
            guard waitForEvent(q, deadline: deadline) else { return nil }
        }
    }

    /// Sleeps until an event arrives on our port(s) (taking and unmasking
    /// it) or the deadline passes; false at the deadline.
    private func waitForEvent(_ q: NetFrontendQueue, deadline: Double) -> Bool {
        let left = deadline - MonotonicClock.seconds()
        if left <= 0 { return false }
        var pfd = pollfd(fd: q.events.fileDescriptor, events: Int16(POLLIN), revents: 0)
        _ = poll(&pfd, 1, Int32(min(left, 1) * 1000) + 1)
        q.drainEvents()
        return true
    }
}
