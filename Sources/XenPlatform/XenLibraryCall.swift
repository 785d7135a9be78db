import Hypervisor
import SystemSupport

/// A call into libxenevtchn or libxengnttab (-1 and errno on failure), made
/// through Syscall: the failure is a HypervisorError naming the call, with
/// its errno and `detail` (built only on failure: notify is on the data path).
@inline(__always)
func xenLibraryCall<Result: BinaryInteger>(
    _ call: StaticString, detail: @autoclosure () -> String = "", _ body: () -> Result
) throws(HypervisorError) -> Result {
    do {
        return try Syscall.retryingOnInterrupt(call, body)
    } catch {
        throw HypervisorError(error.call, errno: error.code, detail: detail())
    }
}
