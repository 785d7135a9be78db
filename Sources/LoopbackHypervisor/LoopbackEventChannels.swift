import CXenBackSupport
import Glibc
import Hypervisor
import SystemSupport

/// An open event channel handle of one loopback domain, with the semantics
/// of /dev/xen/evtchn: pending local ports are read from a FIFO (this
/// handle's file descriptor), and a port that fired stays masked until
/// `unmask`. Delivery rule, shared by `notify` and `unmask`: whoever flips
/// a port's `masked` from 0 to 1 while it is pending writes the port number
/// (4 bytes, atomic in a pipe) into the owner handle's FIFO. A notify of a
/// masked port costs two atomic operations and no system call.
public final class LoopbackEventChannels: EventChannelHandle, @unchecked Sendable {  // used by one thread at a time
    public let domain: DomID
    public let handleID: UInt32
    private let layout: LoopbackLayout
    private let table: EventChannelTable
    private let fifoPath: String
    private let fifo: Int32
    /// Peer tables, opened on first use.
    private var peerTables: [DomID: EventChannelTable] = [:]
    /// Per local port: the write end of the FIFO that receives its peer's events.
    private var peerFIFO: [Int32]
    private var peerFIFOKey: [UInt64]
    private var boundPorts: Set<EventChannelPort> = []

    public var fileDescriptor: Int32 { fifo }

    /// A peer that dies leaves its FIFO without a reader, and a write to it
    /// would raise SIGPIPE: this process takes EPIPE instead (once, for all).
    private static let ignoreBrokenPipes: Void = { signal(SIGPIPE, SIG_IGN) }()

    public init(layout: LoopbackLayout, domain: DomID) throws(HypervisorError) {
        Self.ignoreBrokenPipes
        self.layout = layout
        self.domain = domain
        table = try EventChannelTable(path: layout.eventChannels(domain), create: true)
        handleID = table.allocateHandleID()
        fifoPath = layout.eventChannelFIFO(domain, handle: handleID)
        unlink(fifoPath)
        let path = fifoPath
        do throws(SystemError) {
            _ = try Syscall.retryingOnInterrupt("mkfifo") { mkfifo(path, 0o600) }
            // O_RDWR keeps the FIFO open for writers even while nobody reads.
            fifo = try Syscall.retryingOnInterrupt("open event channel FIFO") { Glibc.open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC) }
        } catch {
            throw HypervisorError(error.call, errno: error.code, detail: path)
        }
        peerFIFO = Array(repeating: -1, count: Int(table.portCount))
        peerFIFOKey = Array(repeating: 0, count: Int(table.portCount))
    }

    deinit { close() }

    private var closed = false
    public func close() {
        guard !closed else { return }
        closed = true
        for p in boundPorts { releasePort(p) }
        boundPorts.removeAll()
        for fd in peerFIFO where fd >= 0 { Glibc.close(fd) }
        Glibc.close(fifo)
        unlink(fifoPath)
    }

    private func peerTable(_ d: DomID) throws(HypervisorError) -> EventChannelTable {
        if let t = peerTables[d] { return t }
        let t = try EventChannelTable(path: layout.eventChannels(d), create: false)
        peerTables[d] = t
        return t
    }

    /// EVTCHNOP_alloc_unbound: a port that `remoteDomain` may bind to. Used by
    /// our simulated frontends (on Xen the guest kernel does this).
    public func allocateUnbound(remoteDomain: DomID) throws(HypervisorError) -> EventChannelPort {
        let p = try table.claimFreePort()
        table.store(p, .remoteDomain, UInt32(remoteDomain))
        table.store(p, .remotePort, 0)
        table.store(p, .handle, handleID)
        table.store(p, .state, EventChannelTable.State.unbound.rawValue)
        boundPorts.insert(p)
        return p
    }

    public func bindInterdomain(remoteDomain: DomID, remotePort: EventChannelPort) throws(HypervisorError) -> EventChannelPort {
        let remote = try peerTable(remoteDomain)
        guard remote.isValid(remotePort) else {
            throw HypervisorError("bind interdomain", errno: EINVAL, detail: "port \(remotePort) out of range")
        }
        reclaimIfOrphaned(remote: remote, remoteDomain: remoteDomain, remotePort: remotePort)
        let local = try table.claimFreePort()
        // Take the remote unbound port for ourselves, atomically.
        guard remote.load(remotePort, .remoteDomain) == UInt32(domain),
              remote.cas(remotePort, .state, from: EventChannelTable.State.unbound.rawValue,
                         to: EventChannelTable.State.busy.rawValue) else {
            table.release(local)
            throw HypervisorError("bind interdomain", errno: EINVAL,
                                  detail: "dom\(remoteDomain) port \(remotePort) is not unbound for dom\(domain)")
        }
        remote.store(remotePort, .remotePort, local)
        remote.store(remotePort, .state, EventChannelTable.State.interdomain.rawValue)
        table.store(local, .remoteDomain, UInt32(remoteDomain))
        table.store(local, .remotePort, remotePort)
        table.store(local, .handle, handleID)
        table.store(local, .state, EventChannelTable.State.interdomain.rawValue)
        boundPorts.insert(local)
        return local
    }

    /// A process of our domain that was killed (SIGKILL, a crash) could not
    /// close its ports, and Xen would have closed them for it. If the remote
    /// port is still bound to one of our ports whose handle has no reader
    /// any more, close our dead end so that the remote port can be bound
    /// again (a restarted backend resuming its rings).
    private func reclaimIfOrphaned(remote: EventChannelTable, remoteDomain: DomID, remotePort: EventChannelPort) {
        guard remote.load(remotePort, .state) == EventChannelTable.State.interdomain.rawValue,
              remote.load(remotePort, .remoteDomain) == UInt32(domain) else { return }
        let mine = remote.load(remotePort, .remotePort)
        guard table.isValid(mine),
              table.load(mine, .state) == EventChannelTable.State.interdomain.rawValue,
              table.load(mine, .remoteDomain) == UInt32(remoteDomain),
              table.load(mine, .remotePort) == remotePort else { return }
        let owner = table.load(mine, .handle)
        let fifo = layout.eventChannelFIFO(domain, handle: owner)
        do {
            let probe = try Syscall.retryingOnInterrupt("open") { Glibc.open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC) }
            Glibc.close(probe)   // its owner is alive: leave the binding alone
            return
        } catch {
            // ENXIO: no reader, ENOENT: no FIFO; anything else proves nothing.
            guard error.errno == .noSuchAddressOrDevice || error.errno == .noSuchFileOrDirectory else { return }
        }
        if remote.cas(remotePort, .state, from: EventChannelTable.State.interdomain.rawValue,
                      to: EventChannelTable.State.busy.rawValue) {
            remote.store(remotePort, .remotePort, 0)
            remote.store(remotePort, .state, EventChannelTable.State.unbound.rawValue)
        }
        table.release(mine)
        unlink(fifo)
    }

    public func unbind(_ port: EventChannelPort) throws(HypervisorError) {
        guard boundPorts.remove(port) != nil else {
            throw HypervisorError("unbind", errno: EINVAL, detail: "port \(port) is not bound here")
        }
        releasePort(port)
    }

    /// Frees a port; its interdomain peer goes back to unbound (EVTCHNOP_close).
    private func releasePort(_ port: EventChannelPort) {
        if table.load(port, .state) == EventChannelTable.State.interdomain.rawValue,
           let remote = try? peerTable(DomID(truncatingIfNeeded: table.load(port, .remoteDomain))) {
            let rp = table.load(port, .remotePort)
            if remote.isValid(rp), remote.load(rp, .remotePort) == port,
               remote.cas(rp, .state, from: EventChannelTable.State.interdomain.rawValue,
                          to: EventChannelTable.State.busy.rawValue) {
                remote.store(rp, .remoteDomain, UInt32(domain))
                remote.store(rp, .remotePort, 0)
                remote.store(rp, .state, EventChannelTable.State.unbound.rawValue)
            }
        }
        if Int(port) < peerFIFO.count, peerFIFO[Int(port)] >= 0 {
            Glibc.close(peerFIFO[Int(port)])
            peerFIFO[Int(port)] = -1
        }
        table.release(port)
    }

    public func notify(_ port: EventChannelPort) throws(HypervisorError) {
        guard table.isValid(port), table.load(port, .state) == EventChannelTable.State.interdomain.rawValue else {
            throw HypervisorError("notify", errno: EINVAL, detail: "port \(port) is not connected")
        }
        let rd = DomID(truncatingIfNeeded: table.load(port, .remoteDomain))
        let rp = table.load(port, .remotePort)
        let remote = try peerTable(rd)
        guard remote.isValid(rp), remote.load(rp, .state) == EventChannelTable.State.interdomain.rawValue else {
            return   // the peer closed its end: the event goes nowhere, as on Xen
        }
        xb_store_release_u32(remote.field(rp, .pending), 1)
        xb_mb()
        deliverIfPending(table: remote, domain: rd, port: rp, cacheSlot: Int(port))
    }

    public func nextPending() throws(HypervisorError) -> EventChannelPort? {
        var port: UInt32 = 0
        let read: Int?
        do {
            read = try Syscall.unlessWouldBlock { () throws(SystemError) in try Syscall.read(fifo, &port, 4) }
        } catch {
            throw HypervisorError("read event channel", errno: error.code)
        }
        guard let read, read != 0 else { return nil }   // nothing now, or no writer yet
        if read == 4 { return port }
        throw HypervisorError("read event channel", errno: EIO)
    }

    public func unmask(_ port: EventChannelPort) throws(HypervisorError) {
        guard table.isValid(port) else { throw HypervisorError("unmask", errno: EINVAL, detail: "port \(port)") }
        table.store(port, .masked, 0)
        xb_mb()
        if table.load(port, .pending) != 0 {
            deliverIfPending(table: table, domain: domain, port: port, cacheSlot: nil)
        }
    }

    /// Masks a pending port and writes it into its owner's FIFO, unless it
    /// is already masked (then the owner's unmask delivers it).
    private func deliverIfPending(table t: EventChannelTable, domain d: DomID, port p: EventChannelPort, cacheSlot: Int?) {
        guard t.cas(p, .masked, from: 0, to: 1) else { return }
        guard t.cas(p, .pending, from: 1, to: 0) else {
            t.store(p, .masked, 0)   // someone else delivered it meanwhile
            return
        }
        let owner = t.load(p, .handle)
        var value = p
        if d == domain && owner == handleID {
            _ = write(fifo, &value, 4)
            return
        }
        if let slot = cacheSlot {
            let fd = cachedFIFO(domain: d, handle: owner, slot: slot)
            if fd >= 0 {
                do {
                    _ = try Syscall.write(fd, &value, 4)
                } catch where error.errno == .brokenPipe {
                    // The owner died: forget its FIFO; a new owner has a new one.
                    Glibc.close(fd)
                    peerFIFO[slot] = -1
                } catch {}   // full: the reader has a wake-up pending already
            }
        } else {
            // A re-delivery on unmask to another handle's port: rare, not cached.
            let fd = Glibc.open(layout.eventChannelFIFO(d, handle: owner), O_WRONLY | O_NONBLOCK | O_CLOEXEC)
            if fd >= 0 { _ = write(fd, &value, 4); Glibc.close(fd) }
        }
    }

    /// The write end of the FIFO of (domain, handle), cached per local port.
    private func cachedFIFO(domain d: DomID, handle: UInt32, slot: Int) -> Int32 {
        let key = UInt64(d) << 32 | UInt64(handle)
        if peerFIFO[slot] >= 0, peerFIFOKey[slot] == key { return peerFIFO[slot] }
        let fd = Glibc.open(layout.eventChannelFIFO(d, handle: handle), O_WRONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return -1 }   // the owner is gone
        if peerFIFO[slot] >= 0 { Glibc.close(peerFIFO[slot]) }
        peerFIFO[slot] = fd
        peerFIFOKey[slot] = key
        return fd
    }
}
