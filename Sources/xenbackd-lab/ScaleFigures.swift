import Hypervisor
import XenStoreClient

/// The handshake times of every device, from the state monitor's clock:
/// keys -> InitWait (the toolstack's transaction committed, to the backend's
/// InitWait) and Initialised -> Connected (the frontend published its ring
/// — Initialised for a vbd, Connected for a vif, as Linux netfront does —
/// to the backend's Connected).
struct StartTimings {
    var vbdInitWait = Durations(), vifInitWait = Durations()
    var vbdConnected = Durations(), vifConnected = Durations()

    init(guests: [ScaleGuest], monitor: StateMonitor) {
        for g in guests {
            let d = g.domid
            for (type, devid) in [("vbd", 51712), ("vif", 0)] {
                let be = "/local/domain/0/backend/\(type)/\(d)/\(devid)"
                let fe = "/local/domain/\(d)/device/\(type)/\(devid)"
                if let keys = monitor.firstChange(be), let initWait = monitor.reached(be, 2) {
                    if type == "vbd" { vbdInitWait.add(initWait - keys) } else { vifInitWait.add(initWait - keys) }
                }
                if let published = monitor.reached(fe, 3), let connected = monitor.reached(be, 4) {
                    if type == "vbd" { vbdConnected.add(connected - published) } else { vifConnected.add(connected - published) }
                }
            }
        }
    }

    var initWait: Durations { Durations(merging: vbdInitWait, vifInitWait) }
    var connected: Durations { Durations(merging: vbdConnected, vifConnected) }
}

extension Durations {
    init(merging a: Durations, _ b: Durations) {
        self.init()
        for v in a.values + b.values { add(v) }
    }
}

/// What the daemon and the store still hold once every guest is destroyed.
struct Leftovers: CustomStringConvertible {
    var taps = 0, mappings = 0, fds = 0, threads = 0, xenstoreNodes = 0
    var total: Int { taps + mappings + fds + threads + xenstoreNodes }
    /// The guests' nodes still in xenstore, with their subtrees.
    var nodePaths: [String] = []

    var description: String {
        "\(taps) vif TAPs, \(mappings) mappings of guest memory, \(fds) fds and \(threads) threads over the daemon's "
            + "count before the guests, \(xenstoreNodes) xenstore nodes of guests"
    }

    static func look(world: ScaleWorld, store: XenStoreSocketClient, baseline: (fds: Int, threads: Int)) -> Leftovers {
        let probe = DaemonProcess(pid: world.daemonPID)
        var left = Leftovers()
        left.taps = world.vifInterfaces().count
        left.mappings = probe.mappings(under: world.root)
        let fds = probe.descriptorTargets
        left.fds = max(fds.count - baseline.fds, fds.count { $0.hasPrefix(world.root + "/dom") })
        left.threads = max(0, probe.threads - baseline.threads)
        var roots: [String] = []
        for type in ["vbd", "vif"] {
            let base = "/local/domain/0/backend/\(type)"
            roots += (((try? store.directory(base)) ?? nil) ?? []).map { base + "/" + $0 }
        }
        roots += (((try? store.directory("/local/domain")) ?? nil) ?? []).filter { $0 != "0" }.map { "/local/domain/" + $0 }
        left.xenstoreNodes = roots.count
        if !roots.isEmpty { for r in roots { collect(r, store, into: &left.nodePaths) } }
        return left
    }

    private static func collect(_ path: String, _ store: XenStoreSocketClient, into paths: inout [String]) {
        guard paths.count < 50 else { return }
        let value = ((try? store.read(path)) ?? nil) ?? ""
        paths.append(value.isEmpty ? path : path + " = \"\(value)\"")
        for child in ((try? store.directory(path)) ?? nil) ?? [] { collect(path + "/" + child, store, into: &paths) }
    }
}
