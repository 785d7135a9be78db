import BlockBackend
import BlockFrontend
import Glibc
import Hypervisor
import Logging
import LoopbackHypervisor
import LoopbackXenStore
import NetBackend
import NetFrontend
import NetworkPlumbing
import SystemSupport
import XenBus
import XenStoreClient

/// One loopback world in one process: the xenstored, dom0's backend (its
/// control loop on its own thread) and simulated guests with the
/// toolstack's part. The daemon runs these pieces as separate processes;
/// tests and the benchmark run them here.
public final class LoopbackHost: @unchecked Sendable {   // mutable state touched from the test/bench thread only
    public let layout: LoopbackLayout
    /// Our xenstored; nil when the host uses another one (`externalXenStore`).
    public let server: LoopbackXenStoreServer?
    /// The dom0 socket of the xenstored in use.
    public let xenStoreSocket: String
    public let platform: LoopbackPlatform
    public let control: XenbusControlLoop
    public let blockService: BlockBackendService
    public let netService: NetBackendService
    public let toolstack: LoopbackToolstack
    private let controlThread: NativeThread
    private let ownsRoot: Bool
    private var guests: [DomID: LoopbackGuestDomain] = [:]

    /// Starts xenstored and the backend under `root` (a new temp folder if
    /// nil). With `externalXenStore` (another xenstored's socket, such as
    /// Xen's own oxenstored) no xenstored is started, and guests talk to it
    /// through dom0 connections (it has no per-domain sockets).
    public init(root: String? = nil, logger: Logger = Logger(label: "xenbackd"),
                openStorage: @escaping StorageOpener = DiskParameters.fileStorageOpener,
                options: BlockBackendOptions = .init(), netOptions: NetBackendOptions = .init(),
                externalXenStore: String? = nil, networkNamespace: String? = nil) throws {
        let dir: String
        if let root { dir = root; try makeDirectories(root, mode: 0o700) } else {
            // Guest memory lives here: tmpfs keeps it off the disk.
            let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
            var template = Array("\(base)/xenbackd-loopback-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw HypervisorError("mkdtemp", errno: errno) }
            dir = String(cString: made)
        }
        ownsRoot = root == nil
        layout = LoopbackLayout(root: dir)
        if let externalXenStore {
            server = nil
            xenStoreSocket = externalXenStore
        } else {
            let ours = try LoopbackXenStoreServer(socketPath: layout.xenStoreSocket,
                                                  domainSocketDirectory: layout.xenStoreDomainSockets, logger: logger)
            try ours.start()
            server = ours
            xenStoreSocket = layout.xenStoreSocket
        }
        platform = try LoopbackPlatform(root: dir, xenStoreSocket: xenStoreSocket)
        let store = try platform.openXenStore()
        control = XenbusControlLoop(store: store, logger: logger)
        var options = options
        if options.ringJournalDirectory == nil { options.ringJournalDirectory = dir + "/rings" }
        blockService = BlockBackendService(platform: platform, loop: control, openStorage: openStorage,
                                           options: options, logger: logger)
        try blockService.start()
        netService = NetBackendService(platform: platform, loop: control, options: netOptions, logger: logger)
        try netService.start()
        let loop = control
        // The backend's interfaces (vifD.N) are created on the control
        // thread, so they live in its namespace: tests give it their own.
        let entered = Handoff<[String]>()   // empty: entered
        controlThread = try NativeThread(name: "xenbus") {
            if let networkNamespace {
                do throws(NetworkError) {
                    try NetworkNamespace.enter(named: networkNamespace, mountSysfs: false)
                } catch {
                    entered.put(["\(error)"])
                    return
                }
            }
            entered.put([])
            loop.run()
        }
        if let failure = entered.take().first {
            controlThread.join()
            server?.stop()
            throw HypervisorError("enter network namespace \(networkNamespace ?? "")", errno: EINVAL, detail: failure)
        }
        toolstack = LoopbackToolstack(store: try XenStoreSocketClient(socketPath: xenStoreSocket))
    }

    /// Creates a guest domain: its memory and grant table, its xenstore home.
    public func createGuest(_ domid: DomID, memoryPages: Int = 16384, grantEntries: Int = 8192) throws -> LoopbackGuestDomain {
        let g = try LoopbackGuestDomain(layout: layout, domain: domid, memoryPages: memoryPages, grantEntries: grantEntries)
        try toolstack.createDomain(domid, name: "guest\(domid)")
        try server?.introduceDomain(domid)
        guests[domid] = g
        return g
    }

    /// A xenstore connection as the guest itself (as dom0 on an external xenstored).
    public func guestStore(_ domid: DomID) throws -> any XenStore {
        try XenStoreSocketClient(socketPath: server == nil ? xenStoreSocket : layout.xenStoreDomainSocket(domid))
    }

    /// Adds a disk the way libxl does and returns the guest's frontend for it
    /// (not yet connected).
    public func attachDisk(to guest: LoopbackGuestDomain, _ disk: LoopbackToolstack.Disk) throws -> LoopbackBlockFrontend {
        try toolstack.addDisk(domain: guest.domain, disk)
        return LoopbackBlockFrontend(guest: guest, store: try guestStore(guest.domain), devid: disk.devid)
    }

    /// Runs `body` on the control loop thread and waits for it.
    public func onControlThread<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let handoff = Handoff<T>()
        control.post { handoff.put(body()) }
        return handoff.take()
    }

    public var blockStatus: [VbdStatus] { onControlThread { [blockService] in blockService.status } }
    public var netStatus: [VifStatus] { onControlThread { [netService] in netService.status } }

    /// Adds a vif the way libxl does and returns the guest's netfront for it
    /// (not yet connected), joined to `tap` (a TAP in the guest's namespace;
    /// nil for a frontend driven by hand).
    public func attachNic(to guest: LoopbackGuestDomain, _ nic: LoopbackToolstack.Nic, tap: TapDevice?,
                          options: NetFrontendOptions = .init()) throws -> LoopbackNetFrontend {
        try toolstack.addNic(domain: guest.domain, nic)
        return LoopbackNetFrontend(guest: guest, store: try guestStore(guest.domain), devid: nic.devid, tap: tap, options: options)
    }

    public func shutdown() {
        onControlThread { [blockService, netService] in
            blockService.quiesce()
            netService.shutdown()
        }
        control.requestStop()
        controlThread.join()
        server?.stop()
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
