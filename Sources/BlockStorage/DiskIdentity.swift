import CXenBackSupport
import Glibc

/// The strings two uses of one storage have in common, whatever path or
/// form names it: the normalised target itself, `file:DEV:INO` for a
/// regular file (hard links and bind mounts alike), `block:MAJ:MIN` for a
/// block device, and for a loop device also its backing file's identity,
/// so /dev/loop0 and the file behind it are one disk. Found with stat and
/// sysfs alone: nothing is opened, nothing waits.
public enum DiskIdentity {
    public static func keys(of target: DiskTarget) -> [String] {
        var keys = [normalizedKey(target)]
        if let path = target.path { keys += statKeys(path) }
        return keys
    }

    /// Keys contain no white space (the script reads them as words).
    static func normalizedKey(_ target: DiskTarget) -> String {
        switch target.location {
        case .path(let path): return "path:" + NBDAddress.percentEncode(path, keeping: "/:+,=@")
        case .nbd(var address):
            // The same export with or without TLS is still one disk.
            address.tls = false
            return address.normalized
        case .rbd(let address):
            // Spaces cannot occur in what the script reads as one word.
            return NBDAddress.percentEncode(address.normalized, keeping: "/:+,=@\\")
        }
    }

    /// `file:…` or `block:…` (plus a loop device's backing file) for an
    /// existing path; nothing otherwise.
    static func statKeys(_ path: String) -> [String] {
        var status = stat()
        guard stat(path, &status) == 0 else { return [] }
        switch status.st_mode & S_IFMT {
        case S_IFREG: return [fileKey(status)]
        case S_IFBLK: return blockKeys(device: status.st_rdev)
        default: return []
        }
    }

    static func fileKey(_ status: stat) -> String {
        let (major, minor) = numbers(status.st_dev)
        return "file:\(major):\(minor):\(status.st_ino)"
    }

    static func blockKeys(device: dev_t) -> [String] {
        let (major, minor) = numbers(device)
        var keys = ["block:\(major):\(minor)"]
        if let backing = loopBackingFile(major: major, minor: minor) {
            var status = stat()
            if stat(backing, &status) == 0, status.st_mode & S_IFMT == S_IFREG { keys.append(fileKey(status)) }
        }
        return keys
    }

    static func numbers(_ device: dev_t) -> (UInt32, UInt32) {
        var major: UInt32 = 0, minor: UInt32 = 0
        xb_device_numbers(UInt64(device), &major, &minor)
        return (major, minor)
    }

    /// The file behind a loop device, from sysfs (nil for other devices).
    static func loopBackingFile(major: UInt32, minor: UInt32) -> String? {
        guard let text = readSysfsText("/sys/dev/block/\(major):\(minor)/loop/backing_file") else { return nil }
        // The kernel appends " (deleted)" when the file was removed.
        return text.isEmpty || text.hasSuffix(" (deleted)") ? nil : text
    }

    static func readSysfsText(_ path: String) -> String? {
        let fd = xb_open(path, O_RDONLY | xb_O_CLOEXEC, 0)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 4096)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        var text = String(decoding: bytes[0..<count], as: UTF8.self)
        while text.last == "\n" { text.removeLast() }
        return text
    }
}

/// A file system mounted in this domain from a block device.
public struct DiskMount: Equatable, Sendable {
    public var source: String
    public var mountpoint: String
    public var readOnly: Bool

    /// Mounts (from /proc/self/mounts) whose device shares a key with `keys`.
    public static func mounts(sharing keys: [String]) -> [DiskMount] {
        guard let table = readWhole("/proc/self/mounts") else { return [] }
        var found: [DiskMount] = []
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 4, fields[0].hasPrefix("/") else { continue }
            let source = unescape(fields[0])
            var status = stat()
            guard stat(source, &status) == 0, status.st_mode & S_IFMT == S_IFBLK else { continue }
            let deviceKeys = DiskIdentity.blockKeys(device: status.st_rdev)
            guard deviceKeys.contains(where: keys.contains) else { continue }
            let options = fields[3].split(separator: ",")
            found.append(DiskMount(source: source, mountpoint: unescape(fields[1]), readOnly: options.contains("ro")))
        }
        return found
    }

    /// /proc/mounts writes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        let utf8 = Array(field.utf8)
        var index = 0
        while index < utf8.count {
            if utf8[index] == UInt8(ascii: "\\"), index + 4 <= utf8.count,
               let value = UInt8(String(decoding: utf8[(index + 1)..<(index + 4)], as: UTF8.self), radix: 8) {
                bytes.append(value)
                index += 4
            } else {
                bytes.append(utf8[index])
                index += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func readWhole(_ path: String) -> String? {
        let fd = xb_open(path, O_RDONLY | xb_O_CLOEXEC, 0)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            data += buffer[0..<count]
        }
        return String(decoding: data, as: UTF8.self)
    }
}
