import CXenBackSupport
import Glibc

/// Network namespaces, for tests and demos (the daemon itself never changes
/// namespace).
///
/// A namespace is entered per *thread*: `setns(CLONE_NEWNET)` moves only the
/// calling thread, and every TapDevice / NetworkInterface call opens its
/// descriptors (/dev/net/tun, sockets) in the namespace of the thread that
/// makes it. Use a dedicated `NativeThread` that never returns to a pool, so
/// no other code runs on a thread that has moved.
public enum NetworkNamespace {
    /// Moves the calling thread into the namespace bound at `path` (`ip netns
    /// add NAME` binds /run/netns/NAME).
    ///
    /// With `mountSysfs`, the thread also gets a private mount namespace
    /// (unshare(CLONE_NEWNS), / made a recursive slave so nothing propagates
    /// back) with a sysfs of the new network namespace on /sys, as `ip netns
    /// exec` does: sysfs shows the network namespace of whoever mounted it,
    /// so without this /sys/class/net still lists the old namespace's
    /// interfaces. Other threads keep the host's /sys.
    public static func enter(path: String, mountSysfs: Bool = true) throws(NetworkError) {
        let fd = xb_open(path, O_RDONLY | xb_O_CLOEXEC, 0)
        guard fd >= 0 else { throw .system(call: "open \(path)", interface: "", errno: errno) }
        defer { Glibc.close(fd) }
        guard xb_setns(fd, xb_CLONE_NEWNET) == 0 else {
            throw .system(call: "setns(CLONE_NEWNET) \(path)", interface: "", errno: errno)
        }
        guard mountSysfs else { return }
        guard xb_unshare(xb_CLONE_NEWNS) == 0 else {
            throw .system(call: "unshare(CLONE_NEWNS)", interface: "", errno: errno)
        }
        guard mount("none", "/", nil, xb_MS_REC | xb_MS_SLAVE, nil) == 0 else {
            throw .system(call: "mount --make-rslave /", interface: "", errno: errno)
        }
        // Detach the inherited sysfs first, so ours is the only one at /sys.
        _ = umount2("/sys", Int32(MNT_DETACH))
        guard mount("sysfs", "/sys", "sysfs", 0, nil) == 0 else {
            throw .system(call: "mount sysfs /sys", interface: "", errno: errno)
        }
    }

    /// Enters the namespace `ip netns` knows as `name` (/run/netns/NAME).
    public static func enter(named name: String, mountSysfs: Bool = true) throws(NetworkError) {
        try enter(path: "/run/netns/" + name, mountSysfs: mountSysfs)
    }
}
