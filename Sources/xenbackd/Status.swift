import ArgumentParser
import DaemonCLI
import Foundation
import Glibc
import SystemSupport

/// `xenbackd status`: every device the running daemon serves, a line
/// each; one device in full; or either as JSON (docs/status.md).
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the devices a running daemon serves.",
        discussion: "With DEVICE (as the DEVICE column names it, e.g. vbd-1-51712), that device in full. "
            + "--json prints the same facts in the versioned schema of docs/status.md.")

    @Argument(help: "One device to show in full.")
    var device: String?
    @Option(help: "The daemon's control socket.")
    var controlSocket: String = ControlServer.defaultPath
    @Flag(help: "Print JSON (docs/status.md: {\"schemaVersion\": 1, \"devices\": [...]}).")
    var json = false

    func run() throws {
        var devices = try ControlProtocol.devices(socket: controlSocket)
        if let name = device {
            devices = devices.filter { $0.device == name }
            guard !devices.isEmpty else { throw RefusalError("no device \(name) (see xenbackd status)") }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(StatusDocument(devices: devices)), as: UTF8.self))
            return
        }
        if let only = devices.first, device != nil {
            printInFull(only)
            return
        }
        print(pad("DEVICE", 18) + pad("STATE", 13) + pad("RING", 6) + pad("REQUESTS", 12, right: true)
              + pad("READ MB", 10, right: true) + pad("WRITTEN MB", 12, right: true) + pad("ERRORS", 8, right: true)
              + "  PARAMS / LAST ERROR")
        for d in devices {
            var line = pad(d.device, 18) + pad(d.state, 13) + pad(ringColumn(d), 6)
            line += pad("\(d.requests)", 12, right: true)
            line += pad(String(d.bytesRead / 1_000_000), 10, right: true)
            line += pad(String(d.bytesWritten / 1_000_000), 12, right: true)
            line += pad("\(d.errors)", 8, right: true) + "  " + d.params
            if let e = d.lastError { line += "  (error: \(e))" }
            if let e = d.storageEvent { line += "  (storage: \(e))" }
            if let r = d.rejected, !r.isEmpty {
                line += "  (refused: " + r.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"
            }
            if let tx = d.txPackets, let rx = d.rxPackets {
                line += "  (frames: \(tx) from guest, \(rx) to guest, \(d.dropped ?? 0) dropped, \(d.malformed ?? 0) malformed)"
            }
            print(line)
        }
        if devices.isEmpty { print("(no devices)") }
    }

    /// Pages per ring, and the number of rings when more than one ("4px2").
    private func ringColumn(_ d: DeviceReport) -> String {
        guard d.ringPages > 0 else { return "-" }
        return "\(d.ringPages)p" + (d.queues.map { $0 > 1 ? "x\($0)" : "" } ?? "")
    }

    /// Every fact about one device, a line each.
    private func printInFull(_ d: DeviceReport) {
        func line(_ key: String, _ value: String) { print(pad(key, 16) + value) }
        print(d.device)
        line("type", "\(d.type) (domain \(d.domain), devid \(d.devid))")
        line("state", d.state)
        if d.resumed == true {
            line("connection", "taken over from a previous daemon")
        } else if let seconds = d.handshakeSeconds {
            line("connection", "handshake of \((seconds * 1000).rounded() / 1000) s (InitWait to Connected)")
        }
        line(d.type == "vif" ? "interface" : "params", d.params)
        if let engine = d.ioEngine { line("io engine", engine) }
        if let v = d.vbd {
            line("disk", "\(v.sectors) sectors of \(v.sectorSize) bytes (physical \(v.physicalSectorSize)), "
                 + (v.readOnly ? "read-only" : "read-write"))
            line("ring", "\(v.ringPages) page\(v.ringPages == 1 ? "" : "s") × \(v.queues) ring\(v.queues == 1 ? "" : "s"), "
                 + "protocol \(v.protocol), persistent grants \(v.persistentGrants ? "on" : "off")")
            var features = [v.flush ? "flush" : nil, v.barrier ? "barrier" : nil,
                            v.discard ? (v.secureDiscard == true ? "discard (secure too)" : "discard") : nil]
                .compactMap { $0 }
            if v.maxIndirectSegments > 0 { features.append("indirect requests of \(v.maxIndirectSegments) segments") }
            line("features", features.isEmpty ? "none" : features.joined(separator: ", "))
        }
        if let v = d.vif {
            line("queues", "\(v.queues)" + (v.splitEventChannels ? ", split event channels" : ", one event channel each"))
            let features = [v.scatterGather ? "sg" : nil, v.gsoTCPv4 ? "gso-tcpv4" : nil, v.gsoTCPv6 ? "gso-tcpv6" : nil,
                            v.checksumOffload ? "csum-offload" : nil, v.ipv6ChecksumOffload ? "ipv6-csum-offload" : nil]
                .compactMap { $0 }
            line("guest features", features.isEmpty ? "none" : features.joined(separator: ", "))
            if v.multicastFiltering == true {
                line("multicast", "filtered, \(v.multicastAddresses ?? 0) address\(v.multicastAddresses == 1 ? "" : "es") admitted")
            }
            if let h = v.rxHeadroom, h > 0 { line("rx headroom", "\(h) bytes (xdp-headroom)") }
            if let h = v.receiveHash {
                let what = h.algorithm == "none" ? "none" : "\(h.algorithm) over " + (h.types.isEmpty ? "no types" : h.types.joined(separator: ", "))
                    + ", key \(h.keyLength) bytes, " + (h.mappingSize == 0 ? "no table" : "table of \(h.mappingSize)")
                line("receive hash", what + (d.steered.map { ", \($0) frames steered" } ?? ""))
            }
        }
        if let tx = d.txPackets, let rx = d.rxPackets {
            line("frames", "\(tx) from the guest (\(d.bytesWritten) bytes), \(rx) to it (\(d.bytesRead) bytes), "
                 + "\(d.dropped ?? 0) dropped, \(d.malformed ?? 0) malformed")
        } else {
            line("requests", "\(d.requests): \(d.bytesRead) bytes read, \(d.bytesWritten) bytes written")
        }
        if let l = d.latency, let p50 = l.quantileBound(0.5), let p99 = l.quantileBound(0.99) {
            line("latency", "p50 \(p50), p99 \(p99) (\(l.counts.reduce(0, &+)) requests timed)")
        }
        if let n = d.inFlight { line("in flight", "\(n) request\(n == 1 ? "" : "s")") }
        if let n = d.persistentGrantsMapped, d.vbd?.persistentGrants == true { line("grants kept", "\(n) mapped") }
        line("errors", "\(d.errors)")
        if let r = d.rejected, !r.isEmpty {
            line("refused", r.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        }
        if let e = d.lastError {
            line("last error", (d.lastErrorTime.map { Self.timestamp($0) + ": " } ?? "") + e)
        }
        if let e = d.storageEvent { line("storage event", e) }
    }

    /// Seconds since the epoch as UTC ISO 8601, to the second.
    static func timestamp(_ seconds: Double) -> String {
        var t = time_t(seconds)
        var parts = tm()
        gmtime_r(&t, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1,
                      Int(parts.tm_mday), Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec))
    }
}
