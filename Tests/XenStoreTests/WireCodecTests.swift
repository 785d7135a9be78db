import Hypervisor
import Testing
import XenABI
import XenStoreWire

@Suite("xenstore wire codec")
struct WireCodecTests {
    @Test("a message encodes as a little-endian xsd_sockmsg and its payload")
    func encode() {
        let message = XenStoreMessage(.write, requestID: 0x0102_0304, transactionID: 7, payload: Array("/a\u{0}v".utf8))
        #expect(message.encoded() == [
            11, 0, 0, 0,  4, 3, 2, 1,  7, 0, 0, 0,  4, 0, 0, 0,
            0x2F, 0x61, 0, 0x76,
        ])
    }

    @Test("the decoder waits for whole frames and keeps their order")
    func decodeInPieces() throws {
        let first = XenStoreMessage(.read, requestID: 1, payload: Array("/x\u{0}".utf8))
        let second = XenStoreMessage(rawType: 999, requestID: 2, transactionID: 3, payload: [])
        let stream = first.encoded() + second.encoded()
        var decoder = XenStoreFrameDecoder()
        var decoded: [XenStoreMessage] = []
        for byte in stream {
            decoder.append(contentsOf: [byte])
            while let message = try decoder.nextMessage() { decoded.append(message) }
        }
        #expect(decoded == [first, second])
        #expect(decoded[1].type == nil)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test("a frame longer than XENSTORE_PAYLOAD_MAX is an error; exactly the maximum is not")
    func payloadLimit() throws {
        var ok = XenStoreFrameDecoder()
        ok.append(contentsOf: XenStoreMessage(.write, payload: [UInt8](repeating: 1, count: 4096)).encoded())
        #expect(try ok.nextMessage()?.payload.count == 4096)

        var bad = XenStoreFrameDecoder()
        bad.append(contentsOf: XenStoreMessage(.write, payload: [UInt8](repeating: 1, count: 4097)).encoded())
        #expect(throws: XenStoreFrameError.payloadTooLong(4097)) { try bad.nextMessage() }
    }

    @Test("NUL-separated payloads")
    func payloads() {
        #expect(XenStorePayload.terminated(["a", "", "bc"]) == [0x61, 0, 0, 0x62, 0x63, 0])
        #expect(XenStorePayload.strings(Array("a\u{0}\u{0}bc\u{0}tail".utf8)) == ["a", "", "bc"])
        #expect(XenStorePayload.singleString(Array("/p\u{0}".utf8)) == "/p")
        #expect(XenStorePayload.singleString(Array("/p".utf8)) == nil)
        #expect(XenStorePayload.singleString(Array("/p\u{0}x\u{0}".utf8)) == nil)
        #expect(XenStorePayload.splitFirstString(Array("/p\u{0}v\u{0}w".utf8))! == ("/p", Array("v\u{0}w".utf8)))
        #expect(XenStorePayload.splitFirstString(Array("/p".utf8)) == nil)
        #expect(XenStorePayload.ok == Array("OK\u{0}".utf8))
        #expect(XenStorePayload.text(Array("12\u{0}".utf8)) == "12")
    }

    @Test("error replies carry errno names")
    func errors() {
        #expect(XenStorePayload.errorReply(errno: 2) == Array("ENOENT\u{0}".utf8))
        #expect(XenStorePayload.errorReply(errno: 11) == Array("EAGAIN\u{0}".utf8))
        #expect(XenStorePayload.errorReply(errno: 9999) == Array("EINVAL\u{0}".utf8))
        #expect(XenStorePayload.errno(fromErrorReply: Array("EACCES\u{0}".utf8)) == 13)
        #expect(XenStorePayload.errno(fromErrorReply: Array("EWHAT\u{0}".utf8)) == 22)
    }

    @Test("path validation and resolution")
    func paths() {
        let valid = ["/", "/a", "/local/domain/0/device/vbd/768/state", "/a-b_c.d@e", "/A9"]
        for path in valid { #expect(XenStorePath.resolve(path, domain: 3) == path, "\(path)") }
        let invalid = ["", "//", "/a/", "/a//b", "/a b", "/a\u{0}", "/é", "@", "@other", "/a*"]
        for path in invalid { #expect(XenStorePath.resolve(path, domain: 3) == nil, "\(path.debugDescription)") }
        #expect(XenStorePath.resolve("device/vif", domain: 3) == "/local/domain/3/device/vif")
        #expect(XenStorePath.resolve("a/", domain: 3) == nil)
        #expect(XenStorePath.resolve("@introduceDomain", domain: 0) == nil)
        #expect(XenStorePath.resolve("@introduceDomain", domain: 0, allowSpecial: true) == "@introduceDomain")
        #expect(XenStorePath.resolve("@releaseDomain", domain: 0, allowSpecial: true) == "@releaseDomain")

        let absolute = "/" + String(repeating: "x", count: XenStoreLimits.absolutePathMax - 1)
        #expect(XenStorePath.resolve(absolute, domain: 0) == absolute)
        #expect(XenStorePath.resolve(absolute + "x", domain: 0) == nil)
        let relative = String(repeating: "y", count: XenStoreLimits.relativePathMax)
        #expect(XenStorePath.resolve(relative, domain: 0) == "/local/domain/0/" + relative)
        #expect(XenStorePath.resolve(relative + "y", domain: 0) == nil)
    }

    @Test("path helpers")
    func pathHelpers() {
        #expect(XenStorePath.parent(of: "/a/b") == "/a")
        #expect(XenStorePath.parent(of: "/a") == "/")
        #expect(XenStorePath.parent(of: "/") == nil)
        #expect(XenStorePath.lastComponent(of: "/a/bc") == "bc")
        #expect(XenStorePath.child("x", of: "/") == "/x")
        #expect(XenStorePath.child("x", of: "/a") == "/a/x")
        #expect(XenStorePath.isSubpath("/a/b", of: "/a"))
        #expect(XenStorePath.isSubpath("/a", of: "/a"))
        #expect(!XenStorePath.isSubpath("/ab", of: "/a"))
        #expect(XenStorePath.isSubpath("/anything", of: "/"))
        #expect(!XenStorePath.isSubpath("@introduceDomain", of: "/"))
        #expect(XenStorePath.relative("/local/domain/4/device/vbd", toDomain: 4) == "device/vbd")
        #expect(XenStorePath.relative("/local/domain/4", toDomain: 4) == nil)
        #expect(XenStorePath.relative("/local/domain/40/x", toDomain: 4) == nil)
        #expect(XenStorePath.domainPath(of: 65) == "/local/domain/65")
    }

    @Test("permission lists")
    func permissionLists() {
        let perms = [XenStorePermission(domain: 0, access: .none), XenStorePermission(domain: 5, access: .read),
                     XenStorePermission(domain: 7, access: .both), XenStorePermission(domain: 9, access: .write)]
        #expect(XenStorePermissionList.encode(perms) == Array("n0\u{0}r5\u{0}b7\u{0}w9\u{0}".utf8))
        #expect(XenStorePermissionList.parse(["n0", "r5", "b7", "w9"]) == perms)
        #expect(XenStorePermissionList.parse([]) == nil)
        #expect(XenStorePermissionList.parse(["n0", "x1"]) == nil)
        #expect(XenStorePermissionList.parse(["r"]) == nil)
        #expect(XenStorePermissionList.parse(["r70000"]) == nil)
    }
}
