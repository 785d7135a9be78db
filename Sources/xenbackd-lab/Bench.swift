import DaemonCLI
import ArgumentParser
import BlockBackend
import BlockFrontend
import BlockStorage
import Foundation
import Glibc
import LoopbackHost
import Hypervisor
import LoopbackHypervisor
import XenABI
import SystemSupport

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure a backend against the raw limit of the same machine.",
        subcommands: [BenchBlock.self, BenchNet.self, BenchScale.self, BenchBusyLoop.self])
}

/// `xenbackd-lab bench blk`: the block backend on the loopback hypervisor,
/// driven by our blkfront, next to fio (libaio) on the same file.
struct BenchBlock: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "blk", abstract: "Benchmark the block backend against fio.")

    @Option(help: "File or block device to serve (created with --size-mi-b if missing).")
    var file: String?
    @Option(help: "An NBD export to serve instead (nbd://, nbd+unix:// or nbd:HOST:PORT); fio then uses its nbd engine.")
    var nbd: String?
    @Option(help: "A Ceph RBD image to serve instead: POOL/IMAGE, or a whole rbd: target (id=, conf=, librados settings); fio then uses its rbd engine, after every row of ours (the backend holds the image's lock while connected).")
    var rbd: String?
    @Option(help: "Size in MiB of a file created by the benchmark.")
    var sizeMiB: Int = 1024
    @Option(help: "Seconds per measurement.")
    var seconds: Double = 5
    @Option(help: "Ring size as a power of two pages (0-4).")
    var ringPageOrder: Int = 2
    @Option(help: "Most microseconds the guest polls for responses before sleeping (0: sleep at once; adaptive, as the backend's).")
    var spinMicroseconds = 50
    @Option(name: .customLong("poll-us"), help: "Most microseconds the backend polls an idle ring before sleeping (adaptive: ARCHITECTURE.md step 9).")
    var pollMicroseconds = 50
    @Flag(help: "Do not use persistent grants (every segment is grant-copied).")
    var noPersistentGrants = false
    @Option(help: "Pages per blkif request: 11 (direct requests) or up to \(VbdDataPlane.indirectSegmentsLimit) (indirect requests; the backend offers at least this many).")
    var segmentsPerRequest = Blkif.maxSegmentsPerRequest
    @Option(help: "The backend's kernel interface for the file: libaio (the daemon's default), io_uring or auto (fio uses libaio either way).")
    var ioEngine: IOEngineChoice = .libaio
    @Flag(help: "Skip the fio runs.")
    var noFio = false
    @Option(help: "Only rows whose name contains this.")
    var only: String?
    @Option(help: "Busy-looping processes to run beside both xenbackd and fio for the whole run (a busy dom0).")
    var contention = 0
    @Option(help: "Guests measured at once, each with its own vbd on the same disk, against fio with as many jobs (aggregate IOPS).")
    var jobs = 1
    @Option(help: "Rings each guest asks for (multi-queue blkif; the backend offers as many), each driven by a guest thread of its own, against fio with as many jobs in all.")
    var queues = 1

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
        guard [file, nbd, rbd].compactMap({ $0 }).count == 1 else {
            throw ValidationError("give exactly one of --file, --nbd and --rbd")
        }
        if rbd != nil {
            guard let address = rbdAddress else {
                throw ValidationError("--rbd takes POOL/IMAGE or rbd:POOL/IMAGE[:OPTION=VALUE]...")
            }
            guard address.namespace.isEmpty, address.snapshot == nil else {
                throw ValidationError("--rbd: fio's rbd engine takes neither a namespace nor a snapshot")
            }
        }
        guard (0...64).contains(contention) else { throw ValidationError("--contention must be 0 to 64") }
        guard (1...64).contains(jobs) else { throw ValidationError("--jobs must be 1 to 64") }
        guard (1...BlockBackendOptions.maxQueuesLimit).contains(queues), jobs * queues <= 64 else {
            throw ValidationError("--queues must be 1 to \(BlockBackendOptions.maxQueuesLimit), and --jobs × --queues at most 64")
        }
        guard (Blkif.maxSegmentsPerRequest...VbdDataPlane.indirectSegmentsLimit).contains(segmentsPerRequest) else {
            throw ValidationError("--segments-per-request must be \(Blkif.maxSegmentsPerRequest) to \(VbdDataPlane.indirectSegmentsLimit)")
        }
    }

    /// The vbd's params: the file, the NBD export, or the RBD image.
    private var params: String {
        if let rbd { return rbd.hasPrefix(RBDImageAddress.scheme) ? rbd : RBDImageAddress.scheme + rbd }
        return nbd ?? file!
    }

    /// `--rbd` parsed (nil when it is not given or does not parse).
    private var rbdAddress: RBDImageAddress? {
        guard rbd != nil, case .rbd(let address)? = try? DiskTarget.parse(params).location else { return nil }
        return address
    }

    /// Served over the network by a library (not a local file): no O_DIRECT question, written whole first.
    private var remote: Bool { file == nil }

    func run() throws {
        let logger = logging.makeLogger("xenbackd.bench")
        if file != nil { try prepareFile() }
        let indirect = segmentsPerRequest > Blkif.maxSegmentsPerRequest
        let offered = max(BlockBackendOptions.defaultMaxIndirectSegments, segmentsPerRequest)
        let host = try LoopbackHost(logger: logger, openStorage: DiskParameters.storageOpener(ioEngine: ioEngine),
                                    options: .init(pollMicroseconds: pollMicroseconds,
                                                                   persistentGrants: !noPersistentGrants,
                                                                   maxIndirectSegments: offered, maxQueues: queues))
        defer { host.shutdown() }
        // Every slot's data and descriptor pages, the ring, and room to spare.
        let slots = SharedRingLayout.slots(pages: 1 << min(max(ringPageOrder, 0), 4), entrySize: Blkif.slotSize)
        let pagesNeeded = slots * (segmentsPerRequest + 1) + 1024
        // One guest per job, each with its own vbd on the same disk (fio's
        // jobs share its file the same way).
        var frontends: [LoopbackBlockFrontend] = []
        for job in 0..<jobs {
            let guest = try host.createGuest(DomID(job + 1), memoryPages: max(65536, pagesNeeded),
                                             grantEntries: max(8192, pagesNeeded))
            let fe = try host.attachDisk(to: guest, .init(params: params))
            fe.maxIndirectSegments = indirect ? segmentsPerRequest : 0
            fe.requestedQueues = queues
            try fe.connect(ringPageOrder: ringPageOrder)
            guard fe.segmentsPerRequest == segmentsPerRequest else {
                throw ValidationError("the backend agreed on \(fe.segmentsPerRequest) segments per request, not \(segmentsPerRequest)")
            }
            guard fe.queues.count == queues else {
                throw ValidationError("the backend agreed on \(fe.queues.count) rings, not \(queues) (an NBD export gets one)")
            }
            fe.spinMicroseconds = spinMicroseconds
            frontends.append(fe)
        }
        let fe = frontends[0]
        // A server's first write of a block allocates it (nbdkit's memory
        // plugin took twice as long for it): written whole first, as a new
        // file is, so that neither side's rows pay for that.
        if remote { try Self.fillWhole(through: fe.queues[0], sectors: fe.info.sectors) }
        let busy = try BusyLoops(count: contention)
        defer { busy.stop() }
        let direct = !remote && storageIsDirect()
        let exportBytes = Int(fe.info.sectors) * Blkif.sectorSize
        say("xenbackd-lab bench blk: \(params), \(fe.info.sectors / 2048) MiB, ring \(fe.ringSlots) slots, "
              + (remote ? host.blockStatus.first?.ioEngine ?? "?" : "O_DIRECT \(direct ? "on" : "off"), \(host.blockStatus.first?.ioEngine ?? "?")") + ", \(fixed(seconds, 0)) s per run, "
              + "requests of up to \(segmentsPerRequest) pages" + (indirect ? " (indirect)" : "")
              + (jobs > 1 ? ", \(jobs) guests" : "") + (queues > 1 ? ", \(queues) rings each" : "")
              + (streams > 1 ? ", \(streams) fio jobs" : "")
              + (contention > 0 ? ", \(contention) busy-looping processes beside" : ""))
        say("cpu: xenbackd's is dom0's (the process but the guests' threads, polling included), fio's its own; "
              + "us/IO per I/O, % of one CPU")
        say("row                   xenbackd IOPS     MB/s   p50 us   p99 us us/IO  cpu% |      fio IOPS     MB/s   p50 us   p99 us us/IO  cpu% | ratio")
        let rows = Self.rows.filter { row in only.map { row.name.contains($0) } ?? true }
        func line(_ row: Row, _ ours: Figures, _ theirs: Figures?) -> String {
            var line = pad(row.name, 20) + " " + figures(ours)
            if let theirs {
                line += " | " + figures(theirs) + " | " + fixed(ours.iops / max(theirs.iops, 1e-9), 2)
            } else {
                line += " | (fio not run)"
            }
            return line
        }
        if rbd != nil {
            // The vbd holds the image's exclusive lock: fio's writes would
            // fail beside it. Every row of ours, the guests gone, then fio's.
            var ours: [Figures] = []
            for row in rows {
                progressLine("\(row.name): xenbackd, \(fixed(seconds, 0)) s…")
                ours.append(try measure(row, on: frontends.flatMap(\.queues), sectors: fe.info.sectors))
            }
            for fe in frontends { try fe.disconnect() }
            try waitForLockRelease(host)
            for (row, figures) in zip(rows, ours) {
                if !noFio { progressLine("\(row.name): fio, \(fixed(seconds, 0)) s…") }
                let theirs = noFio ? nil : runFio(row, direct: false, sizeBytes: exportBytes)
                progressLine("")
                say(line(row, figures, theirs))
            }
            return
        }
        for row in rows {
            progressLine("\(row.name): xenbackd, \(fixed(seconds, 0)) s…")
            let ours = try measure(row, on: frontends.flatMap(\.queues), sectors: fe.info.sectors)
            if !noFio { progressLine("\(row.name): fio, \(fixed(seconds, 0)) s…") }
            let theirs = noFio ? nil : runFio(row, direct: direct, sizeBytes: exportBytes)
            progressLine("")
            say(line(row, ours, theirs))
        }
        for fe in frontends { try fe.disconnect() }
    }

    /// Until the backend has closed every disk (and so released an RBD image's lock).
    private func waitForLockRelease(_ host: LoopbackHost) throws {
        for _ in 0..<300 {
            if host.blockStatus.allSatisfy({ !$0.diskOpen }) { return }
            usleep(100_000)
        }
        throw ValidationError("the backend did not close the disk within 30 s")
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
        /// CPU seconds per I/O and CPU seconds per second (nil: not known).
        var cpuPerIO: Double?
        var cpuShare: Double?
    }

    private func figures(_ f: Figures) -> String {
        pad(fixed(f.iops, 0), 13, right: true) + pad(fixed(f.mbps, 1), 9, right: true)
            + pad(fixed(f.p50us, 0), 9, right: true) + pad(fixed(f.p99us, 0), 9, right: true)
            + pad(f.cpuPerIO.map { fixed($0 * 1e6, 1) } ?? "-", 6, right: true)
            + pad(f.cpuShare.map { fixed($0 * 100, 0) } ?? "-", 6, right: true)
    }

    /// What one guest's thread measured.
    struct GuestRun: Sendable {
        var completedIOs = 0
        var elapsed = 0.0
        var cpuSeconds = 0.0
        var histogram = LatencyHistogram()
    }

    /// I/O streams: one per ring of each guest, as many fio jobs.
    private var streams: Int { jobs * queues }

    /// Drives `row` on every ring of every guest at once, each from a
    /// thread of its own (the guests' vCPUs), and sums them: IOPS and MB/s
    /// add up, latencies are percentiles of all I/Os. dom0's CPU is the
    /// process's over the run but the guests' threads: the backend's data
    /// planes (their idle polling too), its control loop and the loopback xenstored.
    private func measure(_ row: Row, on rings: [BlockFrontendRing], sectors: UInt64) throws -> Figures {
        let processStart = Self.cpuSeconds(CLOCK_PROCESS_CPUTIME_ID)
        let seconds = self.seconds
        var runs: [Handoff<Result<GuestRun, any Error>>] = []
        var threads: [NativeThread] = []
        for (stream, ring) in rings.enumerated() {
            let handoff = Handoff<Result<GuestRun, any Error>>()
            runs.append(handoff)
            threads.append(try NativeThread(name: "guest-\(stream + 1)") {
                handoff.put(Result { try Self.drive(row, on: ring, sectors: sectors, seconds: seconds, seed: 99 + UInt64(stream)) })
            })
        }
        for t in threads { t.join() }
        let processCPU = Self.cpuSeconds(CLOCK_PROCESS_CPUTIME_ID) - processStart
        var total = GuestRun()
        for handoff in runs {
            let run = try handoff.take().get()
            total.completedIOs += run.completedIOs
            total.elapsed = max(total.elapsed, run.elapsed)
            total.cpuSeconds += run.cpuSeconds
            total.histogram.add(run.histogram)
        }
        let iops = Double(total.completedIOs) / total.elapsed
        let dom0 = max(processCPU - total.cpuSeconds, 0)
        return Figures(iops: iops, mbps: iops * Double(row.blockSize) / 1e6,
                       p50us: total.histogram.percentile(0.50) * 1e6, p99us: total.histogram.percentile(0.99) * 1e6,
                       cpuPerIO: dom0 / Double(max(total.completedIOs, 1)), cpuShare: dom0 / total.elapsed)
    }

    static func cpuSeconds(_ clock: clockid_t) -> Double {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Drives `row` through the frontend: `queueDepth` I/Os of `blockSize`
    /// in flight (a 1 MiB I/O is split into blkif requests of up to
    /// `--segments-per-request` pages, as blkfront splits a bio), for `seconds`.
    private static func drive(_ row: Row, on fe: BlockFrontendRing, sectors: UInt64, seconds: Double,
                              seed: UInt64) throws -> GuestRun {
        let sectorsPerIO = row.blockSize / Blkif.sectorSize
        let maxPerRequest = fe.maxSectorsPerRequest
        let requestsPerIO = (sectorsPerIO + maxPerRequest - 1) / maxPerRequest
        guard requestsPerIO * row.queueDepth <= fe.ringSlots else {
            throw ValidationError("\(row.name) needs \(requestsPerIO * row.queueDepth) ring slots; use a larger --ring-page-order")
        }
        let ios = sectors / UInt64(sectorsPerIO)
        var rng = Xorshift(seed: seed)
        var nextSequential: UInt64 = 0
        var histogram = LatencyHistogram()
        // Per I/O in flight: requests left and start time; requests map to their I/O by slot.
        var ioOfSlot = [Int](repeating: -1, count: fe.ringSlots)
        var remaining = [Int](repeating: 0, count: row.queueDepth)
        var started = [Double](repeating: 0, count: row.queueDepth)
        var freeIOs = Array(0..<row.queueDepth)
        var completedIOs = 0
        var errors = 0
        let cpuStart = cpuSeconds(CLOCK_THREAD_CPUTIME_ID)
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
        return GuestRun(completedIOs: completedIOs, elapsed: elapsed,
                        cpuSeconds: cpuSeconds(CLOCK_THREAD_CPUTIME_ID) - cpuStart, histogram: histogram)
    }

    /// Writes every sector once, in order, with as many requests in flight
    /// as half the ring holds.
    private static func fillWhole(through fe: BlockFrontendRing, sectors: UInt64) throws {
        let perRequest = UInt64(fe.maxSectorsPerRequest)
        var next: UInt64 = 0
        var inFlight = 0
        var errors = 0
        var shown: UInt64 = 0
        while next < sectors || inFlight > 0 {
            while next < sectors && inFlight < max(fe.ringSlots / 2, 1) {
                let n = Int(min(perRequest, sectors - next))
                _ = try fe.submit(.write(sector: next, count: n))
                next += UInt64(n)
                inFlight += 1
            }
            fe.kick()
            inFlight -= try fe.collect(timeout: 10) { if $0.status != BlkifStatus.okay { errors += 1 } }
            let mebibytes = next / 2048
            if mebibytes / 64 != shown / 64 {
                shown = mebibytes
                progressLine("writing the export whole: \(mebibytes)/\(sectors / 2048) MiB")
            }
        }
        progressLine("")
        if errors > 0 { throw ValidationError("writing the export whole: \(errors) requests failed") }
    }

    /// fio on the same storage, same block size, depth and direct mode:
    /// libaio on a file, its nbd engine (libnbd) on an export.
    private func runFio(_ row: Row, direct: Bool, sizeBytes: Int) -> Figures? {
        var environment = ProcessInfo.processInfo.environment
        let target: [String]
        if let nbd {
            target = ["--ioengine=nbd", "--uri=\(nbd)"]
        } else if let a = rbdAddress {
            // The same image as the same user; librados's settings from the params too.
            target = ["--ioengine=rbd", "--pool=\(a.pool)", "--rbdname=\(a.image)", "--clientname=\(a.user ?? "admin")"]
            if let conf = a.configPath { environment["CEPH_CONF"] = conf }
            // librbd's cache off, as the backend has it (a write done is on the OSDs).
            environment["CEPH_ARGS"] = (["--rbd_cache=false"] + a.settings.map { "--\($0.name)=\($0.value)" })
                .joined(separator: " ")
        } else {
            target = ["--filename=\(file!)", "--ioengine=libaio", "--direct=\(direct ? 1 : 0)", "--invalidate=0"]
        }
        let args = ["fio", "--name=bench"] + target + [
                    "--rw=\(row.fioRW)", "--bs=\(row.blockSize)", "--iodepth=\(row.queueDepth)",
                    "--runtime=\(Int(seconds))", "--time_based", "--output-format=json",
                    "--lat_percentiles=1", "--size=\(sizeBytes)"]
            + (streams > 1 ? ["--numjobs=\(streams)", "--group_reporting"] : [])
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.environment = environment
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
        // fio's own CPU: usr_cpu and sys_cpu are percentages of job_runtime
        // (ms; with group_reporting the sum of the jobs' runtimes).
        let cpuPercent = number(job["usr_cpu"]) + number(job["sys_cpu"])
        let runtime = number(job["job_runtime"]) / 1000
        let cpu = cpuPercent / 100 * runtime
        let ios = number(side["total_ios"])
        return Figures(iops: iops, mbps: bw / 1e6, p50us: p50 / 1000, p99us: p99 / 1000,
                       cpuPerIO: ios > 0 ? cpu / ios : nil, cpuShare: runtime > 0 ? cpu / (runtime / Double(streams)) : nil)
    }

}

private func number(_ value: Any?) -> Double {
    (value as? Double) ?? Double(value as? Int ?? 0)
}

/// `count` processes that spin on a CPU each until `stop` (or until this
/// process dies: they watch their parent): a busy dom0.
final class BusyLoops {
    private var processes: [Process] = []

    init(count: Int) throws {
        guard count > 0 else { return }
        let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        for _ in 0..<count {
            let p = Process()
            p.executableURL = me
            p.arguments = ["bench", "busy-loop", "--parent", "\(getpid())"]
            try p.run()
            processes.append(p)
        }
    }

    func stop() {
        for p in processes where p.isRunning { p.terminate() }
        for p in processes { p.waitUntilExit() }
        processes = []
    }
}

/// `xenbackd-lab bench busy-loop`: spins until killed or its parent is gone.
struct BenchBusyLoop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "busy-loop", abstract: "Spin on one CPU (bench blk --contention).",
                                                    shouldDisplay: false)
    @Option(help: "Exit once this process is no longer the parent.")
    var parent: Int32

    func run() {
        var x: UInt64 = 1
        while getppid() == parent {
            for _ in 0..<(1 << 20) { x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407 }
            busyLoopSink = x
        }
    }
}

nonisolated(unsafe) private var busyLoopSink: UInt64 = 0

/// Latency histogram with 1 µs buckets up to 100 ms (longer goes in the last).
struct LatencyHistogram: Sendable {
    private var buckets = [UInt64](repeating: 0, count: 100_001)
    private var count: UInt64 = 0
    mutating func record(seconds: Double) {
        let us = min(Int(seconds * 1e6), buckets.count - 1)
        buckets[max(us, 0)] += 1
        count += 1
    }
    mutating func add(_ other: LatencyHistogram) {
        for i in buckets.indices { buckets[i] += other.buckets[i] }
        count += other.count
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
