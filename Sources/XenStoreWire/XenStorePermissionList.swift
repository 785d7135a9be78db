import Hypervisor

/// A node's permission list in its wire form: one string per entry
/// ("n0\0r5\0"), the first naming the owner and everyone else's access.
public enum XenStorePermissionList {
    /// The list the strings spell; nil if it is empty or any entry is malformed.
    public static func parse(_ strings: [String]) -> [XenStorePermission]? {
        guard !strings.isEmpty else { return nil }
        var perms: [XenStorePermission] = []
        perms.reserveCapacity(strings.count)
        for text in strings {
            guard let perm = XenStorePermission(text), perm.domain <= UInt32(UInt16.max) else { return nil }
            perms.append(perm)
        }
        return perms
    }

    /// The wire form: each entry's text followed by a NUL.
    public static func encode(_ perms: [XenStorePermission]) -> [UInt8] {
        XenStorePayload.terminated(perms.map(\.description))
    }
}
