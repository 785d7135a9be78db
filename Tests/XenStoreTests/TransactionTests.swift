import Hypervisor
import Testing
import XenStoreClient

@Suite("xenstore transactions")
struct TransactionTests {
    @Test("changes are private until commit", arguments: ClientKind.allCases)
    func commit(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let observer = try fixture.dom0()
            try xs.write("/tx/old", "1")
            let t = try xs.startTransaction()
            #expect(t != .none)
            try xs.write("/tx/new", "2", transaction: t)
            try xs.remove("/tx/old", transaction: t)
            #expect(try xs.read("/tx/new", transaction: t) == "2")
            #expect(try xs.read("/tx/old", transaction: t) == nil)
            #expect(try xs.directory("/tx", transaction: t) == ["new"])
            #expect(try observer.read("/tx/new") == nil)
            #expect(try observer.read("/tx/old") == "1")
            try xs.endTransaction(t, commit: true)
            #expect(try observer.read("/tx/new") == "2")
            #expect(try observer.read("/tx/old") == nil)
            #expect(try observer.directory("/tx") == ["new"])
        }
    }

    @Test("abort discards the changes", arguments: ClientKind.allCases)
    func abort(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let t = try xs.startTransaction()
            try xs.write("/tx/a", "1", transaction: t)
            try xs.endTransaction(t, commit: false)
            #expect(try xs.read("/tx/a") == nil)
            #expect(try xs.directory("/tx") == nil)
            expectErrno(XenStoreError.noEntry) { try xs.endTransaction(t, commit: true) }  // gone
        }
    }

    @Test("a change to a node the transaction read fails the commit with EAGAIN", arguments: ClientKind.allCases)
    func conflictOnRead(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let other = try fixture.dom0()
            let t = try xs.startTransaction()
            #expect(try xs.read("/tx/flag", transaction: t) == nil)
            try other.write("/tx/flag", "set")
            try xs.write("/tx/result", "computed", transaction: t)
            expectErrno(XenStoreError.again) { try xs.endTransaction(t, commit: true) }
            #expect(try other.read("/tx/result") == nil)
            #expect(try other.read("/tx/flag") == "set")
        }
    }

    @Test("a new child of a listed directory fails the commit; unrelated changes do not")
    func conflictOnDirectory() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let other = try fixture.dom0()
            try xs.write("/dir/a", "1")
            // Created beforehand: adding a child to "/" would be a change to "/" that both sides make.
            try xs.write("/unrelated", "")
            try xs.write("/summary", "")
            let t = try xs.startTransaction()
            #expect(try xs.directory("/dir", transaction: t) == ["a"])
            try other.write("/unrelated", "x")
            try other.write("/dir/a", "changed value, same listing")
            try xs.write("/summary", "1 child", transaction: t)
            try xs.endTransaction(t, commit: true)
            #expect(try other.read("/summary") == "1 child")

            let t2 = try xs.startTransaction()
            #expect(try xs.directory("/dir", transaction: t2) == ["a"])
            try other.write("/dir/b", "2")
            try xs.write("/summary", "still 1 child", transaction: t2)
            expectErrno(XenStoreError.again) { try xs.endTransaction(t2, commit: true) }
            #expect(try other.read("/summary") == "1 child")
        }
    }

    @Test("two transactions writing the same node: the second commit fails")
    func writeWriteConflict() throws {
        try withLoopbackXenStore { fixture in
            let a = try fixture.dom0()
            let b = try fixture.dom0(.libxenstore)
            let ta = try a.startTransaction()
            let tb = try b.startTransaction()
            try a.write("/n", "from a", transaction: ta)
            try b.write("/n", "from b", transaction: tb)
            try a.endTransaction(ta, commit: true)
            expectErrno(XenStoreError.again) { try b.endTransaction(tb, commit: true) }
            #expect(try b.read("/n") == "from a")
        }
    }

    @Test("withTransaction retries a conflicting body", arguments: ClientKind.allCases)
    func retry(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let other = try fixture.dom0()
            try xs.write("/counter", "10")
            var attempts = 0
            let result = try xs.withTransaction { t throws(XenStoreError) -> Int in
                attempts += 1
                let value = Int(try xs.read("/counter", transaction: t) ?? "0")!
                if attempts == 1 { try other.write("/counter", "20") }  // a concurrent change
                try xs.write("/counter", String(value + 1), transaction: t)
                return value + 1
            }
            #expect(attempts == 2)
            #expect(result == 21)
            #expect(try xs.read("/counter") == "21")
        }
    }

    @Test("concurrent increments through transactions lose no update")
    func concurrentIncrements() throws {
        try withLoopbackXenStore { fixture in
            let clients = [try fixture.dom0(.socketClient), try fixture.dom0(.libxenstore), try fixture.dom0(.socketClient)]
            try clients[0].write("/count", "0")
            let failures = Locked<[String]>([])
            let threads = clients.map { client in
                TestThread {
                    do {
                        for _ in 0..<40 {
                            _ = try client.withTransaction(maxAttempts: 1000) { t throws(XenStoreError) in
                                let value = Int(try client.read("/count", transaction: t)!)!
                                try client.write("/count", String(value + 1), transaction: t)
                            }
                        }
                    } catch {
                        failures.withLock { $0.append("\(error)") }
                    }
                }
            }
            for thread in threads { thread.join() }
            #expect(failures.withLock { $0 } == [])
            #expect(try clients[0].read("/count") == "120")
        }
    }

    @Test("watches fire when a transaction commits, not before")
    func watchesOnCommit() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let watcher = try fixture.dom0()
            try watcher.watch("/tw", token: "t")
            #expect(try nextEvent(watcher)?.path == "/tw")
            let t = try xs.startTransaction()
            try xs.write("/tw/a", "1", transaction: t)
            #expect(try queuedEvents(watcher) { try ping(watcher) } == [])
            try xs.endTransaction(t, commit: true)
            #expect(try queuedEvents(watcher) { try ping(watcher) } == [XenStoreWatchEvent(path: "/tw/a", token: "t")])
            let aborted = try xs.startTransaction()
            try xs.write("/tw/b", "1", transaction: aborted)
            try xs.endTransaction(aborted, commit: false)
            #expect(try queuedEvents(watcher) { try ping(watcher) } == [])
        }
    }

    @Test("transaction ids belong to their connection")
    func foreignTransaction() throws {
        try withLoopbackXenStore { fixture in
            let a = try fixture.dom0()
            let b = try fixture.dom0()
            let t = try a.startTransaction()
            expectErrno(XenStoreError.noEntry) { try b.write("/x", "1", transaction: t) }
            expectErrno(XenStoreError.noEntry) { try b.endTransaction(t, commit: true) }
            // (A read would report ENOENT as a missing node: the protocol cannot tell them apart.)
            expectErrno(XenStoreError.noEntry) { try a.write("/x", "1", transaction: XenStoreTransaction(id: 999_999)) }
            try a.endTransaction(t, commit: true)
        }
    }

    @Test("a guest's transactions see its permissions")
    func guestTransaction() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            let guest = try fixture.guest(5)
            try fixture.createDomainHome(5, using: dom0)
            try guest.withTransaction { t throws(XenStoreError) in
                try guest.write("device/vif/0/state", "1", transaction: t)
                try guest.write("device/vif/0/mac", "00:16:3e:00:00:01", transaction: t)
            }
            #expect(try dom0.read("/local/domain/5/device/vif/0/mac") == "00:16:3e:00:00:01")
            #expect(try dom0.permissions("/local/domain/5/device/vif/0/mac") == [.n(5)])
            let t = try guest.startTransaction()
            expectErrno(XenStoreError.accessDenied) { try guest.write("/elsewhere", "1", transaction: t) }
            try guest.endTransaction(t, commit: true)
        }
    }

    // MARK: Conflicts only on nodes looked at (C xenstored's rule)

    @Test("two transactions changing different nodes, interleaved, both commit", arguments: ClientKind.allCases)
    func disjointTransactionsBothCommit(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let a = try fixture.dom0(kind)
            let b = try fixture.dom0(kind)
            try a.write("/d/a", "0")
            try a.write("/d/b", "0")
            let ta = try a.startTransaction()
            let tb = try b.startTransaction()
            #expect(try a.read("/d/a", transaction: ta) == "0")
            #expect(try b.read("/d/b", transaction: tb) == "0")
            try a.write("/d/a", "1", transaction: ta)
            try b.write("/d/b", "1", transaction: tb)
            try a.write("/d/new-a", "x", transaction: ta)   // siblings created under one directory
            try b.write("/d/new-b", "y", transaction: tb)
            try a.endTransaction(ta, commit: true)
            try b.endTransaction(tb, commit: true)
            #expect(try a.read("/d/a") == "1")
            #expect(try a.read("/d/b") == "1")
            #expect(Set(try a.directory("/d") ?? []) == ["a", "b", "new-a", "new-b"])
        }
    }

    @Test("a node read in the transaction and changed by another before commit: EAGAIN", arguments: ClientKind.allCases)
    func readThenChangedConflicts(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let other = try fixture.dom0()
            try xs.write("/r/n", "before")
            let t = try xs.startTransaction()
            #expect(try xs.read("/r/n", transaction: t) == "before")
            try other.write("/r/n", "changed")
            try xs.write("/r/out", "derived", transaction: t)
            expectErrno(XenStoreError.again) { try xs.endTransaction(t, commit: true) }
            #expect(try other.read("/r/out") == nil)
        }
    }

    @Test("a node found missing in the transaction and created by another before commit: EAGAIN", arguments: ClientKind.allCases)
    func missingThenCreatedConflicts(kind: ClientKind) throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0(kind)
            let other = try fixture.dom0()
            try xs.mkdir("/m")
            let t = try xs.startTransaction()
            #expect(try xs.read("/m/lock", transaction: t) == nil)
            try other.write("/m/lock", "taken")
            try xs.write("/m/lock", "mine", transaction: t)
            expectErrno(XenStoreError.again) { try xs.endTransaction(t, commit: true) }
            #expect(try other.read("/m/lock") == "taken")
        }
    }

    @Test("a change made before the transaction first looks at a node is no conflict: the look sees it")
    func changeBeforeFirstLookIsNoConflict() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let other = try fixture.dom0()
            try xs.write("/f/n", "old")
            let t = try xs.startTransaction()
            try other.write("/f/n", "new")
            #expect(try xs.read("/f/n", transaction: t) == "new")
            try xs.write("/f/copy", "new", transaction: t)
            try xs.endTransaction(t, commit: true)
            #expect(try other.read("/f/copy") == "new")
        }
    }

    @Test("a directory a transaction creates under, removed or given other permissions meanwhile: EAGAIN")
    func parentChangedUnderCreateConflicts() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let other = try fixture.dom0()
            try xs.mkdir("/p/gone")
            let t1 = try xs.startTransaction()
            try xs.write("/p/gone/child", "1", transaction: t1)
            try other.remove("/p/gone")
            expectErrno(XenStoreError.again) { try xs.endTransaction(t1, commit: true) }
            #expect(try other.directory("/p/gone") == nil)

            try xs.mkdir("/p/kept")
            let t2 = try xs.startTransaction()
            try xs.write("/p/kept/child", "1", transaction: t2)
            try other.setPermissions("/p/kept", [.n(0), .r(5)])
            expectErrno(XenStoreError.again) { try xs.endTransaction(t2, commit: true) }
            #expect(try other.directory("/p/kept") == [])
        }
    }

    @Test("a listed directory that gains a child elsewhere conflicts, though creating siblings does not")
    func listedDirectoryStillConflicts() throws {
        try withLoopbackXenStore { fixture in
            let xs = try fixture.dom0()
            let other = try fixture.dom0()
            try xs.mkdir("/l")
            let t = try xs.startTransaction()
            #expect(try xs.directory("/l", transaction: t) == [])
            try xs.write("/l/mine", "1", transaction: t)
            try other.write("/l/theirs", "1")
            expectErrno(XenStoreError.again) { try xs.endTransaction(t, commit: true) }
            #expect(try other.directory("/l") == ["theirs"])
        }
    }

    /// What a toolstack starting a hundred guests at once does: one
    /// transaction per device, each writing its own backend and frontend
    /// directories (under /local/domain/0/backend/vbd, shared by all).
    @Test("100 transactions open at once on disjoint device directories all commit without EAGAIN")
    func hundredDisjointDeviceTransactions() throws {
        try withLoopbackXenStore { fixture in
            let dom0 = try fixture.dom0()
            try dom0.mkdir("/local/domain/0/backend/vbd")
            let clients = try (0..<100).map { i in try i % 2 == 0 ? fixture.dom0(.socketClient) : fixture.dom0(.libxenstore) }
            var open: [XenStoreTransaction] = []
            for (i, xs) in clients.enumerated() {
                let d = i + 1
                let t = try xs.startTransaction()
                open.append(t)
                let be = "/local/domain/0/backend/vbd/\(d)/51712", fe = "/local/domain/\(d)/device/vbd/51712"
                #expect(try xs.read(be + "/state", transaction: t) == nil)
                try xs.mkdir(fe, transaction: t)
                try xs.setPermissions(fe, [.n(UInt32(d)), .r(0)], transaction: t)
                for (k, v) in [("backend", be), ("state", "1"), ("virtual-device", "51712")] {
                    try xs.write(fe + "/" + k, v, transaction: t)
                }
                try xs.mkdir(be, transaction: t)
                for (k, v) in [("frontend", fe), ("params", "/tmp/disk\(d)"), ("state", "1"), ("mode", "w")] {
                    try xs.write(be + "/" + k, v, transaction: t)
                }
            }
            var again = 0
            for (xs, t) in zip(clients, open) {
                do { try xs.endTransaction(t, commit: true) } catch let error as XenStoreError where error.isAgain { again += 1 }
            }
            #expect(again == 0)
            #expect(try dom0.directory("/local/domain/0/backend/vbd")?.count == 100)
            #expect(try dom0.read("/local/domain/100/device/vbd/51712/state") == "1")
            #expect(try dom0.read("/local/domain/0/backend/vbd/57/51712/params") == "/tmp/disk57")
        }
    }

    @Test("100 threads adding devices in transactions at once: none needs a retry")
    func hundredConcurrentDeviceTransactions() throws {
        try withLoopbackXenStore { fixture in
            let clients = try (0..<100).map { _ in try fixture.dom0(.socketClient) }
            try clients[0].mkdir("/local/domain/0/backend/vif")
            let attempts = Locked<[Int]>([])
            let threads = clients.enumerated().map { i, xs in
                TestThread {
                    let d = i + 1
                    var tries = 0
                    do {
                        try xs.withTransaction(maxAttempts: 1) { t throws(XenStoreError) in
                            tries += 1
                            let be = "/local/domain/0/backend/vif/\(d)/0"
                            try xs.mkdir(be, transaction: t)
                            for k in ["frontend", "mac", "bridge", "state", "online", "handle"] {
                                try xs.write(be + "/" + k, "v", transaction: t)
                            }
                        }
                    } catch {
                        tries = -tries
                    }
                    attempts.withLock { $0.append(tries) }
                }
            }
            for thread in threads { thread.join() }
            #expect(attempts.withLock { $0 }.sorted() == [Int](repeating: 1, count: 100))
            #expect(try clients[0].directory("/local/domain/0/backend/vif")?.count == 100)
        }
    }
}
