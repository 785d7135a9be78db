import Foundation
import Testing
import XenABI
import XenBus

/// docs/ARCHITECTURE.md's xenbus state table, read as data and checked
/// against `FrontendStateReaction` for every pair of states, `online` and
/// device type: the table is the promise, so it must be the code.
@Suite("the xenbus state table in docs/ARCHITECTURE.md")
struct XenbusStateTableDocTests {
    struct Row {
        var frontends: Set<String>?   // nil: any
        var backends: Set<String>?
        var online: Bool?
        var type: String?
        var action: String
    }

    static let names: [XenbusState: String] = [
        .unknown: "Unknown", .initialising: "Initialising", .initWait: "InitWait", .initialised: "Initialised",
        .connected: "Connected", .closing: "Closing", .closed: "Closed", .reconfiguring: "Reconfiguring",
        .reconfigured: "Reconfigured",
    ]

    static func rows() throws -> [Row] {
        let docs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/ARCHITECTURE.md")
        let text = try String(contentsOf: docs, encoding: .utf8)
        guard let start = text.range(of: "<!-- xenbus-state-table: begin -->"),
              let end = text.range(of: "<!-- xenbus-state-table: end -->") else {
            throw TableError("no state table markers in docs/ARCHITECTURE.md")
        }
        let lines = text[start.upperBound..<end.lowerBound].split(separator: "\n").map(String.init)
            .filter { $0.hasPrefix("|") }.dropFirst(2)   // header, separator
        func set(_ cell: String) -> Set<String>? {
            cell == "any" ? nil : Set(cell.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        }
        return try lines.map { line in
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count == 5 else { throw TableError("row with \(cells.count) cells: \(line)") }
            return Row(frontends: set(cells[0]), backends: set(cells[1]),
                       online: cells[2] == "any" ? nil : cells[2] == "1", type: cells[3] == "any" ? nil : cells[3],
                       action: cells[4].trimmingCharacters(in: CharacterSet(charactersIn: "`")))
        }
    }

    struct TableError: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    static func action(_ r: FrontendStateReaction) -> String {
        switch r {
        case .none: "nothing"
        case .connect: "connect"
        case .offerAgain: "offer"
        case .close(let s): "close→\(names[s]!)"
        case .reconfigure: "reconfigure"
        case .endReconfigure: "end-reconfigure"
        }
    }

    @Test("every (frontend, backend, online, type) gives the action of the first row that matches")
    func everyPair() throws {
        let rows = try Self.rows()
        #expect(rows.count >= 6)
        let frontends: [XenbusState?] = [nil] + XenbusState.allKnown
        var checked = 0
        for fe in frontends {
            for be in [XenbusState.initialising, .initWait, .connected, .closing, .closed, .reconfigured] {
                for online in [true, false] {
                    for type in ["vbd", "vif"] {
                        let feName = fe.map { Self.names[$0]! } ?? "gone"
                        let beName = Self.names[be]!
                        let row = rows.first { r in
                            (r.frontends?.contains(feName) ?? true) && (r.backends?.contains(beName) ?? true)
                                && (r.online.map { $0 == online } ?? true) && (r.type.map { $0 == type } ?? true)
                        }
                        let code = FrontendStateReaction(frontend: fe, backend: be, mayOfferAgain: true,
                                                         connectsAtInitialised: type == "vbd", online: online,
                                                         reconfigures: type == "vif")
                        #expect(row?.action == Self.action(code),
                                "frontend \(feName), backend \(beName), online \(online), \(type): docs say \(row?.action ?? "no row"), code does \(Self.action(code))")
                        checked += 1
                    }
                }
            }
        }
        #expect(checked == 10 * 6 * 2 * 2)
    }

    @Test("a final failure is never offered again, whatever the frontend does")
    func finalFailure() {
        for fe in [XenbusState.initialising, .initialised, .connected] {
            for be in [XenbusState.closing, .closed] {
                #expect(FrontendStateReaction(frontend: fe, backend: be, mayOfferAgain: false) == .none)
            }
        }
    }
}

extension XenbusState {
    static let allKnown: [XenbusState] = [.unknown, .initialising, .initWait, .initialised, .connected, .closing, .closed,
                                          .reconfiguring, .reconfigured]
}
