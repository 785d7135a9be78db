import Glibc

/// Why a disk target cannot be served, as one line an operator can act on
/// (the hotplug script puts it in `hotplug-error`, which `xl create` prints).
public enum DiskTargetError: Error, Equatable, Sendable, CustomStringConvertible {
    case empty
    case notAbsolute(params: String)
    case malformedNBD(params: String, reason: String)
    case malformedRBD(params: String, reason: String)
    case rbdUnavailable(image: String, detail: String)
    case missing(path: String)
    case notFileOrBlockDevice(path: String)
    case emptyFile(path: String)
    case noMedium(device: String)
    case readOnly(what: String)
    case notWritable(path: String, errno: Int32)
    case cannotOpen(path: String, operation: String, errno: Int32)
    case mounted(path: String, mountpoint: String)
    case nbdUnreachable(export: String, detail: String)
    case nbdTimedOut(export: String, seconds: Double)
    case nbdTLSUnavailable(export: String)

    public var description: String {
        switch self {
        case .empty:
            return "no disk target (params is empty)"
        case .notAbsolute(let params):
            return "params '\(params)' is neither an absolute path, an NBD export nor an RBD image"
        case .malformedNBD(let params, let reason):
            return "malformed NBD export '\(params)': \(reason)"
        case .malformedRBD(let params, let reason):
            return "malformed RBD image '\(params)': \(reason)"
        case .rbdUnavailable(let image, let detail):
            return "RBD image \(image) cannot be opened: \(detail)"
        case .missing(let path):
            return "disk \(path) does not exist"
        case .notFileOrBlockDevice(let path):
            return "disk \(path) is neither a regular file nor a block device"
        case .emptyFile(let path):
            return "disk file \(path) is empty"
        case .noMedium(let device):
            return "block device \(device) has no medium"
        case .readOnly(let what):
            return "\(what) is read-only"
        case .notWritable(let path, let code):
            return "disk \(path) is not writable: \(Self.text(code))"
        case .cannotOpen(let path, let operation, let code):
            return "disk \(path) cannot be opened: \(operation): \(Self.text(code))"
        case .mounted(let path, let mountpoint):
            return "disk \(path) is mounted in this domain at \(mountpoint)"
        case .nbdUnreachable(let export, let detail):
            return "NBD export \(export) cannot be reached: \(detail)"
        case .nbdTimedOut(let export, let seconds):
            return "NBD export \(export) did not complete its handshake within \(Self.seconds(seconds))"
        case .nbdTLSUnavailable(let export):
            return "NBD export \(export) needs TLS, and this libnbd was built without it"
        }
    }

    private static func text(_ code: Int32) -> String { String(cString: strerror(code)) }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value)) s" : "\((value * 10).rounded() / 10) s"
    }
}
