import BlockFrontend
import DaemonCLI
import Foundation
import Glibc
import Prometheus
import SystemSupport
import Testing
import XenABI

/// `xenbackd run --metrics-listen`: the guest's I/O on /metrics with its
/// labels, checked by reading the exposition, by promtool, and by Debian's
/// Prometheus server scraping the daemon.
@Suite("metrics")
struct MetricsTests {
    /// A daemon serving /metrics on a free port, and dom1 with a connected vbd
    /// that wrote 5 times, read 3 times, flushed once and had one write past
    /// the end refused.
    struct Bed {
        let world: DaemonRestartTests.World
        let port: Int
        /// The guest's frontend, kept connected for as long as the bed lives.
        let frontend: LoopbackBlockFrontend
        init() throws {
            world = try DaemonRestartTests.World()
            let port = try freePort()
            self.port = port
            world.daemon!.terminate()
            _ = world.waitExit(world.daemon!, seconds: 10)
            world.daemon = try world.startDaemon(["--metrics-listen", "127.0.0.1:\(port)"])
            try waitUntil("/metrics to answer", seconds: 10) { (try? httpGet(port: port, "/metrics"))?.status == 200 }
            let (fe, _) = try DaemonRestartTests().connectGuest(world)
            frontend = fe
            let page = [UInt8](repeating: 0x42, count: 4096)
            for i in 0..<5 { #expect(try fe.write(sector: UInt64(i * 8), data: page) == BlkifStatus.okay) }
            for i in 0..<3 { #expect(try fe.read(sector: UInt64(i * 8), count: 8).status == BlkifStatus.okay) }
            #expect(try fe.run(.flush) == BlkifStatus.okay)
            #expect(try fe.write(sector: 16 * 2048, data: page) == BlkifStatus.error)
        }
    }

    static let vbd = ["type": "vbd", "domain": "1", "device": "vbd-1-51712"]

    @Test("/metrics: the vbd's requests by operation, bytes and state, with type, domain and device; promtool accepts it")
    func exposition() throws {
        let bed = try Bed()
        defer { bed.world.close() }
        let reply = try httpGet(port: bed.port, "/metrics")
        #expect(reply.status == 200 && reply.contentType.hasPrefix("text/plain; version=0.0.4"), "\(reply.contentType)")
        let body = reply.body
        func value(_ name: String, _ labels: [String: String]) -> Double? { sample(body, name, labels) }
        #expect(value("xenbackd_vbd_requests_total", Self.vbd.merging(["operation": "write"]) { $1 }) == 5, "\(body)")
        #expect(value("xenbackd_vbd_requests_total", Self.vbd.merging(["operation": "read"]) { $1 }) == 3)
        #expect(value("xenbackd_vbd_requests_total", Self.vbd.merging(["operation": "flush"]) { $1 }) == 1)
        #expect(value("xenbackd_vbd_written_bytes_total", Self.vbd) == Double(5 * 4096))
        #expect(value("xenbackd_vbd_read_bytes_total", Self.vbd) == Double(3 * 4096))
        #expect(value("xenbackd_device_errors_total", Self.vbd) == 1)
        #expect(value("xenbackd_vbd_rejected_total", Self.vbd.merging(["reason": "beyond-end-of-disk"]) { $1 }) == 1)
        #expect(value("xenbackd_device_connected", Self.vbd) == 1)
        #expect(value("xenbackd_vbd_sectors", Self.vbd) == Double(16 * 2048))
        #expect(value("xenbackd_devices", ["type": "vbd", "state": "Connected"]) == 1)
        #expect(value("xenbackd_devices", ["type": "vif", "state": "Connected"]) == 0)
        // 5 writes, 3 reads and a flush carried out; the refused write is not timed.
        let duration = "xenbackd_vbd_request_duration_seconds"
        #expect(value(duration + "_count", Self.vbd) == 9)
        #expect(value(duration + "_bucket", Self.vbd.merging(["le": "+Inf"]) { $1 }) == 9)
        #expect(value(duration + "_bucket", Self.vbd.merging(["le": "1.0"]) { $1 }) ?? 0 <= 9)
        let sum = try #require(value(duration + "_sum", Self.vbd))
        #expect(sum > 0 && sum < 9 * 5, "\(sum)")
        #expect(body.contains("# TYPE \(duration) histogram"))
        #expect(value("xenbackd_device_resumed", Self.vbd) == 0, "a handshake of this daemon's")
        #expect(value("xenbackd_vbd_requests_in_flight", Self.vbd) == 0, "every request answered")
        #expect(value("xenbackd_vbd_persistent_grants", Self.vbd) != nil)
        let handshake = try #require(value("xenbackd_device_handshake_seconds", Self.vbd))
        #expect(handshake > 0 && handshake < 30)

        let file = NSTemporaryDirectory() + "xenbackd-metrics-\(getpid()).txt"
        defer { unlink(file) }
        try Data(body.utf8).write(to: URL(fileURLWithPath: file))
        let check = try runProcess(["/bin/sh", "-c", "promtool check metrics < '\(file)'"],
                                   environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], timeout: 30)
        #expect(check.status == 0, "promtool: \(check.stdout) \(check.stderr)")

        #expect(try httpGet(port: bed.port, "/other").status == 404)
        #expect(try httpGet(port: bed.port, "/metrics", method: "POST").status == 405)

        // A restarted daemon takes the connection over: resumed, no handshake of its own.
        bed.world.daemon!.terminate()
        _ = bed.world.waitExit(bed.world.daemon!, seconds: 10)
        bed.world.daemon = try bed.world.startDaemon(["--metrics-listen", "127.0.0.1:\(bed.port)"])
        try? waitUntil("the resumed device in /metrics", seconds: 10) {
            sample((try? httpGet(port: bed.port, "/metrics"))?.body ?? "", "xenbackd_device_resumed", Self.vbd) == 1
        }
        let after = try httpGet(port: bed.port, "/metrics").body
        #expect(sample(after, "xenbackd_device_resumed", Self.vbd) == 1, "\(after)")
        #expect(sample(after, "xenbackd_device_handshake_seconds", Self.vbd) == nil, "\(after)")
    }

    @Test("Debian's Prometheus server scrapes the daemon: the guest's writes through its query API")
    func prometheusScrapes() throws {
        let bed = try Bed()
        defer { bed.world.close() }
        let dir = bed.world.root + "/prometheus"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let config = dir + "/prometheus.yml"
        try """
        global:
          scrape_interval: 1s
        scrape_configs:
          - job_name: xenbackd
            static_configs:
              - targets: ["127.0.0.1:\(bed.port)"]
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let webPort = try freePort()
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/bin/prometheus")
        server.arguments = ["--config.file=\(config)", "--storage.tsdb.path=\(dir)/data",
                            "--web.listen-address=127.0.0.1:\(webPort)"]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer {
            server.terminate()
            server.waitUntilExit()
        }
        let query = "xenbackd_vbd_requests_total%7Boperation%3D%22write%22%7D"
        var result: [String: Any]?
        try waitUntil("Prometheus to have scraped the guest's writes", seconds: 60) {
            guard let r = try? httpGet(port: webPort, "/api/v1/query?query=" + query), r.status == 200,
                  let json = try? JSONSerialization.jsonObject(with: Data(r.body.utf8)) as? [String: Any],
                  let data = json["data"] as? [String: Any], let series = data["result"] as? [[String: Any]],
                  let first = series.first else { return false }
            result = first
            return true
        }
        let labels = try #require(result?["metric"] as? [String: String])
        #expect(labels["job"] == "xenbackd" && labels["instance"] == "127.0.0.1:\(bed.port)")
        #expect(labels["type"] == "vbd" && labels["domain"] == "1" && labels["device"] == "vbd-1-51712", "\(labels)")
        #expect((result?["value"] as? [Any])?.last as? String == "5", "\(String(describing: result))")
    }
}

/// A TCP port nobody listens on now (bound to 0 and let go).
func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard bound else { throw SystemError("bind", errno: errno) }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// One HTTP/1.1 request to 127.0.0.1:`port`, the connection closed after it.
func httpGet(port: Int, _ path: String, method: String = "GET") throws -> (status: Int, contentType: String, body: String) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
    guard connected else { throw SystemError("connect", errno: errno) }
    let request = Array("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".utf8)
    guard send(fd, request, request.count, 0) == request.count else { throw SystemError("send", errno: errno) }
    var reply: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        reply += buffer[0..<n]
    }
    let text = String(decoding: reply, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw SystemError("no HTTP reply", errno: EPROTO) }
    let head = text[..<split.lowerBound].split(separator: "\r\n")
    let status = head.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    let contentType = head.first { $0.lowercased().hasPrefix("content-type:") }
        .map { $0.dropFirst("content-type:".count).trimmingCharacters(in: .whitespaces) } ?? ""
    return (status, contentType, String(text[split.upperBound...]))
}

/// The value of the sample `name{labels…}` with exactly these labels, from
/// Prometheus's text format (label values here hold no comma or quote).
func sample(_ exposition: String, _ name: String, _ labels: [String: String]) -> Double? {
    for line in exposition.split(separator: "\n") where line.hasPrefix(name + "{") {
        guard let close = line.lastIndex(of: "}") else { continue }
        let inside = line[line.index(line.startIndex, offsetBy: name.count + 1)..<close]
        var found: [String: String] = [:]
        for pair in inside.split(separator: ",") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            guard parts.count == 2 else { continue }
            found[String(parts[0])] = String(parts[1].dropFirst().dropLast())
        }
        if found == labels { return Double(line[line.index(after: close)...].trimmingCharacters(in: .whitespaces)) }
    }
    return nil
}

/// `DeviceMetrics` alone, fed reports as the control loop would: a vif's
/// series, a device that goes away, and one that comes back.
@Suite("metrics from device reports")
struct DeviceMetricsTests {
    static func vif(tx: UInt64, rx: UInt64, state: String = "Connected") -> DeviceReport {
        var d = DeviceReport(device: "vif-3-0", type: "vif", domain: 3, devid: 0, state: state, params: "vif3.0 on xenbr0",
                             ringPages: 0, requests: tx + rx, bytesRead: rx * 100, bytesWritten: tx * 60, errors: 0)
        d.txPackets = tx; d.rxPackets = rx; d.dropped = 3; d.malformed = 1
        d.droppedByReason = ["from_guest/tap-full": 1, "to_guest/no-buffers": 2, "to_guest/unfit": 0]
        d.rateLimited = tx / 5; d.rateLimitedSeconds = Double(tx) / 1000
        d.vif = .init(queues: 2, splitEventChannels: true, scatterGather: true, gsoTCPv4: true, gsoTCPv6: false,
                      checksumOffload: true, ipv6ChecksumOffload: false)
        return d
    }

    static let labels = ["type": "vif", "domain": "3", "device": "vif-3-0"]
    static func with(_ extra: [String: String]) -> [String: String] { labels.merging(extra) { $1 } }

    @Test("a vif: frames and bytes by direction, drops, malformed frames, queues; gone with the device; a reset when it comes back")
    func vifSeries() throws {
        let metrics = DeviceMetrics(registry: PrometheusCollectorRegistry())
        metrics.update([Self.vif(tx: 10, rx: 7)])
        metrics.update([Self.vif(tx: 15, rx: 9)])
        var text = metrics.registry.emitToString()
        #expect(sample(text, "xenbackd_vif_frames_total", Self.with(["direction": "from_guest"])) == 15, "\(text)")
        #expect(sample(text, "xenbackd_vif_frames_total", Self.with(["direction": "to_guest"])) == 9)
        #expect(sample(text, "xenbackd_vif_bytes_total", Self.with(["direction": "from_guest"])) == 900)
        #expect(sample(text, "xenbackd_vif_bytes_total", Self.with(["direction": "to_guest"])) == 900)
        #expect(sample(text, "xenbackd_vif_dropped_total", Self.with(["direction": "from_guest", "reason": "tap-full"])) == 1)
        #expect(sample(text, "xenbackd_vif_dropped_total", Self.with(["direction": "to_guest", "reason": "no-buffers"])) == 2)
        #expect(sample(text, "xenbackd_vif_dropped_total", Self.with(["direction": "to_guest", "reason": "unfit"])) == 0)
        #expect(sample(text, "xenbackd_vif_malformed_total", Self.labels) == 1)
        #expect(sample(text, "xenbackd_vif_rate_limited_total", Self.labels) == 3)
        #expect(sample(text, "xenbackd_vif_rate_limited_seconds_total", Self.labels) == 0.015)
        #expect(sample(text, "xenbackd_vif_queues", Self.labels) == 2)
        #expect(sample(text, "xenbackd_devices", ["type": "vif", "state": "Connected"]) == 1)
        #expect(text.contains("# HELP xenbackd_vif_frames_total "))

        metrics.update([])
        text = metrics.registry.emitToString()
        #expect(!text.contains("vif-3-0"), "a device gone takes its series with it: \(text)")
        #expect(sample(text, "xenbackd_devices", ["type": "vif", "state": "Connected"]) == 0)

        // Back under the same name with counts from 0: a new series from 0.
        metrics.update([Self.vif(tx: 4, rx: 1, state: "InitWait")])
        text = metrics.registry.emitToString()
        #expect(sample(text, "xenbackd_vif_frames_total", Self.with(["direction": "from_guest"])) == 4, "\(text)")
        #expect(sample(text, "xenbackd_device_connected", Self.labels) == 0)
        #expect(sample(text, "xenbackd_devices", ["type": "vif", "state": "InitWait"]) == 1)
    }
}
