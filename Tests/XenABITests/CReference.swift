import Testing
import XenABIReference

/// The values Xen's C headers give (XenABIReference, compiled against <xen/...>).
enum CReference {
    /// Every entry of xen_abi_reference_table(), by its C spelling.
    static let table: [String: Int64] = {
        var count = 0
        guard let p = xen_abi_reference_table(&count) else { return [:] }
        var d: [String: Int64] = [:]
        for i in 0..<count {
            d[String(cString: p[i].name)] = p[i].value
        }
        return d
    }()

    /// xsd_errors[] in header order.
    static let xsdErrors: [(name: String, errno: Int32)] = {
        var count = 0
        guard let p = xen_abi_reference_xsd_errors(&count) else { return [] }
        return (0..<count).map { (String(cString: p[$0].errstring), Int32(p[$0].errnum)) }
    }()
}

/// One claim of the Swift side: the C expression `c` has the value `swift`.
struct Claim: Sendable, CustomStringConvertible {
    var c: String
    var swift: Int64
    /// The Swift declaration that makes the claim.
    var declaration: String

    init(_ c: String, _ swift: some BinaryInteger, _ declaration: String) {
        self.c = c
        self.swift = Int64(swift)
        self.declaration = declaration
    }

    var description: String { "\(c) <-> \(declaration)" }
}

/// Claims for a C struct's size, and each field's offset and size.
struct StructClaims {
    let type: String
    var claims: [Claim] = []

    init(_ type: String, size: Int, _ declaration: String) {
        self.type = type
        claims.append(Claim("sizeof(\(type))", size, declaration))
    }

    /// `impliedSize`: XenABI declares only the offset; the size claimed is
    /// the distance to the next declared offset (or the end of the struct).
    mutating func field(_ name: String, offset: Int, size: Int, _ declaration: String, impliedSize: Bool = false) {
        claims.append(Claim("offsetof(\(type), \(name))", offset, declaration))
        claims.append(Claim("fieldsize(\(type), \(name))", size,
                            impliedSize ? "\(declaration) up to the next offset" : "size of \(declaration)"))
    }
}

/// Records one issue per claim that is missing from the C table or differs.
func check(_ claims: [Claim], sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(!claims.isEmpty, sourceLocation: sourceLocation)
    for claim in claims {
        guard let c = CReference.table[claim.c] else {
            Issue.record("no C reference value for \(claim.c) (claimed by \(claim.declaration))",
                         sourceLocation: sourceLocation)
            continue
        }
        #expect(claim.swift == c,
                "\(claim.c): C says \(c), Swift \(claim.declaration) says \(claim.swift)",
                sourceLocation: sourceLocation)
    }
}

/// A small deterministic generator (xorshift64*) for the round-trip tests.
struct XorShift: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}

/// A buffer for one wire struct, pre-filled with a poison byte so that any
/// byte an encoder forgets to write shows up in the comparison.
final class WireBuffer {
    let count: Int
    let pointer: UnsafeMutableRawPointer

    init(_ count: Int, poison: UInt8 = 0xA5) {
        self.count = count
        pointer = .allocate(byteCount: count, alignment: 16)
        pointer.initializeMemory(as: UInt8.self, repeating: poison, count: count)
    }

    deinit { pointer.deallocate() }

    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: pointer, count: count)) }
}

/// Describes where two byte images differ, for failure messages.
func byteDiff(_ a: [UInt8], _ b: [UInt8]) -> String {
    guard a.count == b.count else { return "lengths \(a.count) vs \(b.count)" }
    let diffs = a.indices.filter { a[$0] != b[$0] }
    if diffs.isEmpty { return "identical" }
    return diffs.prefix(8).map { "byte \($0): \(a[$0]) vs \(b[$0])" }.joined(separator: ", ")
        + (diffs.count > 8 ? " (+\(diffs.count - 8) more)" : "")
}
