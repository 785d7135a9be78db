import Glibc
import SystemSupport
import Hypervisor

// Small POSIX helpers shared by the loopback xenstored and the socket client.
// `package` access: internal to this SwiftPM package, not part of the wire API.

package extension UnixSocket {
    /// `listen(at:)`, failing as a xenstore error.
    static func xenStoreListen(at path: String) throws(XenStoreError) -> Int32 {
        do { return try listen(at: path) } catch { throw XenStoreError(errno: error.code, context: error.call) }
    }

    /// `connect(to:)`, failing as a xenstore error.
    static func xenStoreConnect(to path: String) throws(XenStoreError) -> Int32 {
        do { return try connect(to: path) } catch { throw XenStoreError(errno: error.code, context: error.call) }
    }
}

package extension NativeThread {
    /// A thread for xenstore's loops, failing as a xenstore error.
    static func forXenStore(name: String, _ body: @escaping @Sendable () -> Void) throws(XenStoreError) -> NativeThread {
        do { return try NativeThread(name: name, body) } catch {
            throw XenStoreError(errno: error.code, context: "pthread_create")
        }
    }
}
