import Glibc
import Hypervisor
import LibXenStore
import LoopbackXenStore
import Testing
import XenABI
import XenStoreClient

@Suite("xenstore basic operations")
struct BasicOperationTests {
    @Test("initial tree", arguments: ClientKind.allCases)
    func initialTree(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            #expect(try xs.directory("/") == ["tool", "local"])
            #expect(try xs.directory("/local/domain") == ["0"])
            #expect(try xs.read("/tool/xenstored") == "")
            #expect(try xs.permissions("/") == [.n(0)])
        }
    }

    @Test("write creates parents, read returns the value", arguments: ClientKind.allCases)
    func writeAndRead(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.write("/a/b/c", "hello")
            #expect(try xs.read("/a/b/c") == "hello")
            #expect(try xs.read("/a/b") == "")
            #expect(try xs.read("/a") == "")
            #expect(try xs.directory("/a") == ["b"])
            #expect(try xs.directory("/a/b") == ["c"])
            #expect(try xs.directory("/a/b/c") == [])
            try xs.write("/a/b/c", "")
            #expect(try xs.read("/a/b/c") == "")
            try xs.write("/a/b/c", "again")
            #expect(try xs.read("/a/b/c") == "again")
            #expect(try xs.read("/a/missing") == nil)
            #expect(try xs.directory("/a/missing") == nil)
        }
    }

    @Test("children are listed in creation order", arguments: ClientKind.allCases)
    func directoryOrder(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            for name in ["zeta", "alpha", "mid", "1"] { try xs.write("/order/\(name)", name) }
            #expect(try xs.directory("/order") == ["zeta", "alpha", "mid", "1"])
        }
    }

    @Test("mkdir creates empty nodes and keeps existing values", arguments: ClientKind.allCases)
    func mkdir(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.mkdir("/m/n/o")
            #expect(try xs.read("/m/n/o") == "")
            #expect(try xs.directory("/m") == ["n"])
            try xs.write("/m/n", "kept")
            try xs.mkdir("/m/n")
            #expect(try xs.read("/m/n") == "kept")
            #expect(try xs.directory("/m/n") == ["o"])
        }
    }

    @Test("rm removes the subtree; removing a missing node succeeds", arguments: ClientKind.allCases)
    func remove(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.write("/r/a/b", "1")
            try xs.write("/r/a/c", "2")
            try xs.write("/r/keep", "3")
            try xs.remove("/r/a")
            #expect(try xs.read("/r/a/b") == nil)
            #expect(try xs.read("/r/a") == nil)
            #expect(try xs.directory("/r") == ["keep"])
            try xs.remove("/r/a")            // missing, parent exists
            try xs.remove("/nowhere/at/all") // missing, parent missing too
            try xs.write("/r/a/b", "back")   // a removed path can be created again
            #expect(try xs.directory("/r") == ["keep", "a"])
            #expect(try xs.read("/r/a/b") == "back")
        }
    }

    @Test("the root cannot be removed")
    func removeRoot() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            expectErrno(XenStoreError.invalid) { try xs.remove("/") }
            #expect(try xs.directory("/") == ["tool", "local"])
        }
    }

    @Test("a value as large as a payload allows round-trips", arguments: ClientKind.allCases)
    func largeValue(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let path = "/big"
            let value = String(repeating: "v", count: XenStoreLimits.payloadMax - path.utf8.count - 1)
            try xs.write(path, value)
            #expect(try xs.read(path) == value)
            expectErrno(7) { try xs.write(path, value + "x") }  // E2BIG, refused by the client library
        }
    }

    @Test("a directory too big for one reply is read with DIRECTORY_PART", arguments: ClientKind.allCases)
    func bigDirectory(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let raw = try fixture.dom0SocketClient()
            let names = (0..<700).map { "child-with-a-long-name-\($0)" }
            _ = try raw.withTransaction { t throws(XenStoreError) in
                for name in names { try raw.write("/big/\(name)", "x", transaction: t) }
            }
            // One XS_DIRECTORY reply cannot hold ~19 KiB of names.
            expectErrno(7) { _ = try raw.request(.directory, payload: Array("/big".utf8) + [0]) }
            let xs = try fixture.dom0(kind)
            let listed = try xs.directory("/big")
            #expect(listed == names)
        }
    }

    @Test("DIRECTORY_PART replies with the generation, a part, and a final empty name")
    func directoryPartFormat() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0SocketClient()
            try xs.write("/p/a", "1")
            try xs.write("/p/bb", "2")
            let whole = try xs.request(.directoryPart, payload: Array("/p\u{0}0\u{0}".utf8))
            let generation = whole.prefix { $0 != 0 }
            #expect(!generation.isEmpty && generation.allSatisfy { (48...57).contains($0) })
            #expect(Array(whole.dropFirst(generation.count)) == Array("\u{0}a\u{0}bb\u{0}\u{0}".utf8))
            // From byte offset 2 ("bb"), then past the end.
            let tail = try xs.request(.directoryPart, payload: Array("/p\u{0}2\u{0}".utf8))
            #expect(Array(tail.dropFirst(generation.count)) == Array("\u{0}bb\u{0}\u{0}".utf8))
            let past = try xs.request(.directoryPart, payload: Array("/p\u{0}5\u{0}".utf8))
            #expect(Array(past.dropFirst(generation.count)) == [0, 0])
            // A new child changes the generation.
            try xs.write("/p/c", "3")
            let after = try xs.request(.directoryPart, payload: Array("/p\u{0}0\u{0}".utf8))
            #expect(after.prefix { $0 != 0 } != generation)
        }
    }

    @Test("relative paths are below /local/domain/<domid>", arguments: ClientKind.allCases)
    func relativePaths(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.write("rel/x", "1")
            #expect(try xs.read("/local/domain/0/rel/x") == "1")
            #expect(try xs.read("rel/x") == "1")
        }
    }

    @Test("domain paths and introduction over the wire")
    func domainRequests() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0SocketClient()
            #expect(try xs.domainPath(of: 5) == "/local/domain/5")
            #expect(try xs.isDomainIntroduced(0))
            #expect(try !xs.isDomainIntroduced(9))
            try xs.introduceDomain(9)
            #expect(try xs.isDomainIntroduced(9))
            #expect(fixture.server.isDomainIntroduced(9))
            try xs.releaseDomain(9)
            #expect(try !xs.isDomainIntroduced(9))
            expectErrno(XenStoreError.noEntry) { try xs.releaseDomain(9) }
            expectErrno(XenStoreError.invalid) { try xs.introduceDomain(0) }
            _ = try xs.request(.control, payload: Array("print\u{0}hello\u{0}".utf8))
            expectErrno(38) { _ = try xs.request(.setTarget, payload: Array("3\u{0}4\u{0}".utf8)) }  // ENOSYS
        }
    }

    @Test("a connection made before start is served after it; stop removes what the server made")
    func connectBeforeStart() throws {
        let directory = "/tmp/xst-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let server = try LoopbackXenStoreServer(socketPath: directory + ".sock", domainSocketDirectory: directory)
        defer {
            server.stop()
            rmdir(directory)
        }
        let xs = try XenStoreSocketClient(socketPath: directory + ".sock")
        defer { xs.close() }
        try server.start()
        try xs.write("/early", "ok")
        #expect(try xs.read("/early") == "ok")
        try server.introduceDomain(3)
        #expect(access(directory + "/domain-3.sock", F_OK) == 0)
        server.stop()
        #expect(access(directory + ".sock", F_OK) != 0)          // socket files removed,
        #expect(access(directory + "/domain-3.sock", F_OK) != 0)
        #expect(access(directory, F_OK) != 0)                    // and the directory it made
        expectErrno(XenStoreError.io) { _ = try xs.read("/early") }
        expectErrno(XenStoreError.io) { try server.start() }
        expectErrno(XenStoreError.io) { try server.introduceDomain(4) }
        server.stop()
    }
}
