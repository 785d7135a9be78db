import ArgumentParser

/// The lab around the daemon: the loopback hypervisor's xenstored,
/// simulated guests, the live fuzzer and the benchmarks. None of it runs in
/// an operator's dom0: the installed daemon (`xenbackd`) is not linked with it.
@main
struct XenbackdLab: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xenbackd-lab",
        abstract: "xenbackd's lab: the loopback xenstored, simulated guests, a live fuzzer and the benchmarks.",
        subcommands: [XenStored.self, Guest.self, Fuzz.self, Bench.self])
}
