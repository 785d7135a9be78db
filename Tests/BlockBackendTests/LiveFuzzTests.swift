import Testing

/// `xenbackd fuzz` against real `xenbackd xenstored` and `xenbackd run`
/// processes: a hostile guest next to a verified bystander, every invariant
/// checked from outside; a seed that once failed is replayed here for good.
@Suite("live fuzz against a running daemon", .serialized)
struct LiveFuzzTests {
    /// Runs `xenbackd fuzz` in a fresh world; its output, to show on failure.
    func fuzz(seed: UInt64, seconds: Int) throws -> (status: Int32, output: String) {
        let w = try DaemonRestartTests.World()
        defer { w.close() }
        try w.waitFor(path: w.controlSocket)
        return try runProgram(w.binary, ["fuzz", "--root", w.root, "--control-socket", w.controlSocket,
                                         "--seed", String(seed), "--seconds", String(seconds), "--disk-megabytes", "16",
                                         // The device comes back after a ring breach (issue 12's xenbus fixes).
                                         "--expect-reconnect"])
    }

    @Test("15 s of a hostile guest with a fixed seed: no invariant broken, the bystander unharmed")
    func fixedSeed() throws {
        let (status, output) = try fuzz(seed: 20261206, seconds: 15)
        #expect(status == 0, "\(output)")
        #expect(output.contains("failures: PASS"), "\(output)")
        #expect(output.contains("0 errors, 0 mismatches"), "\(output)")
    }

    @Test("a short run with a second seed")
    func secondSeed() throws {
        let (status, output) = try fuzz(seed: 7, seconds: 5)
        #expect(status == 0, "\(output)")
        #expect(output.contains("failures: PASS"), "\(output)")
    }
}
