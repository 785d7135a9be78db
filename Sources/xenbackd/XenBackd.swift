import ArgumentParser
import DaemonCLI

@main
struct XenBackd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenbackd",
        abstract: "Xen split-driver backends for dom0: blkback (disks on files, block devices, LVM and NBD) and netback (vifs on TAPs and bridges), served from userspace.",
        discussion: "The simulated guests, the loopback xenstored, the fuzzers and the benchmarks are in xenbackd-lab.",
        subcommands: [Run.self, Status.self, Rescan.self, CheckDisk.self, RBDLock.self],
        defaultSubcommand: Run.self)
}
