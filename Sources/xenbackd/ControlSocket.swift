import BlockBackend
import DaemonCLI
import NetBackend
import Foundation
import Glibc
import Logging
import SystemSupport
import XenBus

extension DeviceReport {
    init(_ s: VbdStatus) {
        self.init(device: s.address.description, type: s.address.type, domain: Int(s.address.frontendDomain),
                  devid: Int(s.address.devid), state: s.state.description, params: s.params, ringPages: s.ringPages,
                  requests: s.statistics.requests, bytesRead: s.statistics.bytesRead,
                  bytesWritten: s.statistics.bytesWritten, errors: s.statistics.errors)
        rejected = s.statistics.rejected.total > 0 ? s.statistics.rejected.named : nil
        operations = ["read": s.statistics.reads, "write": s.statistics.writes,
                      "flush": s.statistics.flushes, "discard": s.statistics.discards]
        queues = s.queues > 0 ? s.queues : nil
        lastError = s.lastError
        storageEvent = s.lastStorageEvent
        ioEngine = s.ioEngine
        lastErrorTime = s.lastErrorTime
        resumed = s.state == .connected ? s.resumed : nil
        handshakeSeconds = s.handshakeSeconds
        let l = s.statistics.latency
        latency = LatencyHistogram(upperBoundsSeconds: VbdLatencyHistogram.upperBoundsNanoseconds.map { Double($0) / 1e9 },
                                   counts: (0..<VbdLatencyHistogram.bucketCount).map { l[$0] },
                                   sumSeconds: Double(l.sumNanoseconds) / 1e9)
        storageConnectionsLost = s.storageConnectionsLost
        storageReconnects = s.storageReconnects
        if s.state == .connected {
            inFlight = s.statistics.inFlight
            persistentGrantsMapped = s.statistics.persistentGrants
        }
        vbd = s.negotiated.map {
            var terms = VbdTerms(sectors: $0.sectors, sectorSize: $0.sectorSize, physicalSectorSize: $0.physicalSectorSize,
                                 readOnly: $0.readOnly, flush: $0.flush, barrier: $0.barrier, discard: $0.discard,
                                 maxIndirectSegments: $0.maxIndirectSegments, persistentGrants: $0.persistentGrants,
                                 ringPages: $0.ringPages, queues: $0.queues, protocol: $0.protocolName)
            terms.secureDiscard = $0.secureDiscard
            return terms
        }
    }

    /// A vif in the same columns: bytes the guest received count as read,
    /// bytes it sent as written; params names the interface and bridge.
    init(_ s: VifStatus) {
        self.init(device: s.address.description, type: s.address.type, domain: Int(s.address.frontendDomain),
                  devid: Int(s.address.devid), state: s.state.description,
                  params: s.interface.isEmpty ? "-" : s.interface + (s.bridge.map { " on " + $0 } ?? ""), ringPages: 0,
                  requests: s.statistics.txPackets &+ s.statistics.rxPackets, bytesRead: s.statistics.rxBytes,
                  bytesWritten: s.statistics.txBytes, errors: s.statistics.txErrors &+ s.statistics.rxErrors)
        lastError = s.lastError
        txPackets = s.statistics.txPackets
        rxPackets = s.statistics.rxPackets
        dropped = s.statistics.txDropped &+ s.statistics.rxDropped
        malformed = s.statistics.txMalformed
        droppedByReason = ["from_guest/tap-full": s.statistics.txDropped,
                           "to_guest/no-buffers": s.statistics.rxDropped &- s.statistics.rxDroppedUnfit
                               &- s.statistics.rxDroppedFiltered &- s.statistics.rxDroppedSteering,
                           "to_guest/unfit": s.statistics.rxDroppedUnfit,
                           "to_guest/multicast-filter": s.statistics.rxDroppedFiltered,
                           "to_guest/steering-full": s.statistics.rxDroppedSteering]
        steered = s.statistics.rxSteered
        rateLimited = s.statistics.txRateLimited
        rateLimitedSeconds = Double(s.statistics.txRateLimitedNanoseconds) / 1e9
        lastErrorTime = s.lastErrorTime
        resumed = s.state == .connected ? s.resumed : nil
        handshakeSeconds = s.handshakeSeconds
        vif = s.frontendFeatures.map {
            var terms = VifTerms(queues: s.queues, splitEventChannels: s.splitEventChannels, scatterGather: $0.scatterGather,
                                 gsoTCPv4: $0.gsoTCPv4, gsoTCPv6: $0.gsoTCPv6, checksumOffload: $0.checksumOffload,
                                 ipv6ChecksumOffload: $0.ipv6ChecksumOffload)
            terms.multicastFiltering = s.multicastFiltering
            terms.multicastAddresses = s.multicastAddresses
            terms.controlRing = s.controlRing
            terms.rxHeadroom = s.rxHeadroom
            terms.receiveHash = s.receiveHash.map {
                DeviceReport.ReceiveHash(algorithm: $0.algorithmName, types: $0.typeNames, keyLength: $0.keyLength,
                                         mappingSize: $0.mappingSize)
            }
            return terms
        }
    }
}

/// The daemon's control socket: a client sends one line ("status") and
/// gets one JSON reply, then the connection closes. Served on the control
/// loop's thread, so the reply reads device state without locks.
final class ControlServer: @unchecked Sendable {   // used on the control loop thread only
    static let defaultPath = ControlProtocol.defaultSocket
    private let listener: Int32
    private let path: String
    private let reports: () -> [DeviceReport]
    private let rescan: (String) -> RescanReply
    private let logger: Logger

    init(path: String, loop: XenbusControlLoop, logger: Logger, reports: @escaping () -> [DeviceReport],
         rescan: @escaping (String) -> RescanReply) throws {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty { try makeDirectories(parent) }
        // Root only: the socket can change things (rescan), and status
        // names every guest's disks.
        listener = try UnixSocket.listen(at: path, mode: 0o600)
        self.path = path
        self.reports = reports
        self.rescan = rescan
        self.logger = logger
        loop.whenReadable(listener) { [self] in acceptOne() }
    }

    func close() {
        Glibc.close(listener)
        unlink(path)
    }

    private func acceptOne() {
        guard let fd = try? Syscall.accept(listener) else { return }   // none waiting (EAGAIN), or it failed
        defer { Glibc.close(fd) }
        // A client that does not send its line within a second is dropped:
        // the control loop must keep serving xenstore.
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 256)
        guard let n = try? Syscall.recv(fd, &buffer, buffer.count), n > 0 else { return }   // closed, timed out or failed
        let request = String(decoding: buffer[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let reply: Data
        let words = request.split(separator: " ", omittingEmptySubsequences: true)
        switch (words.first, words.count) {
        case ("status", 1):
            reply = (try? encoder.encode(reports())) ?? Data("[]".utf8)
        case ("rescan", 2):
            reply = (try? encoder.encode(rescan(String(words[1])))) ?? Data("{}".utf8)
        default:
            reply = (try? encoder.encode(["error": "unknown request \(request.prefix(40))"])) ?? Data("{}".utf8)
        }
        _ = sendAll(fd, Array(reply) + [10])
    }
}
