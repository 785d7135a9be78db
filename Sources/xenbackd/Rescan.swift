import ArgumentParser
import DaemonCLI
import Foundation

/// `xenbackd rescan DEVICE`: tells a running daemon to compare a disk's
/// size with what its frontend was told now, instead of at its next
/// periodic check (within a second), and prints the outcome.
struct Rescan: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pass a vbd's new disk size to its guest now (online resize).",
        discussion: "The daemon also notices a disk that grew or shrank on its own within a second. "
            + "An NBD export's size is fixed for its connection and is not rescanned.")

    @Argument(help: "The vbd, as `xenbackd status` names it (e.g. vbd-1-51712).")
    var device: String
    @Option(help: "The daemon's control socket.")
    var controlSocket: String = ControlServer.defaultPath

    func run() throws {
        let reply = try ControlProtocol.ask("rescan \(device)", socket: controlSocket)
        guard let r = try? JSONDecoder().decode(RescanReply.self, from: Data(reply.utf8)) else {
            throw RefusalError("unexpected reply from \(controlSocket): \(reply.prefix(200))")
        }
        if let error = r.error { throw RefusalError(error) }
        guard let sectors = r.sectors else { throw RefusalError("\(device) is not connected: nothing to tell its guest") }
        if let before = r.previousSectors {
            print("\(device): \(sectors) sectors, was \(before): the guest has been told")
        } else {
            print("\(device): \(sectors) sectors, unchanged")
        }
    }
}
