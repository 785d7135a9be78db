import Glibc
import SystemPackage

/// A failed system call: which one (and on what, when that helps), and its errno.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public var call: String
    public var errno: Errno

    public init(_ call: String, errno: Errno) { self.call = call; self.errno = errno }
    public init(_ call: String, errno: Int32) { self.init(call, errno: Errno(rawValue: errno)) }

    /// The errno as C has it, for error types that carry an Int32.
    public var code: Int32 { errno.rawValue }

    /// EAGAIN/EWOULDBLOCK: a non-blocking descriptor has nothing now.
    public var isWouldBlock: Bool { errno == .resourceTemporarilyUnavailable || errno == .wouldBlock }

    public var description: String { "\(call): \(errno) (errno \(errno.rawValue))" }
}
