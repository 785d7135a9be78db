import Glibc

/// What `bench scale` reads of the daemon in /proc: memory, threads,
/// descriptors, CPU time, wake-ups, and what it still holds of the guests.
struct DaemonProcess {
    let pid: pid_t

    struct Memory {
        var residentKB = 0, anonymousKB = 0, sharedKB = 0
    }

    var memory: Memory {
        var m = Memory()
        for line in procLines("status") {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count > 1, let v = Int(f[1]) else { continue }
            switch f[0] {
            case "VmRSS:": m.residentKB = v
            case "RssAnon:": m.anonymousKB = v
            case "RssShmem:": m.sharedKB = v
            default: break
            }
        }
        return m
    }

    var threads: Int { DaemonFootprint(pid: pid)?.threads ?? 0 }

    /// Open descriptors and where each points.
    var descriptorTargets: [String] {
        guard let dir = opendir("/proc/\(pid)/fd") else { return [] }
        defer { closedir(dir) }
        var targets: [String] = []
        var buffer = [CChar](repeating: 0, count: 4096)
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name.hasPrefix(".") { continue }
            let n = readlink("/proc/\(pid)/fd/\(name)", &buffer, buffer.count - 1)
            targets.append(n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?")
        }
        return targets
    }

    /// User + system CPU seconds so far.
    var cpuSeconds: Double { Self.cpuSeconds(statFile: "/proc/\(pid)/stat") }

    /// The same, of its main thread alone (the daemon's control loop runs there).
    var mainThreadCPUSeconds: Double { Self.cpuSeconds(statFile: "/proc/\(pid)/task/\(pid)/stat") }

    /// Times its main thread went to sleep (waiting for xenstore, a lock, a file).
    var mainThreadSleeps: Int { wakeupsByThread[Int(pid)]?.count ?? 0 }

    private static func cpuSeconds(statFile: String) -> Double {
        guard let text = try? String(contentsOfProcFile: statFile), let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After the command: state is field 3, utime 14 and stime 15 (1-based).
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Voluntary context switches of each thread, by thread id, with its name.
    var wakeupsByThread: [Int: (name: String, count: Int)] {
        guard let dir = opendir("/proc/\(pid)/task") else { return [:] }
        defer { closedir(dir) }
        var result: [Int: (name: String, count: Int)] = [:]
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard let tid = Int(name) else { continue }
            var comm = "", count = 0
            for line in procLines("task/\(name)/status") {
                let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                if f.first == "Name:", f.count > 1 { comm = String(f[1]) }
                if f.first == "voluntary_ctxt_switches:", f.count > 1 { count = Int(f[1]) ?? 0 }
            }
            result[tid] = (comm, count)
        }
        return result
    }

    /// Memory mappings of files under `root` (guest memory and grant tables).
    func mappings(under root: String) -> Int {
        procLines("maps").count { $0.contains(root) }
    }

    private func procLines(_ file: String) -> [Substring] {
        ((try? String(contentsOfProcFile: "/proc/\(pid)/\(file)")) ?? "").split(separator: "\n")
    }
}
