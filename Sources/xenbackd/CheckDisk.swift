import ArgumentParser
import BlockStorage
import Glibc

/// `xenbackd check-disk`: the daemon's own parser and probe of a disk
/// target, for the block hotplug script and for an operator. Needs neither
/// a running daemon nor xenstore.
struct CheckDisk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-disk",
        abstract: "Check a disk target as the daemon would open it.",
        discussion: """
            Prints the normalised target and what opening it found (size, sector sizes, \
            read-only, discard), or a one-line reason on standard error and exits 1. \
            With --identities, prints for each target (one line each, nothing opened) the \
            words a sharing check compares.
            """)

    @Argument(help: "A disk target: a file, a block device, /dev/VG/LV, /dev/mapper/VG-LV, an NBD export, or an RBD image (docs/hotplug.md, docs/storage.md).")
    var targets: [String]

    @Option(help: "r (read-only), w (writable), or w! (writable, mounts in this domain not checked), as a vbd's mode.")
    var mode: String = "r"

    @Option(help: "Seconds an NBD server has to complete its handshake, or a Ceph cluster to answer.")
    var timeout: Double = 10

    @Flag(help: "Print each target's sharing identities only (stat, no open).")
    var identities = false

    func validate() throws {
        guard ["r", "w", "w!"].contains(mode) else { throw ValidationError("--mode must be r, w or w!") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        guard identities || targets.count == 1 else { throw ValidationError("give one target (or --identities)") }
    }

    func run() throws {
        if identities {
            for text in targets {
                print((try? DiskTarget.parse(text)).map { DiskIdentity.keys(of: $0).joined(separator: " ") } ?? "")
            }
            return
        }
        let access = DiskAccess(writable: mode != "r", refuseMounted: mode != "w!")
        let target: DiskTarget
        do { target = try DiskTarget.parse(targets[0]) } catch { throw fail(error) }
        print("target: \(target.normalized)")
        do {
            let report = try target.probe(access, timeout: timeout)
            for line in Self.lines(report) { print(line) }
        } catch {
            if case .missing = error, let volume = target.logicalVolume { print("lvm-volume: \(volume)") }
            throw fail(error)
        }
    }

    private func fail(_ error: DiskTargetError) -> ExitCode { failure("\(error)") }

    /// `key: value` lines, one fact each, for people and for the script.
    static func lines(_ report: DiskReport) -> [String] {
        let g = report.geometry
        var lines = ["kind: \(report.kind.rawValue)"]
        if let path = report.resolvedPath { lines.append("path: \(path)") }
        if let device = report.device { lines.append("device: \(device.major):\(device.minor)") }
        if let backing = report.backingFile { lines.append("backing-file: \(backing)") }
        lines.append("size: \(g.sizeBytes) bytes (\(humanSize(g.sizeBytes)))")
        lines.append("sector-size: \(g.logicalSectorSize) logical, \(g.physicalSectorSize) physical")
        lines.append("read-only: \(g.readOnly ? "yes" : "no")")
        if let discard = g.discard {
            lines.append("discard: yes (granularity \(discard.granularity) bytes)")
        } else {
            lines.append("discard: no")
        }
        lines.append("flush: \(g.supportsFlush ? "yes" : "no")")
        if let direct = report.directIO { lines.append("direct-io: \(direct ? "yes" : "no")") }
        for mount in report.mounts {
            lines.append("mounted: \(mount.mountpoint) (\(mount.readOnly ? "read-only" : "writable"))")
        }
        if let rbd = report.rbd {
            lines.append("object-size: \(rbd.objectSize) bytes")
            lines.append("features: \(rbd.features.isEmpty ? "none" : rbd.features.joined(separator: " "))")
            switch rbd.lockOwners {
            case nil: lines.append("locked: unknown (read-only handle)")
            case let owners? where owners.isEmpty: lines.append("locked: no")
            case let owners?: lines.append("locked: yes, by \(owners.joined(separator: ", "))")
            }
        }
        for key in report.identities { lines.append("identity: \(key)") }
        return lines
    }

    static func humanSize(_ bytes: UInt64) -> String {
        let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = Double(bytes), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        if unit == 0 { return "\(bytes) bytes" }
        return "\((value * 10).rounded() / 10) \(units[unit])"
    }
}
