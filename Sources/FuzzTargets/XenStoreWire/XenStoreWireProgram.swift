import Hypervisor
import XenABI
import XenStoreWire

/// One step of a xenstore-wire program (docs/FUZZING.md has the byte layout).
enum XenStoreWireStep {
    /// Bytes appended to the guest's input stream as they are.
    case raw([UInt8])
    /// Requests built from fuzzer choices, sent back to back in one write.
    case requests([XenStoreMessage])
    case dom0(XenStoreWireDom0Action)
    /// The guest stops (or starts again) reading its replies: they queue in the server.
    case toggleGuestReading
    /// The guest hangs up and connects again.
    case reconnect

    static func decode(_ input: inout FuzzInput, lastTransactionID: UInt32) -> XenStoreWireStep {
        switch input.choice(5) {
        case 0: return .raw(input.bytes(Int(input.uint16()) % 8193))
        case 1: return .requests(XenStoreWireRequestBuilder.decode(&input, lastTransactionID: lastTransactionID))
        case 2: return .dom0(XenStoreWireDom0Action.decode(&input))
        case 3: return .toggleGuestReading
        default: return .reconnect
        }
    }
}

/// What dom0 does between the guest's steps: a write, a removal or new
/// permissions on one of a few nodes, in and out of the guest's reach.
struct XenStoreWireDom0Action {
    enum Kind { case write([UInt8]), remove, setPermissions([XenStorePermission]) }
    var path: String
    var kind: Kind

    static let paths = [
        "/protected/k", "/protected/new", "/local/domain/5/x", "/local/domain/5/dom0-owned",
        "/local/domain/5/data/deep/er", "/local/domain/5", "/shared/s", "/readable/k",
        "/local/domain/7/secret", "/writeonly/w",
    ]
    static let permissionSets: [[XenStorePermission]] = [
        [.init(domain: 0, access: .none)], [.init(domain: 7, access: .none)],
        [.init(domain: 0, access: .none), .init(domain: 5, access: .read)],
        [.init(domain: 0, access: .none), .init(domain: 5, access: .write)],
        [.init(domain: 0, access: .none), .init(domain: 5, access: .both)],
        [.init(domain: 5, access: .none)], [.init(domain: 0, access: .read)],
        [.init(domain: 0, access: .none), .init(domain: 7, access: .read)],
    ]

    static func decode(_ input: inout FuzzInput) -> XenStoreWireDom0Action {
        let kind = input.choice(3)
        let path = paths[input.choice(paths.count)]
        switch kind {
        case 0: return XenStoreWireDom0Action(path: path, kind: .write(input.bytes(input.choice(64))))
        case 1: return XenStoreWireDom0Action(path: path, kind: .remove)
        default: return XenStoreWireDom0Action(path: path, kind: .setPermissions(permissionSets[input.choice(permissionSets.count)]))
        }
    }
}

/// Well-formed (or nearly: a missing NUL, a bad number) requests from
/// fuzzer choices, so that the fuzzer reaches transactions, watches,
/// permissions and quotas without having to invent the framing.
enum XenStoreWireRequestBuilder {
    /// Paths a guest names: its own nodes, others', special, invalid, too long.
    static let paths: [String] = [
        "", "data", "data/x", "dom0-owned", "readonly", "device/vbd/51712/state",
        "/local/domain/5", "/local/domain/5/data", "/local/domain/5/dom0-owned", "/local/domain/5/readonly",
        "/local/domain/7", "/local/domain/7/secret", "/local/domain/0", "/local/domain", "/",
        "/protected", "/protected/k", "/readable", "/readable/k", "/shared", "/shared/s",
        "/writeonly", "/writeonly/w", "/tool/xenstored", "@introduceDomain", "@releaseDomain", "@bogus",
        "//x", "data/", "bad char!", String(repeating: "a", count: 2049),
        "/" + String(repeating: "b/", count: 1536) + "c",
    ]
    static let permissionStrings = ["n5", "r5", "w5", "b5", "n0", "b0", "r7", "n7", "b7", "x5", "", "n65535", "n70000", "r-1"]
    static let domainStrings = ["5", "7", "0", "65535", "70000", "-1", "x", ""]
    static let repeatCounts = [1, 1, 1, 1, 2, 16, 200, 1100]
    static let valueSizes = [0, 1, 8, 100, 2047, 2048, 2049, 4000]

    static func decode(_ input: inout FuzzInput, lastTransactionID: UInt32) -> [XenStoreMessage] {
        let typeChoice = input.choice(24)
        let rawType = typeChoice == 23 ? input.uint32() : UInt32(typeChoice)
        let requestID = input.uint32()
        let transactionID: UInt32 = switch input.choice(4) {
        case 0: 0
        case 1: lastTransactionID
        case 2: input.uint32()
        default: lastTransactionID &+ 1
        }
        let count = repeatCounts[input.choice(repeatCounts.count)]
        // The fields are decoded once; a repetition differs only in a "/n<i>" suffix.
        let fields = PayloadFields.decode(&input, rawType: rawType)
        // Repetitions stop at 256 KiB, what the server reads from a socket in one wake-up.
        var messages: [XenStoreMessage] = []
        var size = 0
        for index in 0..<count where size < 256 * 1024 {
            let message = XenStoreMessage(rawType: rawType, requestID: requestID &+ UInt32(index), transactionID: transactionID,
                                          payload: fields.payload(index: index))
            size += XenStoreMessageHeader.size + message.payload.count
            messages.append(message)
        }
        return messages
    }

    /// The decoded choices of one payload.
    struct PayloadFields {
        var hasPath = false
        var path: [UInt8] = []
        var pathSuffix: Suffix = .none
        var omitNUL = false
        var rest: [[UInt8]] = []

        enum Suffix { case none, indexed, bytes([UInt8]) }

        static func decode(_ input: inout FuzzInput, rawType: UInt32) -> PayloadFields {
            var fields = PayloadFields()
            func text(_ s: String) -> [UInt8] { Array(s.utf8) }
            func choose(_ options: [String]) -> [UInt8] { text(options[input.choice(options.count)]) }
            func takePath() {
                fields.hasPath = true
                fields.path = text(paths[input.choice(paths.count)])
                switch input.choice(4) {
                case 0: fields.pathSuffix = .none
                case 1: fields.pathSuffix = .indexed
                case 2: fields.pathSuffix = .bytes(input.bytes(input.choice(16)).map { UInt8(ascii: "a") + $0 % 26 })
                default: fields.pathSuffix = .bytes(input.bytes(input.choice(16)))
                }
                fields.omitNUL = input.choice(8) == 0
            }
            switch XenStoreMessageType(rawValue: rawType) {
            case .read, .directory, .getPerms, .mkdir, .rm:
                takePath()
            case .write:
                takePath()
                let size = valueSizes[input.choice(valueSizes.count)]
                fields.rest = [[UInt8](repeating: input.uint8(), count: size)]
            case .setPerms:
                takePath()
                fields.rest = (0..<input.choice(5)).map { _ in choose(permissionStrings) + [0] }
            case .watch, .unwatch:
                takePath()
                fields.rest = [choose(["t0", "t1", "", "tok"]) + [0]]
            case .transactionStart:
                fields.rest = [input.bool() ? [0] : []]
            case .transactionEnd:
                fields.rest = [choose(["T\0", "F\0", "X\0", "T"])]
            case .directoryPart:
                takePath()
                fields.rest = [choose(["0", "1", "5", "4096", "-1", "abc", "99999999999999999999"]) + [0]]
            case .getDomainPath, .isDomainIntroduced, .release, .resume:
                fields.rest = [choose(domainStrings) + [0]]
            case .introduce:
                fields.rest = [choose(domainStrings) + [0], text("123\0"), text("4\0")]
            case .setTarget:
                fields.rest = [choose(domainStrings) + [0], choose(domainStrings) + [0]]
            case .control:
                fields.rest = [choose(["check\0", "print\0x\0", ""])]
            case .resetWatches:
                break
            case .watchEvent, .error, .invalid, nil:
                fields.rest = [input.bytes(Int(input.uint8()))]
            }
            return fields
        }

        /// The payload of repetition `index`: the path (if any), its NUL, the other fields.
        func payload(index: Int) -> [UInt8] {
            var bytes = path
            switch pathSuffix {
            case .none: break
            case .indexed: bytes += Array("/n\(index)".utf8)
            case .bytes(let suffix): bytes += [UInt8(ascii: "/")] + suffix
            }
            if hasPath && !omitNUL { bytes.append(0) }
            for field in rest { bytes += field }
            return bytes
        }
    }
}
