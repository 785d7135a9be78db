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
}
