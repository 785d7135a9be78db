import DaemonCLI
import ArgumentParser
import Glibc
import LoopbackHypervisor
import LoopbackXenStore
import SystemSupport

/// `xenbackd-lab xenstored`: the loopback hypervisor's xenstore daemon.
struct XenStored: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenstored",
        abstract: "Run the loopback hypervisor's xenstored (Xen's wire protocol on a unix socket).")

    @Option(help: "Loopback hypervisor root folder.")
    var root: String = "/run/xenbackd/loopback"

    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = logging.makeLogger("xenstored")
        try makeDirectories(root, mode: 0o700)
        let layout = LoopbackLayout(root: root)
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let server = try LoopbackXenStoreServer(socketPath: layout.xenStoreSocket,
                                                domainSocketDirectory: layout.xenStoreDomainSockets, logger: logger)
        try server.start()
        logger.notice("loopback xenstored listening", metadata: ["socket": "\(layout.xenStoreSocket)"])
        var sig: Int32 = 0
        sigwait(&signals, &sig)
        server.stop()
        logger.notice("loopback xenstored stopped")
    }
}
