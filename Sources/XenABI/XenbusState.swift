/// enum xenbus_state (xen/io/xenbus.h): the `state` key of each end of a device.
public enum XenbusState: UInt32, Sendable, CustomStringConvertible {
    case unknown = 0
    case initialising = 1
    case initWait = 2
    case initialised = 3
    case connected = 4
    case closing = 5
    case closed = 6
    case reconfiguring = 7
    case reconfigured = 8

    public var description: String {
        switch self {
        case .unknown: "Unknown"
        case .initialising: "Initialising"
        case .initWait: "InitWait"
        case .initialised: "Initialised"
        case .connected: "Connected"
        case .closing: "Closing"
        case .closed: "Closed"
        case .reconfiguring: "Reconfiguring"
        case .reconfigured: "Reconfigured"
        }
    }

    /// Parses a xenstore `state` value ("4"); nil for anything malformed.
    public init?(xenstoreValue s: String) {
        guard let n = UInt32(s.trimmingSpaces), let v = XenbusState(rawValue: n) else { return nil }
        self = v
    }

    public var xenstoreValue: String { String(rawValue) }
}

extension String {
    var trimmingSpaces: Substring {
        var s = Substring(self)
        while s.first == " " || s.first == "\n" { s.removeFirst() }
        while s.last == " " || s.last == "\n" || s.last == "\0" { s.removeLast() }
        return s
    }
}
