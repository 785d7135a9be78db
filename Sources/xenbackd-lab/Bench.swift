import DaemonCLI
import ArgumentParser
import BlockBackend
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import LoopbackHost
import LoopbackHypervisor
import XenABI
import SystemSupport

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure a backend against the raw limit of the same machine.",
        subcommands: [BenchBlock.self, BenchNet.self, BenchScale.self])
}

/// `xenbackd-lab bench blk`: the block backend on the loopback hypervisor,
/// driven by our blkfront, next to fio (libaio) on the same file.
struct BenchBlock: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "blk", abstract: "Benchmark the block backend against fio.")

    @Option(help: "File or block device to serve (created with --size if missing).")
    var file: String?
    @Option(help: "An NBD export to serve instead (nbd://, nbd+unix:// or nbd:HOST:PORT); fio then uses its nbd engine.")
    var nbd: String?
    @Option(help: "Size in MiB of a file created by the benchmark.")
    var sizeMiB: Int = 1024
    @Option(help: "Seconds per measurement.")
    var seconds: Double = 5
    @Option(help: "Ring size as a power of two pages (0-4).")
    var ringPageOrder: Int = 2
    @Option(help: "Microseconds the guest polls for responses before sleeping (0: sleep at once).")
    var spinMicroseconds = 50
    @Option(name: .customLong("poll-us"), help: "Microseconds the backend polls an idle ring before sleeping.")
    var pollMicroseconds = 50
    @Flag(help: "Do not use persistent grants (every segment is grant-copied).")
    var noPersistentGrants = false
    @Option(help: "Pages per blkif request: 11 (direct requests) or up to \(VbdDataPlane.indirectSegmentsLimit) (indirect requests; the backend offers at least this many).")
    var segmentsPerRequest = Blkif.maxSegmentsPerRequest
    @Option(help: "The backend's kernel interface for the file: auto, io_uring or libaio (fio uses libaio either way).")
    var ioEngine: IOEngineChoice = .auto
    @Flag(help: "Skip the fio runs.")
    var noFio = false
    @Option(help: "Only rows whose name contains this.")
    var only: String?

    @OptionGroup var logging: LoggingOptions

    struct Row {
        let name: String
        let fioRW: String
        let write: Bool
        let random: Bool
        let blockSize: Int
        let queueDepth: Int
    }

    static let rows = [
        Row(name: "4k-randread-qd1", fioRW: "randread", write: false, random: true, blockSize: 4096, queueDepth: 1),
        Row(name: "4k-randread-qd32", fioRW: "randread", write: false, random: true, blockSize: 4096, queueDepth: 32),
        Row(name: "4k-randwrite-qd1", fioRW: "randwrite", write: true, random: true, blockSize: 4096, queueDepth: 1),
        Row(name: "4k-randwrite-qd32", fioRW: "randwrite", write: true, random: true, blockSize: 4096, queueDepth: 32),
        Row(name: "1m-seqread-qd1", fioRW: "read", write: false, random: false, blockSize: 1 << 20, queueDepth: 1),
        Row(name: "1m-seqwrite-qd1", fioRW: "write", write: true, random: false, blockSize: 1 << 20, queueDepth: 1),
        Row(name: "1m-seqread-qd4", fioRW: "read", write: false, random: false, blockSize: 1 << 20, queueDepth: 4),
        Row(name: "1m-seqwrite-qd4", fioRW: "write", write: true, random: false, blockSize: 1 << 20, queueDepth: 4),
    ]

    func validate() throws {
        guard (file == nil) != (nbd == nil) else { throw ValidationError("give exactly one of --file and --nbd") }
        guard (Blkif.maxSegmentsPerRequest...VbdDataPlane.indirectSegmentsLimit).contains(segmentsPerRequest) else {
            throw ValidationError("--segments-per-request must be \(Blkif.maxSegmentsPerRequest) to \(VbdDataPlane.indirectSegmentsLimit)")
        }
    }

    /// The vbd's params: the file, or the NBD export.
    private var params: String { nbd ?? file! }

    func run() throws {
        let logger = logging.makeLogger("xenbackd.bench")
        if nbd == nil { try prepareFile() }
        let indirect = segmentsPerRequest > Blkif.maxSegmentsPerRequest
        let offered = max(BlockBackendOptions.defaultMaxIndirectSegments, segmentsPerRequest)
        let host = try LoopbackHost(logger: logger, openStorage: DiskParameters.storageOpener(ioEngine: ioEngine),
                                    options: .init(pollMicroseconds: pollMicroseconds,
                                                                   persistentGrants: !noPersistentGrants,
                                                                   maxIndirectSegments: offered))
        defer { host.shutdown() }
        // Every slot's data and descriptor pages, the ring, and room to spare.
        let slots = SharedRingLayout.slots(pages: 1 << min(max(ringPageOrder, 0), 4), entrySize: Blkif.slotSize)
        let pagesNeeded = slots * (segmentsPerRequest + 1) + 1024
        let guest = try host.createGuest(1, memoryPages: max(65536, pagesNeeded), grantEntries: max(8192, pagesNeeded))
        let fe = try host.attachDisk(to: guest, .init(params: params))
        fe.maxIndirectSegments = indirect ? segmentsPerRequest : 0
        try fe.connect(ringPageOrder: ringPageOrder)
        guard fe.segmentsPerRequest == segmentsPerRequest else {
            throw ValidationError("the backend agreed on \(fe.segmentsPerRequest) segments per request, not \(segmentsPerRequest)")
        }
        fe.spinMicroseconds = spinMicroseconds
        let direct = nbd == nil && storageIsDirect()
        let exportBytes = Int(fe.info.sectors) * Blkif.sectorSize
        say("xenbackd-lab bench blk: \(params), \(fe.info.sectors / 2048) MiB, ring \(fe.ringSlots) slots, "
              + (nbd == nil ? "O_DIRECT \(direct ? "on" : "off"), \(host.blockStatus.first?.ioEngine ?? "?")" : "libnbd") + ", \(fixed(seconds, 0)) s per run, "
              + "requests of up to \(segmentsPerRequest) pages" + (indirect ? " (indirect)" : ""))
        say("row                   xenbackd IOPS     MB/s   p50 us   p99 us |      fio IOPS     MB/s   p50 us   p99 us | ratio")
        for row in Self.rows where only.map({ row.name.contains($0) }) ?? true {
            progressLine("\(row.name): xenbackd, \(fixed(seconds, 0)) s…")
            let ours = try measure(row, on: fe)
            if !noFio { progressLine("\(row.name): fio, \(fixed(seconds, 0)) s…") }
            let theirs = noFio ? nil : runFio(row, direct: direct, sizeBytes: exportBytes)
            progressLine("")
            var line = pad(row.name, 20) + " " + figures(ours)
            if let theirs {
                line += " | " + figures(theirs) + " | " + fixed(ours.iops / max(theirs.iops, 1e-9), 2)
            } else {
                line += " | (fio not run)"
            }
            say(line)
        }
        try fe.disconnect()
    }

    /// Whether the backend's storage uses O_DIRECT on this file (fio must match).
    private func storageIsDirect() -> Bool {
        guard let file, let s = try? FileStorage.open(path: DiskParameters.path(of: file), readOnly: true, queueDepth: 1) else { return false }
        defer { s.close() }
        return s.directIO
    }

    private func prepareFile() throws {
        guard let file, access(file, F_OK) != 0 else { return }
        let fd = open(file, O_CREAT | O_WRONLY, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot create \(file): errno \(errno)") }
        defer { close(fd) }
        // Real blocks, not a sparse file: a hole reads faster than any disk.
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var rng = Xorshift(seed: 7)
        for i in stride(from: 0, to: chunk.count, by: 8) {
            let v = rng.next()
            withUnsafeBytes(of: v) { for j in 0..<8 { chunk[i + j] = $0[j] } }
        }
        for i in 0..<sizeMiB {
            guard write(fd, chunk, chunk.count) == chunk.count else { throw ValidationError("writing \(file) failed") }
            if i % 64 == 0 { progressLine("creating \(file): \(i)/\(sizeMiB) MiB") }
        }
        fsync(fd)
        progressLine("")
    }

    struct Figures {
        var iops: Double
        var mbps: Double
        var p50us: Double
        var p99us: Double
    }

    private func figures(_ f: Figures) -> String {
        pad(fixed(f.iops, 0), 13, right: true) + pad(fixed(f.mbps, 1), 9, right: true)
            + pad(fixed(f.p50us, 0), 9, right: true) + pad(fixed(f.p99us, 0), 9, right: true)
    }

    /// Drives `row` through the frontend: `queueDepth` I/Os of `blockSize`
    /// in flight (a 1 MiB I/O is split into blkif requests of up to
    /// `--segments-per-request` pages, as blkfront splits a bio), for `seconds`.
    private func measure(_ row: Row, on fe: LoopbackBlockFrontend) throws -> Figures {
        let sectorsPerIO = row.blockSize / Blkif.sectorSize
        let maxPerRequest = fe.maxSectorsPerRequest
        let requestsPerIO = (sectorsPerIO + maxPerRequest - 1) / maxPerRequest
        guard requestsPerIO * row.queueDepth <= fe.ringSlots else {
            throw ValidationError("\(row.name) needs \(requestsPerIO * row.queueDepth) ring slots; use a larger --ring-page-order")
        }
        let ios = fe.info.sectors / UInt64(sectorsPerIO)
        var rng = Xorshift(seed: 99)
        var nextSequential: UInt64 = 0
        var histogram = LatencyHistogram()
        // Per I/O in flight: requests left and start time; requests map to their I/O by slot.
        var ioOfSlot = [Int](repeating: -1, count: fe.ringSlots)
        var remaining = [Int](repeating: 0, count: row.queueDepth)
        var started = [Double](repeating: 0, count: row.queueDepth)
        var freeIOs = Array(0..<row.queueDepth)
        var completedIOs = 0
        var errors = 0
        let start = MonotonicClock.seconds()
        var stopping = false

        func issue(_ io: Int) throws {
            let base = (row.random ? rng.next() % ios : nextSequential % ios) * UInt64(sectorsPerIO)
            nextSequential += 1
            var left = sectorsPerIO
            var sector = base
            remaining[io] = 0
            while left > 0 {
                let n = min(left, maxPerRequest)
                let t = try fe.submit(row.write ? .write(sector: sector, count: n) : .read(sector: sector, count: n))
                ioOfSlot[t.slot] = io
                remaining[io] += 1
                left -= n
                sector += UInt64(n)
            }
            started[io] = MonotonicClock.seconds()
        }

        while true {
            if !stopping {
                while let io = freeIOs.popLast() { try issue(io) }
                fe.kick()
            }
            try fe.collect(timeout: 10) { rsp in
                if rsp.status != BlkifStatus.okay { errors += 1 }
                let slot = Int(rsp.id & 0xffff)
                let io = ioOfSlot[slot]
                remaining[io] -= 1
                if remaining[io] == 0 {
                    histogram.record(seconds: MonotonicClock.seconds() - started[io])
                    completedIOs += 1
                    freeIOs.append(io)
                }
            }
            if !stopping && MonotonicClock.seconds() - start >= seconds { stopping = true }
            if stopping && freeIOs.count == row.queueDepth { break }
        }
        let elapsed = MonotonicClock.seconds() - start
        if errors > 0 { throw ValidationError("\(row.name): \(errors) requests failed") }
        let iops = Double(completedIOs) / elapsed
        return Figures(iops: iops, mbps: iops * Double(row.blockSize) / 1e6,
                       p50us: histogram.percentile(0.50) * 1e6, p99us: histogram.percentile(0.99) * 1e6)
    }

    /// fio on the same storage, same block size, depth and direct mode:
    /// libaio on a file, its nbd engine (libnbd) on an export.
    private func runFio(_ row: Row, direct: Bool, sizeBytes: Int) -> Figures? {
        let target = nbd.map { ["--ioengine=nbd", "--uri=\($0)"] }
            ?? ["--filename=\(file!)", "--ioengine=libaio", "--direct=\(direct ? 1 : 0)", "--invalidate=0"]
        let args = ["fio", "--name=bench"] + target + [
                    "--rw=\(row.fioRW)", "--bs=\(row.blockSize)", "--iodepth=\(row.queueDepth)",
                    "--runtime=\(Int(seconds))", "--time_based", "--output-format=json",
                    "--lat_percentiles=1", "--size=\(sizeBytes)"]
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return nil }
        var data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        // fio's nbd engine prints a line before the JSON.
        if let brace = data.firstIndex(of: UInt8(ascii: "{")) { data = data[brace...] }
        guard p.terminationStatus == 0,
              let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let job = (json["jobs"] as? [[String: Any]])?.first,
              let side = job[row.write ? "write" : "read"] as? [String: Any] else { return nil }
        let iops = side["iops"] as? Double ?? 0
        let bw = (side["bw_bytes"] as? Double) ?? Double(side["bw_bytes"] as? Int ?? 0)
        // Total latency (submission + completion), as ours is measured.
        let lat = side["lat_ns"] as? [String: Any]
        let pct = lat?["percentile"] as? [String: Any]
        let p50 = (pct?["50.000000"] as? Double) ?? Double(pct?["50.000000"] as? Int ?? 0)
        let p99 = (pct?["99.000000"] as? Double) ?? Double(pct?["99.000000"] as? Int ?? 0)
        return Figures(iops: iops, mbps: bw / 1e6, p50us: p50 / 1000, p99us: p99 / 1000)
    }

}

/// Latency histogram with 1 µs buckets up to 100 ms (longer goes in the last).
struct LatencyHistogram {
    private var buckets = [UInt64](repeating: 0, count: 100_001)
    private var count: UInt64 = 0
    mutating func record(seconds: Double) {
        let us = min(Int(seconds * 1e6), buckets.count - 1)
        buckets[max(us, 0)] += 1
        count += 1
    }
    func percentile(_ p: Double) -> Double {
        guard count > 0 else { return 0 }
        let target = UInt64((Double(count) * p).rounded(.up))
        var seen: UInt64 = 0
        for (us, n) in buckets.enumerated() {
            seen += n
            if seen >= target { return Double(us) / 1e6 }
        }
        return Double(buckets.count - 1) / 1e6
    }
}


extension IOEngineChoice: ExpressibleByArgument {}
