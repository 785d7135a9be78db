/// A Xen domain id. dom0 is 0.
public typealias DomID = UInt16

/// A grant reference: an index into the granting domain's grant table.
public typealias GrantRef = UInt32

/// An event channel port number, local to one domain.
public typealias EventChannelPort = UInt32

/// An errno-carrying failure of a hypervisor operation.
public struct HypervisorError: Error, Equatable, CustomStringConvertible, Sendable {
    public var operation: String
    public var errno: Int32
    /// A GNTST_* code when the failure came from a grant operation.
    public var grantStatus: Int16?
    public var detail: String

    public init(_ operation: String, errno: Int32, grantStatus: Int16? = nil, detail: String = "") {
        self.operation = operation; self.errno = errno; self.grantStatus = grantStatus; self.detail = detail
    }

    public var description: String {
        var s = "\(operation) failed: errno \(errno)"
        if let g = grantStatus { s += ", grant status \(g)" }
        if !detail.isEmpty { s += " (\(detail))" }
        return s
    }
}
