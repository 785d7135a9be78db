import Foundation
import Testing

/// docs/ARCHITECTURE.md's module table is a promise about the code: every
/// module of Sources is in it, and what each may depend on covers both
/// what Package.swift declares and what its files import.
@Suite("docs/ARCHITECTURE.md's module table against Package.swift and the imports in Sources")
struct ModuleTableTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// Modules from outside the package (their products), and the system's.
    static let external: Set<String> = ["Logging", "Metrics", "ArgumentParser", "Glibc", "Foundation", "Testing",
                                        "Synchronization", "Dispatch", "FoundationEssentials", "SystemPackage",
                                        "Prometheus", "NIOCore", "NIOPosix", "NIOHTTP1"]

    struct Allowed {
        var modules: Set<String>
        var any: Bool   // "the above" / "everything"
    }

    /// module -> what the table lets it depend on.
    static func table() throws -> [String: Allowed] {
        let text = try String(contentsOf: root.appendingPathComponent("docs/ARCHITECTURE.md"), encoding: .utf8)
        guard let start = text.range(of: "## Modules"), let end = text.range(of: "\n## ", range: start.upperBound..<text.endIndex)
        else { throw Failure("no Modules section") }
        var result: [String: Allowed] = [:]
        for line in text[start.upperBound..<end.lowerBound].split(separator: "\n") where line.hasPrefix("| `") {
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 5 else { throw Failure("row without three cells: \(line)") }
            let names = Self.ticked(cells[1])
            let deps = cells[3]
            let allowed = Allowed(modules: Set(deps.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                                                .filter { !$0.isEmpty && $0 != "—" }),
                                  any: deps == "the above" || deps == "everything")
            for n in names { result[n] = allowed }
        }
        return result
    }

    static func ticked(_ cell: String) -> [String] {
        cell.split(separator: "`", omittingEmptySubsequences: false).enumerated().filter { $0.offset % 2 == 1 }.map { String($0.element) }
    }

    /// Package.swift's non-test targets and the package's own modules each
    /// declares (products of other packages left out).
    static func declared() throws -> [String: (dependencies: Set<String>, path: String?)] {
        let text = try String(contentsOf: root.appendingPathComponent("Package.swift"), encoding: .utf8)
        var result: [String: (Set<String>, String?)] = [:]
        let pattern = try NSRegularExpression(pattern: #"\.(target|executableTarget|systemLibrary)\(name: "([^"]+)""#)
        let ns = text as NSString
        for m in pattern.matches(in: text, range: NSRange(location: 0, length: ns.length)) {
            let name = ns.substring(with: m.range(at: 2))
            // The call's text, up to its closing parenthesis.
            let start = m.range.location
            var depth = 0, end = start
            while end < ns.length {
                let c = ns.character(at: end)
                if c == 0x28 { depth += 1 } else if c == 0x29 { depth -= 1; if depth == 0 { break } }
                end += 1
            }
            let call = ns.substring(with: NSRange(location: start, length: end - start + 1))
            var deps: Set<String> = []
            if let d = call.range(of: "dependencies: [") {
                var level = 1, k = d.upperBound
                while k < call.endIndex && level > 0 {
                    if call[k] == "[" { level += 1 } else if call[k] == "]" { level -= 1 }
                    k = call.index(after: k)
                }
                let list = String(call[d.upperBound..<k])
                    .replacingOccurrences(of: #"\.product\([^)]*\)"#, with: "", options: .regularExpression)
                deps = Set(list.split(separator: "\"", omittingEmptySubsequences: false).enumerated().filter { $0.offset % 2 == 1 }.map { String($0.element) })
            }
            var path: String?
            if let p = call.range(of: #"path: "([^"]+)""#, options: .regularExpression) {
                path = String(call[p].dropFirst(7).dropLast())
            }
            result[name] = (deps, path)
        }
        return result
    }

    /// The package's modules a target's Swift files import.
    static func imports(of target: String, path: String?) throws -> Set<String> {
        let dir = root.appendingPathComponent(path ?? "Sources/\(target)")
        guard let files = FileManager.default.enumerator(at: dir, includingPropertiesForKeys: nil) else { return [] }
        var found: Set<String> = []
        for case let url as URL in files where url.pathExtension == "swift" {
            for line in try String(contentsOf: url, encoding: .utf8).split(separator: "\n") {
                let words = line.split(separator: " ")
                if let i = words.firstIndex(of: "import"), i + 1 < words.count, words[..<i].allSatisfy({ $0 == "@testable" || $0.hasPrefix("@") || $0 == "public" || $0 == "package" || $0 == "internal" }) {
                    found.insert(String(words[i + 1]))
                }
            }
        }
        return found.subtracting(external)
    }

    @Test("every module of Sources has a row, and every row names a module")
    func everyModuleHasARow() throws {
        let table = try Self.table()
        let targets = try Self.declared().filter { !($0.value.path ?? "").hasPrefix("Tests/") }
        for name in targets.keys {
            #expect(table[name] != nil, "\(name) (Package.swift) has no row in docs/ARCHITECTURE.md's module table")
        }
        for name in table.keys {
            #expect(targets[name] != nil, "the module table's \(name) is not a target of Package.swift")
        }
    }

    @Test("what Package.swift declares and what the files import is what the table allows")
    func dependenciesAreAllowed() throws {
        let table = try Self.table()
        for (name, target) in try Self.declared() where !(target.path ?? "").hasPrefix("Tests/") {
            guard let allowed = table[name], !allowed.any else { continue }
            let declaredExtra = target.dependencies.subtracting(allowed.modules)
            #expect(declaredExtra.isEmpty, "\(name) depends on \(declaredExtra.sorted()) in Package.swift; the table allows \(allowed.modules.sorted())")
            let imported = try Self.imports(of: name, path: target.path).subtracting([name])
            let importedExtra = imported.subtracting(allowed.modules)
            #expect(importedExtra.isEmpty, "\(name) imports \(importedExtra.sorted()); the table allows \(allowed.modules.sorted())")
        }
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }
}
