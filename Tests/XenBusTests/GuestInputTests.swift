import Testing
import XenABI
import XenBus

@Suite("strict numbers from xenstore")
struct XenStoreNumberTests {
    @Test("decimal digits in range are numbers; leading zeros are accepted")
    func accepted() {
        #expect(XenStoreNumber.parse("0", as: UInt32.self) == 0)
        #expect(XenStoreNumber.parse("8", as: UInt32.self) == 8)
        #expect(XenStoreNumber.parse("007", as: UInt32.self) == 7)
        #expect(XenStoreNumber.parse("4294967295", as: UInt32.self) == UInt32.max)
        #expect(XenStoreNumber.parse("65535", as: UInt16.self) == 65535)
        #expect(XenStoreNumber.parse("0000000000000000000000042", as: UInt8.self) == 42)
    }

    @Test("anything else is refused", arguments: [
        "", "+1", "-1", "-0", " 1", "1 ", "1\n", "1\0", "0x10", "1e3", "1.0", "1,0", "٣", "１", "4294967296",
        "99999999999999999999999",
    ])
    func refused(text: String) {
        #expect(XenStoreNumber.parse(text, as: UInt32.self) == nil)
    }

    @Test("a node's name has no leading zero")
    func names() {
        #expect(XenStoreNumber.parseName("51712", as: UInt32.self) == 51712)
        #expect(XenStoreNumber.parseName("0", as: UInt16.self) == 0)
        #expect(XenStoreNumber.parseName("07", as: UInt16.self) == nil)
        #expect(XenStoreNumber.parseName("00", as: UInt16.self) == nil)
        #expect(XenStoreNumber.parseName("+7", as: UInt16.self) == nil)
        #expect(BackendDeviceAddress.parse(path: "/r/007/51712/state", root: "/r", type: "vbd") == nil)
        #expect(BackendDeviceAddress.parse(path: "/r/7/51712/state", root: "/r", type: "vbd")
                == BackendDeviceAddress(type: "vbd", frontendDomain: 7, devid: 51712))
    }

    @Test("the range is the type's")
    func range() {
        #expect(XenStoreNumber.parse("65536", as: UInt16.self) == nil)
        #expect(XenStoreNumber.parse("256", as: UInt8.self) == nil)
        #expect(XenStoreNumber.parse("18446744073709551615", as: UInt64.self) == UInt64.max)
        #expect(XenStoreNumber.parse("18446744073709551616", as: UInt64.self) == nil)
    }
}

@Suite("guest text escaped for logs and error nodes")
struct GuestTextTests {
    @Test("printable ASCII is kept; backslash and quote are escaped")
    func printable() {
        #expect(GuestText.escaped("x86_64-abi") == "x86_64-abi")
        #expect(GuestText.escaped(#"a\b"c"#) == #"a\\b\"c"#)
        #expect(GuestText.quoted("ring") == #""ring""#)
    }

    @Test("control characters become visible escapes")
    func controls() {
        #expect(GuestText.escaped("x86_64-abi\n\u{1b}[31m") == #"x86_64-abi\n\x1b[31m"#)
        #expect(GuestText.escaped("\r\t\0\u{7f}\u{01}") == #"\r\t\x00\x7f\x01"#)
    }

    @Test("non-ASCII characters, C1 controls and the replacement character are escaped")
    func nonASCII() {
        #expect(GuestText.escaped("é") == #"\u{E9}"#)
        #expect(GuestText.escaped("\u{9b}31m") == #"\u{9B}31m"#)
        #expect(GuestText.escaped("a\u{202E}b") == #"a\u{202E}b"#)
        // What our xenstore clients make of invalid bytes (String(decoding:as:)).
        let decoded = String(decoding: [0x31, 0xff, 0x32] as [UInt8], as: UTF8.self)
        #expect(GuestText.escaped(decoded) == #"1\u{FFFD}2"#)
    }

    @Test("invalid UTF-8 bytes are shown one by one")
    func invalidUTF8() {
        #expect(GuestText.escaped(bytes: [0x61, 0xff, 0xc3, 0x62]) == #"a\xff\xc3b"#)
        #expect(GuestText.escaped(bytes: [0xe2, 0x82]) == #"\xe2\x82"#)
        #expect(GuestText.escaped(bytes: [0xed, 0xa0, 0x80]) == #"\xed\xa0\x80"#)   // a surrogate
        #expect(GuestText.escaped(bytes: []) == "")
    }

    @Test("long values are cut after 64 bytes, at a character boundary")
    func truncation() {
        let long = String(repeating: "a", count: 100)
        #expect(GuestText.escaped(long) == String(repeating: "a", count: 64) + "…")
        #expect(GuestText.escaped(String(repeating: "b", count: 64)) == String(repeating: "b", count: 64))
        // 63 bytes, then a two-byte character that would end past the limit.
        #expect(GuestText.escaped(String(repeating: "c", count: 63) + "é") == String(repeating: "c", count: 63) + "…")
        #expect(GuestText.escaped("abcdef", limit: 3) == "abc…")
    }
}

@Suite("the backend's reaction to its frontend's state")
struct FrontendStateReactionTests {
    func reaction(_ fe: XenbusState?, _ be: XenbusState, mayOfferAgain: Bool = true) -> FrontendStateReaction {
        FrontendStateReaction(frontend: fe, backend: be, mayOfferAgain: mayOfferAgain)
    }

    @Test("Initialised or Connected connects a backend in InitWait, and only then")
    func connect() {
        #expect(reaction(.initialised, .initWait) == .connect)
        #expect(reaction(.connected, .initWait) == .connect)
        #expect(reaction(.connected, .connected) == FrontendStateReaction.none)
        #expect(reaction(.initialised, .closed) == FrontendStateReaction.none)
        #expect(reaction(.connected, .closing) == FrontendStateReaction.none)
    }

    @Test("Closing is answered with Closing; Closed (or gone, or Unknown) with Closed")
    func close() {
        #expect(reaction(.closing, .connected) == .close(.closing))
        #expect(reaction(.closing, .initWait) == .close(.closing))
        #expect(reaction(.closing, .closing) == FrontendStateReaction.none)
        #expect(reaction(.closing, .closed) == FrontendStateReaction.none)
        #expect(reaction(.closed, .closing) == .close(.closed))
        #expect(reaction(.closed, .connected) == .close(.closed))
        #expect(reaction(nil, .connected) == .close(.closed))
        #expect(reaction(.unknown, .initWait) == .close(.closed))
        #expect(reaction(.closed, .closed) == FrontendStateReaction.none)
    }

    @Test("Initialising after a close or a failure offers the device again, unless it cannot work")
    func offerAgain() {
        #expect(reaction(.initialising, .closed) == .offerAgain)
        #expect(reaction(.initialising, .closing) == .offerAgain)
        #expect(reaction(.initialising, .closed, mayOfferAgain: false) == FrontendStateReaction.none)
        #expect(reaction(.initialising, .initWait) == FrontendStateReaction.none)
        #expect(reaction(.initialising, .connected) == FrontendStateReaction.none)
        #expect(reaction(.initWait, .closed) == FrontendStateReaction.none)
    }
}
