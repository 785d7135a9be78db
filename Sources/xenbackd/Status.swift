import ArgumentParser
import DaemonCLI
import Foundation
import Glibc
import SystemSupport

/// `xenbackd status`: every device the running daemon serves.
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the devices a running daemon serves.")

    @Option(help: "The daemon's control socket.")
    var controlSocket: String = ControlServer.defaultPath
    @Flag(help: "Print the daemon's JSON reply as it is.")
    var json = false

    func run() throws {
        if json {
            print(try ControlProtocol.ask("status", socket: controlSocket))
            return
        }
        let devices = try ControlProtocol.devices(socket: controlSocket)
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
}
