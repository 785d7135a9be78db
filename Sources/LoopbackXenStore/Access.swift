import Hypervisor

/// Who sent a request: a connection on the dom0 socket is privileged
/// (xenstored's "tools"); one on a domain socket acts as that domain.
struct Requester: Equatable {
    var domain: DomID
    var isPrivileged: Bool

    static let dom0 = Requester(domain: 0, isPrivileged: true)
    static func guest(_ domid: DomID) -> Requester { Requester(domain: domid, isPrivileged: false) }

    /// The access this requester has to a node with `permissions`: dom0 and
    /// the owner have all of it; a domain named in a later entry has that
    /// entry's access; anyone else has the first entry's.
    func access(to permissions: [XenStorePermission]) -> XenStorePermission.Access {
        if isPrivileged || isOwner(of: permissions) { return .both }
        if let grant = permissions.dropFirst().first(where: { $0.domain == UInt32(domain) }) { return grant.access }
        return permissions.first?.access ?? .none
    }

    func isOwner(of permissions: [XenStorePermission]) -> Bool {
        permissions.first?.domain == UInt32(domain)
    }

    func may(_ need: Need, _ permissions: [XenStorePermission]) -> Bool {
        let granted = XenStorePermission(domain: 0, access: access(to: permissions))
        switch need {
        case .read: return granted.canRead
        case .write: return granted.canWrite
        }
    }

    enum Need { case read, write }
}
