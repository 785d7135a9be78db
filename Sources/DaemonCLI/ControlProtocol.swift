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

/// The reply to `rescan DEVICE`: the disk's size compared with what its
/// frontend was told, now rather than at the next periodic check.
public struct RescanReply: Codable, Sendable, Equatable {
    public var device: String
    /// The sectors the frontend has now (nil: the device is not connected).
    public var sectors: UInt64?
    /// Set when this rescan changed the size: what it was.
    public var previousSectors: UInt64?
    /// Why nothing could be done (no such vbd).
    public var error: String?
    public init(device: String, sectors: UInt64? = nil, previousSectors: UInt64? = nil, error: String? = nil) {
        self.device = device; self.sectors = sectors; self.previousSectors = previousSectors; self.error = error
    }
}

/// What `xenbackd status --json` prints: a versioned document whose fields
/// are those of docs/status.md. A field may be added within a version;
/// none is renamed, retyped or removed without a new `schemaVersion`.
public struct StatusDocument: Codable, Sendable {
    public static let currentSchemaVersion = 1
    public var schemaVersion: Int
    public var devices: [DeviceReport]
    public init(devices: [DeviceReport]) { schemaVersion = Self.currentSchemaVersion; self.devices = devices }
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
    /// vifs: frames dropped, by direction and reason: "from_guest/tap-full"
    /// (the TAP's queue was full), "to_guest/no-buffers" (the guest had
    /// posted none), "to_guest/unfit" (a frame the frontend cannot take),
    /// "to_guest/multicast-filter", "to_guest/steering-full".
    public var droppedByReason: [String: UInt64]?
    /// vifs: frames for the guest handed to the queue its hash table names.
    public var steered: UInt64?
    /// vifs: times the guest's frames waited for the rate limit (`rate`),
    /// and the waits' total in seconds.
    public var rateLimited: UInt64?
    public var rateLimitedSeconds: Double?
    /// vbds: requests refused without being done, by reason (only those seen).
    public var rejected: [String: UInt64]?
    /// vbds: requests answered, by operation (read, write, flush, discard).
    public var operations: [String: UInt64]?
    /// vbds on a file or block device: the kernel interface ("io_uring", "libaio").
    public var ioEngine: String?
    /// When `lastError` happened, in seconds since the Unix epoch.
    public var lastErrorTime: Double?
    /// A connected vbd's disk and ring terms as the frontend was told them.
    public var vbd: VbdTerms?
    /// A connected vif's queues and the frontend's features in use.
    public var vif: VifTerms?
    /// The connection was taken over from a previous daemon (nil: not connected).
    public var resumed: Bool?
    /// Seconds from InitWait to Connected in the last handshake this daemon made.
    public var handshakeSeconds: Double?
    /// vbds: how long the requests carried out took.
    public var latency: LatencyHistogram?
    /// vbds on an NBD export: its connections lost and regained.
    public var storageConnectionsLost: UInt64?
    public var storageReconnects: UInt64?
    /// Connected vbds: requests taken off the rings and not yet answered.
    public var inFlight: UInt64?
    /// Connected vbds: the guest's grants kept mapped (feature-persistent).
    public var persistentGrantsMapped: UInt64?

    /// Requests by duration: `counts[i]` took at most `upperBoundsSeconds[i]`
    /// and more than the bound before it; the last count has no bound.
    public struct LatencyHistogram: Codable, Sendable, Equatable {
        public var upperBoundsSeconds: [Double]
        public var counts: [UInt64]
        public var sumSeconds: Double

        public init(upperBoundsSeconds: [Double], counts: [UInt64], sumSeconds: Double) {
            self.upperBoundsSeconds = upperBoundsSeconds; self.counts = counts; self.sumSeconds = sumSeconds
        }

        /// "≤ 250 µs": the bound of the bucket holding quantile `q`; nil with no requests.
        public func quantileBound(_ q: Double) -> String? {
            let total = counts.reduce(0, &+)
            guard total > 0 else { return nil }
            let rank = UInt64((Double(total) * q).rounded(.up))
            var seen: UInt64 = 0
            for (i, n) in counts.enumerated() {
                seen &+= n
                if seen >= rank {
                    guard i < upperBoundsSeconds.count else { return "> \(Self.duration(upperBoundsSeconds.last ?? 0))" }
                    return "≤ \(Self.duration(upperBoundsSeconds[i]))"
                }
            }
            return nil
        }

        static func duration(_ seconds: Double) -> String {
            if seconds >= 1 { return "\(seconds.formatted0) s" }
            if seconds >= 0.001 { return "\((seconds * 1000).formatted0) ms" }
            return "\((seconds * 1_000_000).formatted0) µs"
        }
    }

    public struct VbdTerms: Codable, Sendable, Equatable {
        public var sectors: UInt64
        public var sectorSize: Int
        public var physicalSectorSize: Int
        public var readOnly: Bool
        public var flush: Bool
        public var barrier: Bool
        public var discard: Bool
        /// `discard-secure`: a discard flagged secure erases securely (BLKSECDISCARD).
        public var secureDiscard: Bool?
        public var maxIndirectSegments: Int
        public var persistentGrants: Bool
        public var ringPages: Int
        public var queues: Int
        public var `protocol`: String

        public init(sectors: UInt64, sectorSize: Int, physicalSectorSize: Int, readOnly: Bool, flush: Bool, barrier: Bool,
                    discard: Bool, maxIndirectSegments: Int, persistentGrants: Bool, ringPages: Int, queues: Int,
                    protocol: String) {
            self.sectors = sectors; self.sectorSize = sectorSize; self.physicalSectorSize = physicalSectorSize
            self.readOnly = readOnly; self.flush = flush; self.barrier = barrier; self.discard = discard
            self.maxIndirectSegments = maxIndirectSegments; self.persistentGrants = persistentGrants
            self.ringPages = ringPages; self.queues = queues; self.protocol = `protocol`
        }
    }

    /// netif.h's receive-side hashing, as the guest set it on its control ring.
    public struct ReceiveHash: Codable, Sendable, Equatable {
        /// "none" or "toeplitz".
        public var algorithm: String
        /// The hash types on: "ipv4", "ipv4-tcp", "ipv6", "ipv6-tcp".
        public var types: [String]
        /// Key bytes set (the rest of the 40 are zero).
        public var keyLength: Int
        /// Entries of the hash-to-queue table (0: the hash modulo the queues).
        public var mappingSize: Int
        public init(algorithm: String, types: [String], keyLength: Int, mappingSize: Int) {
            self.algorithm = algorithm; self.types = types; self.keyLength = keyLength; self.mappingSize = mappingSize
        }
    }

    public struct VifTerms: Codable, Sendable, Equatable {
        public var queues: Int
        public var splitEventChannels: Bool
        public var scatterGather: Bool
        public var gsoTCPv4: Bool
        public var gsoTCPv6: Bool
        public var checksumOffload: Bool
        public var ipv6ChecksumOffload: Bool
        /// The guest asked for multicast filtering (`request-multicast-control`),
        /// and how many addresses its filter holds.
        public var multicastFiltering: Bool?
        public var multicastAddresses: Int?
        /// The guest gave a control ring (`feature-ctrl-ring`), and what it
        /// set there for receive-side hashing.
        public var controlRing: Bool?
        public var receiveHash: ReceiveHash?
        /// Bytes kept free before each frame for the guest (`xdp-headroom`).
        public var rxHeadroom: Int?

        public init(queues: Int, splitEventChannels: Bool, scatterGather: Bool, gsoTCPv4: Bool, gsoTCPv6: Bool,
                    checksumOffload: Bool, ipv6ChecksumOffload: Bool) {
            self.queues = queues; self.splitEventChannels = splitEventChannels; self.scatterGather = scatterGather
            self.gsoTCPv4 = gsoTCPv4; self.gsoTCPv6 = gsoTCPv6; self.checksumOffload = checksumOffload
            self.ipv6ChecksumOffload = ipv6ChecksumOffload
        }
    }

    public init(device: String, type: String, domain: Int, devid: Int, state: String, params: String, ringPages: Int,
                requests: UInt64, bytesRead: UInt64, bytesWritten: UInt64, errors: UInt64) {
        self.device = device; self.type = type; self.domain = domain; self.devid = devid; self.state = state
        self.params = params; self.ringPages = ringPages; self.requests = requests; self.bytesRead = bytesRead
        self.bytesWritten = bytesWritten; self.errors = errors
    }
}

extension Double {
    /// 2.5 as "2.5", 250.0 as "250".
    fileprivate var formatted0: String { self == rounded() ? String(Int(self)) : String(self) }
}
