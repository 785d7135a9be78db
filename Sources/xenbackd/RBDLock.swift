import ArgumentParser
import BlockStorage
import Glibc

/// `xenbackd rbd-lock`: who holds an RBD image's exclusive lock, and the
/// operator's way to break it after the holder's host died. The daemon
/// itself never breaks another host's lock (docs/storage.md).
struct RBDLock: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rbd-lock",
        abstract: "Show or break an RBD image's exclusive lock.",
        discussion: """
            show prints the lock's holders, one per line (nothing: unlocked). break removes \
            the lock and has the cluster blocklist its holder, so that a holder still alive \
            can no longer write: only for a holder whose host is known to be dead, or the \
            image's data can be lost.
            """)

    enum Action: String, ExpressibleByArgument { case show, `break` }

    @Argument(help: "show or break.")
    var action: Action

    @Argument(help: "The image, as a disk's params: rbd:POOL/[NAMESPACE/]IMAGE[:id=USER][:conf=PATH]...")
    var target: String

    @Option(help: "Seconds the cluster has to answer.")
    var timeout: Int = 30

    func validate() throws {
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
    }

    func run() throws {
        let address: RBDImageAddress
        do {
            guard case .rbd(let parsed) = try DiskTarget.parse(target).location else {
                throw failure("\(DiskTarget.redacted(target)) is not an RBD image")
            }
            address = parsed
        } catch let error as DiskTargetError {
            throw failure("\(error)")
        }
        guard address.snapshot == nil else { throw failure("a snapshot has no lock: name the image") }
        let storage: RBDStorage
        do {
            // Read-write (which locks nothing): librbd names a lock's holders only to such a handle.
            storage = try RBDStorage.open(address, readOnly: false, queueDepth: 1, timeoutSeconds: timeout)
        } catch {
            throw failure("\(error)")
        }
        defer { storage.close() }
        do {
            switch action {
            case .show:
                for owner in try storage.lockOwners() { print(owner) }
            case .break:
                let broken = try storage.breakLock()
                print(broken.isEmpty ? "\(address.normalized): not locked" : broken.map { "broken: \($0)" }.joined(separator: "\n"))
            }
        } catch {
            throw failure("\(error)")
        }
    }
}
