import CXenBackSupport
import Glibc
import SystemSupport

/// A TAP interface owned by this process: one /dev/net/tun descriptor per
/// queue, each non-blocking and close-on-exec.
///
/// Not persistent (TUNSETPERSIST is never set): the kernel removes the
/// interface, and takes it off its bridge, when the last queue's descriptor
/// closes (`close()`, deinit, or the process dying). That is what the
/// backend wants: a vif never outlives its device or a crashed daemon. The
/// flip side: a restarted daemon creates the vif again and must put it on
/// its bridge again itself (the vif hotplug script ran for the old one).
///
/// With `vnetHeader`, every frame read or written starts with a 12-byte
/// `VirtioNetHeader` (TUNSETVNETHDRSZ 12 = sizeof(struct virtio_net_hdr_v1)
/// = sizeof(struct virtio_net_hdr_mrg_rxbuf); little endian, TUNSETVNETLE).
///
/// Thread use: `queue(_:)` hands out a `TapQueue` per queue; each data-plane
/// thread reads and writes its own. `close()` only after those threads have
/// stopped (a descriptor number closed under a running reader may be reused
/// by the next open).
public final class TapDevice: @unchecked Sendable {  // `closed` guarded by `lock`; everything else immutable
    public let name: String
    /// 12 with a virtio-net header, else 0.
    public let vnetHeaderSize: Int
    private let queues: [TapQueue]
    private let lock = PThreadMutex()
    private var closed = false

    /// The queues' descriptors (for epoll), queue 0 first.
    public var queueFileDescriptors: [Int32] { queues.map(\.fileDescriptor) }
    public var queueCount: Int { queues.count }

    private init(name: String, vnetHeaderSize: Int, queues: [TapQueue]) {
        self.name = name
        self.vnetHeaderSize = vnetHeaderSize
        self.queues = queues
    }

    deinit { close() }

    /// Creates TAP `name` (e.g. "vif3.0") in the calling thread's network
    /// namespace: opens /dev/net/tun once per queue with IFF_TAP | IFF_NO_PI
    /// (| IFF_VNET_HDR) (| IFF_MULTI_QUEUE when queues > 1) and TUNSETIFF.
    /// The interface starts down, with a random MAC, MTU 1500, carrier on
    /// (a TAP has carrier while attached: call `setCarrier(false)` until the
    /// frontend connects). Refuses a name that exists already.
    public static func create(name: String, queues: Int = 1, vnetHeader: Bool = true) throws(NetworkError) -> TapDevice {
        try InterfaceName.validate(name)
        guard queues >= 1, queues <= 256 else { throw .invalidArgument("\(queues) queues (1...256)") }
        if try NetworkInterface.exists(name) { throw .alreadyExists(name) }

        var flags = xb_IFF_TAP | xb_IFF_NO_PI
        if vnetHeader { flags |= xb_IFF_VNET_HDR }
        if queues > 1 { flags |= xb_IFF_MULTI_QUEUE }

        var descriptors: [Int32] = []
        do throws(NetworkError) {
            for queue in 0..<queues {
                let fd = try networkCall("open /dev/net/tun", interface: name) {
                    xb_open("/dev/net/tun", O_RDWR | O_NONBLOCK | xb_O_CLOEXEC, 0)
                }
                descriptors.append(fd)
                var request = try interfaceRequest(name)
                request.ifr_ifru.ifru_flags = flags
                _ = try networkCall("TUNSETIFF queue \(queue)", interface: name) { xb_ioctl_pointer(fd, xb_TUNSETIFF, &request) }
                let granted = interfaceName(of: request)
                guard granted == name else {
                    throw .invalidName(name, reason: "TUNSETIFF created \"\(granted)\"")
                }
            }
            if vnetHeader {
                // Per device, not per queue: set once, through queue 0.
                var littleEndian: Int32 = 1
                _ = try networkCall("TUNSETVNETLE", interface: name) { xb_ioctl_pointer(descriptors[0], xb_TUNSETVNETLE, &littleEndian) }
                var size = Int32(VirtioNetHeader.size)
                _ = try networkCall("TUNSETVNETHDRSZ", interface: name) { xb_ioctl_pointer(descriptors[0], xb_TUNSETVNETHDRSZ, &size) }
            }
        } catch {
            for fd in descriptors { Glibc.close(fd) }
            throw error
        }
        let headerSize = vnetHeader ? VirtioNetHeader.size : 0
        return TapDevice(name: name, vnetHeaderSize: headerSize,
                         queues: descriptors.map { TapQueue(fileDescriptor: $0, vnetHeaderSize: headerSize) })
    }

    /// The queue `index` (0..<queueCount), for the thread that serves it.
    public func queue(_ index: Int) -> TapQueue { queues[index] }

    /// TUNSETOFFLOAD: what the kernel may hand *us* in frames read from the
    /// TAP. `csum`: frames with a partial checksum (NEEDS_CSUM); `tso4` /
    /// `tso6` (need `csum`): TCP super-frames up to 64 KiB with a GSO type;
    /// `tsoECN`: those with ECN. Frames we write may carry any of these
    /// regardless (the kernel segments and checksums them). Off by default.
    public func setOffloads(csum: Bool, tso4: Bool, tso6: Bool, tsoECN: Bool = false) throws(NetworkError) {
        guard csum || !(tso4 || tso6 || tsoECN) else {
            throw .invalidArgument("TSO offloads need checksum offload")
        }
        var bits: UInt32 = 0
        if csum { bits |= xb_TUN_F_CSUM }
        if tso4 { bits |= xb_TUN_F_TSO4 }
        if tso6 { bits |= xb_TUN_F_TSO6 }
        if tsoECN { bits |= xb_TUN_F_TSO_ECN }
        _ = try networkCall("TUNSETOFFLOAD", interface: name) { xb_ioctl_value(queues[0].fileDescriptor, xb_TUNSETOFFLOAD, UInt(bits)) }
    }

    /// TUNSETCARRIER: the link's carrier as the bridge and the stack see it
    /// (down: the bridge stops forwarding to the port).
    public func setCarrier(_ up: Bool) throws(NetworkError) {
        var value: Int32 = up ? 1 : 0
        _ = try networkCall("TUNSETCARRIER", interface: name) { xb_ioctl_pointer(queues[0].fileDescriptor, xb_TUNSETCARRIER, &value) }
    }

    /// TUNSETQUEUE: a detached queue keeps its descriptor but the kernel
    /// no longer steers frames to it (a vif whose frontend uses fewer
    /// queues than the TAP has). Queues start attached; attaching an
    /// attached queue (or detaching a detached one) fails with EINVAL.
    public func setQueueAttached(_ index: Int, _ attached: Bool) throws(NetworkError) {
        guard index >= 0, index < queues.count else { throw .invalidArgument("queue \(index) of \(queues.count)") }
        var request = ifreq()
        request.ifr_ifru.ifru_flags = attached ? xb_IFF_ATTACH_QUEUE : xb_IFF_DETACH_QUEUE
        _ = try networkCall(attached ? "TUNSETQUEUE attach \(index)" : "TUNSETQUEUE detach \(index)", interface: name) {
            xb_ioctl_pointer(queues[index].fileDescriptor, xb_TUNSETQUEUE, &request)
        }
    }

    /// The flags TUNGETIFF reports for a queue (IFF_TAP, IFF_VNET_HDR, IFF_MULTI_QUEUE, ...).
    public func interfaceFlags(queue index: Int = 0) throws(NetworkError) -> Int16 {
        var request = ifreq()
        _ = try networkCall("TUNGETIFF", interface: name) { xb_ioctl_pointer(queues[index].fileDescriptor, xb_TUNGETIFF, &request) }
        return request.ifr_ifru.ifru_flags
    }

    /// Writes one frame made of `parts` (virtio header first when there is
    /// one) with one writev. A convenience: the variadic array allocates;
    /// the data path uses `TapQueue.write(_:)` with its own iovecs.
    @discardableResult
    public func write(queue index: Int = 0, _ parts: UnsafeRawBufferPointer...) throws(NetworkError) -> Int? {
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: parts.count) { (vectors) throws(NetworkError) -> Int? in
            for (i, part) in parts.enumerated() {
                vectors[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: part.baseAddress), iov_len: part.count)
            }
            return try queues[index].write(UnsafeBufferPointer(vectors))
        }
    }

    /// Reads one frame (with its virtio header) from a queue; nil when none is waiting.
    public func read(queue index: Int = 0, into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int? {
        try queues[index].read(into: buffer)
    }

    /// Closes every queue's descriptor; the kernel then deletes the
    /// interface. Idempotent.
    public func close() {
        let wasOpen = lock.withLock { () -> Bool in
            defer { closed = true }
            return !closed
        }
        guard wasOpen else { return }
        for queue in queues { Glibc.close(queue.fileDescriptor) }
    }
}

/// One queue of a TAP: the descriptor a data-plane thread polls, reads and
/// writes. No allocation, no locking, no reference counting per frame.
public struct TapQueue: Sendable {
    public let fileDescriptor: Int32
    /// 12 (frames start with a `VirtioNetHeader`) or 0.
    public let vnetHeaderSize: Int

    /// A queue over `fileDescriptor` (non-blocking, one frame per read or
    /// write; a test double may use a SOCK_SEQPACKET socket). Not owned:
    /// whoever opened it closes it.
    public init(fileDescriptor: Int32, vnetHeaderSize: Int) {
        self.fileDescriptor = fileDescriptor
        self.vnetHeaderSize = vnetHeaderSize
    }

    /// Writes one frame gathered from `vectors` (writev: a virtio header and
    /// the fragments, no copy). Returns the bytes written (the whole frame:
    /// TAP writes are atomic), or nil if the queue would block (EAGAIN).
    /// A malformed frame or header fails with EINVAL.
    @inline(__always)
    public func write(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int? {
        do {
            return try Syscall.unlessWouldBlock { () throws(SystemError) in try Syscall.writev(fileDescriptor, vectors) }
        } catch {
            throw .system(error)
        }
    }

    /// Reads one frame into `buffer`; returns its length (virtio header
    /// included), nil if none is waiting (EAGAIN). A buffer shorter than the
    /// frame gets its start (the rest is lost): give 65550 bytes
    /// (12 + 65535 + Ethernet header) when GSO offloads are on, else
    /// header + MTU + 14 (+4 for a VLAN tag).
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(NetworkError) -> Int? {
        do {
            return try Syscall.unlessWouldBlock { () throws(SystemError) in try Syscall.read(fileDescriptor, buffer.baseAddress, buffer.count) }
        } catch {
            throw .system(error)
        }
    }

    /// Reads one frame scattered over `vectors` (readv), e.g. the virtio
    /// header into one place and the frame straight into another.
    @inline(__always)
    public func read(_ vectors: UnsafeBufferPointer<iovec>) throws(NetworkError) -> Int? {
        do {
            return try Syscall.unlessWouldBlock { () throws(SystemError) in try Syscall.readv(fileDescriptor, vectors) }
        } catch {
            throw .system(error)
        }
    }
}
