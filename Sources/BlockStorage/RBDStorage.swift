import CLibRBD
import Glibc
import SystemSupport

/// An RBD image through librbd's asynchronous C API (loaded at run time,
/// `LibRBD`). Operations go out with `rbd_aio_readv`/`writev`/`flush`/
/// `discard`; their completions are queued by librbd for
/// `rbd_poll_io_events` and announced on an eventfd
/// (`rbd_set_image_notification`), which the data plane polls like any
/// storage's: no callback runs on librbd's threads, no thread per request.
/// A write is answered once librbd has acknowledged it, which, with its
/// cache off (`rbd_cache=false`, as QEMU's cache=none), it does only once
/// the OSDs have it.
///
/// Single writer: before a read-write connection serves its first request,
/// `takeWriterLock` takes the image's exclusive lock explicitly
/// (`rbd_lock_acquire`); another client's writes then fail (EROFS) instead
/// of passing the lock back and forth with ours. A lock another client
/// holds is waited for, never broken: only `breakLock` (the operator's
/// `xenbackd rbd-lock break`) or the proof that the holder was this disk's
/// own previous daemon breaks one.
///
/// One handle, one thread (the data plane's); `close()` releases the lock.
public final class RBDStorage: BlockStorage {   // confined to one thread after open
    public private(set) var geometry: StorageGeometry
    public let queueDepth: Int
    public let address: RBDImageAddress
    /// The object size: discard's granularity.
    public private(set) var objectSize: UInt64 = 0
    /// The image's feature bits (RBD_FEATURE_*).
    public private(set) var features: UInt64 = 0
    /// The feature bits' names, as `rbd info` prints them.
    public var featureNames: [String] {
        let names = ["layering", "striping", "exclusive-lock", "object-map", "fast-diff", "deep-flatten", "journaling",
                     "data-pool", "operations", "migrating", "non-primary", "dirty-cache"]
        return names.indices.filter { features & (1 << UInt64($0)) != 0 }.map { names[$0] }
    }
    /// This handle's name as a lock owner, once it holds the lock.
    public private(set) var lockOwnerName: String?
    /// Seconds a request may wait for the cluster before it fails (librados's op timeouts).
    public static let operationTimeoutSeconds = 30
    private let lib: LibRBD
    private var cluster: rados_t?
    private var ioContext: rados_ioctx_t?
    private var image: rbd_image_t?
    private let wakeup: Wakeup
    private var eventHandler: StorageEventHandler?

    /// Per in-flight operation (its completion's argument is slot + 1).
    private struct Slot { var tag: UInt64 = 0; var kind: StorageOperationKind = .read; var length: UInt64 = 0; var busy = false }
    private var slots: [Slot]
    private var freeSlots: [Int]
    private let polled: UnsafeMutablePointer<rbd_completion_t?>
    /// Operations answered here, not by librbd (refused at submit, or a
    /// flush with nothing to flush): completed at the next reap.
    private var answeredHere: [StorageCompletion] = []
    /// A write or discard has gone out through this handle.
    private var wrote = false

    public var completionFileDescriptor: Int32 { wakeup.fd }
    public var ioEngineName: String? { "librbd" }
    public var maxIovecsPerOperation: Int? { nil }

    /// Connects to the cluster and opens the image (a snapshot read-only).
    /// No lock is taken here: see `takeWriterLock`. Throws with the call that failed.
    /// `timeoutSeconds`: how long the cluster may keep a request or the
    /// connection waiting before it fails (librados's op and mount timeouts).
    public static func open(_ address: RBDImageAddress, readOnly: Bool, queueDepth: Int = 64,
                            timeoutSeconds: Int = operationTimeoutSeconds) throws(StorageError) -> RBDStorage {
        let lib: LibRBD
        do { lib = try LibRBD.get() } catch {
            throw StorageError("dlopen", errno: ENOENT, path: address.normalized, detail: error.description)
        }
        return try RBDStorage(lib: lib, address: address, readOnly: readOnly || address.snapshot != nil,
                              queueDepth: queueDepth, timeoutSeconds: max(1, timeoutSeconds))
    }

    private init(lib: LibRBD, address: RBDImageAddress, readOnly: Bool, queueDepth: Int,
                 timeoutSeconds: Int) throws(StorageError) {
        self.lib = lib
        self.address = address
        self.queueDepth = queueDepth
        slots = Array(repeating: Slot(), count: queueDepth)
        freeSlots = Array((0..<queueDepth).reversed())
        polled = .allocate(capacity: queueDepth)
        polled.initialize(repeating: nil, count: queueDepth)
        do { wakeup = try Wakeup() } catch {
            polled.deallocate()
            throw StorageError("eventfd", errno: error.code, path: address.normalized)
        }
        geometry = StorageGeometry(sizeBytes: 0, logicalSectorSize: 512, physicalSectorSize: 512, readOnly: readOnly,
                                   supportsFlush: true, discard: nil)
        do {
            try connect(readOnly: readOnly, timeoutSeconds: timeoutSeconds)
        } catch {
            release()
            throw error
        }
    }

    deinit {
        release()
        polled.deallocate()
    }

    private func check(_ rc: Int32, _ call: String) throws(StorageError) {
        guard rc >= 0 else { throw StorageError(call, errno: -rc, path: address.normalized) }
    }

    private func connect(readOnly: Bool, timeoutSeconds: Int) throws(StorageError) {
        var c: rados_t?
        try check(lib.radosCreate2(&c, "ceph", "client." + (address.user ?? "admin"), 0), "rados_create2")
        cluster = c
        let read = lib.radosConfReadFile(c, address.configPath)
        if read < 0 {
            // The default search finding nothing is fine when the params name the monitors.
            let monitorsGiven = address.settings.contains { $0.name == "mon_host" || $0.name == "mon-host" }
            if address.configPath != nil || !monitorsGiven {
                throw StorageError("rados_conf_read_file", errno: -read, path: address.normalized,
                                   detail: address.configPath.map { "cannot read \($0): \(String(cString: strerror(-read)))" }
                                       ?? "no Ceph configuration (no $CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config or ./ceph.conf): give conf=PATH, or mon_host= and keyring=")
            }
        }
        // A cluster that stays away fails requests instead of holding them for ever.
        let timeout = String(timeoutSeconds)
        try check(lib.radosConfSet(c, "rados_osd_op_timeout", timeout), "rados_conf_set")
        try check(lib.radosConfSet(c, "rados_mon_op_timeout", timeout), "rados_conf_set")
        try check(lib.radosConfSet(c, "client_mount_timeout", timeout), "rados_conf_set")
        // No librbd cache: a write is answered once the OSDs have it, so a
        // daemon killed between a guest's write and its flush loses nothing
        // it acknowledged (the guest lives on, unlike after a power cut).
        try check(lib.radosConfSet(c, "rbd_cache", "false"), "rados_conf_set")
        // A discard of part of an object zeroes that part (librbd skips it by
        // default), so that a discarded sector reads as zeros, as promised.
        try check(lib.radosConfSet(c, "rbd_skip_partial_discard", "false"), "rados_conf_set")
        for setting in address.settings {
            try check(lib.radosConfSet(c, setting.name, setting.value), "rados_conf_set \(setting.name)")
        }
        try check(lib.radosConnect(c), "rados_connect")
        var io: rados_ioctx_t?
        try check(lib.radosIoctxCreate(c, address.pool, &io), "rados_ioctx_create")
        ioContext = io
        if !address.namespace.isEmpty { lib.radosIoctxSetNamespace(io, address.namespace) }
        var i: rbd_image_t?
        if readOnly {
            try check(lib.openReadOnly(io, address.image, &i, address.snapshot), "rbd_open_read_only")
        } else {
            try check(lib.open(io, address.image, &i, nil), "rbd_open")
        }
        image = i
        var info = rbd_image_info_t()
        try check(lib.stat(i, &info, MemoryLayout<rbd_image_info_t>.size), "rbd_stat")
        try check(lib.getFeatures(i, &features), "rbd_get_features")
        geometry.sizeBytes = info.size
        objectSize = info.obj_size
        if !readOnly { geometry.discard = Self.discardSupport(objectSize: info.obj_size) }
        try check(lib.setImageNotification(i, wakeup.fd, Int32(EVENT_TYPE_EVENTFD)), "rbd_set_image_notification")
    }

    /// Discard as offered on an image of `objectSize`-byte objects: that
    /// granularity, and zeroes (partial discards are not skipped).
    static func discardSupport(objectSize: UInt64) -> DiscardSupport {
        DiscardSupport(granularity: UInt32(min(objectSize, UInt64(UInt32.max))), alignment: 0, zeroesData: true)
    }

    // MARK: the exclusive lock

    /// Who holds the image's lock now (librbd's owner names; empty: nobody).
    public func lockOwners() throws(StorageError) -> [String] {
        guard let i = image else { throw StorageError("rbd_lock_get_owners", errno: EBADF, path: address.normalized) }
        var mode = RBD_LOCK_MODE_EXCLUSIVE
        var capacity = 8
        while true {
            var names = [UnsafeMutablePointer<CChar>?](repeating: nil, count: capacity)
            var count = capacity
            let rc = lib.lockGetOwners(i, &mode, &names, &count)
            if rc == -ENOENT { return [] }
            if rc == -ERANGE, count > capacity { capacity = count; continue }
            try check(rc, "rbd_lock_get_owners")
            let owners = names[0..<count].compactMap { $0.map { String(cString: $0) } }
            lib.lockGetOwnersCleanup(&names, count)
            return owners
        }
    }

    /// Takes the exclusive lock for this connection's writes. A lock held
    /// by `previousOwner` (this disk's own daemon before a restart: dead,
    /// since this one serves its ring now) is broken; one held by anybody
    /// else is waited for up to `seconds` (a migration's source lets go
    /// when its guest has left), then refused with the holder's name.
    /// Returns this handle's owner name, for the next restart to recognise.
    @discardableResult
    public func takeWriterLock(waitingUpTo seconds: Double, breakingPreviousOwner previousOwner: String?,
                               giveUp: () -> Bool = { false }) throws(StorageError) -> String? {
        guard let i = image else { throw StorageError("rbd_lock_acquire", errno: EBADF, path: address.normalized) }
        if geometry.readOnly { return nil }
        if let name = lockOwnerName { return name }
        guard features & UInt64(RBD_FEATURE_EXCLUSIVE_LOCK) != 0 else {
            throw StorageError("rbd_lock_acquire", errno: EINVAL, path: address.normalized,
                               detail: "the image has no exclusive-lock feature, so nothing keeps a second writer out: "
                                   + "`rbd feature enable \(address.pool)/\(address.namespace.isEmpty ? "" : address.namespace + "/")"
                                   + "\(address.image) exclusive-lock`, or attach it read-only")
        }
        let deadline = MonotonicClock.seconds() + seconds
        var brokePrevious = false
        while true {
            let owners = try lockOwners()
            if let previousOwner, !brokePrevious, owners == [previousOwner] {
                try check(lib.lockBreak(i, RBD_LOCK_MODE_EXCLUSIVE, previousOwner), "rbd_lock_break")
                brokePrevious = true
                continue
            }
            if owners.isEmpty {
                // Asking librbd only when nobody holds it: its acquire would
                // itself break the lock of a holder it thinks dead.
                let rc = lib.lockAcquire(i, RBD_LOCK_MODE_EXCLUSIVE)
                if rc == 0 { break }
                // EROFS/EBUSY: somebody took it between our look and our ask.
                if rc != -EROFS && rc != -EBUSY { try check(rc, "rbd_lock_acquire") }
            }
            if giveUp() {
                throw StorageError("rbd_lock_acquire", errno: ECANCELED, path: address.normalized,
                                   detail: "gave up waiting for the image's exclusive lock (the device is going away)")
            }
            if MonotonicClock.seconds() >= deadline {
                let holder = owners.isEmpty ? "another client" : owners.joined(separator: ", ")
                throw StorageError("rbd_lock_acquire", errno: EBUSY, path: address.normalized,
                                   detail: "the image's exclusive lock is held by \(holder) and was not released within "
                                       + "\(Int(seconds)) s; if its host is dead, break it with "
                                       + "`xenbackd rbd-lock break \(address.withoutSecrets)`")
            }
            usleep(200_000)
        }
        let name = (try? lockOwners())?.first ?? ""
        lockOwnerName = name
        return name
    }

    /// Breaks whatever lock the image has, the holder's blocklisted by the
    /// cluster so that it cannot write again (librbd's
    /// rbd_blocklist_on_break_lock). For the operator, when the holder's
    /// host is known dead. Returns the owners broken.
    public func breakLock() throws(StorageError) -> [String] {
        guard let i = image else { throw StorageError("rbd_lock_break", errno: EBADF, path: address.normalized) }
        let owners = try lockOwners()
        for owner in owners { try check(lib.lockBreak(i, RBD_LOCK_MODE_EXCLUSIVE, owner), "rbd_lock_break") }
        return owners
    }

    private var released = false

    /// Releases the lock, closes the image and the cluster connection. Idempotent.
    private func release() {
        guard !released else { return }
        released = true
        if let i = image {
            if lockOwnerName != nil { _ = lib.lockRelease(i) }
            lockOwnerName = nil
            _ = lib.close(i)
            image = nil
        }
        if let io = ioContext { lib.radosIoctxDestroy(io); ioContext = nil }
        if let c = cluster { lib.radosShutdown(c); cluster = nil }
        wakeup.close()
    }

    public func close() { release() }

    public func setEventHandler(_ handler: @escaping StorageEventHandler) { eventHandler = handler }

    public func openAnotherQueue() throws -> (any BlockStorage)? { nil }

    public func currentSizeBytes() -> UInt64? {
        guard let i = image else { return nil }
        var size: UInt64 = 0
        return lib.getSize(i, &size) == 0 ? size : nil
    }

    public func sizeChanged(to bytes: UInt64) { geometry.sizeBytes = bytes }

    // MARK: I/O

    public func submit(_ operations: UnsafeMutableBufferPointer<StorageOperation>) -> Int {
        var taken = 0
        for op in operations {
            guard let slot = freeSlots.popLast() else { break }
            taken += 1
            let length = op.byteCount
            slots[slot] = Slot(tag: op.tag, kind: op.kind, length: length, busy: true)
            if let error = precheck(op, length: length) {
                answerHere(slot, -Int64(error))
                continue
            }
            // Nothing written through this handle: nothing to flush. (librbd
            // would first ask for the exclusive lock, and wait on a dead holder.)
            if op.kind == .flush && !wrote {
                answerHere(slot, 0)
                continue
            }
            if op.kind == .write || op.kind == .discard { wrote = true }
            var completion: rbd_completion_t?
            let rc0 = lib.aioCreateCompletion(UnsafeMutableRawPointer(bitPattern: slot + 1), nil, &completion)
            guard rc0 == 0, let completion else {
                answerHere(slot, Int64(rc0 < 0 ? rc0 : -ENOMEM))
                continue
            }
            let rc: Int32
            switch op.kind {
            case .read: rc = lib.aioReadv(image, op.iovecs, op.iovecCount, op.offset, completion)
            case .write: rc = lib.aioWritev(image, op.iovecs, op.iovecCount, op.offset, completion)
            case .flush: rc = lib.aioFlush(image, completion)
            case .discard: rc = lib.aioDiscard(image, op.offset, op.length, completion)
            }
            if rc < 0 {
                lib.aioRelease(completion)
                answerHere(slot, Int64(rc))
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

    private func answerHere(_ slot: Int, _ result: Int64) {
        answeredHere.append(StorageCompletion(tag: slots[slot].tag, result: result))
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
        while let r = answeredHere.popLast() {
            body(r)
            n += 1
        }
        guard let i = image else { return n }
        while true {
            let got = Int(lib.pollIOEvents(i, polled, Int32(queueDepth)))
            if got <= 0 { break }
            for k in 0..<got {
                guard let c = polled[k] else { continue }
                let slot = Int(bitPattern: lib.aioGetArg(c)) - 1
                let value = Int64(lib.aioGetReturnValue(c))
                lib.aioRelease(c)
                guard slot >= 0, slot < slots.count, slots[slot].busy else { continue }
                let s = slots[slot]
                // librbd answers a read with its byte count and a write with 0.
                let result = value < 0 ? value : (s.kind == .read || s.kind == .write ? Int64(s.length) : 0)
                if (value == -Int64(ETIMEDOUT)) != clusterAway { noteClusterAway(value == -Int64(ETIMEDOUT)) }
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

    /// Requests are timing out (the cluster did not answer within the op
    /// timeout): reported once when it starts and once when answers come back.
    private var clusterAway = false

    private func noteClusterAway(_ away: Bool) {
        clusterAway = away
        let image = address.normalized
        eventHandler?(away
            ? StorageEvent(.unreachable, "\(image): the cluster did not answer within the operation timeout; failing requests (ETIMEDOUT)")
            : StorageEvent(.reconnected, "\(image): the cluster answers again"))
    }
}
