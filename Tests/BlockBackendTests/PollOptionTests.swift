import Foundation
import Glibc
import SystemSupport
import Testing

/// `xenbackd run --poll-us`: 50 µs by default on the loopback hypervisor
/// (0 on Xen, checked by scripts/test-xen), as given otherwise, and the
/// value the daemon serves with is in its "serving" line.
@Suite("xenbackd run --poll-us")
struct PollOptionTests {
    @Test("the loopback default is 50, an explicit value is kept, a negative one is refused")
    func pollDefaultOnLoopback() throws {
        let world = try DaemonRestartTests.World()
        defer { world.close() }
        // The world's own daemon already serves this root: these run beside
        // it for a moment on their own control sockets, and are killed.
        for (extra, expected) in [([String](), "pollMicroseconds=50"), (["--poll-us", "7"], "pollMicroseconds=7")] {
            let result = try runProcess([world.binary, "run", "--platform", "loopback", "--root", world.root,
                                         "--control-socket", world.root + "/poll-test.sock", "--log-level", "notice"] + extra,
                                        environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], timeout: 2)
            let serving = result.stderr.split(separator: "\n").first { $0.contains("xenbackd serving") }
            #expect(serving?.contains(expected) == true, "\(result)")
        }
        let refused = try runProcess([world.binary, "run", "--platform", "loopback", "--root", world.root, "--poll-us=-1"],
                                     environment: ["PATH": "/usr/bin:/bin"], timeout: 10)
        #expect(refused.status != 0 && refused.status != 124, "\(refused)")
        #expect(refused.stderr.contains("--poll-us must be 0 or more"), "\(refused)")
    }
}
