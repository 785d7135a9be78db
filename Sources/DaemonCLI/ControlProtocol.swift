import ArgumentParser
import Foundation
import Glibc
import SystemSupport

/// The daemon's control socket as its clients see it (`xenbackd status`,
/// the lab's live fuzzer): one request line, one JSON reply, then the
/// connection closes.
public enum ControlProtocol {
    public static let defaultSocket = "/run/xenbackd/control.sock"

    /// Sends one request line and returns the reply.
    public static func ask(_ request: String, socket path: String) throws -> String {
        let fd: Int32
        do { fd = try UnixSocket.connect(to: path) } catch {
            throw ValidationError("cannot reach the daemon at \(path): \(error) (is xenbackd running?)")
        }
        defer { close(fd) }
        guard sendAll(fd, Array((request + "\n").utf8)) else { throw ValidationError("the daemon closed \(path)") }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            guard let n = try? Syscall.recv(fd, &buffer, buffer.count), n > 0 else { break }
            reply += buffer[0..<n]
        }
        return String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The devices a `status` reply lists.
    public static func devices(socket path: String) throws -> [DeviceReport] {
        let reply = try ask("status", socket: path)
        guard let devices = try? JSONDecoder().decode([DeviceReport].self, from: Data(reply.utf8)) else {
            throw ValidationError("unexpected reply from \(path): \(reply.prefix(200))")
        }
        return devices
    }
}

/// What `xenbackd status` prints for one device (the JSON reply's element).
public struct DeviceReport: Codable, Sendable {
    public var device: String
    public var type: String
    public var domain: Int
    public var devid: Int
    public var state: String
    public var params: String
    public var ringPages: Int
    /// vbds: rings in use (multi-queue blkif), when connected.
    public var queues: Int?
    public var requests: UInt64
    public var bytesRead: UInt64
    public var bytesWritten: UInt64
    public var errors: UInt64
    public var lastError: String?
    public var storageEvent: String?
    /// vifs: frames each way and frames dropped.
    public var txPackets: UInt64?
    public var rxPackets: UInt64?
    public var dropped: UInt64?
    public var malformed: UInt64?
    /// vbds: requests refused without being done, by reason (only those seen).
    public var rejected: [String: UInt64]?
    /// vbds on a file or block device: the kernel interface ("io_uring", "libaio").
    public var ioEngine: String?

    public init(device: String, type: String, domain: Int, devid: Int, state: String, params: String, ringPages: Int,
                requests: UInt64, bytesRead: UInt64, bytesWritten: UInt64, errors: UInt64) {
        self.device = device; self.type = type; self.domain = domain; self.devid = devid; self.state = state
        self.params = params; self.ringPages = ringPages; self.requests = requests; self.bytesRead = bytesRead
        self.bytesWritten = bytesWritten; self.errors = errors
    }
}
