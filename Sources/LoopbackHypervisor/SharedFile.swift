import Glibc
import SystemSupport

/// A file mapped MAP_SHARED into this process: how every loopback domain
/// structure (memory, grant table, event channel table) is shared between
/// the backend and frontend processes.
final class SharedFile: @unchecked Sendable {   // immutable after init; the memory is shared by design
    let path: String
    let fd: Int32
    let base: UnsafeMutableRawPointer
    let length: Int

    /// Opens (creating with `createLength` if given and missing) and maps a file.
    init(path: String, createLength: Int? = nil, operation: String) throws(HypervisorError) {
        var flags = O_RDWR | O_CLOEXEC
        if createLength != nil { flags |= O_CREAT }
        // A failed call: what it was for, which call, errno, and the file.
        func failure(_ error: SystemError) -> HypervisorError {
            HypervisorError(operation, errno: error.code, detail: "\(error.call) \(path)")
        }
        let fd: Int32
        do { fd = try Syscall.retryingOnInterrupt("open") { Glibc.open(path, flags, 0o600) } } catch { throw failure(error) }
        var st = stat()
        var length = 0
        do throws(SystemError) {
            _ = try Syscall.retryingOnInterrupt("fstat") { fstat(fd, &st) }
            length = Int(st.st_size)
            if let want = createLength, length < want {
                _ = try Syscall.retryingOnInterrupt("ftruncate") { ftruncate(fd, off_t(want)) }
                length = want
            }
        } catch {
            Glibc.close(fd)
            throw failure(error)
        }
        guard length > 0 else {
            Glibc.close(fd); throw HypervisorError(operation, errno: EINVAL, detail: "\(path) is empty")
        }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            let e = errno; Glibc.close(fd); throw HypervisorError(operation, errno: e, detail: path)
        }
        self.path = path; self.fd = fd; self.base = p; self.length = length
    }

    deinit {
        munmap(base, length)
        Glibc.close(fd)
    }
}

import Hypervisor
