import Glibc
import SystemSupport

/// A failed network operation: a system call that failed (with errno), or a
/// request refused before any call was made.
public enum NetworkError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `call` (the system call and what it was for) failed with `errno` on `interface`.
    case system(call: String, interface: String, errno: Int32)
    /// An interface name the kernel would refuse (or that TUN would rewrite).
    case invalidName(String, reason: String)
    /// An argument out of range (queue count, MAC length, MTU, ...).
    case invalidArgument(String)
    /// `create` was asked for an interface that already exists: attaching to
    /// someone else's (persistent) TAP silently is never what the backend wants.
    case alreadyExists(String)
    /// An rtnetlink reply the parser did not expect.
    case badNetlinkReply(String)

    /// A system call's failure (the call named by its wrapper), on `interface`.
    public static func system(_ error: SystemError, interface: String = "") -> NetworkError {
        .system(call: error.call, interface: interface, errno: error.code)
    }

    /// errno of a failed call, nil for the other cases.
    public var errno: Int32? {
        if case .system(_, _, let e) = self { return e }
        return nil
    }

    public var description: String {
        switch self {
        case .system(let call, let interface, let e):
            let subject = interface.isEmpty ? "" : " (\(interface))"
            return "\(call)\(subject): \(String(cString: strerror(e))) (errno \(e))"
        case .invalidName(let name, let reason):
            return "invalid interface name \"\(name)\": \(reason)"
        case .invalidArgument(let what):
            return "invalid argument: \(what)"
        case .alreadyExists(let name):
            return "interface \(name) already exists"
        case .badNetlinkReply(let what):
            return "unexpected rtnetlink reply: \(what)"
        }
    }
}

/// Interface names as the kernel's dev_valid_name() accepts them: 1 to 15
/// bytes (IFNAMSIZ - 1), not "." or "..", no '/', ':', NUL or white space.
/// '%' is refused too: TUNSETIFF would treat the name as a template
/// ("vif%d") and create a different name than the one asked for.
public enum InterfaceName {
    public static let maximumLength = 15

    public static func validate(_ name: String) throws(NetworkError) {
        let bytes = Array(name.utf8)
        if bytes.isEmpty { throw .invalidName(name, reason: "empty") }
        if bytes.count > maximumLength {
            throw .invalidName(name, reason: "\(bytes.count) bytes, at most \(maximumLength) (IFNAMSIZ - 1)")
        }
        if name == "." || name == ".." { throw .invalidName(name, reason: "\".\" and \"..\" are reserved") }
        for b in bytes {
            switch b {
            case UInt8(ascii: "/"), UInt8(ascii: ":"), UInt8(ascii: "%"):
                throw .invalidName(name, reason: "contains '\(Character(Unicode.Scalar(b)))'")
            case 0, UInt8(ascii: " "), 0x09...0x0d:
                throw .invalidName(name, reason: "contains NUL or white space")
            default:
                continue
            }
        }
    }
}

/// A system call for `interface`, made through Syscall (interruptions retried); its
/// failure is `.system` with `call` (what it was for) and errno. Both
/// strings are built only on failure.
@inline(__always)
func networkCall<Result: BinaryInteger>(
    _ call: @autoclosure () -> String, interface: @autoclosure () -> String, _ body: () -> Result
) throws(NetworkError) -> Result {
    do {
        return try Syscall.retryingOnInterrupt("network call", body)
    } catch {
        throw .system(call: call(), interface: interface(), errno: error.code)
    }
}
