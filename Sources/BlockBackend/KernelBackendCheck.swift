import Glibc

/// The dom0 kernel's own backends (xen-blkback, xen-netback) serve every
/// device of their type on the xen-backend bus. Two backends on one ring
/// would corrupt it, so the daemon refuses a type whose kernel driver is
/// registered.
public enum KernelBackendCheck {
    public static let kernelModules = ["vbd": "xen-blkback", "vif": "xen-netback"]

    /// The reason to refuse `type`, or nil when no kernel driver claims it.
    /// `sysfs` is a parameter so tests can point it at a folder of their own.
    public static func refusal(type: String, sysfs: String = "/sys") -> String? {
        let driver = sysfs + "/bus/xen-backend/drivers/" + type
        guard access(driver, F_OK) == 0 else { return nil }
        let module = kernelModules[type] ?? "the kernel's \(type) backend"
        return "\(module) is loaded (\(driver)) and would serve every \(type) in our place: "
            + "unload it (modprobe -r \(module)) and keep it from loading (scripts/install writes /etc/modprobe.d/xenbackd.conf)"
    }
}
