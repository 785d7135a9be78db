/// `value` with `digits` decimals, without Foundation.
public func fixed(_ value: Double, _ digits: Int = 1) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let n = (abs(value) * scale).rounded()
    let whole = Int(n / scale)
    let frac = Int(n - Double(whole) * scale)
    var s = (value < 0 && n != 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let f = String(frac)
        s += "." + String(repeating: "0", count: max(0, digits - f.count)) + f
    }
    return s
}
