import Glibc
import Hypervisor
import Testing
import XenStoreClient

@Suite("xenstore watches")
struct WatchTests {
    @Test("initial firing, child writes, token round trip", arguments: ClientKind.allCases)
    func firing(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let token = "token with spaces/and:punctuation"
            try xs.watch("/w", token: token)
            // Fired once at once, for the watched path, whether or not it exists.
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "/w", token: token))
            try xs.write("/w/a/b", "1")
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "/w/a/b", token: token))
            try xs.write("/w", "self")
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "/w", token: token))
            try xs.mkdir("/w/dir")
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "/w/dir", token: token))
            // Outside the watched subtree ("/wx" is not below "/w").
            #expect(try queuedEvents(xs) { try xs.write("/wx", "no"); try xs.write("/other", "no") } == [])
        }
    }

    @Test("the descriptor is readable exactly while events are queued", arguments: ClientKind.allCases)
    func descriptor(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            #expect(!waitReadable(xs.watchFileDescriptor, timeout: 0))
            #expect(try xs.nextWatchEvent() == nil)
            try xs.watch("/d", token: "t")
            #expect(waitReadable(xs.watchFileDescriptor, timeout: 5))
            try xs.write("/d/1", "x")
            #expect(try xs.nextWatchEvent()?.path == "/d")
            #expect(try xs.nextWatchEvent()?.path == "/d/1")
            #expect(try xs.nextWatchEvent() == nil)
            #expect(!waitReadable(xs.watchFileDescriptor, timeout: 0))
        }
    }

    @Test("rm fires for the removed node and for watched descendants", arguments: ClientKind.allCases)
    func removal(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.write("/r/a/b/c", "1")
            try xs.write("/r/a/d", "2")
            try xs.watch("/r", token: "top")
            try xs.watch("/r/a/b", token: "deep")
            try xs.watch("/r/a/b/c/below", token: "below")
            let initial = try queuedEvents(xs) { try ping(xs) }
            #expect(initial.map(\.token) == ["top", "deep", "below"])
            let events = try queuedEvents(xs) { try xs.remove("/r/a") }
            // Children first; descendants only reach watches on exactly their path.
            #expect(events == [
                XenStoreWatchEvent(path: "/r/a/b", token: "deep"),
                XenStoreWatchEvent(path: "/r/a", token: "top"),
            ])
        }
    }

    @Test("unwatch stops events; duplicate and unknown watches are refused", arguments: ClientKind.allCases)
    func unwatch(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            try xs.watch("/u", token: "one")
            try xs.watch("/u", token: "two")
            expectErrno(XenStoreError.exists) { try xs.watch("/u", token: "one") }
            #expect(try queuedEvents(xs) { try ping(xs) }.map(\.token) == ["one", "two"])
            try xs.unwatch("/u", token: "one")
            #expect(try queuedEvents(xs) { try xs.write("/u/x", "1") } == [XenStoreWatchEvent(path: "/u/x", token: "two")])
            try xs.unwatch("/u", token: "two")
            #expect(try queuedEvents(xs) { try xs.write("/u/x", "2") } == [])
            expectErrno(XenStoreError.noEntry) { try xs.unwatch("/u", token: "two") }
            expectErrno(XenStoreError.invalid) { try xs.watch("bad//path", token: "t") }
        }
    }

    @Test("watches of other connections fire; a guest hears only about nodes it may read")
    func guestVisibility() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            try fixture.createDomainHome(5, using: dom0)
            try dom0.mkdir("/backend")
            try guest.watch("/backend", token: "be")
            try guest.watch("device", token: "rel")  // relative: reported relative
            #expect(try nextEvent(guest) == XenStoreWatchEvent(path: "/backend", token: "be"))
            #expect(try nextEvent(guest) == XenStoreWatchEvent(path: "device", token: "rel"))

            try dom0.write("/backend/secret", "x")  // n0: not readable by domain 5
            try dom0.write("/local/domain/5/device/vbd/768", "1")
            try dom0.write("/backend/visible", "y")
            try dom0.setPermissions("/backend/visible", [.n(0), .r(5)])
            try dom0.write("/backend/visible", "z")
            let events = try queuedEvents(guest) { try ping(guest) }
            #expect(events == [
                XenStoreWatchEvent(path: "device/vbd/768", token: "rel"),
                XenStoreWatchEvent(path: "/backend/visible", token: "be"),  // the permission change
                XenStoreWatchEvent(path: "/backend/visible", token: "be"),  // the write after it
            ])
            // dom0 hears about everything.
            try dom0.watch("/backend", token: "all")
            try dom0.write("/backend/secret", "again")
            #expect(try queuedEvents(dom0) { try ping(dom0) } == [
                XenStoreWatchEvent(path: "/backend", token: "all"),
                XenStoreWatchEvent(path: "/backend/secret", token: "all"),
            ])
        }
    }

    @Test("@introduceDomain and @releaseDomain fire for dom0", arguments: ClientKind.allCases)
    func specialWatches(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let wire = try fixture.dom0SocketClient()
            try xs.watch("@introduceDomain", token: "in")
            try xs.watch("@releaseDomain", token: "out")
            #expect(try queuedEvents(xs) { try ping(xs) } == [
                XenStoreWatchEvent(path: "@introduceDomain", token: "in"),
                XenStoreWatchEvent(path: "@releaseDomain", token: "out"),
            ])
            try fixture.server.introduceDomain(3)  // from Swift
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "@introduceDomain", token: "in"))
            try wire.introduceDomain(4)            // XS_INTRODUCE
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "@introduceDomain", token: "in"))
            try wire.introduceDomain(4)            // already introduced: no event
            try wire.releaseDomain(4)              // XS_RELEASE
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "@releaseDomain", token: "out"))
            try fixture.server.releaseDomain(3)
            #expect(try nextEvent(xs) == XenStoreWatchEvent(path: "@releaseDomain", token: "out"))
            #expect(try queuedEvents(xs) { try ping(xs) } == [])
            // Only the two special paths exist.
            expectErrno(XenStoreError.invalid) { try xs.watch("@other", token: "x") }
        }
    }

    @Test("a guest gets no special events")
    func guestSpecialWatches() throws {
        try withLoopbackXenStore { fixture in
            let guest = try fixture.guest(5)
            try guest.watch("@introduceDomain", token: "in")
            #expect(try nextEvent(guest) == XenStoreWatchEvent(path: "@introduceDomain", token: "in"))
            try fixture.server.introduceDomain(6)
            #expect(try queuedEvents(guest) { try ping(guest) } == [])
        }
    }

    @Test("RESET_WATCHES drops the connection's watches")
    func resetWatches() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0SocketClient()
            try xs.watch("/z", token: "t")
            #expect(try nextEvent(xs)?.path == "/z")
            try xs.resetWatches()
            #expect(try queuedEvents(xs) { try xs.write("/z/1", "1") } == [])
            try xs.watch("/z", token: "t")  // may be registered again
        }
    }
}
