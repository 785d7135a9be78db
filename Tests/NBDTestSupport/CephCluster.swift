import Glibc
import Synchronization
import SystemSupport

/// A one-node Ceph cluster of the tests' own (../shared/reference/ceph-one-node.md):
/// a monitor, a manager and one OSD from Debian's packages, everything in a
/// temporary directory, listening on 127.0.0.1 only, cephx on, a pool `rbd`
/// for images. memstore starts fastest but loses everything when the OSD
/// restarts; bluestore on a 2 GiB file survives it. `stop()` (or deinit)
/// kills the daemons, OSD first, and removes the directory.
///
/// The daemons run in process groups of their own, spawned like the NBD
/// servers (ServerProcess), so a crashed test leaves no daemon behind.
public final class CephCluster: @unchecked Sendable {   // used by one test at a time
    public enum Store: String, Sendable { case memstore, bluestore }

    public let directory: String
    /// `-c` for the ceph and rbd tools, and CEPH_CONF (or `conf=`) for librados clients.
    public let configPath: String
    public let pool = "rbd"
    /// The monitor's address, as the config names it.
    public let monitorAddress: String
    private var daemons: [(name: String, pid: pid_t)] = []
    private var stopped = false

    /// Packages whose absence makes the tests fail loudly (scripts/setup installs them).
    public static let tools = ["/usr/bin/ceph-mon", "/usr/bin/ceph-mgr", "/usr/bin/ceph-osd", "/usr/bin/ceph",
                               "/usr/bin/rbd", "/usr/bin/ceph-authtool", "/usr/bin/monmaptool"]
    public static var isInstalled: Bool { tools.allSatisfy { access($0, X_OK) == 0 } }

    /// The port blocks of this process's clusters (tests run in parallel).
    private static let blocksInUse = Mutex<Set<Int>>([])
    private var portBase = 0

    /// A block of 100 ports no other cluster here has, whose monitor ports
    /// nothing on the host listens on (the ephemeral range overlaps them).
    private static func claimPortBlock() throws -> Int {
        try blocksInUse.withLock { used in
            let start = Int(getpid() % 90)
            for k in 0..<90 {
                let base = 40_300 + ((start + k * 7) % 90) * 100
                if !used.contains(base) && canBindTCP(port: base) && canBindTCP(port: base + 1) {
                    used.insert(base)
                    return base
                }
            }
            throw CephClusterError("no free block of ports for a Ceph cluster in 40300-49399")
        }
    }

    /// Brings the cluster up and creates the pool; throws (with the
    /// daemons' last log lines) if it is not usable within `timeout` seconds.
    public init(store: Store = .memstore, timeout: Double = 120) throws {
        guard Self.isInstalled else {
            throw CephClusterError("Ceph is not installed (scripts/setup installs ceph-mon, ceph-mgr, ceph-osd, ceph-common)")
        }
        var template = Array("/var/tmp/xenbackd-ceph-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw CephClusterError("mkdtemp: \(String(cString: strerror(errno)))") }
        directory = String(cString: made)
        configPath = directory + "/ceph.conf"
        // Ports: a block of 100 per cluster.
        let base: Int
        do { base = try Self.claimPortBlock() } catch {
            _ = try? sh(["rm", "-rf", directory])
            throw error
        }
        portBase = base
        monitorAddress = "[v2:127.0.0.1:\(base),v1:127.0.0.1:\(base + 1)]"
        do {
            try bringUp(store: store, base: base, deadline: MonotonicClock.seconds() + timeout)
        } catch {
            let logs = (try? sh(["sh", "-c", "tail -n 5 \(directory)/log/*.log 2>/dev/null"])) ?? ""
            stop()
            throw CephClusterError("\(error)\n\(logs)")
        }
    }

    deinit { stop() }

    private func bringUp(store: Store, base: Int, deadline: Double) throws {
        let d = directory
        for sub in ["run", "log", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0", "crash"] {
            try sh(["mkdir", "-p", d + "/" + sub])
        }
        let fsid = try sh(["cat", "/proc/sys/kernel/random/uuid"]).trimmed
        let config = """
        [global]
        fsid = \(fsid)
        mon initial members = a
        mon host = \(monitorAddress)
        public addr = 127.0.0.1
        cluster addr = 127.0.0.1
        ms bind port min = \(base + 10)
        ms bind port max = \(base + 99)
        auth cluster required = cephx
        auth service required = cephx
        auth client required = cephx
        auth allow insecure global id reclaim = false
        keyring = \(d)/$cluster.$name.keyring
        run dir = \(d)/run
        pid file = \(d)/run/$cluster-$name.pid
        log file = \(d)/log/$cluster-$name.log
        crash dir = \(d)/crash
        mon data = \(d)/mon/$cluster-$id
        mgr data = \(d)/mgr/$cluster-$id
        osd data = \(d)/osd/$cluster-$id
        osd pool default size = 1
        osd pool default min size = 1
        osd pool default pg autoscale mode = off
        osd pool default pg num = 8
        osd pool default pgp num = 8
        osd crush chooseleaf type = 0
        mon allow pool size one = true
        mon allow pool delete = true
        mon warn on pool no redundancy = false
        mon data avail warn = 1
        osd objectstore = \(store.rawValue)
        memstore device bytes = 1073741824
        bluestore block create = true
        bluestore block size = 2147483648
        [mon]
        admin socket = \(d)/run/$cluster-$name.asok
        keyring = \(d)/mon/$cluster-$id/keyring
        [mgr]
        admin socket = \(d)/run/$cluster-$name.asok
        keyring = \(d)/mgr/$cluster-$id/keyring
        [osd]
        admin socket = \(d)/run/$cluster-$name.asok
        keyring = \(d)/osd/$cluster-$id/keyring

        """
        try writeFile(configPath, config)
        let c = ["-c", configPath]
        try sh(["ceph-authtool", "--create-keyring", d + "/mon.keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
        try sh(["ceph-authtool", "--create-keyring", d + "/ceph.client.admin.keyring", "--gen-key", "-n", "client.admin",
                "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *"])
        try sh(["ceph-authtool", d + "/mon.keyring", "--import-keyring", d + "/ceph.client.admin.keyring"])
        try sh(["monmaptool", "--create", "--addv", "a", monitorAddress, "--fsid", fsid, d + "/monmap"])
        try sh(["ceph-mon"] + c + ["--mkfs", "-i", "a", "--monmap", d + "/monmap", "--keyring", d + "/mon.keyring"])
        try start("mon", ["/usr/bin/ceph-mon"] + c + ["-f", "-i", "a"])
        try ceph(["--connect-timeout", "30", "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                  "mds", "allow *", "-o", d + "/mgr/ceph-x/keyring"])
        try start("mgr", ["/usr/bin/ceph-mgr"] + c + ["-f", "-i", "x"])
        let osdUUID = try sh(["cat", "/proc/sys/kernel/random/uuid"]).trimmed
        let secret = try sh(["ceph-authtool", "--gen-print-key"]).trimmed
        try writeFile(d + "/osd.json", "{\"cephx_secret\": \"\(secret)\"}")
        let id = try ceph(["osd", "new", osdUUID, "-i", d + "/osd.json"]).trimmed
        guard id == "0" else { throw CephClusterError("ceph osd new gave id \(id)") }
        try sh(["ceph-authtool", "--create-keyring", d + "/osd/ceph-0/keyring", "--name", "osd.0", "--add-key", secret])
        try sh(["ceph-osd"] + c + ["-i", "0", "--mkfs", "--osd-uuid", osdUUID], timeout: 120)
        try startOSD()
        try waitForOSD(deadline: deadline)
        try ceph(["osd", "pool", "create", pool, "8", "8"])
        try rbd(["pool", "init", pool])
    }

    private func start(_ name: String, _ arguments: [String]) throws {
        let pid = try ServerProcess.spawn(arguments, logPath: directory + "/log/\(name).out")
        daemons.append((name, pid))
    }

    /// (Re)starts the OSD; after `killOSD` its data is still there on bluestore.
    public func startOSD() throws {
        try start("osd", ["/usr/bin/ceph-osd", "-c", configPath, "-f", "-i", "0"])
    }

    /// SIGKILL to the OSD (a crash), reaped.
    public func killOSD() {
        for (i, d) in daemons.enumerated().reversed() where d.name == "osd" {
            ServerProcess.killGroup(d.pid)
            daemons.remove(at: i)
        }
    }

    /// SIGKILL to the monitor (a crash), reaped; its store stays on disk.
    public func killMonitor() {
        for (i, d) in daemons.enumerated().reversed() where d.name == "mon" {
            ServerProcess.killGroup(d.pid)
            daemons.remove(at: i)
        }
    }

    /// Starts the monitor again on its store, and waits until it answers.
    public func startMonitor(deadline: Double) throws {
        try start("mon", ["/usr/bin/ceph-mon", "-c", configPath, "-f", "-i", "a"])
        while MonotonicClock.seconds() < deadline {
            if (try? ceph(["--connect-timeout", "5", "mon", "stat"], timeout: 10)) != nil { return }
            usleep(250_000)
        }
        throw CephClusterError("the monitor does not answer after its restart")
    }

    /// Until the OSD is up and every placement group active+clean.
    public func waitForOSD(deadline: Double) throws {
        while MonotonicClock.seconds() < deadline {
            if let stat = try? ceph(["pg", "stat"], timeout: 10), stat.contains("active+clean"),
               !stat.contains("peering"), !stat.contains("stale"), !stat.contains("unknown"),
               let osd = try? ceph(["osd", "stat"], timeout: 10), osd.contains("1 up") {
                return
            }
            usleep(250_000)
        }
        throw CephClusterError("the OSD is not up with every placement group active+clean in time")
    }

    /// The ceph tool against this cluster, as client.admin.
    @discardableResult
    public func ceph(_ arguments: [String], timeout: Int = 60) throws -> String {
        try sh(["timeout", "-s", "KILL", String(timeout), "ceph", "-c", configPath] + arguments, timeout: timeout + 5)
    }

    /// The rbd tool against this cluster, as client.admin.
    @discardableResult
    public func rbd(_ arguments: [String], timeout: Int = 60) throws -> String {
        try sh(["timeout", "-s", "KILL", String(timeout), "rbd", "-c", configPath] + arguments, timeout: timeout + 5)
    }

    /// A new image in the pool.
    public func createImage(_ name: String, sizeMiB: Int) throws {
        try rbd(["create", "--size", "\(sizeMiB)M", "\(pool)/\(name)"])
    }

    /// OSD first (it takes long to give up without a monitor), then the others; the directory goes.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        let base = portBase
        Self.blocksInUse.withLock { _ = $0.remove(base) }
        for name in ["osd", "mgr", "mon"] {
            for d in daemons where d.name == name { ServerProcess.killGroup(d.pid) }
        }
        daemons = []
        _ = try? sh(["rm", "-rf", directory])
    }

    private func writeFile(_ path: String, _ text: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw CephClusterError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw CephClusterError("write \(path): \(String(cString: strerror(errno)))")
        }
    }
}

extension String {
    fileprivate var trimmed: String { String(self.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed()) }
}

public struct CephClusterError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
