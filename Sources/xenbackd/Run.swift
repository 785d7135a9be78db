import DaemonCLI
import ArgumentParser
import BlockBackend
import BlockStorage
import NetBackend
import Glibc
import Hypervisor
import Logging
import Metrics
import MetricsEndpoint
import Prometheus
import LoopbackHypervisor
import XenBus
import XenPlatform

/// `xenbackd run`: the daemon. Serves every vbd and vif under this
/// domain's backend directory until SIGTERM or SIGINT, then answers every
/// request in flight and exits leaving xenstore as it is (its vif
/// interfaces go with it: a restarted daemon creates them again).
struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the backend daemon.")

    @Option(help: "Hypervisor platform: xen (a Xen dom0) or loopback (shared memory on any Linux). Default: xen if /dev/xen/gntdev exists, else loopback.")
    var platform: String?

    @Option(help: "Loopback hypervisor root folder (with the loopback xenstored's socket).")
    var root: String = "/run/xenbackd/loopback"

    @Option(name: .customLong("poll-us"), help: "Most microseconds a ring's thread keeps polling an idle ring before sleeping (0: sleep at once); the window adapts to what polling wins and stops while the CPU is contended. Default: 0 on Xen, as blkback (a dom0 that polls takes CPU time from guests that share its CPUs; opt in where dom0 has CPUs of its own), \(Self.loopbackPollMicroseconds) on the loopback hypervisor.")
    var pollMicroseconds: Int?

    /// The loopback hypervisor's guests are threads of this host: there,
    /// polling saves their notification and our wakeup (docs/PERFORMANCE.md).
    static let loopbackPollMicroseconds = 50

    @Flag(help: "Do not offer persistent grants (feature-persistent).")
    var noPersistentGrants = false

    @Option(help: "Segments per indirect request offered to blkfronts (feature-max-indirect-segments, at most \(VbdDataPlane.indirectSegmentsLimit); 0: no indirect requests).")
    var maxIndirectSegments = BlockBackendOptions.defaultMaxIndirectSegments

    @Option(help: "Rings one vbd may use (multi-queue-max-queues, 1 to \(BlockBackendOptions.maxQueuesLimit); each ring gets its own thread; NBD disks use one). Default: the host's online CPUs, \(BlockBackendOptions.defaultMaxQueues) here.")
    var maxQueues = BlockBackendOptions.defaultMaxQueues

    @Option(help: "Seconds a connecting vbd waits for another host to release an RBD image's exclusive lock (a live migration's source) before it fails; the lock of a dead host is broken only by `xenbackd rbd-lock break`.")
    var rbdLockWait: Double = BlockBackendOptions.defaultWriterLockWaitSeconds

    @Option(help: "Where each ring's journal lives, so that a daemon restarted after a kill answers every request exactly once: a tmpfs that outlives the daemon (default: /run/xenbackd/rings on Xen, ROOT/rings on the loopback hypervisor).")
    var ringJournalDir: String?

    // libaio by default: io_uring without registered buffers cost more dom0
    // CPU per I/O and ran slower at QD32 on a loop device (docs/PERFORMANCE.md).
    @Option(help: "Kernel interface for files and block devices: libaio (the default), io_uring, or auto (io_uring where the kernel allows it, else libaio).")
    var ioEngine: IOEngineChoice = .libaio

    @Option(help: "Control socket for `xenbackd status`.")
    var controlSocket: String = ControlServer.defaultPath

    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md), e.g. 127.0.0.1:9701 or [::1]:9701. Off unless set.")
    var metricsListen: String?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let listen = metricsListen, Self.hostAndPort(listen) == nil {
            throw ValidationError("--metrics-listen takes HOST:PORT (an IPv6 host in brackets), not \"\(listen)\"")
        }
        guard (0...VbdDataPlane.indirectSegmentsLimit).contains(maxIndirectSegments) else {
            throw ValidationError("--max-indirect-segments must be 0 to \(VbdDataPlane.indirectSegmentsLimit)")
        }
        guard rbdLockWait >= 0 else { throw ValidationError("--rbd-lock-wait must be 0 or more") }
        guard (pollMicroseconds ?? 0) >= 0 else { throw ValidationError("--poll-us must be 0 or more") }
        guard (1...BlockBackendOptions.maxQueuesLimit).contains(maxQueues) else {
            throw ValidationError("--max-queues must be 1 to \(BlockBackendOptions.maxQueuesLimit)")
        }
    }

    func run() throws {
        let logger = logging.makeLogger("xenbackd")
        let hypervisor: any HypervisorPlatform
        switch platform ?? (access(XenHypervisorPlatform.grantDevice, F_OK) == 0 ? "xen" : "loopback") {
        case "loopback":
            hypervisor = try LoopbackPlatform(root: root)
        case "xen":
            // A HypervisorError (not a ValidationError, which would add the usage text) prints one line.
            hypervisor = try XenHypervisorPlatform()
        default:
            throw ValidationError("unknown platform \"\(platform ?? "")\" (loopback or xen)")
        }
        if hypervisor.name == "xen" {
            for type in [BlockBackendService.deviceType, NetBackendService.deviceType] {
                if let reason = KernelBackendCheck.refusal(type: type) { throw RefusalError(reason) }
            }
        }
        // Signals are taken by one thread with sigwait; block them everywhere first.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let store: any XenStore
        do { store = try hypervisor.openXenStore() } catch {
            throw ValidationError("cannot reach xenstore on the \(hypervisor.name) platform: \(error)")
        }
        let loop = XenbusControlLoop(store: store, logger: logger)
        let poll = pollMicroseconds ?? (hypervisor.name == "xen" ? 0 : Self.loopbackPollMicroseconds)
        let service = BlockBackendService(platform: hypervisor, loop: loop,
                                          openStorage: DiskParameters.storageOpener(ioEngine: ioEngine),
                                          options: .init(pollMicroseconds: poll,
                                                         persistentGrants: !noPersistentGrants,
                                                         maxIndirectSegments: maxIndirectSegments,
                                                         ringJournalDirectory: ringJournalDir
                                                             ?? (hypervisor.name == "xen" ? "/run/xenbackd/rings" : root + "/rings"),
                                                         maxQueues: maxQueues, writerLockWaitSeconds: rbdLockWait),
                                          logger: logger)
        try service.start()
        let net = NetBackendService(platform: hypervisor, loop: loop, logger: logger)
        try net.start()
        // What `status` and each /metrics scrape read, on the control loop.
        let reports: @Sendable () -> [DeviceReport] = {
            service.status.map(DeviceReport.init) + net.status.map(DeviceReport.init)
        }
        let control = try ControlServer(path: controlSocket, loop: loop, logger: logger, reports: reports, rescan: { name in
            guard let r = service.rescan(device: name) else {
                return RescanReply(device: name, error: "no vbd \(name)")
            }
            return RescanReply(device: name, sectors: r.sectors, previousSectors: r.previous)
        })
        defer { control.close() }
        var metrics: MetricsEndpoint?
        if let listen = metricsListen, let (host, port) = Self.hostAndPort(listen) {
            let registry = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
            let devices = DeviceMetrics(registry: registry)
            do {
                metrics = try MetricsEndpoint(host: host, port: port) { reply in
                    loop.post {
                        devices.update(reports())
                        reply(devices.exposition())
                    }
                }
            } catch {
                throw RefusalError("cannot serve metrics at \(listen): \(error)")
            }
            logger.notice("metrics at http://\(metrics!.boundAddress)/metrics")
        }
        defer { metrics?.close() }
        SignalWaiter.start(signals: signals) { signal in
            logger.notice("signal \(signal): answering requests in flight, then exiting")
            loop.post {
                service.quiesce()
                net.quiesce()
                loop.requestStop()
            }
        }
        if ioEngine != .libaio, let refusal = IOEngineChoice.ioUringRefusal() {
            logger.warning(ioEngine == .auto ? "io_uring refused (\(refusal)): files and block devices use libaio"
                                             : "io_uring refused (\(refusal)): files and block devices will fail to open")
        }
        logger.notice("xenbackd serving", metadata: ["platform": "\(hypervisor.name)", "domain": "\(hypervisor.ownDomain)", "pollMicroseconds": "\(poll)"])
        loop.run()
        logger.notice("xenbackd stopped")
    }
}

/// A thread that waits for the blocked signals and reports each one.
enum SignalWaiter {
    static func start(signals: sigset_t, _ handler: @escaping @Sendable (Int32) -> Void) {
        final class Context: @unchecked Sendable {   // read-only after creation
            let signals: sigset_t
            let handler: @Sendable (Int32) -> Void
            init(_ s: sigset_t, _ h: @escaping @Sendable (Int32) -> Void) { signals = s; handler = h }
        }
        var thread = pthread_t()
        let ctx = Unmanaged.passRetained(Context(signals, handler)).toOpaque()
        pthread_create(&thread, nil, { raw in
            let c = Unmanaged<Context>.fromOpaque(raw!).takeRetainedValue()
            var set = c.signals
            while true {
                var sig: Int32 = 0
                if sigwait(&set, &sig) == 0 { c.handler(sig) }
            }
        }, ctx)
        pthread_detach(thread)
    }
}

/// A reason to stop at start, printed as one line (no usage text).
struct RefusalError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

extension IOEngineChoice: ExpressibleByArgument {}

extension Run {
    /// "HOST:PORT" or "[IPV6]:PORT".
    static func hostAndPort(_ s: String) -> (String, Int)? {
        guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port) else {
            return nil
        }
        var host = String(s[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, !host.contains("[") else { return nil }
        return (host, port)
    }
}
