import CLibNBD
import CXenBackSupport
import Glibc
import SystemSupport

/// What the server said in the handshake (of the first connection).
public struct NBDServerFeatures: Equatable, Sendable {
    public var sizeBytes: UInt64
    public var readOnly: Bool
    public var canFlush: Bool
    public var canFUA: Bool
    public var canTrim: Bool
    public var canZero: Bool
    public var canMultiConn: Bool
    /// Block sizes the server advertised (0: not advertised).
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumBlockSize: UInt32
}

/// A disk on an NBD export, driven through libnbd's asynchronous API from
/// the ring's thread: no thread of its own, no thread per request.
///
/// Event loop: `completionFileDescriptor` is an epoll descriptor of this
/// storage's own, holding each connection's socket (with the directions
/// `nbd_aio_get_direction` asks for, updated after every call into libnbd,
/// so EPOLLOUT is armed while libnbd has a request half-sent to a slow
/// server), an eventfd (completions produced inside `submit`: refusals,
/// commands on a dead connection) and a timerfd (command timeouts). An epoll
/// descriptor is readable while any member is ready, so the data plane's
/// epoll wakes on it like on libaio's eventfd. `reapCompletions` /
/// `pollCompletions` ask this epoll (zero timeout) which sockets are ready,
/// call `nbd_aio_notify_read` / `nbd_aio_notify_write`, and libnbd runs the
/// completion callbacks inside those calls: each records its result in the
/// operation's preallocated slot; an operation whose last command finished
/// goes on the finished ring, which the reap hands to the caller.
///
/// Reads and writes: an operation whose iovecs are one contiguous run of
/// memory (one iovec, or a slot's adjacent bounce pages) is one command
/// straight into the caller's memory. Otherwise it goes through a bounce
/// buffer of the slot (gathered before a write, scattered after a read): a
/// memcpy of a few pages costs far less than an NBD command per iovec (a
/// request header, a reply and a server round of work per 4 KiB). The slot's
/// bounce buffer grows to the largest operation seen, up to 4 MiB (or the
/// server's maximum payload), and is kept; larger operations are sent as one
/// command per contiguous run (split at the maximum payload) and complete
/// when all of their commands have.
///
/// Several connections (`connections` > 1 and the server allows multi-conn):
/// operations go round-robin; a flush goes to every connection and completes
/// when all have flushed.
///
/// Faults: when a server dies, libnbd fails every command in flight on that
/// connection (their operations complete with its errno, typically
/// -ENOTCONN) and the connection is dropped; operations submitted with no
/// connection left complete with -EIO. A command not answered within
/// `commandTimeoutMilliseconds` (a hung server) makes its connection be shut
/// down, which fails everything in flight on it (the late one with
/// -ETIMEDOUT).
///
/// Reconnection: when no connection is left alive, a fresh libnbd handle
/// connects asynchronously (nbd_aio_connect_*) with its socket in the same
/// epoll, attempts spaced by a back-off (50 ms, 100 ms, 200 ms … 2 s) driven
/// by a second timerfd. Operations submitted meanwhile are held (not failed)
/// until `reconnectTimeoutMilliseconds` after the loss; once connected they
/// are issued on the new connection, or when that deadline passes they
/// complete with -EIO, and later operations fail at once with -EIO while the
/// attempts go on in the background. A server whose export changed size is
/// refused: held operations complete with -EIO and reconnection stops.
///
/// Retries: a read, write or trim whose commands failed because their
/// connection died (not a server's error reply, not a timeout) is issued
/// again, on another live connection or, with none left, held for the
/// reconnection like a new operation; at most 3 times. That is safe for
/// block semantics: the operation was never acknowledged, rewriting the
/// same bytes at the same place is idempotent, and held operations go out
/// in order. A flush is never retried: it would vouch for writes the lost
/// connection acknowledged, which a new connection cannot.
///
/// Multi-conn: a connection that dies while others live is replaced in the
/// background (same attempts and back-off, nothing held); after a
/// reconnection, every connection the disk had is brought back one by one.
///
/// Other refusals, as `FileStorage`: -EINVAL past the end of the disk,
/// -EROFS for a write or discard on a read-only disk or export, -EOPNOTSUPP
/// for a discard the server cannot trim. A flush on a server without flush
/// support completes with 0 (writes there are not cached).
///
/// Opened on a control thread, then used by one data-plane thread only.
public final class NBDStorage: BlockStorage, @unchecked Sendable {
    public let address: NBDAddress
    private var eventHandler: StorageEventHandler?

    public func setEventHandler(_ handler: @escaping StorageEventHandler) { eventHandler = handler }
    public let geometry: StorageGeometry
    public let features: NBDServerFeatures
    public let queueDepth: Int
    public var completionFileDescriptor: Int32 { epollFD }
    public let commandTimeoutMilliseconds: Int
    /// Connections opened (1 unless the server allows multi-conn).
    public var connectionCount: Int { connections.count }
    /// Connections still alive.
    public var liveConnectionCount: Int { connections.reduce(0) { $0 + ($1.alive ? 1 : 0) } }

    static let maximumBounceBytes = 4 << 20
    private static let eventToken: UInt64 = 0
    private static let timerToken: UInt64 = 1
    private static let firstConnectionToken: UInt64 = 2
    private static let reconnectTimerToken: UInt64 = UInt64.max - 1
    private static let connectingToken: UInt64 = UInt64.max
    /// The longest one connection attempt may take before it is abandoned.
    private static let attemptLimitNanoseconds: UInt64 = 5_000_000_000

    /// How long operations are held while no connection is alive (0: not held).
    public let reconnectTimeoutMilliseconds: Int
    /// Successful reconnections since open.
    public private(set) var reconnections = 0
    /// True while no connection is alive and a new one is being sought.
    public var isReconnecting: Bool { reconnecting }
    /// True when a reconnection found the export with another size (no more attempts).
    public private(set) var reconnectRefused = false
    private let reconnectTimerFD: Int32
    private var reconnecting = false
    private var reconnectDeadline: UInt64 = 0
    private var reconnectDeadlinePassed = false
    private var reconnectAttempts = 0
    private var nextAttemptAt: UInt64 = 0
    private var attempt: OpaquePointer?
    private var attemptFD: Int32 = -1
    private var attemptEvents: UInt32 = 0
    private var attemptStartedAt: UInt64 = 0
    /// Slots held while reconnecting (in submission order); preallocated.
    private let heldSlots: UnsafeMutablePointer<Int32>
    private var heldCount = 0
    /// Operations finished with an error, waiting to be told apart: their
    /// connection died (retry) or the server said no (complete). Preallocated.
    private let suspects: UnsafeMutablePointer<Int32>
    private var suspectCount = 0
    /// Replacing dead connections while others still serve (multi-conn).
    private var refilling = false
    /// Bumped for every connection installed, so a slot can tell whether
    /// the connection it used is still the one at its index.
    private var connectionGeneration: UInt32 = 0
    /// Operations issued again after their connection died.
    public private(set) var retriedOperations = 0
    static let maximumRetries: UInt8 = 3

    private var connections: [NBDConnection]
    /// Commands issued on each connection (tests check the round-robin).
    var commandsIssued: [Int] { connections.map(\.commandsIssued) }
    /// Times a socket was registered for EPOLLOUT (libnbd had a request half-sent).
    private(set) var outputWaits = 0
    private let epollFD: Int32
    private let eventFD: Int32
    private let timerFD: Int32
    private var closed = false
    private var timerArmed = false
    private var nextConnection = 0
    private let maximumPayload: Int
    private let bounceLimit: Int

    // Everything below is allocated at open: one entry per queue slot.
    private let slots: UnsafeMutablePointer<NBDSlot>
    private let contexts: UnsafeMutablePointer<NBDCallbackContext>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeSlotCount: Int
    private var finished: SlotQueue
    /// Slots taken and not yet reaped.
    private var busySlots = 0
    private let readyTokens: UnsafeMutablePointer<UInt64>
    private let readyEvents: UnsafeMutablePointer<UInt32>
    private let readyCapacity: Int32

    /// Connects (synchronously) to the export and reads its handshake.
    /// - connections: how many connections to open when the server allows
    ///   multi-conn (otherwise one).
    /// - commandTimeoutMilliseconds: 0 disables the timeout.
    /// - reconnectTimeoutMilliseconds: how long operations are held while
    ///   reconnecting after every connection died (0: failed at once).
    public static func open(uri: String, readOnly: Bool, queueDepth: Int, connections: Int = 1,
                            commandTimeoutMilliseconds: Int = 30_000,
                            reconnectTimeoutMilliseconds: Int = 10_000) throws(StorageError) -> NBDStorage {
        try open(address: NBDAddress.parse(uri), readOnly: readOnly, queueDepth: queueDepth, connections: connections,
                 commandTimeoutMilliseconds: commandTimeoutMilliseconds,
                 reconnectTimeoutMilliseconds: reconnectTimeoutMilliseconds)
    }

    /// `open(uri:…)` for an address already parsed (a `DiskTarget`'s).
    public static func open(address: NBDAddress, readOnly: Bool, queueDepth: Int, connections: Int = 1,
                            commandTimeoutMilliseconds: Int = 30_000,
                            reconnectTimeoutMilliseconds: Int = 10_000) throws(StorageError) -> NBDStorage {
        let uri = address.description
        guard queueDepth >= 1, queueDepth <= Int(Int32.max), connections >= 1, commandTimeoutMilliseconds >= 0,
              reconnectTimeoutMilliseconds >= 0 else {
            throw StorageError("open (queue depth \(queueDepth), connections \(connections))", errno: EINVAL, path: uri)
        }
        var opened: [NBDConnection] = []
        var fds: [Int32] = []
        func cleanUp() {
            for connection in opened { nbd_close(connection.handle) }
            for fd in fds { Glibc.close(fd) }
        }
        let first = try connect(address)
        opened.append(first)
        let features = readFeatures(first.handle)
        guard features.sizeBytes != UInt64.max else {
            let error = libnbdError("nbd_get_size", uri)
            cleanUp()
            throw error
        }
        if connections > 1 && features.canMultiConn {
            for _ in 1..<connections {
                do throws(StorageError) { opened.append(try connect(address)) } catch { cleanUp(); throw error }
            }
        }
        // Each descriptor, or a StorageError naming the call after giving back what was taken.
        func made(_ make: () throws(SystemError) -> Int32) throws(StorageError) -> Int32 {
            do {
                let fd = try make()
                fds.append(fd)
                return fd
            } catch {
                cleanUp()
                throw StorageError(error, path: uri)
            }
        }
        let epollFD = try made { () throws(SystemError) in try Syscall.epollCreate() }
        let eventFD = try made { () throws(SystemError) in
            try Syscall.retryingOnInterrupt("eventfd") { xb_eventfd(0, xb_EFD_NONBLOCK | xb_EFD_CLOEXEC) }
        }
        let timerFD = try made { () throws(SystemError) in
            try Syscall.retryingOnInterrupt("timerfd_create") { timerfd_create(CLOCK_MONOTONIC, Int32(TFD_NONBLOCK | TFD_CLOEXEC)) }
        }
        let reconnectTimerFD = try made { () throws(SystemError) in
            try Syscall.retryingOnInterrupt("timerfd_create") { timerfd_create(CLOCK_MONOTONIC, Int32(TFD_NONBLOCK | TFD_CLOEXEC)) }
        }
        do throws(SystemError) {
            try Syscall.epollAdd(epollFD, eventFD, events: xb_EPOLLIN, token: eventToken)
            try Syscall.epollAdd(epollFD, timerFD, events: xb_EPOLLIN, token: timerToken)
            try Syscall.epollAdd(epollFD, reconnectTimerFD, events: xb_EPOLLIN, token: reconnectTimerToken)
            for index in opened.indices {
                let events = epollEvents(nbd_aio_get_direction(opened[index].handle))
                try Syscall.epollAdd(epollFD, opened[index].fd, events: events, token: firstConnectionToken + UInt64(index))
                opened[index].registeredEvents = events
            }
        } catch {
            cleanUp()
            throw StorageError(error, path: uri)
        }
        return NBDStorage(address: address, features: features, readOnly: readOnly, queueDepth: queueDepth,
                          connections: opened, epollFD: epollFD, eventFD: eventFD, timerFD: timerFD,
                          reconnectTimerFD: reconnectTimerFD,
                          commandTimeoutMilliseconds: commandTimeoutMilliseconds,
                          reconnectTimeoutMilliseconds: reconnectTimeoutMilliseconds)
    }

    /// Starts connecting a fresh handle without waiting (nil when libnbd
    /// refused at once).
    private static func startConnecting(_ address: NBDAddress) -> OpaquePointer? {
        guard let handle = nbd_create() else { return nil }
        let result: Int32
        switch (address.uri, address.transport) {
        case (let uri?, _):
            result = allowLocalFiles(handle) == 0 ? nbd_aio_connect_uri(handle, uri) : -1
        case (nil, .tcp(let host, let port)):
            result = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_aio_connect_tcp(handle, host, port) : -1
        case (nil, .unix(let path)):
            result = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_aio_connect_unix(handle, path) : -1
        }
        guard result == 0, nbd_aio_is_dead(handle) != 1, nbd_aio_is_closed(handle) != 1, nbd_aio_get_fd(handle) >= 0 else {
            nbd_close(handle)
            return nil
        }
        return handle
    }

    private static func connect(_ address: NBDAddress) throws(StorageError) -> NBDConnection {
        let name = address.description
        guard let handle = nbd_create() else { throw libnbdError("nbd_create", name) }
        let result: Int32
        switch (address.uri, address.transport) {
        case (let uri?, _):
            result = allowLocalFiles(handle) == 0 ? nbd_connect_uri(handle, uri) : -1
        case (nil, .tcp(let host, let port)):
            result = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_connect_tcp(handle, host, port) : -1
        case (nil, .unix(let path)):
            result = nbd_set_export_name(handle, address.exportName) == 0 ? nbd_connect_unix(handle, path) : -1
        }
        guard result == 0 else {
            let error = libnbdError("connect", name)
            nbd_close(handle)
            throw error
        }
        let fd = nbd_aio_get_fd(handle)
        guard fd >= 0 else {
            let error = libnbdError("nbd_aio_get_fd", name)
            nbd_close(handle)
            throw error
        }
        return NBDConnection(handle: handle, fd: fd)
    }

    /// A URI's `tls-certificates=` and `tls-psk-file=` name files in dom0:
    /// `params` is written by the toolstack, never by a guest.
    static func allowLocalFiles(_ handle: OpaquePointer) -> Int32 {
        nbd_set_uri_allow_local_file(handle, true)
    }

    static func readFeatures(_ handle: OpaquePointer) -> NBDServerFeatures {
        let size = nbd_get_size(handle)
        func flag(_ value: Int32) -> Bool { value == 1 }
        func blockSize(_ kind: Int32) -> UInt32 {
            let value = nbd_get_block_size(handle, kind)
            return value > 0 && value <= Int64(UInt32.max) ? UInt32(value) : 0
        }
        return NBDServerFeatures(
            sizeBytes: size < 0 ? UInt64.max : UInt64(size),
            readOnly: flag(nbd_is_read_only(handle)), canFlush: flag(nbd_can_flush(handle)),
            canFUA: flag(nbd_can_fua(handle)), canTrim: flag(nbd_can_trim(handle)),
            canZero: flag(nbd_can_zero(handle)), canMultiConn: flag(nbd_can_multi_conn(handle)),
            minimumBlockSize: blockSize(Int32(LIBNBD_SIZE_MINIMUM)),
            preferredBlockSize: blockSize(Int32(LIBNBD_SIZE_PREFERRED)),
            maximumBlockSize: blockSize(Int32(LIBNBD_SIZE_MAXIMUM)))
    }

    static func libnbdError(_ operation: String, _ name: String) -> StorageError {
        let code = nbd_get_errno()
        let message = nbd_get_error().map { String(cString: $0) } ?? ""
        return StorageError(message.isEmpty ? operation : "\(operation) (\(message))",
                            errno: code > 0 ? code : EIO, path: name)
    }

    static func epollEvents(_ direction: UInt32) -> UInt32 {
        (direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 ? xb_EPOLLIN : 0)
            | (direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 ? xb_EPOLLOUT : 0)
    }

    /// The geometry this storage reports for a handshake.
    static func geometry(for features: NBDServerFeatures, readOnly: Bool) -> StorageGeometry {
        let preferred = features.preferredBlockSize
        let physical: UInt32 = preferred >= 512 && preferred <= 65536 && preferred & (preferred - 1) == 0 ? preferred : 4096
        let granularity = max(features.minimumBlockSize, features.preferredBlockSize)
        let discard = features.canTrim && !(readOnly || features.readOnly)
            ? DiscardSupport(granularity: granularity >= 512 ? granularity : 4096, alignment: 0, zeroesData: false)
            : nil
        return StorageGeometry(sizeBytes: features.sizeBytes, logicalSectorSize: 512, physicalSectorSize: physical,
                               readOnly: readOnly || features.readOnly,
                               supportsFlush: features.canFlush && !(readOnly || features.readOnly),
                               discard: discard)
    }

    private init(address: NBDAddress, features: NBDServerFeatures, readOnly: Bool, queueDepth: Int,
                 connections: [NBDConnection], epollFD: Int32, eventFD: Int32, timerFD: Int32,
                 reconnectTimerFD: Int32, commandTimeoutMilliseconds: Int, reconnectTimeoutMilliseconds: Int) {
        self.address = address
        self.features = features
        self.geometry = Self.geometry(for: features, readOnly: readOnly)
        self.queueDepth = queueDepth
        self.connections = connections
        self.epollFD = epollFD
        self.eventFD = eventFD
        self.timerFD = timerFD
        self.commandTimeoutMilliseconds = commandTimeoutMilliseconds
        self.reconnectTimerFD = reconnectTimerFD
        self.reconnectTimeoutMilliseconds = reconnectTimeoutMilliseconds
        heldSlots = .allocate(capacity: queueDepth)
        heldSlots.initialize(repeating: 0, count: queueDepth)
        suspects = .allocate(capacity: queueDepth)
        suspects.initialize(repeating: 0, count: queueDepth)
        // The NBD protocol's default limit when the server names none.
        maximumPayload = features.maximumBlockSize > 0 ? Int(features.maximumBlockSize) : 32 << 20
        bounceLimit = min(maximumPayload, Self.maximumBounceBytes)
        slots = .allocate(capacity: queueDepth)
        slots.initialize(repeating: NBDSlot(), count: queueDepth)
        contexts = .allocate(capacity: queueDepth)
        freeSlots = .allocate(capacity: queueDepth)
        for index in 0..<queueDepth { freeSlots[index] = Int32(queueDepth - 1 - index) }
        freeSlotCount = queueDepth
        finished = SlotQueue(capacity: queueDepth)
        readyCapacity = Int32(connections.count + 4)
        readyTokens = .allocate(capacity: Int(readyCapacity))
        readyTokens.initialize(repeating: 0, count: Int(readyCapacity))
        readyEvents = .allocate(capacity: Int(readyCapacity))
        readyEvents.initialize(repeating: 0, count: Int(readyCapacity))
        let owner = Unmanaged.passUnretained(self).toOpaque()
        for index in 0..<queueDepth {
            (contexts + index).initialize(to: NBDCallbackContext(owner: owner, slot: Int32(index)))
        }
    }

    deinit {
        close()
        for index in 0..<queueDepth { free(slots[index].bounce) }
        slots.deinitialize(count: queueDepth)
        slots.deallocate()
        contexts.deallocate()
        freeSlots.deallocate()
        heldSlots.deallocate()
        suspects.deallocate()
        readyTokens.deallocate()
        readyEvents.deallocate()
    }

    /// Disconnects (NBD_CMD_DISC, without waiting for the server) and closes
    /// every connection.
    public func close() {
        guard !closed else { return }
        closed = true
        for index in connections.indices {
            let handle = connections[index].handle
            if connections[index].alive && nbd_aio_is_ready(handle) == 1 && nbd_aio_disconnect(handle, 0) == 0 {
                // One attempt to send it; the socket's close does the rest.
                if nbd_aio_get_direction(handle) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 {
                    _ = nbd_aio_notify_write(handle)
                }
            }
            connections[index].alive = false
            // Completion callbacks of anything still in flight must not run any more.
            nbd_close(handle)
        }
        if let attempt {
            _ = xb_epoll_del(epollFD, attemptFD)
            nbd_close(attempt)
            self.attempt = nil
        }
        reconnecting = false
        refilling = false
        Glibc.close(reconnectTimerFD)
        Glibc.close(timerFD)
        Glibc.close(eventFD)
        Glibc.close(epollFD)
    }

    // MARK: Submission

    public func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int {
        let count = min(operations.count, freeSlotCount)
        guard count > 0 else { return 0 }
        let finishedBefore = finished.count
        for index in 0..<count { start(operations[index]) }
        resolveSuspects()
        for index in connections.indices where connections[index].alive { updateRegistration(index) }
        if busySlots > finished.count { armTimer() }
        if finished.count > finishedBefore { signalCompletion() }
        return count
    }

    private func start(_ operation: StorageOperation) {
        freeSlotCount -= 1
        let slot = Int(freeSlots[freeSlotCount])
        busySlots += 1
        let bytes = operation.byteCount
        slots[slot].tag = operation.tag
        slots[slot].kind = operation.kind
        slots[slot].bytes = bytes
        slots[slot].iovecs = operation.iovecs
        slots[slot].iovecCount = operation.iovecCount
        slots[slot].scatter = false
        slots[slot].error = 0
        slots[slot].connection = -1
        slots[slot].offset = operation.offset
        slots[slot].held = false
        slots[slot].retries = 0
        // One guard reference while commands are issued: a callback running
        // inside an nbd_aio_* call cannot finish the operation early.
        slots[slot].pending = 1
        slots[slot].issuedAt = MonotonicNanoseconds.now()
        if let error = refusal(operation.kind, offset: operation.offset, bytes: bytes) {
            slots[slot].error = error
        } else if reconnecting && !reconnectDeadlinePassed && !anyConnectionAlive() {
            // Held (its guard reference kept) until a connection is back or the deadline passes.
            slots[slot].held = true
            heldSlots[heldCount] = Int32(slot)
            heldCount += 1
            return
        } else if !(bytes == 0 && operation.kind != .flush) {
            issue(slot, operation.kind, offset: operation.offset, bytes: bytes)
        }
        release(slot)
    }

    private func refusal(_ kind: StorageOperationKind, offset: UInt64, bytes: UInt64) -> Int32? {
        switch kind {
        case .read: return rangeError(offset, bytes)
        case .write: return geometry.readOnly ? EROFS : rangeError(offset, bytes)
        case .flush: return nil
        case .discard:
            if geometry.readOnly { return EROFS }
            if !features.canTrim { return EOPNOTSUPP }
            return rangeError(offset, bytes)
        }
    }

    private func rangeError(_ offset: UInt64, _ length: UInt64) -> Int32? {
        let size = geometry.sizeBytes
        return length > size || offset > size - length ? EINVAL : nil
    }

    private func issue(_ slot: Int, _ kind: StorageOperationKind, offset: UInt64, bytes: UInt64) {
        if kind == .flush {
            guard features.canFlush else { return }
            var any = false
            for index in connections.indices where connections[index].alive {
                any = true
                _ = command(slot, on: index) { handle, callback in nbd_aio_flush(handle, callback, 0) }
            }
            if !any { slots[slot].error = EIO }
            return
        }
        guard let connection = pickConnection() else {
            slots[slot].error = EIO
            return
        }
        slots[slot].connection = Int32(connection)
        slots[slot].generation = connections[connection].generation
        switch kind {
        case .flush:
            break
        case .discard:
            var done: UInt64 = 0
            // Trim lengths are 32-bit on the wire: split what is larger.
            let chunk = UInt64(UInt32.max) & ~4095
            while done < bytes {
                let length = min(chunk, bytes - done)
                let position = offset + done
                guard command(slot, on: connection, { handle, callback in
                    nbd_aio_trim(handle, length, position, callback, 0)
                }) else { return }
                done += length
            }
        case .read, .write:
            transfer(slot, kind, offset: offset, bytes: Int(bytes), connection: connection)
        }
    }

    private func transfer(_ slot: Int, _ kind: StorageOperationKind, offset: UInt64, bytes: Int, connection: Int) {
        guard let iovecs = slots[slot].iovecs else { slots[slot].error = EFAULT; return }
        let count = Int(slots[slot].iovecCount)
        if bytes <= maximumPayload && isOneRun(iovecs, count), let base = firstBase(iovecs, count) {
            _ = dataCommand(slot, kind, base, bytes, offset, connection)
            return
        }
        if bytes <= bounceLimit, let bounce = bounceBuffer(slot, bytes) {
            if kind == .write {
                nbdGather(iovecs, count, into: bounce)
            } else {
                slots[slot].scatter = true
            }
            _ = dataCommand(slot, kind, bounce, bytes, offset, connection)
            return
        }
        // Too large to bounce: one command per contiguous run, split at the maximum payload.
        var position = offset
        var index = 0
        while index < count {
            guard let base = iovecs[index].iov_base else { index += 1; continue }
            var run = iovecs[index].iov_len
            index += 1
            while index < count, iovecs[index].iov_base == base + run { run += iovecs[index].iov_len; index += 1 }
            var done = 0
            while done < run {
                let length = min(maximumPayload, run - done)
                guard dataCommand(slot, kind, base + done, length, position, connection) else { return }
                done += length
                position += UInt64(length)
            }
        }
    }

    private func dataCommand(_ slot: Int, _ kind: StorageOperationKind, _ buffer: UnsafeMutableRawPointer,
                             _ length: Int, _ offset: UInt64, _ connection: Int) -> Bool {
        if kind == .read {
            return command(slot, on: connection) { handle, callback in
                nbd_aio_pread(handle, buffer, length, offset, callback, 0)
            }
        }
        return command(slot, on: connection) { handle, callback in
            nbd_aio_pwrite(handle, buffer, length, offset, callback, 0)
        }
    }

    /// Issues one command of `slot`'s operation on a connection; false (and
    /// the error recorded) when libnbd refused it.
    @inline(__always)
    private func command(_ slot: Int, on connection: Int,
                         _ body: (OpaquePointer, nbd_completion_callback) -> Int64) -> Bool {
        let callback = nbd_completion_callback(callback: nbdCommandCompleted, user_data: UnsafeMutableRawPointer(contexts + slot),
                                               free: nil)
        slots[slot].pending += 1
        connections[connection].commandsIssued &+= 1
        guard body(connections[connection].handle, callback) >= 0 else {
            slots[slot].pending -= 1
            let code = nbd_get_errno()
            if slots[slot].error == 0 { slots[slot].error = code > 0 ? code : EIO }
            checkDead(connection)
            return false
        }
        return true
    }

    private func anyConnectionAlive() -> Bool {
        for index in connections.indices where connections[index].alive { return true }
        return false
    }

    private func pickConnection() -> Int? {
        for _ in 0..<connections.count {
            let index = nextConnection
            nextConnection = nextConnection + 1 == connections.count ? 0 : nextConnection + 1
            if connections[index].alive { return index }
        }
        return nil
    }

    /// The slot's bounce buffer, grown (page-aligned, kept) to hold `bytes`.
    private func bounceBuffer(_ slot: Int, _ bytes: Int) -> UnsafeMutableRawPointer? {
        if slots[slot].bounceCapacity >= bytes { return slots[slot].bounce }
        var capacity = max(64 << 10, slots[slot].bounceCapacity)
        while capacity < bytes { capacity *= 2 }
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, capacity) == 0, let memory else { return nil }
        free(slots[slot].bounce)
        slots[slot].bounce = memory
        slots[slot].bounceCapacity = capacity
        return memory
    }

    // MARK: Completion

    /// Called by libnbd (inside our calls into it) when a command finished.
    fileprivate func commandCompleted(slot: Int, error: Int32) {
        if error != 0 && slots[slot].error == 0 { slots[slot].error = error }
        release(slot)
    }

    /// Drops one reference to the slot's operation; the last one finishes it.
    private func release(_ slot: Int) {
        slots[slot].pending -= 1
        guard slots[slot].pending == 0 else { return }
        if slots[slot].error != 0 && mayRetry(slot) {
            suspects[suspectCount] = Int32(slot)
            suspectCount += 1
            return
        }
        if slots[slot].error == 0 && slots[slot].scatter, let bounce = slots[slot].bounce {
            nbdScatter(bounce, to: slots[slot].iovecs, Int(slots[slot].iovecCount))
        }
        finished.push(slot)
    }

    /// Whether a failed operation could be issued again if its connection
    /// turns out to have died (decided in `resolveSuspects`).
    private func mayRetry(_ slot: Int) -> Bool {
        // Refusals and operations that found no connection never had one.
        guard !closed, reconnectTimeoutMilliseconds > 0, !reconnectRefused, slots[slot].connection >= 0,
              slots[slot].retries < Self.maximumRetries, slots[slot].error != ETIMEDOUT else { return false }
        switch slots[slot].kind {
        case .read, .write, .discard: return true
        case .flush: return false
        }
    }

    /// Sorts the failed operations: those whose connection is gone (dead,
    /// or replaced since) go out again or wait for the reconnection; the
    /// rest complete with their error.
    private func resolveSuspects() {
        var index = 0
        while index < suspectCount {   // a re-issue may add suspects; retries are bounded
            let slot = Int(suspects[index])
            index += 1
            let c = Int(slots[slot].connection)
            let lost = c >= 0 && (!connections[c].alive || connections[c].generation != slots[slot].generation)
            guard lost && !closed else {
                finished.push(slot)
                continue
            }
            let originalError = slots[slot].error
            slots[slot].retries += 1
            slots[slot].error = 0
            slots[slot].connection = -1
            slots[slot].pending = 1
            slots[slot].issuedAt = MonotonicNanoseconds.now()
            retriedOperations &+= 1
            if anyConnectionAlive() {
                issue(slot, slots[slot].kind, offset: slots[slot].offset, bytes: slots[slot].bytes)
                release(slot)
            } else if reconnecting && !reconnectDeadlinePassed {
                slots[slot].held = true
                heldSlots[heldCount] = Int32(slot)
                heldCount += 1
            } else {
                slots[slot].error = originalError
                slots[slot].pending = 0
                finished.push(slot)
            }
        }
        suspectCount = 0
    }

    /// `body` may call `submit` (the completed operation's slot is already
    /// free) but not `reapCompletions`.
    public func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        drainEventCounter()
        // Always look at the sockets here: one that hung up while idle keeps
        // the descriptor readable until libnbd has seen it.
        return deliverFinished(body) + driveConnections(body)
    }

    /// Drives the sockets only while something is in flight (an epoll_wait
    /// with zero timeout); otherwise no system call.
    public func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        let reaped = deliverFinished(body)
        guard busySlots > 0 else { return reaped }
        return reaped + driveConnections(body)
    }

    /// Lets libnbd read replies and send what it has queued on every
    /// connection its epoll says is ready, then hands over what finished.
    private func driveConnections(_ body: (StorageCompletion) -> Void) -> Int {
        let ready = xb_epoll_wait(epollFD, readyTokens, readyEvents, readyCapacity, 0)
        guard ready > 0 else { return 0 }
        for entry in 0..<Int(ready) {
            let token = readyTokens[entry]
            if token == Self.timerToken {
                timerFired()
                continue
            }
            if token == Self.reconnectTimerToken {
                reconnectTick()
                continue
            }
            if token == Self.connectingToken {
                attemptProgress(readyEvents[entry])
                continue
            }
            guard token >= Self.firstConnectionToken else { continue }
            let index = Int(token - Self.firstConnectionToken)
            guard connections[index].alive else { continue }
            let handle = connections[index].handle
            let events = readyEvents[entry]
            let direction = nbd_aio_get_direction(handle)
            let wantsRead = direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0
            let wantsWrite = direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0
            let failed = events & (xb_EPOLLERR | xb_EPOLLHUP) != 0
            if wantsWrite && (events & xb_EPOLLOUT != 0 || failed) { _ = nbd_aio_notify_write(handle) }
            if connections[index].alive && (events & xb_EPOLLIN != 0 || failed) && (wantsRead || !wantsWrite) {
                _ = nbd_aio_notify_read(handle)
            }
            if !checkDead(index) { updateRegistration(index) }
        }
        resolveSuspects()
        for index in connections.indices where connections[index].alive { updateRegistration(index) }
        if busySlots > finished.count { armTimer() }
        return deliverFinished(body)
    }

    private func deliverFinished(_ body: (StorageCompletion) -> Void) -> Int {
        var reaped = 0
        while let slot = finished.pop() {
            let state = slots[slot]
            let result: Int64
            if state.error != 0 {
                result = -Int64(state.error)
            } else {
                result = state.kind == .read || state.kind == .write ? Int64(state.bytes) : 0
            }
            freeSlots[freeSlotCount] = Int32(slot)
            freeSlotCount += 1
            busySlots -= 1
            body(StorageCompletion(tag: state.tag, result: result))
            reaped += 1
        }
        return reaped
    }

    // MARK: Connections, timer, eventfd

    /// Re-registers the connection's socket for the directions libnbd wants now.
    private func updateRegistration(_ index: Int) {
        if checkDead(index) { return }
        let events = Self.epollEvents(nbd_aio_get_direction(connections[index].handle))
        guard events != connections[index].registeredEvents else { return }
        _ = xb_epoll_mod(epollFD, connections[index].fd, events, Self.firstConnectionToken + UInt64(index))
        connections[index].registeredEvents = events
        if events & xb_EPOLLOUT != 0 { outputWaits &+= 1 }
    }

    /// Drops a connection libnbd declared dead or closed (its commands have
    /// been failed through their callbacks). Returns true when it is gone.
    @discardableResult
    private func checkDead(_ index: Int) -> Bool {
        guard connections[index].alive else { return true }
        let handle = connections[index].handle
        guard nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 else { return false }
        connections[index].alive = false
        // libnbd may have closed the socket already (then this fails harmlessly).
        _ = xb_epoll_del(epollFD, connections[index].fd)
        if !closed && !reconnecting && !reconnectRefused {
            if !anyConnectionAlive() {
                beginReconnect()
            } else if !refilling {
                beginRefill()
            }
        }
        return true
    }

    // MARK: Reconnection (allocates; never on the steady-state path)

    /// One connection of several died: replace it in the background.
    private func beginRefill() {
        eventHandler?(StorageEvent(.connectionLost, "lost a connection to \(address) (\(liveConnectionCount) of \(connections.count) left); replacing it"))
        refilling = true
        reconnectAttempts = 0
        nextAttemptAt = MonotonicNanoseconds.now()
        scheduleReconnectTimer()
    }

    private func beginReconnect() {
        eventHandler?(StorageEvent(.connectionLost, "lost every connection to \(address); reconnecting"))
        let now = MonotonicNanoseconds.now()
        refilling = false
        reconnecting = true
        reconnectAttempts = 0
        reconnectDeadline = now &+ UInt64(reconnectTimeoutMilliseconds) * 1_000_000
        reconnectDeadlinePassed = reconnectTimeoutMilliseconds == 0
        nextAttemptAt = now
        scheduleReconnectTimer()
    }

    /// Arms the reconnect timer for the next thing to do: an attempt, the
    /// abandonment of a slow attempt, or the hold deadline.
    private func scheduleReconnectTimer() {
        var fireAt: UInt64
        if !reconnecting && !refilling {
            fireAt = 0
        } else {
            fireAt = attempt == nil ? nextAttemptAt : attemptStartedAt &+ Self.attemptLimitNanoseconds
            if reconnecting && !reconnectDeadlinePassed { fireAt = min(fireAt, reconnectDeadline) }
            fireAt = max(fireAt, 1)
        }
        var setting = itimerspec()
        setting.it_value = timespec(tv_sec: Int(fireAt / 1_000_000_000), tv_nsec: Int(fireAt % 1_000_000_000))
        _ = timerfd_settime(reconnectTimerFD, Int32(TFD_TIMER_ABSTIME), &setting, nil)
    }

    private func reconnectTick() {
        var expirations: UInt64 = 0
        _ = read(reconnectTimerFD, &expirations, MemoryLayout<UInt64>.size)
        guard reconnecting || refilling else { return }
        let now = MonotonicNanoseconds.now()
        if reconnecting && !reconnectDeadlinePassed && now >= reconnectDeadline {
            reconnectDeadlinePassed = true
            eventHandler?(StorageEvent(.unreachable, "\(address) still unreachable after \(reconnectTimeoutMilliseconds) ms: failing held requests, still retrying"))
            failHeld(EIO)
        }
        if attempt != nil && now &- attemptStartedAt >= Self.attemptLimitNanoseconds { attemptFailed() }
        if attempt == nil && now >= nextAttemptAt { startAttempt() }
        scheduleReconnectTimer()
    }

    private func startAttempt() {
        attemptStartedAt = MonotonicNanoseconds.now()
        guard let handle = Self.startConnecting(address) else {
            attemptFailed()
            return
        }
        let fd = nbd_aio_get_fd(handle)
        let events = Self.epollEvents(nbd_aio_get_direction(handle))
        guard xb_epoll_add(epollFD, fd, events, Self.connectingToken) == 0 else {
            nbd_close(handle)
            attemptFailed()
            return
        }
        attempt = handle
        attemptFD = fd
        attemptEvents = events
        attemptProgress(0)
    }

    /// Drops the current attempt (if any) and schedules the next after the back-off.
    private func attemptFailed() {
        if let handle = attempt {
            _ = xb_epoll_del(epollFD, attemptFD)
            nbd_close(handle)
            attempt = nil
        }
        let delay = min(50 << min(reconnectAttempts, 6), 2000)
        reconnectAttempts += 1
        nextAttemptAt = MonotonicNanoseconds.now() &+ UInt64(delay) * 1_000_000
        scheduleReconnectTimer()
    }

    /// Lets libnbd advance the attempt's handshake; installs it once ready.
    private func attemptProgress(_ events: UInt32) {
        guard let handle = attempt else { return }
        let direction = nbd_aio_get_direction(handle)
        let failed = events & (xb_EPOLLERR | xb_EPOLLHUP) != 0
        if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 && (events & xb_EPOLLOUT != 0 || failed) {
            _ = nbd_aio_notify_write(handle)
        }
        if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 && nbd_aio_is_dead(handle) != 1
            && (events & xb_EPOLLIN != 0 || failed) {
            _ = nbd_aio_notify_read(handle)
        }
        if nbd_aio_is_ready(handle) == 1 {
            installAttempt(handle)
        } else if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 {
            attemptFailed()
        } else {
            let wanted = Self.epollEvents(nbd_aio_get_direction(handle))
            if wanted != attemptEvents {
                _ = xb_epoll_mod(epollFD, attemptFD, wanted, Self.connectingToken)
                attemptEvents = wanted
            }
        }
    }

    /// A new connection is ready: it takes the place of the first dead
    /// one. After a reconnection the held operations go out on it; while
    /// any connection is still missing, the next attempt starts at once.
    private func installAttempt(_ handle: OpaquePointer) {
        _ = xb_epoll_del(epollFD, attemptFD)
        attempt = nil
        let size = nbd_get_size(handle)
        guard size >= 0, UInt64(size) == features.sizeBytes else {
            // Another export (or a resized one): never write to it.
            nbd_close(handle)
            eventHandler?(StorageEvent(.refused, "\(address) came back with another size (\(size) bytes): refusing it for good"))
            reconnectRefused = true
            reconnecting = false
            refilling = false
            scheduleReconnectTimer()
            failHeld(EIO)
            return
        }
        guard let index = connections.firstIndex(where: { !$0.alive }) else {
            nbd_close(handle)   // nothing to replace any more
            refilling = false
            scheduleReconnectTimer()
            return
        }
        nbd_close(connections[index].handle)
        connectionGeneration &+= 1
        var connection = NBDConnection(handle: handle, fd: attemptFD)
        connection.registeredEvents = Self.epollEvents(nbd_aio_get_direction(handle))
        connection.commandsIssued = connections[index].commandsIssued
        connection.generation = connectionGeneration
        guard xb_epoll_add(epollFD, attemptFD, connection.registeredEvents, Self.firstConnectionToken + UInt64(index)) == 0 else {
            nbd_close(handle)
            connections[index].alive = false
            attemptFailed()
            return
        }
        connections[index] = connection
        let wasReconnecting = reconnecting
        reconnecting = false
        reconnectAttempts = 0
        refilling = connections.contains { !$0.alive }
        nextAttemptAt = MonotonicNanoseconds.now()
        if wasReconnecting {
            reconnections += 1
            eventHandler?(StorageEvent(.reconnected, "reconnected to \(address)"))
        } else {
            eventHandler?(StorageEvent(.reconnected, "connection \(index + 1) of \(connections.count) to \(address) restored"))
        }
        scheduleReconnectTimer()
        guard wasReconnecting else { return }
        // Issue what was held, in order.
        let count = heldCount
        heldCount = 0
        let now = MonotonicNanoseconds.now()
        for index in 0..<count {
            let slot = Int(heldSlots[index])
            slots[slot].held = false
            slots[slot].issuedAt = now
            issue(slot, slots[slot].kind, offset: slots[slot].offset, bytes: slots[slot].bytes)
            release(slot)
        }
        resolveSuspects()
        for index in connections.indices where connections[index].alive { updateRegistration(index) }
        if busySlots > finished.count { armTimer() }
    }

    /// Completes every held operation with `error`.
    private func failHeld(_ error: Int32) {
        let count = heldCount
        heldCount = 0
        for index in 0..<count {
            let slot = Int(heldSlots[index])
            slots[slot].held = false
            slots[slot].error = error
            release(slot)
        }
    }

    /// Fails the commands of a connection that stopped answering: shutting
    /// the socket down makes libnbd see the end of the stream, fail what is
    /// in flight and go dead.
    private func abandon(_ index: Int) {
        guard connections[index].alive else { return }
        shutdown(connections[index].fd, Int32(SHUT_RDWR))
        let handle = connections[index].handle
        _ = nbd_aio_notify_read(handle)
        if !checkDead(index) {
            _ = nbd_aio_notify_write(handle)
            if !checkDead(index) { updateRegistration(index) }
        }
    }

    private func armTimer() {
        guard !timerArmed, commandTimeoutMilliseconds > 0 else { return }
        let period = max(commandTimeoutMilliseconds / 4, 1)
        let interval = timespec(tv_sec: period / 1000, tv_nsec: (period % 1000) * 1_000_000)
        var setting = itimerspec(it_interval: interval, it_value: interval)
        if timerfd_settime(timerFD, 0, &setting, nil) == 0 { timerArmed = true }
    }

    private func timerFired() {
        var expirations: UInt64 = 0
        _ = read(timerFD, &expirations, MemoryLayout<UInt64>.size)
        if busySlots == finished.count {
            // Idle: stop ticking until the next submit.
            var setting = itimerspec()
            _ = timerfd_settime(timerFD, 0, &setting, nil)
            timerArmed = false
            return
        }
        let now = MonotonicNanoseconds.now()
        let limit = UInt64(commandTimeoutMilliseconds) * 1_000_000
        for slot in 0..<queueDepth where slots[slot].pending > 0 && !slots[slot].held
            && now &- slots[slot].issuedAt > limit {
            if slots[slot].error == 0 { slots[slot].error = ETIMEDOUT }
            let connection = Int(slots[slot].connection)
            if connection >= 0 {
                abandon(connection)
            } else {
                for index in connections.indices { abandon(index) }
            }
        }
    }

    /// Wakes the poller for completions that did not come from the kernel.
    private func signalCompletion() { Wakeup(adopting: eventFD).signal() }

    private func drainEventCounter() { Wakeup(adopting: eventFD).drain() }
}

struct NBDConnection {
    var handle: OpaquePointer
    var fd: Int32
    var alive = true
    var registeredEvents: UInt32 = 0
    var commandsIssued = 0
    /// NBDStorage.connectionGeneration when it was installed (0: at open).
    var generation: UInt32 = 0
}

/// Bookkeeping for one operation in flight.
struct NBDSlot {
    var tag: UInt64 = 0
    var kind: StorageOperationKind = .read
    var bytes: UInt64 = 0
    var iovecs: UnsafeMutablePointer<iovec>?
    var iovecCount: Int32 = 0
    /// Commands not yet finished (+1 while they are being issued); 0: not in flight.
    var pending: Int32 = 0
    /// The first errno of any of its commands.
    var error: Int32 = 0
    /// A read into the bounce buffer, to be scattered into the iovecs.
    var scatter = false
    /// The connection its commands went to; -1 for all (flush) or none.
    var connection: Int32 = -1
    var issuedAt: UInt64 = 0
    var offset: UInt64 = 0
    /// Waiting for a reconnection (not issued yet).
    var held = false
    /// The generation of the connection its commands went to.
    var generation: UInt32 = 0
    /// Times it was issued again after its connection died.
    var retries: UInt8 = 0
    var bounce: UnsafeMutableRawPointer?
    var bounceCapacity = 0
}

/// What libnbd hands back to the completion callback: preallocated, one per slot.
struct NBDCallbackContext {
    var owner: UnsafeMutableRawPointer
    var slot: Int32
}

private let nbdCommandCompleted: @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<Int32>?) -> Int32 = {
    userData, error in
    guard let context = userData?.assumingMemoryBound(to: NBDCallbackContext.self) else { return 1 }
    let storage = Unmanaged<NBDStorage>.fromOpaque(context.pointee.owner).takeUnretainedValue()
    storage.commandCompleted(slot: Int(context.pointee.slot), error: error?.pointee ?? 0)
    // 1: libnbd retires the command now; nothing to collect later.
    return 1
}

enum MonotonicNanoseconds {
    @inline(__always)
    static func now() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
    }
}

/// True when the iovecs describe one contiguous run of memory.
private func isOneRun(_ iovecs: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
    guard count > 1 else { return true }
    for index in 1..<count {
        guard let previous = iovecs[index - 1].iov_base,
              iovecs[index].iov_base == previous + iovecs[index - 1].iov_len else { return false }
    }
    return true
}

private func firstBase(_ iovecs: UnsafeMutablePointer<iovec>, _ count: Int) -> UnsafeMutableRawPointer? {
    count > 0 ? iovecs[0].iov_base : nil
}

private func nbdGather(_ iovecs: UnsafeMutablePointer<iovec>, _ count: Int, into buffer: UnsafeMutableRawPointer) {
    var position = 0
    for index in 0..<count {
        let vector = iovecs[index]
        if let base = vector.iov_base { memcpy(buffer + position, base, vector.iov_len) }
        position += vector.iov_len
    }
}

private func nbdScatter(_ buffer: UnsafeMutableRawPointer, to iovecs: UnsafeMutablePointer<iovec>?, _ count: Int) {
    guard let iovecs else { return }
    var position = 0
    for index in 0..<count {
        let vector = iovecs[index]
        if let base = vector.iov_base { memcpy(base, buffer + position, vector.iov_len) }
        position += vector.iov_len
    }
}
