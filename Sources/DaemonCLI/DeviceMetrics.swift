import Prometheus

/// The daemon's metrics for `--metrics-listen` (docs/metrics.md): at each
/// scrape the same device reports as `xenbackd status`, so the two never
/// disagree, become counters and gauges in swift-prometheus's registry.
/// The data planes keep plain counters and take no part: a scrape costs
/// their threads nothing. Registered here with their HELP text rather than
/// through swift-metrics, whose Prometheus factory gives every metric an
/// empty one (promtool's lint refuses that); swift-metrics is bootstrapped
/// on the same registry for anything else that records through it.
public final class DeviceMetrics: @unchecked Sendable {   // update runs on one thread at a time (the control loop's)
    public let registry: PrometheusCollectorRegistry
    /// A counter and the total it was last brought to.
    private var counters: [String: (counter: Counter, total: UInt64)] = [:]
    private var gauges: [String: Gauge] = [:]
    /// The vbds' latency histograms as of the last update, by device.
    private var latencies: [(labels: [(String, String)], histogram: DeviceReport.LatencyHistogram)] = []

    static let states = ["Initialising", "InitWait", "Initialised", "Connected", "Closing", "Closed"]

    /// Every metric's HELP, by name.
    static let help: [String: String] = [
        "xenbackd_devices": "Devices the daemon serves, by type and xenbus state.",
        "xenbackd_device_connected": "1 while the device is Connected to its frontend.",
        "xenbackd_device_errors_total": "vbd: requests answered with an error; vif: frames that failed either way.",
        "xenbackd_device_resumed": "1 while the device's connection is one taken over from a previous daemon (restart, upgrade, kill -9).",
        "xenbackd_device_handshake_seconds": "Seconds from InitWait to Connected in the last handshake this daemon made for the device.",
        "xenbackd_vbd_requests_total": "Requests carried out and answered, by operation.",
        "xenbackd_vbd_read_bytes_total": "Bytes read from the disk for the guest.",
        "xenbackd_vbd_written_bytes_total": "Bytes the guest wrote to the disk.",
        "xenbackd_vbd_rejected_total": "Requests refused before any I/O (answered BLKIF_RSP_ERROR), by reason.",
        "xenbackd_vbd_sectors": "The disk's size in 512-byte sectors, as the frontend was told.",
        "xenbackd_vbd_rings": "Rings in use (multi-queue blkif).",
        "xenbackd_vbd_storage_connections_lost_total": "An NBD disk's connections lost (one, or all of them at once).",
        "xenbackd_vbd_storage_reconnects_total": "An NBD disk's connections regained.",
        "xenbackd_vbd_requests_in_flight": "Requests taken off the rings and not yet answered.",
        "xenbackd_vbd_persistent_grants": "The guest's grants kept mapped (feature-persistent).",
        "xenbackd_vif_frames_total": "Frames moved, by direction (from_guest, to_guest).",
        "xenbackd_vif_bytes_total": "Bytes moved, by direction (from_guest, to_guest).",
        "xenbackd_vif_rate_limited_total": "Times the guest's frames waited for the rate limit's next refill (the vif's rate).",
        "xenbackd_vif_rate_limited_seconds_total": "Seconds the guest's frames waited for the rate limit, all waits together.",
        "xenbackd_vif_dropped_total":
            "Frames dropped, by direction and reason (tap-full, no-buffers, unfit, multicast-filter, steering-full).",
        "xenbackd_vif_steered_total": "Frames for the guest handed to the queue its hash table names (feature-ctrl-ring).",
        "xenbackd_vif_malformed_total": "Malformed frames from the guest.",
        "xenbackd_vif_queues": "Queues (ring pairs) in use.",
        "xenbackd_vbd_request_duration_seconds":
            "Time from the ring thread's pass that took a request to the push of its response, for requests carried out.",
    ]

    public init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    public func update(_ reports: [DeviceReport]) {
        var seenCounters = Set<String>(), seenGauges = Set<String>()
        latencies = []
        /// The counter for (name, labels) and how far its total moved since
        /// the last scrape. A total below the last one is a device that went
        /// and came back under the same name: a counter reset, as Prometheus reads it.
        func advance(_ name: String, _ labels: [(String, String)], to total: UInt64) -> (Counter, UInt64) {
            let key = Self.key(name, labels)
            seenCounters.insert(key)
            let entry = counters[key] ?? (registry.makeCounter(descriptor: Self.descriptor(name), labels: labels), 0)
            counters[key] = (entry.counter, total)
            return (entry.counter, total >= entry.total ? total - entry.total : total)
        }
        func count(_ name: String, _ labels: [(String, String)], _ total: UInt64) {
            let (counter, delta) = advance(name, labels, to: total)
            if delta > 0 { counter.increment(by: Int64(clamping: delta)) }
        }
        /// A counter in seconds, from a total kept in nanoseconds.
        func countSeconds(_ name: String, _ labels: [(String, String)], nanoseconds total: UInt64) {
            let (counter, delta) = advance(name, labels, to: total)
            if delta > 0 { counter.increment(by: Double(delta) / 1e9) }
        }
        func gauge(_ name: String, _ labels: [(String, String)], _ value: Double) {
            let key = Self.key(name, labels)
            seenGauges.insert(key)
            let g = gauges[key] ?? registry.makeGauge(descriptor: Self.descriptor(name), labels: labels)
            g.set(value)
            gauges[key] = g
        }
        func gauge(_ name: String, _ labels: [(String, String)], _ value: Int) { gauge(name, labels, Double(value)) }

        for type in ["vbd", "vif"] {
            for state in Self.states {
                gauge("xenbackd_devices", [("type", type), ("state", state)],
                      reports.filter { $0.type == type && $0.state == state }.count)
            }
        }
        for d in reports {
            let labels = [("type", d.type), ("domain", String(d.domain)), ("device", d.device)]
            count("xenbackd_device_errors_total", labels, d.errors)
            gauge("xenbackd_device_connected", labels, d.state == "Connected" ? 1 : 0)
            if let resumed = d.resumed { gauge("xenbackd_device_resumed", labels, resumed ? 1 : 0) }
            if let seconds = d.handshakeSeconds { gauge("xenbackd_device_handshake_seconds", labels, seconds) }
            if d.type == "vbd" {
                for (operation, n) in d.operations ?? [:] {
                    count("xenbackd_vbd_requests_total", labels + [("operation", operation)], n)
                }
                if let l = d.latency { latencies.append((labels, l)) }
                if let n = d.storageConnectionsLost { count("xenbackd_vbd_storage_connections_lost_total", labels, n) }
                if let n = d.storageReconnects { count("xenbackd_vbd_storage_reconnects_total", labels, n) }
                count("xenbackd_vbd_read_bytes_total", labels, d.bytesRead)
                count("xenbackd_vbd_written_bytes_total", labels, d.bytesWritten)
                for (reason, n) in d.rejected ?? [:] {
                    count("xenbackd_vbd_rejected_total", labels + [("reason", reason)], n)
                }
                if let v = d.vbd {
                    gauge("xenbackd_vbd_sectors", labels, Int(clamping: v.sectors))
                    gauge("xenbackd_vbd_rings", labels, v.queues)
                    gauge("xenbackd_vbd_requests_in_flight", labels, Int(clamping: d.inFlight ?? 0))
                    gauge("xenbackd_vbd_persistent_grants", labels, Int(clamping: d.persistentGrantsMapped ?? 0))
                }
            } else {
                count("xenbackd_vif_frames_total", labels + [("direction", "from_guest")], d.txPackets ?? 0)
                count("xenbackd_vif_frames_total", labels + [("direction", "to_guest")], d.rxPackets ?? 0)
                count("xenbackd_vif_bytes_total", labels + [("direction", "from_guest")], d.bytesWritten)
                count("xenbackd_vif_bytes_total", labels + [("direction", "to_guest")], d.bytesRead)
                for (key, n) in d.droppedByReason ?? [:] {
                    let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
                    guard parts.count == 2 else { continue }
                    count("xenbackd_vif_dropped_total", labels + [("direction", parts[0]), ("reason", parts[1])], n)
                }
                count("xenbackd_vif_malformed_total", labels, d.malformed ?? 0)
                if let n = d.steered { count("xenbackd_vif_steered_total", labels, n) }
                count("xenbackd_vif_rate_limited_total", labels, d.rateLimited ?? 0)
                countSeconds("xenbackd_vif_rate_limited_seconds_total", labels,
                             nanoseconds: UInt64(((d.rateLimitedSeconds ?? 0) * 1e9).rounded()))
                if let v = d.vif { gauge("xenbackd_vif_queues", labels, v.queues) }
            }
        }
        // A device gone is a series gone, so 200 guests coming and going do
        // not grow the exposition for ever.
        for (key, entry) in counters where !seenCounters.contains(key) {
            registry.unregisterCounter(entry.counter)
            counters[key] = nil
        }
        for (key, g) in gauges where !seenGauges.contains(key) {
            registry.unregisterGauge(g)
            gauges[key] = nil
        }
    }

    /// The registry's metrics, then the latency histograms. These are written
    /// here: swift-prometheus's Histogram takes one observation at a time,
    /// and ours are counted by the ring threads, in buckets already.
    public func exposition() -> [UInt8] {
        var out = registry.emitToBuffer()
        guard !latencies.isEmpty else { return out }
        let name = "xenbackd_vbd_request_duration_seconds"
        var text = "# HELP \(name) \(Self.help[name]!)\n# TYPE \(name) histogram\n"
        for (labels, h) in latencies {
            let base = labels.map { "\($0.0)=\"\(Self.escaped($0.1))\"" }.joined(separator: ",")
            var cumulative: UInt64 = 0
            for (i, n) in h.counts.enumerated() {
                cumulative &+= n
                let le = i < h.upperBoundsSeconds.count ? "\(h.upperBoundsSeconds[i])" : "+Inf"
                text += "\(name)_bucket{\(base),le=\"\(le)\"} \(cumulative)\n"
            }
            text += "\(name)_sum{\(base)} \(h.sumSeconds)\n\(name)_count{\(base)} \(cumulative)\n"
        }
        out.append(contentsOf: Array(text.utf8))
        return out
    }

    /// A label value as the text format wants it: backslash, quote and newline escaped.
    static func escaped(_ value: String) -> String {
        var out = ""
        for c in value {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    /// The whole name is `metricName`: the descriptor's other parts are empty.
    private static func descriptor(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help[name]!)
    }

    private static func key(_ name: String, _ labels: [(String, String)]) -> String {
        name + labels.map { "|\($0.0)=\($0.1)" }.joined()
    }
}
