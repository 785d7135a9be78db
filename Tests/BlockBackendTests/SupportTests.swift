@testable import BlockBackend
import BlockFrontend
import Foundation
import Glibc
import Testing

@Suite("the data path's fixed hash map")
struct FixedHashMapTests {
    @Test("random inserts and removals agree with a Dictionary, including long probe chains", arguments: [4, 32, 512])
    func agreesWithDictionary(capacity: Int) {
        var map = FixedHashMap<UInt64>(capacity: capacity)
        var model: [UInt64: UInt64] = [:]
        var rng = Xorshift(seed: UInt64(capacity))
        // Few distinct keys, many of them colliding (multiples of a power of two).
        let keys = (0..<(capacity * 2)).map { UInt64($0) << 20 }
        for step in 0..<20_000 {
            let key = keys[Int(rng.next() % UInt64(keys.count))]
            if rng.next() % 2 == 0 {
                let inserted = map.insert(key, UInt64(step))   // outside #expect: the map is ~Copyable
                let expected = model[key] == nil && model.count < capacity
                #expect(inserted == expected)
                if expected { model[key] = UInt64(step) }
            } else {
                let removed = map.remove(key)
                #expect(removed == model.removeValue(forKey: key))
            }
            let count = map.count
            #expect(count == model.count)
        }
        for key in keys {
            let value = map[key]
            #expect(value == model[key])
        }
        map.removeAll()
        let emptied = map.count == 0 && keys.allSatisfy { map[$0] == nil }
        #expect(emptied)
        // Emptied, it takes a full load again.
        var refilled = 0
        for key in keys.prefix(capacity) where map.insert(key, key) { refilled += 1 }
        let found = keys.prefix(capacity).allSatisfy { map[$0] == $0 }
        #expect(refilled == capacity && found)
    }

    @Test("in-flight ids refuse a duplicate until it is answered")
    func inFlightIDs() {
        var ids = InFlightIDs(capacity: 32)
        let first = ids.insert(7), duplicate = ids.insert(7), other = ids.insert(UInt64.max)
        ids.remove(7)
        let again = ids.insert(7)
        let count = ids.count
        #expect(first && !duplicate && other && again)
        #expect(count == 2)
    }
}

@Suite("loopback layout")
struct LoopbackLayoutTests {
    @Test("the layout names the per-domain xenstore socket the way the server creates it")
    func domainSocketNaming() throws {
        let bed = try TestBed()
        defer { bed.close() }
        _ = try bed.host.createGuest(5)
        #expect(bed.host.server?.domainSocketPath(for: 5) == bed.host.layout.xenStoreDomainSocket(5))
        #expect(access(bed.host.layout.xenStoreDomainSocket(5), F_OK) == 0)
    }
}

@Suite("kernel backend check")
struct KernelBackendCheckTests {
    @Test("a registered xen-blkback driver is a reason to refuse vbds, named in one line")
    func refusesWhenKernelDriverIsThere() throws {
        var template = Array("/tmp/xenbackd-sysfs-XXXXXX".utf8CString)
        let root = String(cString: mkdtemp(&template)!)
        defer { _ = try? FileManager.default.removeItem(atPath: root) }
        #expect(KernelBackendCheck.refusal(type: "vbd", sysfs: root) == nil)
        try FileManager.default.createDirectory(atPath: root + "/bus/xen-backend/drivers/vbd", withIntermediateDirectories: true)
        let reason = KernelBackendCheck.refusal(type: "vbd", sysfs: root)
        #expect(reason?.hasPrefix("xen-blkback is loaded") == true)
        #expect(reason?.contains("\n") == false)
        #expect(KernelBackendCheck.refusal(type: "vif", sysfs: root) == nil)
    }
}
