// xen/io/xs_wire.h: the xenstore socket protocol.

/// enum xsd_sockmsg_type.
public enum XenStoreMessageType: UInt32, Sendable {
    case control = 0          // XS_DEBUG shares this value
    case directory = 1
    case read = 2
    case getPerms = 3
    case watch = 4
    case unwatch = 5
    case transactionStart = 6
    case transactionEnd = 7
    case introduce = 8
    case release = 9
    case getDomainPath = 10
    case write = 11
    case mkdir = 12
    case rm = 13
    case setPerms = 14
    case watchEvent = 15
    case error = 16
    case isDomainIntroduced = 17
    case resume = 18
    case setTarget = 19
    case resetWatches = 21
    case directoryPart = 22
    case invalid = 0xffff

    public static let typeCount: UInt32 = 23
}

/// struct xsd_sockmsg: the 16-byte header before every payload.
public struct XenStoreMessageHeader: Equatable, Sendable {
    public static let size = 16
    public enum Offset { public static let type = 0, reqId = 4, txId = 8, len = 12 }
    public var type: UInt32, reqId: UInt32, txId: UInt32, len: UInt32
    public init(type: UInt32, reqId: UInt32, txId: UInt32, len: UInt32) {
        self.type = type; self.reqId = reqId; self.txId = txId; self.len = len
    }
    public init(decoding p: UnsafeRawPointer) {
        type = p.wire(Offset.type); reqId = p.wire(Offset.reqId)
        txId = p.wire(Offset.txId); len = p.wire(Offset.len)
    }
    public func encode(to p: UnsafeMutableRawPointer) {
        p.setWire(Offset.type, type); p.setWire(Offset.reqId, reqId)
        p.setWire(Offset.txId, txId); p.setWire(Offset.len, len)
    }
}

public enum XenStoreLimits {
    public static let payloadMax = 4096
    public static let absolutePathMax = 3072
    public static let relativePathMax = 2048
    public static let ringSize = 1024
    /// Index of path and token in a watch event's NUL-separated strings.
    public static let watchPathIndex = 0
    public static let watchTokenIndex = 1
}

/// Error names carried by XS_ERROR replies (xsd_errors[]), with Linux errno values.
public enum XenStoreErrorName {
    public static let all: [(name: String, errno: Int32)] = [
        ("EINVAL", 22), ("EACCES", 13), ("EEXIST", 17), ("EISDIR", 21), ("ENOENT", 2),
        ("ENOMEM", 12), ("ENOSPC", 28), ("EIO", 5), ("ENOTEMPTY", 39), ("ENOSYS", 38),
        ("EROFS", 30), ("EBUSY", 16), ("EAGAIN", 11), ("EISCONN", 106), ("E2BIG", 7),
        ("EPERM", 1),
    ]
    public static func errno(named name: String) -> Int32? { all.first { $0.name == name }?.errno }
    public static func name(of errno: Int32) -> String { all.first { $0.errno == errno }?.name ?? "EINVAL" }
}
