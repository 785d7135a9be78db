import Foundation
import Glibc
import Hypervisor
import Testing

/// Debian's xenstore-utils, unchanged, against the loopback xenstored
/// (they reach it through libxenstore with XENSTORED_PATH set).
@Suite("xenstore-utils against the loopback xenstored")
struct XenstoreToolsTests {
    @Test("xenstore-write, -read, -ls, -list, -exists, -rm")
    func readWriteListRemove() throws {
        try withLoopbackXenStore { fixture in
            let socket = fixture.socketPath
            let xs = try fixture.dom0()
            #expect(try runTool(["xenstore-write", "/tools/a", "hello", "/tools/sub/b", "world"], socketPath: socket).status == 0)
            #expect(try xs.read("/tools/a") == "hello")
            #expect(try xs.read("/tools/sub/b") == "world")

            let read = try runTool(["xenstore-read", "/tools/a", "/tools/sub/b"], socketPath: socket)
            #expect(read.status == 0)
            #expect(read.stdout == "hello\nworld\n")

            let ls = try runTool(["xenstore-ls", "/tools"], socketPath: socket)
            #expect(ls.status == 0)
            #expect(ls.stdout == "a = \"hello\"\nsub = \"\"\n b = \"world\"\n")

            let lsFull = try runTool(["xenstore-ls", "-f", "-p", "/tools"], socketPath: socket)
            #expect(lsFull.stdout == """
                /tools/a = "hello"   (n0)
                /tools/sub = ""   (n0)
                /tools/sub/b = "world"   (n0)

                """)

            #expect(try runTool(["xenstore-list", "/tools"], socketPath: socket).stdout == "a\nsub\n")
            #expect(try runTool(["xenstore-exists", "/tools/a"], socketPath: socket).status == 0)
            #expect(try runTool(["xenstore-exists", "/tools/nope"], socketPath: socket).status != 0)

            #expect(try runTool(["xenstore-rm", "/tools/a"], socketPath: socket).status == 0)
            #expect(try xs.read("/tools/a") == nil)
            let missing = try runTool(["xenstore-read", "/tools/a"], socketPath: socket)
            #expect(missing.status != 0)
            #expect(missing.stdout == "")
            #expect(missing.stderr.contains("/tools/a"))
        }
    }

    @Test("xenstore-chmod sets permission lists")
    func chmod() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            try xs.write("/perm", "p")
            #expect(try runTool(["xenstore-chmod", "/perm", "n0", "r5"], socketPath: fixture.socketPath).status == 0)
            #expect(try xs.permissions("/perm") == [.n(0), .r(5)])
        }
    }

    @Test("xenstore-watch prints the initial firing and then changes")
    func watch() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let result = Locked<(status: Int32, stdout: String, stderr: String)?>(nil)
            let socket = fixture.socketPath
            let watcher = TestThread {
                let outcome = try? runTool(["xenstore-watch", "-n", "2", "/tools/w"], socketPath: socket, timeout: 10)
                result.withLock { $0 = outcome }
            }
            // Write until the tool has seen its second event and exited (it may start watching late).
            for _ in 0..<200 where result.withLock({ $0 == nil }) {
                try xs.write("/tools/w/x", "1")
                usleep(25_000)
            }
            watcher.join()
            let outcome = try #require(result.withLock { $0 })
            #expect(outcome.status == 0)
            #expect(outcome.stdout == "/tools/w\n/tools/w/x\n")
        }
    }

    @Test("concurrent xenstore-write runs all succeed (each retries its transaction on EAGAIN)")
    func toolsUseTransactions() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let socket = fixture.socketPath
            let statuses = Locked<[Int32]>([])
            let threads = (0..<4).map { i in
                TestThread {
                    let status = (try? runTool(["xenstore-write", "/race", "writer-\(i)"], socketPath: socket))?.status ?? -1
                    statuses.withLock { $0.append(status) }
                }
            }
            for thread in threads { thread.join() }
            #expect(statuses.withLock { $0 } == [0, 0, 0, 0])
            let value = try #require(try xs.read("/race"))
            #expect(["writer-0", "writer-1", "writer-2", "writer-3"].contains(value))
        }
    }
}
