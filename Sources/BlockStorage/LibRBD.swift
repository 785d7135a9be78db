import CLibRBD
import Glibc

/// librbd and librados, loaded when the first RBD disk is opened, as QEMU's
/// optional block-rbd module is: a host with no Ceph libraries installed
/// (Debian's librbd1) runs every other disk, and an RBD disk there fails
/// with a reason naming the package. Only the calls RBDStorage makes.
struct LibRBD: @unchecked Sendable {   // immutable function pointers after load
    let radosCreate2: @convention(c) (UnsafeMutablePointer<rados_t?>?, UnsafePointer<CChar>?, UnsafePointer<CChar>?, UInt64) -> Int32
    let radosConfReadFile: @convention(c) (rados_t?, UnsafePointer<CChar>?) -> Int32
    let radosConfSet: @convention(c) (rados_t?, UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Int32
    let radosConnect: @convention(c) (rados_t?) -> Int32
    let radosShutdown: @convention(c) (rados_t?) -> Void
    let radosIoctxCreate: @convention(c) (rados_t?, UnsafePointer<CChar>?, UnsafeMutablePointer<rados_ioctx_t?>?) -> Int32
    let radosIoctxDestroy: @convention(c) (rados_ioctx_t?) -> Void
    let radosIoctxSetNamespace: @convention(c) (rados_ioctx_t?, UnsafePointer<CChar>?) -> Void
    let open: @convention(c) (rados_ioctx_t?, UnsafePointer<CChar>?, UnsafeMutablePointer<rbd_image_t?>?, UnsafePointer<CChar>?) -> Int32
    let openReadOnly: @convention(c) (rados_ioctx_t?, UnsafePointer<CChar>?, UnsafeMutablePointer<rbd_image_t?>?, UnsafePointer<CChar>?) -> Int32
    let close: @convention(c) (rbd_image_t?) -> Int32
    let stat: @convention(c) (rbd_image_t?, UnsafeMutablePointer<rbd_image_info_t>?, Int) -> Int32
    let getSize: @convention(c) (rbd_image_t?, UnsafeMutablePointer<UInt64>?) -> Int32
    let getFeatures: @convention(c) (rbd_image_t?, UnsafeMutablePointer<UInt64>?) -> Int32
    let lockAcquire: @convention(c) (rbd_image_t?, rbd_lock_mode_t) -> Int32
    let lockRelease: @convention(c) (rbd_image_t?) -> Int32
    let lockGetOwners: @convention(c) (rbd_image_t?, UnsafeMutablePointer<rbd_lock_mode_t>?,
                                       UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?, UnsafeMutablePointer<Int>?) -> Int32
    let lockGetOwnersCleanup: @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?, Int) -> Void
    let lockBreak: @convention(c) (rbd_image_t?, rbd_lock_mode_t, UnsafePointer<CChar>?) -> Int32
    let setImageNotification: @convention(c) (rbd_image_t?, Int32, Int32) -> Int32
    let aioCreateCompletion: @convention(c) (UnsafeMutableRawPointer?, rbd_callback_t?, UnsafeMutablePointer<rbd_completion_t?>?) -> Int32
    let aioRelease: @convention(c) (rbd_completion_t?) -> Void
    let aioGetArg: @convention(c) (rbd_completion_t?) -> UnsafeMutableRawPointer?
    let aioGetReturnValue: @convention(c) (rbd_completion_t?) -> Int
    let aioReadv: @convention(c) (rbd_image_t?, UnsafePointer<iovec>?, Int32, UInt64, rbd_completion_t?) -> Int32
    let aioWritev: @convention(c) (rbd_image_t?, UnsafePointer<iovec>?, Int32, UInt64, rbd_completion_t?) -> Int32
    let aioFlush: @convention(c) (rbd_image_t?, rbd_completion_t?) -> Int32
    let aioDiscard: @convention(c) (rbd_image_t?, UInt64, UInt64, rbd_completion_t?) -> Int32
    let pollIOEvents: @convention(c) (rbd_image_t?, UnsafeMutablePointer<rbd_completion_t?>?, Int32) -> Int32

    static let libraryNames = ("librbd.so.1", "librados.so.2")

    /// The libraries, or why they could not be loaded (one line).
    static let loaded: Result<LibRBD, LoadError> = load()

    struct LoadError: Error, Sendable, CustomStringConvertible {
        let description: String
    }

    static func get() throws(LoadError) -> LibRBD { try loaded.get() }

    private static func load() -> Result<LibRBD, LoadError> {
        // librados first, so that librbd's dependency resolves to the same copy.
        guard let rados = dlopen(libraryNames.1, RTLD_NOW | RTLD_LOCAL),
              let rbd = dlopen(libraryNames.0, RTLD_NOW | RTLD_LOCAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "not found"
            return .failure(LoadError(description: "Ceph's librbd cannot be loaded (install librbd1): \(reason)"))
        }
        do { return .success(try LibRBD(rados: rados, rbd: rbd)) } catch { return .failure(error) }
    }

    private init(rados: UnsafeMutableRawPointer, rbd: UnsafeMutableRawPointer) throws(LoadError) {
        func function<F>(_ handle: UnsafeMutableRawPointer, _ name: String) throws(LoadError) -> F {
            guard let pointer = dlsym(handle, name) else {
                throw LoadError(description: "Ceph's librbd lacks \(name) (librbd1 too old?)")
            }
            return unsafeBitCast(pointer, to: F.self)
        }
        radosCreate2 = try function(rados, "rados_create2")
        radosConfReadFile = try function(rados, "rados_conf_read_file")
        radosConfSet = try function(rados, "rados_conf_set")
        radosConnect = try function(rados, "rados_connect")
        radosShutdown = try function(rados, "rados_shutdown")
        radosIoctxCreate = try function(rados, "rados_ioctx_create")
        radosIoctxDestroy = try function(rados, "rados_ioctx_destroy")
        radosIoctxSetNamespace = try function(rados, "rados_ioctx_set_namespace")
        open = try function(rbd, "rbd_open")
        openReadOnly = try function(rbd, "rbd_open_read_only")
        close = try function(rbd, "rbd_close")
        stat = try function(rbd, "rbd_stat")
        getSize = try function(rbd, "rbd_get_size")
        getFeatures = try function(rbd, "rbd_get_features")
        lockAcquire = try function(rbd, "rbd_lock_acquire")
        lockRelease = try function(rbd, "rbd_lock_release")
        lockGetOwners = try function(rbd, "rbd_lock_get_owners")
        lockGetOwnersCleanup = try function(rbd, "rbd_lock_get_owners_cleanup")
        lockBreak = try function(rbd, "rbd_lock_break")
        setImageNotification = try function(rbd, "rbd_set_image_notification")
        aioCreateCompletion = try function(rbd, "rbd_aio_create_completion")
        aioRelease = try function(rbd, "rbd_aio_release")
        aioGetArg = try function(rbd, "rbd_aio_get_arg")
        aioGetReturnValue = try function(rbd, "rbd_aio_get_return_value")
        aioReadv = try function(rbd, "rbd_aio_readv")
        aioWritev = try function(rbd, "rbd_aio_writev")
        aioFlush = try function(rbd, "rbd_aio_flush")
        aioDiscard = try function(rbd, "rbd_aio_discard")
        pollIOEvents = try function(rbd, "rbd_poll_io_events")
    }
}
