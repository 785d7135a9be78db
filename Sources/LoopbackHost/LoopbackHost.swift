import BlockBackend
import BlockFrontend
import Glibc
import Hypervisor
import Logging
import LoopbackHypervisor
import LoopbackXenStore
import XenBus
import XenStoreClient

/// One loopback world in one process: the xenstored, dom0's backend (its
/// control loop on its own thread) and simulated guests with the
/// toolstack's part. The daemon runs these pieces as separate processes;
/// tests and the benchmark run them here.
public final class LoopbackHost: @unchecked Sendable {   // mutable state touched from the test/bench thread only
    public let layout: LoopbackLayout
    public let server: LoopbackXenStoreServer
    public let platform: LoopbackPlatform
    public let control: XenbusControlLoop
    public let blockService: BlockBackendService
    public let toolstack: LoopbackToolstack
    private let controlThread: BackgroundThread
    private let ownsRoot: Bool
    private var guests: [DomID: LoopbackGuestDomain] = [:]

    /// Starts xenstored and the backend under `root` (a new temp folder if nil).
    public init(root: String? = nil, logger: Logger = Logger(label: "xenbackd"),
                openStorage: @escaping StorageOpener = DiskParameters.fileStorageOpener) throws {
        let dir: String
        if let root { dir = root; mkdir(root, 0o700) } else {
            var template = Array("/tmp/xenbackd-loopback-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw HypervisorError("mkdtemp", errno: errno) }
            dir = String(cString: made)
        }
        ownsRoot = root == nil
        layout = LoopbackLayout(root: dir)
        server = try LoopbackXenStoreServer(socketPath: layout.xenStoreSocket,
                                            domainSocketDirectory: layout.xenStoreDomainSockets, logger: logger)
        try server.start()
        platform = try LoopbackPlatform(root: dir)
        let store = try platform.openXenStore()
        control = XenbusControlLoop(store: store, logger: logger)
        blockService = BlockBackendService(platform: platform, loop: control, openStorage: openStorage, logger: logger)
        try blockService.start()
        let loop = control
        controlThread = BackgroundThread { loop.run() }
        toolstack = LoopbackToolstack(store: try XenStoreSocketClient(socketPath: layout.xenStoreSocket))
    }

    /// Creates a guest domain: its memory and grant table, its xenstore home.
    public func createGuest(_ domid: DomID, memoryPages: Int = 16384) throws -> LoopbackGuestDomain {
        let g = try LoopbackGuestDomain(layout: layout, domain: domid, memoryPages: memoryPages)
        try toolstack.createDomain(domid, name: "guest\(domid)")
        try server.introduceDomain(domid)
        guests[domid] = g
        return g
    }

    /// A xenstore connection as the guest itself.
    public func guestStore(_ domid: DomID) throws -> any XenStore {
        try XenStoreSocketClient(socketPath: layout.xenStoreDomainSocket(domid))
    }

    /// Adds a disk the way libxl does and returns the guest's frontend for it
    /// (not yet connected).
    public func attachDisk(to guest: LoopbackGuestDomain, _ disk: LoopbackToolstack.Disk) throws -> LoopbackBlockFrontend {
        try toolstack.addDisk(domain: guest.domain, disk)
        return LoopbackBlockFrontend(guest: guest, store: try guestStore(guest.domain), devid: disk.devid)
    }

    /// Runs `body` on the control loop thread and waits for it.
    public func onControlThread<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let box = ResultBox<T>()
        control.post { box.set(body()) }
        return box.wait()
    }

    public var blockStatus: [VbdStatus] { onControlThread { [blockService] in blockService.status } }

    public func shutdown() {
        onControlThread { [blockService] in blockService.quiesce() }
        control.requestStop()
        controlThread.join()
        server.stop()
        for g in guests.values { g.destroy() }
        if ownsRoot { removeTree(layout.root) }
    }
}

func removeTree(_ path: String) {
    guard let dir = opendir(path) else { unlink(path); return }
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name == "." || name == ".." { continue }
        let child = path + "/" + name
        var st = stat()
        if lstat(child, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR { removeTree(child) } else { unlink(child) }
    }
    closedir(dir)
    rmdir(path)
}

/// A thread running one closure (the control loop, a test's second guest).
public final class BackgroundThread: @unchecked Sendable {   // `thread` written once before any join
    private var thread = pthread_t()
    public init(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body))
        pthread_create(&thread, nil, { raw in
            let b = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            b.body()
            return nil
        }, box.toOpaque())
    }
    public func join() { pthread_join(thread, nil) }
    private final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ b: @escaping @Sendable () -> Void) { body = b }
    }
}

/// A value handed from one thread to a waiting one.
final class ResultBox<T>: @unchecked Sendable {   // guarded by the mutex/condition pair
    private var m = pthread_mutex_t()
    private var c = pthread_cond_t()
    private var value: T?
    init() { pthread_mutex_init(&m, nil); pthread_cond_init(&c, nil) }
    func set(_ v: T) {
        pthread_mutex_lock(&m); value = v; pthread_cond_signal(&c); pthread_mutex_unlock(&m)
    }
    func wait() -> T {
        pthread_mutex_lock(&m)
        while value == nil { pthread_cond_wait(&c, &m) }
        let v = value!
        pthread_mutex_unlock(&m)
        return v
    }
}
