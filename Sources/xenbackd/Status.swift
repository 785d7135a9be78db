import ArgumentParser
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
        let reply = try Self.ask("status", socket: controlSocket)
        if json {
            print(reply)
            return
        }
        guard let devices = try? JSONDecoder().decode([DeviceReport].self, from: Data(reply.utf8)) else {
            throw ValidationError("unexpected reply from \(controlSocket): \(reply.prefix(200))")
        }
        print(pad("DEVICE", 18) + pad("STATE", 13) + pad("RING", 6) + pad("REQUESTS", 12, right: true)
              + pad("READ MB", 10, right: true) + pad("WRITTEN MB", 12, right: true) + pad("ERRORS", 8, right: true)
              + "  PARAMS / LAST ERROR")
        for d in devices {
            var line = pad(d.device, 18) + pad(d.state, 13) + pad(d.ringPages > 0 ? "\(d.ringPages)p" : "-", 6)
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

    /// Sends one request line and returns the reply.
    static func ask(_ request: String, socket path: String) throws -> String {
        let fd: Int32
        do { fd = try UnixSocket.connect(to: path) } catch {
            throw ValidationError("cannot reach the daemon at \(path): \(error) (is xenbackd running?)")
        }
        defer { close(fd) }
        guard sendAll(fd, Array((request + "\n").utf8)) else { throw ValidationError("the daemon closed \(path)") }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            reply += buffer[0..<n]
        }
        return String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
