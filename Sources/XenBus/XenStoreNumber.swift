/// Numbers a guest or the toolstack wrote in xenstore (`ring-ref`,
/// `event-channel`, `state`, `frontend-id`, a device's directory name...),
/// parsed strictly: ASCII decimal digits only, at least one, nothing else
/// (no sign, no space, no `0x`, no trailing byte) and within the type's
/// range. Linux's xenbus_scanf ("%u", "%d") is laxer (leading spaces,
/// signs); we are deliberately stricter. Leading zeros are accepted ("007"
/// is 7), as every C parser of these keys accepts them. Swift's
/// `UInt32(String)` is not used on such input: it takes "+5".
public enum XenStoreNumber {
    public static func parse<T: FixedWidthInteger & UnsignedInteger>(_ text: some StringProtocol, as type: T.Type = T.self) -> T? {
        var value: T = 0
        var digits = 0
        for byte in text.utf8 {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(T(byte - UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            value = sum
            digits += 1
        }
        return digits > 0 ? value : nil
    }

    /// A number that is a node's name (a domain id or devid in a device's
    /// path): as `parse`, but without leading zeros, so that "007" cannot
    /// stand for the node "7" when the path is built again.
    public static func parseName<T: FixedWidthInteger & UnsignedInteger>(_ text: some StringProtocol, as type: T.Type = T.self) -> T? {
        guard let n = parse(text, as: T.self), text.utf8.count == String(n).utf8.count else { return nil }
        return n
    }
}
