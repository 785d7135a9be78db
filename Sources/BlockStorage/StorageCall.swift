import SystemSupport

extension StorageError {
    /// A system call's failure (named by Syscall) on the disk at `path`.
    public init(_ error: SystemError, path: String) {
        self.init(error.call, errno: error.code, path: path)
    }
}

/// A system call on the disk at `path`, made through Syscall; its failure
/// is a StorageError naming the call, with its errno and the disk.
@inline(__always)
func storageCall<Result: BinaryInteger>(
    _ call: StaticString, path: @autoclosure () -> String, _ body: () -> Result
) throws(StorageError) -> Result {
    do {
        return try Syscall.retryingOnInterrupt(call, body)
    } catch {
        throw StorageError(error, path: path())
    }
}
