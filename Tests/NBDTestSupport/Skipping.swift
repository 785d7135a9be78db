import Testing

extension NBDServerKind {
    /// Cancels the running test (skipped, with the reason) unless this server is installed.
    public func requireInstalled() throws {
        if !isInstalled { try Test.cancel("\(executable) is not installed (scripts/setup installs nbdkit and nbd-server)") }
    }
}
