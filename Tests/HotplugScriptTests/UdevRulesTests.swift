import Foundation
import Glibc
import SystemSupport
import Testing

/// One parsed udev rule: its KEY op "value" pairs, in order.
struct UdevRule {
    struct Pair: Equatable {
        var key: String       // "ENV{XENBUS_TYPE}", "RUN", ...
        var op: String        // ==, !=, =, +=, -=, :=
        var value: String
    }
    var line: Int
    var pairs: [Pair]
}

enum UdevRuleError: Error, CustomStringConvertible {
    case syntax(line: Int, String)
    var description: String {
        switch self { case let .syntax(line, message): "line \(line): \(message)" }
    }
}

/// A small parser of udev's rule syntax (udev(7)), for hosts whose udevadm
/// has no `verify` (it came in systemd 253; Debian 12 has 252): every rule
/// line is comma-separated `KEY op "value"`, each key known to udev and used
/// with an operator it accepts, every GOTO has its LABEL.
enum UdevRuleParser {
    static let matchOnly: Set<String> = ["ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS",
                                         "DRIVER", "DRIVERS", "TAGS", "TEST", "PROGRAM", "RESULT", "CONST"]
    static let assignOnly: Set<String> = ["OWNER", "GROUP", "MODE", "OPTIONS", "RUN", "LABEL", "GOTO",
                                          "IMPORT", "SECLABEL", "WAIT_FOR"]
    static let both: Set<String> = ["NAME", "SYMLINK", "ENV", "ATTR", "ATTRS", "SYSCTL", "TAG"]

    static func parse(_ text: String) throws -> [UdevRule] {
        var rules: [UdevRule] = []
        var pending = "", startLine = 0
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            var line = String(raw)
            if pending.isEmpty {
                startLine = index + 1
                let trimmed = line.trimmingCharacters(in: .whitespaces)
                if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
            }
            if line.hasSuffix("\\") {
                line.removeLast()
                pending += line
                continue
            }
            pending += line
            rules.append(UdevRule(line: startLine, pairs: try parsePairs(pending, line: startLine)))
            pending = ""
        }
        if !pending.isEmpty { throw UdevRuleError.syntax(line: startLine, "continuation at end of file") }
        let labels = Set(rules.flatMap { $0.pairs.filter { $0.key == "LABEL" }.map(\.value) })
        for rule in rules {
            for pair in rule.pairs where pair.key == "GOTO" && !labels.contains(pair.value) {
                throw UdevRuleError.syntax(line: rule.line, "GOTO \"\(pair.value)\" has no LABEL")
            }
        }
        return rules
    }

    static func parsePairs(_ text: String, line: Int) throws -> [UdevRule.Pair] {
        var pairs: [UdevRule.Pair] = []
        var s = Substring(text)
        func skipSpaces() { s = s.drop { $0 == " " || $0 == "\t" } }
        skipSpaces()
        while !s.isEmpty {
            // KEY or KEY{attribute}
            let name = s.prefix { $0.isUppercase || $0 == "_" }
            guard !name.isEmpty else { throw UdevRuleError.syntax(line: line, "expected a key at \"\(s.prefix(20))\"") }
            s = s.dropFirst(name.count)
            var key = String(name)
            if s.first == "{" {
                guard let close = s.firstIndex(of: "}") else { throw UdevRuleError.syntax(line: line, "unclosed { after \(name)") }
                key += String(s[s.startIndex...close])
                s = s[s.index(after: close)...]
            }
            skipSpaces()
            guard let op = ["==", "!=", "+=", "-=", ":=", "="].first(where: { s.hasPrefix($0) }) else {
                throw UdevRuleError.syntax(line: line, "expected an operator after \(key)")
            }
            s = s.dropFirst(op.count)
            skipSpaces()
            guard s.first == "\"" else { throw UdevRuleError.syntax(line: line, "value of \(key) must be double-quoted") }
            s = s.dropFirst()
            var value = "", escaped = false, closed = false
            while let c = s.first {
                s = s.dropFirst()
                if escaped { value.append(c); escaped = false; continue }
                if c == "\\" { escaped = true; value.append(c); continue }
                if c == "\"" { closed = true; break }
                value.append(c)
            }
            guard closed else { throw UdevRuleError.syntax(line: line, "unterminated value of \(key)") }
            try check(key: key, op: op, line: line)
            pairs.append(.init(key: key, op: op, value: value))
            skipSpaces()
            if s.first == "," { s = s.dropFirst(); skipSpaces() } else if !s.isEmpty {
                throw UdevRuleError.syntax(line: line, "expected , at \"\(s.prefix(20))\"")
            }
        }
        guard !pairs.isEmpty else { throw UdevRuleError.syntax(line: line, "empty rule") }
        return pairs
    }

    static func check(key: String, op: String, line: Int) throws {
        let base = String(key.prefix { $0 != "{" })
        let isMatch = op == "==" || op == "!="
        if matchOnly.contains(base) {
            guard isMatch else { throw UdevRuleError.syntax(line: line, "\(key) can only be matched (== or !=), not \(op)") }
        } else if assignOnly.contains(base) {
            guard !isMatch else { throw UdevRuleError.syntax(line: line, "\(key) can only be assigned, not \(op)") }
            if base == "LABEL" || base == "GOTO", op != "=" { throw UdevRuleError.syntax(line: line, "\(key) takes =") }
        } else if !both.contains(base) {
            throw UdevRuleError.syntax(line: line, "unknown key \(key)")
        }
        if ["ENV", "ATTR", "ATTRS", "SYSCTL", "TEST", "IMPORT", "CONST", "SECLABEL"].contains(base), !key.contains("{") {
            throw UdevRuleError.syntax(line: line, "\(base) needs {name}")
        }
    }

    /// udev's evaluation for the keys our rules use: == and != with `|`
    /// alternatives and * globs against the event's properties; GOTO jumps
    /// to its LABEL; RUN programs are collected. Returns the programs udev
    /// would run for the event.
    static func programs(for event: [String: String], rules: [UdevRule]) -> [String] {
        var programs: [String] = []
        var index = 0
        func property(_ key: String) -> String? {
            if key.hasPrefix("ENV{") { return event[String(key.dropFirst(4).dropLast())] }
            return event[key]
        }
        func matches(_ value: String?, _ pattern: String) -> Bool {
            pattern.split(separator: "|", omittingEmptySubsequences: false).contains { alternative in
                fnmatch(String(alternative), value ?? "", 0) == 0
            }
        }
        outer: while index < rules.count {
            let rule = rules[index]
            index += 1
            for pair in rule.pairs where pair.op == "==" || pair.op == "!=" {
                let ok = matches(property(pair.key), pair.value)
                if ok != (pair.op == "==") { continue outer }
            }
            for pair in rule.pairs {
                switch pair.key {
                case "RUN", "RUN{program}": programs.append(pair.value)
                case "GOTO":
                    guard let target = rules.firstIndex(where: { $0.pairs.contains(.init(key: "LABEL", op: "=", value: pair.value)) }) else { break }
                    index = target
                    continue outer
                default: break
                }
            }
        }
        return programs
    }
}

/// udev/xenbackd.rules and what they run (scripts/xenbackd-udev).
@Suite struct UdevRulesTests {
    let rulesText: String

    init() throws {
        rulesText = try String(contentsOfFile: repoRoot + "/udev/xenbackd.rules", encoding: .utf8)
    }

    /// The installed helper's path in the rules, mapped to the repository.
    func repositoryProgram(_ program: String) -> String {
        program.replacingOccurrences(of: "/usr/local/lib/xenbackd/", with: repoRoot + "/scripts/")
    }

    @Test func rulesParse() throws {
        let rules = try UdevRuleParser.parse(rulesText)
        #expect(rules.count == 4)
        let runs = rules.flatMap(\.pairs).filter { $0.key == "RUN" }
        #expect(runs == [.init(key: "RUN", op: "+=", value: "/usr/local/lib/xenbackd/xenbackd-udev")])
        #expect(FileManager.default.isExecutableFile(atPath: repositoryProgram(runs[0].value)))
    }

    @Test func parserRejectsBrokenRules() {
        for broken in ["SUBSYSTEM==xen-backend", "SUBSYSTEM=\"xen-backend\"", "ACTION==\"add\" RUN+=\"/x\"",
                       "FOO==\"x\"", "ENV==\"x\"", "GOTO=\"nowhere\"", "RUN==\"/x\"", "ACTION==\"add"] {
            #expect(throws: UdevRuleError.self, "\(broken)") { try UdevRuleParser.parse(broken) }
        }
    }

    /// udevadm verify (systemd ≥ 253) when this host's udevadm has it.
    @Test func udevadmVerify() throws {
        guard commandExists("udevadm"), sh(["udevadm", "verify", "--help"]) != nil else {
            try Test.cancel("udevadm verify is not available here (needs systemd-udev ≥ 253; Debian 12 has 252); rulesParse checks the syntax")
        }
        let result = try runProcess(["udevadm", "verify", "--resolve-names=never", repoRoot + "/udev/xenbackd.rules"],
                                    environment: ["PATH": basePath])
        #expect(result.status == 0, "\(result)")
    }

    @Test(arguments: [
        (["ACTION": "add", "SUBSYSTEM": "xen-backend", "XENBUS_TYPE": "vbd"], true),
        (["ACTION": "remove", "SUBSYSTEM": "xen-backend", "XENBUS_TYPE": "vif"], true),
        (["ACTION": "add", "SUBSYSTEM": "xen-backend", "XENBUS_TYPE": "console"], false),
        (["ACTION": "add", "SUBSYSTEM": "xen-backend", "XENBUS_TYPE": "qdisk"], false),
        (["ACTION": "change", "SUBSYSTEM": "xen-backend", "XENBUS_TYPE": "vbd"], false),
        (["ACTION": "add", "SUBSYSTEM": "block", "XENBUS_TYPE": "vbd"], false),
    ])
    func rulesSelectTheirEvents(event: [String: String], runs: Bool) throws {
        let rules = try UdevRuleParser.parse(rulesText)
        #expect(UdevRuleParser.programs(for: event, rules: rules) == (runs ? ["/usr/local/lib/xenbackd/xenbackd-udev"] : []))
    }

    /// The uevent the dom0 kernel sends for a new vbd (as recorded on Xen
    /// 4.17 in shared/xenlab), fed through the rules: the helper they run
    /// returns at once, asks for the daemon (a stub here) and, with the
    /// switch on, runs the block script, which finishes the device.
    func ueventEnvironment(_ f: HotplugFixture, action: String, type: String, path: String,
                           extra: [String: String]) -> [String: String] {
        var env = f.environment(xenbusPath: path, type: type)
        env.merge([
            "ACTION": action, "SUBSYSTEM": "xen-backend", "DEVPATH": "/devices/" + path.dropFirst("backend/".count).replacingOccurrences(of: "/", with: "-"),
            "MODALIAS": "xen-backend:" + type, "SEQNUM": "1234",
            "XENBACKD_DAEMON_CMD": f.directory + "/daemon-stub", "XENBACKD_DEFAULTS": f.directory + "/defaults",
        ]) { $1 }
        env.merge(extra) { $1 }
        return env
    }

    func writeDaemonStub(_ f: HotplugFixture) throws {
        try "#!/bin/sh\necho \"$*\" >> \(f.directory)/daemon-stub.calls\n"
            .write(toFile: f.directory + "/daemon-stub", atomically: true, encoding: .utf8)
        chmod(f.directory + "/daemon-stub", 0o755)
    }

    func daemonCalls(_ f: HotplugFixture) -> String {
        (try? String(contentsOfFile: f.directory + "/daemon-stub.calls", encoding: .utf8)) ?? ""
    }

    func fireEvent(_ env: [String: String]) throws -> [ProcessResult] {
        let rules = try UdevRuleParser.parse(rulesText)
        return try UdevRuleParser.programs(for: env, rules: rules).map { program in
            try runProcess([repositoryProgram(program)], environment: env, timeout: 10)
        }
    }

    @Test func vbdAddEventStartsTheDaemonAndRunsTheBlockScript() throws {
        try withFixture { f in
            try writeDaemonStub(f)
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 5, params: disk)
            let env = ueventEnvironment(f, action: "add", type: "vbd", path: "backend/vbd/5/51712",
                                        extra: ["XENBACKD_UDEV_HOTPLUG": "1"])
            let results = try fireEvent(env)
            #expect(results.count == 1)
            #expect(results.first?.status == 0, "\(results)")
            #expect((results.first?.seconds ?? 99) < 5, "udev RUN programs must be short-lived")
            #expect(daemonCalls(f) == "start\n")
            // The block script runs detached (setsid here, systemd-run under systemd).
            #expect(try f.waitForValue(f.backendPath(domid: 5, devid: 51712) + "/hotplug-status") == "connected", "\(f.log)")
            #expect(try f.hotplugKeys(domid: 5) == ["hotplug-status": "connected", "physical-device-path": disk])
            #expect(f.log.contains("xenbackd-udev"))
        }
    }

    @Test func switchOffOnlyStartsTheDaemon() throws {
        try withFixture { f in
            try writeDaemonStub(f)
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 5, params: disk)
            try "XENBACKD_UDEV_HOTPLUG=0\n".write(toFile: f.directory + "/defaults", atomically: true, encoding: .utf8)
            let env = ueventEnvironment(f, action: "add", type: "vbd", path: "backend/vbd/5/51712",
                                        extra: ["XENBACKD_UDEV_DETACH": "none"])
            #expect(try fireEvent(env).map(\.status) == [0])
            #expect(daemonCalls(f) == "start\n")
            #expect(try f.hotplugKeys(domid: 5) == [:])
        }
    }

    /// The documented switch: XENBACKD_UDEV_HOTPLUG=1 in the settings file.
    @Test func switchInTheSettingsFile() throws {
        try withFixture { f in
            try writeDaemonStub(f)
            let disk = try makeFile(f.directory + "/disk.img", size: 1 << 20)
            try f.addVbd(domid: 5, params: disk)
            try "# test\nXENBACKD_UDEV_HOTPLUG=1\n".write(toFile: f.directory + "/defaults", atomically: true, encoding: .utf8)
            let env = ueventEnvironment(f, action: "add", type: "vbd", path: "backend/vbd/5/51712",
                                        extra: ["XENBACKD_UDEV_DETACH": "none"])
            #expect(try fireEvent(env).map(\.status) == [0])
            #expect(try f.hotplugKeys(domid: 5)["hotplug-status"] == "connected")
        }
    }

    /// A vif event runs the vif script (here it finds no bridge: the error
    /// keys prove it ran with the event's XENBUS_PATH).
    @Test func vifAddEventRunsTheVifScript() throws {
        try withFixture { f in
            try writeDaemonStub(f)
            try f.addVif(domid: 6, bridge: "nobr-udev")
            let env = ueventEnvironment(f, action: "add", type: "vif", path: "backend/vif/6/0",
                                        extra: ["XENBACKD_UDEV_HOTPLUG": "1", "XENBACKD_UDEV_DETACH": "none"])
            #expect(try fireEvent(env).map(\.status) == [0])
            #expect(try f.hotplugKeys(type: "vif", domid: 6, devid: 0) == [
                "hotplug-status": "error", "hotplug-error": "bridge nobr-udev does not exist (or is not a bridge)",
            ])
        }
    }

    /// Without systemd the helper starts the daemon through xenbackd-daemon
    /// (a stub binary here), once for any number of events.
    @Test func withoutSystemdTheHelperStartsTheDaemonOnce() throws {
        if FileManager.default.fileExists(atPath: "/run/systemd/system") {
            try Test.cancel("systemd is running here: the helper would use systemctl")
        }
        try withFixture { f in
            try """
                #!/bin/bash
                trap 'exit 0' TERM
                while :; do sleep 0.1; done
                """.write(toFile: f.directory + "/xenbackd", atomically: true, encoding: .utf8)
            chmod(f.directory + "/xenbackd", 0o755)
            var env = ueventEnvironment(f, action: "add", type: "vbd", path: "backend/vbd/5/51712", extra: [
                "XENBACKD_BIN": f.directory + "/xenbackd", "XENBACKD_PIDFILE": f.directory + "/run/xenbackd.pid",
                "XENBACKD_DAEMON_LOG": f.directory + "/daemon.log",
            ])
            env["XENBACKD_DAEMON_CMD"] = nil
            #expect(try fireEvent(env).map(\.status) == [0])
            #expect(try fireEvent(env).map(\.status) == [0])
            let daemon = [scriptPath("xenbackd-daemon")]
            let status = try runProcess(daemon + ["status"], environment: env)
            #expect(status.status == 0, "\(status)\n\(f.log)")
            #expect(try runProcess(daemon + ["stop"], environment: env).status == 0)
            #expect(f.log.components(separatedBy: "xenbackd-daemon start").count == 3)
        }
    }

    @Test func removeEventOnlyLogs() throws {
        try withFixture { f in
            try writeDaemonStub(f)
            let env = ueventEnvironment(f, action: "remove", type: "vbd", path: "backend/vbd/5/51712", extra: [:])
            #expect(try fireEvent(env).map(\.status) == [0])
            #expect(daemonCalls(f) == "")
            #expect(f.log.contains("udev remove vbd"))
            #expect(try f.read("/local/domain/0/backend/vbd/5") == nil)
        }
    }
}
