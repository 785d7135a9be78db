import Glibc

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
        let fd = Glibc.open(path, flags, 0o600)
        guard fd >= 0 else { throw HypervisorError(operation, errno: errno, detail: path) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno; Glibc.close(fd); throw HypervisorError(operation, errno: e, detail: path)
        }
        var length = Int(st.st_size)
        if let want = createLength, length < want {
            guard ftruncate(fd, off_t(want)) == 0 else {
                let e = errno; Glibc.close(fd); throw HypervisorError(operation, errno: e, detail: path)
            }
            length = want
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
