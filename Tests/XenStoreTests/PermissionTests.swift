import Glibc
import Hypervisor
import Testing
import XenStoreClient

@Suite("xenstore permissions")
struct PermissionTests {
    @Test("a guest is refused what the permission lists do not grant")
    func refusals() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            try dom0.write("/secret/key", "42")
            // Everything below / is dom0's with no access for others ("n0").
            expectErrno(XenStoreError.accessDenied) { _ = try guest.read("/secret/key") }
            expectErrno(XenStoreError.accessDenied) { try guest.write("/secret/key", "1") }
            expectErrno(XenStoreError.accessDenied) { try guest.write("/new", "1") }
            expectErrno(XenStoreError.accessDenied) { try guest.mkdir("/secret/dir") }
            expectErrno(XenStoreError.accessDenied) { try guest.remove("/secret/key") }
            expectErrno(XenStoreError.accessDenied) { _ = try guest.directory("/secret") }
            expectErrno(XenStoreError.accessDenied) { _ = try guest.permissions("/secret") }
            // A missing node below an unreadable parent is not revealed as missing.
            expectErrno(XenStoreError.accessDenied) { _ = try guest.read("/secret/missing") }
            // Domain management is dom0's.
            expectErrno(XenStoreError.accessDenied) { try guest.introduceDomain(6) }
            expectErrno(XenStoreError.accessDenied) { _ = try guest.isDomainIntroduced(5) }
            expectErrno(XenStoreError.accessDenied) { try guest.releaseDomain(5) }
            #expect(try dom0.read("/secret/key") == "42")
            #expect(try dom0.directory("/secret") == ["key"])
        }
    }

    @Test("read and write grants for other domains")
    func grants() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            let other = try fixture.guest(6)
            try dom0.write("/backend/vbd/5/0/state", "1")
            try dom0.setPermissions("/backend/vbd/5/0/state", [.n(0), .r(5)])
            #expect(try guest.read("/backend/vbd/5/0/state") == "1")
            expectErrno(XenStoreError.accessDenied) { try guest.write("/backend/vbd/5/0/state", "2") }
            expectErrno(XenStoreError.accessDenied) { _ = try other.read("/backend/vbd/5/0/state") }
            #expect(try guest.permissions("/backend/vbd/5/0/state") == [.n(0), .r(5)])

            try dom0.setPermissions("/backend/vbd/5/0/state", [.n(0), .b(5)])
            try guest.write("/backend/vbd/5/0/state", "4")
            #expect(try dom0.read("/backend/vbd/5/0/state") == "4")
            // Write-only: may write, may not read.
            try dom0.setPermissions("/backend/vbd/5/0/state", [.n(0), .w(5)])
            try guest.write("/backend/vbd/5/0/state", "5")
            expectErrno(XenStoreError.accessDenied) { _ = try guest.read("/backend/vbd/5/0/state") }
            // The first entry is everyone else's access.
            try dom0.setPermissions("/backend/vbd/5/0/state", [.r(0)])
            #expect(try other.read("/backend/vbd/5/0/state") == "5")
            expectErrno(XenStoreError.accessDenied) { try other.write("/backend/vbd/5/0/state", "6") }
        }
    }

    @Test("new nodes inherit the parent's permissions; a guest owns what it creates")
    func inheritance() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            try fixture.createDomainHome(5, using: dom0)
            try dom0.mkdir("/local/domain/5/device")
            try dom0.setPermissions("/local/domain/5/device", [.n(0), .b(5), .r(7)])

            try guest.write("/local/domain/5/device/vbd/768/state", "1")
            #expect(try dom0.permissions("/local/domain/5/device/vbd") == [.n(5), .b(5), .r(7)])
            #expect(try dom0.permissions("/local/domain/5/device/vbd/768/state") == [.n(5), .b(5), .r(7)])
            try dom0.write("/local/domain/5/device/by-dom0", "x")
            #expect(try dom0.permissions("/local/domain/5/device/by-dom0") == [.n(0), .b(5), .r(7)])
            // Relative paths of a guest are below its home, which it owns.
            try guest.write("data/key", "v")
            #expect(try dom0.read("/local/domain/5/data/key") == "v")
            #expect(try dom0.permissions("/local/domain/5/data/key") == [.n(5)])
            #expect(try guest.read("data/key") == "v")
            #expect(try guest.directory("/local/domain/5") == ["device", "data"])
            // A missing node below a readable parent is just missing.
            #expect(try guest.read("data/missing") == nil)
        }
    }

    @Test("only the owner changes permissions, and a guest cannot give a node away")
    func settingPermissions() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            try fixture.createDomainHome(5, using: dom0)
            try dom0.write("/shared", "s")
            try dom0.setPermissions("/shared", [.n(0), .b(5)])
            expectErrno(XenStoreError.accessDenied) { try guest.setPermissions("/shared", [.n(0), .b(5), .r(6)]) }

            try guest.write("mine", "m")
            try guest.setPermissions("mine", [.n(5), .r(6)])
            #expect(try dom0.permissions("/local/domain/5/mine") == [.n(5), .r(6)])
            expectErrno(1) { try guest.setPermissions("mine", [.n(6)]) }  // EPERM
            // dom0 may give it to anyone.
            try dom0.setPermissions("/local/domain/5/mine", [.n(6)])
            expectErrno(XenStoreError.accessDenied) { _ = try guest.read("mine") }
            expectErrno(XenStoreError.noEntry) { try dom0.setPermissions("/missing", [.n(0)]) }
            expectErrno(XenStoreError.invalid) {
                _ = try fixture.dom0SocketClient().request(.setPerms, payload: Array("/shared\u{0}x5\u{0}".utf8))
            }
        }
    }

    @Test("domain sockets follow introduction and release")
    func domainSockets() throws {
        try withLoopbackXenStore { fixture in
            let path = fixture.server.domainSocketPath(for: 12)
            #expect(path == fixture.directory + "/domains/domain-12.sock")
            #expect(access(path, F_OK) != 0)
            expectErrno(ENOENT) { _ = try XenStoreSocketClient(socketPath: path) }
            let guest = try fixture.guest(12)
            #expect(access(path, F_OK) == 0)
            #expect(try guest.domainPath(of: 12) == "/local/domain/12")
            try fixture.server.releaseDomain(12)
            #expect(access(path, F_OK) != 0)
            #expect(!fixture.server.isDomainIntroduced(12))
            expectErrno(XenStoreError.io) { _ = try guest.domainPath(of: 12) }  // disconnected
        }
    }
}
