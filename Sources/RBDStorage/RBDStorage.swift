import BlockStorage
import CLibRBD
import Glibc
import SystemSupport

/// Where an RBD image is and who opens it: the parts of QEMU's
/// `rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH]` form.
public struct RBDImageAddress: Equatable, Sendable {
    public var pool: String
    public var image: String
    /// A snapshot: served read-only.
    public var snapshot: String?
    /// The cephx user, without "client." (admin when nil).
    public var user: String?
    /// ceph.conf (librados's default search when nil: CEPH_CONF, /etc/ceph/ceph.conf, ...).
    public var configPath: String?
    public init(pool: String, image: String, snapshot: String? = nil, user: String? = nil, configPath: String? = nil) {
        self.pool = pool; self.image = image; self.snapshot = snapshot; self.user = user; self.configPath = configPath
    }
    public var description: String { "rbd:\(pool)/\(image)" + (snapshot.map { "@" + $0 } ?? "") }
}

/// An RBD image through librbd's asynchronous C API. Operations go out
/// with `rbd_aio_readv`/`writev`/`flush`/`discard`; their completions are
/// queued by librbd for `rbd_poll_io_events` and announced on an eventfd
/// (`rbd_set_image_notification`), which the data plane polls like any
/// storage's: no callback runs on librbd's threads, no thread per request.
/// A write is answered once librbd has acknowledged it, which it does only
/// once the OSDs have it. A read-write image is opened with its exclusive
/// lock taken explicitly (`rbd_lock_acquire`): another client's writes
/// then fail (EROFS) instead of passing the lock back and forth with ours.
///
/// One handle, one thread (the data plane's); `close()` releases the lock.
public final class RBDStorage: BlockStorage {   // confined to one thread after open
    public private(set) var geometry: StorageGeometry
    public let queueDepth: Int
    public let address: RBDImageAddress
    /// The object size: discard's granularity.
    public private(set) var objectSize: UInt64 = 0
    private var cluster: rados_t?
    private var ioContext: rados_ioctx_t?
    private var image: rbd_image_t?
    private let wakeup: Wakeup
    private var locked = false
    private var eventHandler: StorageEventHandler?

    /// Per in-flight operation (its completion's argument is slot + 1).
    private struct Slot { var tag: UInt64 = 0; var kind: StorageOperationKind = .read; var length: UInt64 = 0; var busy = false }
    private var slots: [Slot]
    private var freeSlots: [Int]
    private let polled: UnsafeMutablePointer<rbd_completion_t?>
    /// Operations librbd refused at submit: completed at the next reap.
    private var refused: [StorageCompletion] = []

    public var completionFileDescriptor: Int32 { wakeup.fd }
    public var ioEngineName: String? { "librbd" }
    public var maxIovecsPerOperation: Int? { nil }

    /// Connects to the cluster, opens the image (a snapshot read-only) and,
    /// read-write, takes its exclusive lock. Throws with the call that failed.
    public static func open(_ address: RBDImageAddress, readOnly: Bool, queueDepth: Int = 64) throws -> RBDStorage {
        try RBDStorage(address: address, readOnly: readOnly || address.snapshot != nil, queueDepth: queueDepth)
    }

    private init(address: RBDImageAddress, readOnly: Bool, queueDepth: Int) throws {
        self.address = address
        self.queueDepth = queueDepth
        slots = Array(repeating: Slot(), count: queueDepth)
        freeSlots = Array((0..<queueDepth).reversed())
        polled = .allocate(capacity: queueDepth)
        polled.initialize(repeating: nil, count: queueDepth)
        do { wakeup = try Wakeup() } catch {
            polled.deallocate()
            throw StorageError("eventfd", errno: error.code, path: address.description)
        }
        geometry = StorageGeometry(sizeBytes: 0, logicalSectorSize: 512, physicalSectorSize: 512, readOnly: readOnly,
                                   supportsFlush: true, discard: nil)
        do {
            try connect(readOnly: readOnly)
        } catch {
            release()
            throw error
        }
    }

    deinit {
        release()
        polled.deallocate()
    }

    private func check(_ rc: Int32, _ call: String) throws {
        guard rc >= 0 else { throw StorageError(call, errno: -rc, path: address.description) }
    }

    private func connect(readOnly: Bool) throws {
        var c: rados_t?
        try check(rados_create2(&c, "ceph", "client." + (address.user ?? "admin"), 0), "rados_create2")
        cluster = c
        try check(rados_conf_read_file(c, address.configPath), "rados_conf_read_file")
        // A cluster that stays away fails requests instead of holding them for ever.
        try check(rados_conf_set(c, "rados_osd_op_timeout", "30"), "rados_conf_set")
        try check(rados_conf_set(c, "rados_mon_op_timeout", "30"), "rados_conf_set")
        try check(rados_connect(c), "rados_connect")
        var io: rados_ioctx_t?
        try check(rados_ioctx_create(c, address.pool, &io), "rados_ioctx_create")
        ioContext = io
        var i: rbd_image_t?
        if readOnly {
            try check(rbd_open_read_only(io, address.image, &i, address.snapshot), "rbd_open_read_only")
        } else {
            try check(rbd_open(io, address.image, &i, nil), "rbd_open")
        }
        image = i
        var info = rbd_image_info_t()
        try check(rbd_stat(i, &info, MemoryLayout<rbd_image_info_t>.size), "rbd_stat")
        geometry.sizeBytes = info.size
        let objectBytes = info.obj_size
        objectSize = objectBytes
        if !readOnly {
            geometry.discard = DiscardSupport(granularity: UInt32(min(objectBytes, UInt64(UInt32.max))), alignment: 0,
                                              zeroesData: true)
            try check(rbd_lock_acquire(i, RBD_LOCK_MODE_EXCLUSIVE), "rbd_lock_acquire")
            locked = true
        }
        try check(rbd_set_image_notification(i, wakeup.fd, Int32(EVENT_TYPE_EVENTFD)), "rbd_set_image_notification")
    }

    private var released = false

    /// Releases the lock, closes the image and the cluster connection. Idempotent.
    private func release() {
        guard !released else { return }
        released = true
        if let i = image {
            if locked { _ = rbd_lock_release(i) }
            locked = false
            _ = rbd_close(i)
            image = nil
        }
        if let io = ioContext { rados_ioctx_destroy(io); ioContext = nil }
        if let c = cluster { rados_shutdown(c); cluster = nil }
        wakeup.close()
    }

    public func close() { release() }

    public func setEventHandler(_ handler: @escaping StorageEventHandler) { eventHandler = handler }

    public func openAnotherQueue() throws -> (any BlockStorage)? { nil }

    public func currentSizeBytes() -> UInt64? {
        guard let i = image else { return nil }
        var size: UInt64 = 0
        return rbd_get_size(i, &size) == 0 ? size : nil
    }

    public func sizeChanged(to bytes: UInt64) { geometry.sizeBytes = bytes }

    // MARK: I/O

    public func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int {
        var taken = 0
        for op in operations {
            guard let slot = freeSlots.popLast() else { break }
            taken += 1
            let length = op.kind == .read || op.kind == .write
                ? (0..<Int(op.iovecCount)).reduce(UInt64(0)) { $0 + UInt64(op.iovecs![$1].iov_len) } : op.length
            slots[slot] = Slot(tag: op.tag, kind: op.kind, length: length, busy: true)
            if let error = precheck(op, length: length) {
                finishRefused(slot, -Int64(error))
                continue
            }
            var completion: rbd_completion_t?
            let rc0 = rbd_aio_create_completion(UnsafeMutableRawPointer(bitPattern: slot + 1), nil, &completion)
            guard rc0 == 0, let completion else {
                finishRefused(slot, Int64(rc0 < 0 ? rc0 : -ENOMEM))
                continue
            }
            let rc: Int32
            switch op.kind {
            case .read: rc = rbd_aio_readv(image, op.iovecs, op.iovecCount, op.offset, completion)
            case .write: rc = rbd_aio_writev(image, op.iovecs, op.iovecCount, op.offset, completion)
            case .flush: rc = rbd_aio_flush(image, completion)
            case .discard: rc = rbd_aio_discard(image, op.offset, op.length, completion)
            }
            if rc < 0 {
                rbd_aio_release(completion)
                finishRefused(slot, Int64(rc))
            }
        }
        return taken
    }

    /// What the request path must not send: beyond the end, a write to a
    /// read-only image.
    private func precheck(_ op: StorageOperation, length: UInt64) -> Int32? {
        if image == nil { return EBADF }
        if (op.kind == .write || op.kind == .discard) && geometry.readOnly { return EROFS }
        if op.kind != .flush {
            let size = geometry.sizeBytes
            if length > size || op.offset > size - length { return EINVAL }
        }
        return nil
    }

    private func finishRefused(_ slot: Int, _ result: Int64) {
        refused.append(StorageCompletion(tag: slots[slot].tag, result: result))
        slots[slot].busy = false
        freeSlots.append(slot)
        wakeup.signal()
    }

    public func reapCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        wakeup.drain()
        return pollCompletions(body)
    }

    public func pollCompletions(_ body: (StorageCompletion) -> Void) -> Int {
        var n = 0
        while let r = refused.popLast() {
            body(r)
            n += 1
        }
        guard let i = image else { return n }
        while true {
            let got = Int(rbd_poll_io_events(i, polled, Int32(queueDepth)))
            if got <= 0 { break }
            for k in 0..<got {
                guard let c = polled[k] else { continue }
                let slot = Int(bitPattern: rbd_aio_get_arg(c)) - 1
                let value = Int64(rbd_aio_get_return_value(c))
                rbd_aio_release(c)
                guard slot >= 0, slot < slots.count, slots[slot].busy else { continue }
                let s = slots[slot]
                // librbd answers a read with its byte count and a write with 0.
                let result = value < 0 ? value : (s.kind == .read || s.kind == .write ? Int64(s.length) : 0)
                slots[slot].busy = false
                freeSlots.append(slot)
                body(StorageCompletion(tag: s.tag, result: result))
                n += 1
            }
            if got < queueDepth { break }
        }
        return n
    }

    public func resetCompletionSignal() { wakeup.drain() }
}
