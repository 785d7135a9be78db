// xen/grant_table.h: the v1 grant entry a frontend fills in, and the status codes.

public enum GrantFlags {
    public static let invalid: UInt16 = 0x0
    public static let permitAccess: UInt16 = 0x1
    public static let typeMask: UInt16 = 0x3
    public static let readonly: UInt16 = 0x4
    public static let reading: UInt16 = 0x8
    public static let writing: UInt16 = 0x10
}

public enum GrantMapFlags {
    public static let deviceMap: UInt32 = 0x1
    public static let hostMap: UInt32 = 0x2
    public static let readonly: UInt32 = 0x4
}

/// GNTST_* status codes.
public enum GrantStatus {
    public static let okay: Int16 = 0
    public static let generalError: Int16 = -1
    public static let badDomain: Int16 = -2
    public static let badGntref: Int16 = -3
    public static let badHandle: Int16 = -4
    public static let badVirtAddr: Int16 = -5
    public static let badDevAddr: Int16 = -6
    public static let noDeviceSpace: Int16 = -7
    public static let permissionDenied: Int16 = -8
    public static let badPage: Int16 = -9
    public static let badCopyArg: Int16 = -10
    public static let addressTooBig: Int16 = -11
    public static let eagain: Int16 = -12
    public static let noSpace: Int16 = -13

    public static func name(_ status: Int16) -> String {
        switch status {
        case okay: "GNTST_okay"
        case generalError: "GNTST_general_error"
        case badDomain: "GNTST_bad_domain"
        case badGntref: "GNTST_bad_gntref"
        case badHandle: "GNTST_bad_handle"
        case badVirtAddr: "GNTST_bad_virt_addr"
        case badDevAddr: "GNTST_bad_dev_addr"
        case noDeviceSpace: "GNTST_no_device_space"
        case permissionDenied: "GNTST_permission_denied"
        case badPage: "GNTST_bad_page"
        case badCopyArg: "GNTST_bad_copy_arg"
        case addressTooBig: "GNTST_address_too_big"
        case eagain: "GNTST_eagain"
        case noSpace: "GNTST_no_space"
        default: "GNTST(\(status))"
        }
    }
}

/// struct grant_entry_v1.
public struct GrantEntryV1: Equatable, Sendable {
    public static let size = 8
    public enum Offset { public static let flags = 0, domid = 2, frame = 4 }
    public var flags: UInt16, domid: UInt16, frame: UInt32
    public init(flags: UInt16, domid: UInt16, frame: UInt32) {
        self.flags = flags; self.domid = domid; self.frame = frame
    }
}
