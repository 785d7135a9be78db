/// Pages of another domain mapped into this process, virtually contiguous,
/// in the order of the grant references that were mapped.
public struct GrantMapping: @unchecked Sendable {
    public let address: UnsafeMutableRawPointer
    public let pageCount: Int
    public let writable: Bool
    /// Opaque to users; the implementation's handle for unmapping.
    public let token: UInt64

    public init(address: UnsafeMutableRawPointer, pageCount: Int, writable: Bool, token: UInt64) {
        self.address = address; self.pageCount = pageCount; self.writable = writable; self.token = token
    }
}

/// One grant copy (GNTTABOP_copy): between a granted page of `domain` and
/// local memory. The copy must stay inside the granted page.
public struct GrantCopyOperation {
    public enum Direction: UInt8, Sendable {
        /// Guest page -> local buffer (the guest needs only read access).
        case fromGuest
        /// Local buffer -> guest page (the guest must have granted write access).
        case toGuest
    }
    public var direction: Direction
    public var domain: DomID
    public var ref: GrantRef
    public var guestOffset: UInt16
    public var length: UInt16
    public var local: UnsafeMutableRawPointer
    /// GNTST_* result, filled in by `copy`.
    public var status: Int16

    public init(direction: Direction, domain: DomID, ref: GrantRef, guestOffset: UInt16,
                length: UInt16, local: UnsafeMutableRawPointer) {
        self.direction = direction; self.domain = domain; self.ref = ref
        self.guestOffset = guestOffset; self.length = length; self.local = local; self.status = 0
    }
}

/// What a backend needs from the hypervisor's grant tables: map a batch of
/// another domain's grants (rings), and copy to and from granted pages (data).
/// One handle is used by one thread at a time.
public protocol GrantTableHandle: AnyObject {
    /// Maps `refs` of `domain` as one contiguous region. Fails as a whole
    /// (HypervisorError.grantStatus tells why) if any reference cannot be mapped.
    func map(domain: DomID, refs: [GrantRef], writable: Bool) throws(HypervisorError) -> GrantMapping
    func unmap(_ mapping: GrantMapping)
    /// Performs every operation; each gets its own status. Hot path: no allocation.
    func copy(_ operations: UnsafeMutableBufferPointer<GrantCopyOperation>)
}
