import Glibc
import SystemSupport

/// The NBD servers the tests run the NBD storage and the block backend against.
public enum NBDServerKind: String, Sendable, CaseIterable, CustomStringConvertible {
    case nbdkit
    case nbdServer = "nbd-server"

    public var executable: String {
        switch self {
        case .nbdkit: "/usr/bin/nbdkit"
        case .nbdServer: "/usr/bin/nbd-server"
        }
    }

    public var isInstalled: Bool { access(executable, X_OK) == 0 }
    public var description: String { rawValue }
}

/// Where a server listens: a unix socket (a fresh path under /tmp) or
/// 127.0.0.1 on a free TCP port.
public enum NBDTransport: Sendable {
    case unixSocket
    case tcp
}

/// What nbd-server announces beyond reads, writes and multi-conn. Its
/// command-line export (`nbd-server [IP:]PORT FILE`) offers none of these;
/// any of them needs a configuration file, whose export has a name ("disk").
public struct NBDServerOptions: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    public static let flush = NBDServerOptions(rawValue: 1)
    public static let fua = NBDServerOptions(rawValue: 2)
    public static let trim = NBDServerOptions(rawValue: 4)
    public static let all: NBDServerOptions = [.flush, .fua, .trim]
}

public struct NBDTestServerError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// One NBD server (nbdkit or nbd-server) for one test: started at once,
/// stopped (its whole process group killed with SIGKILL and reaped) by
/// `stop()` or when released; `restart()` starts it again on the same
/// socket or port, with the same arguments or new ones.
///
///     let server = try NBDTestServer.nbdkit(["memory", "16M"])
///     let server = try NBDTestServer.nbdServer(exporting: file, transport: .tcp)
///     let server = try NBDTestServer.scratchDisk(.nbdServer, megabytes: 16)
public final class NBDTestServer: @unchecked Sendable {   // `state` behind `mutex`; `ownedFiles` set before it is shared
    public let kind: NBDServerKind
    public let transport: NBDTransport
    /// An NBD URI naming the export (`nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://127.0.0.1:PORT/EXPORT`), as libnbd and the backend parse it.
    public let uri: String
    /// The unix socket, for `.unixSocket`.
    public let socketPath: String?
    /// The TCP port on 127.0.0.1, for `.tcp`.
    public let port: Int?
    /// The export's name ("" unless nbd-server runs from a configuration file).
    public let exportName: String
    /// What a vbd's `params` key names: the old Xen form `nbd:127.0.0.1 PORT`
    /// when that reaches the export (TCP, the default export), else `uri`.
    public let params: String

    private struct State {
        var arguments: [String]
        var group: pid_t?
        var exportedFile: String?
    }
    private var state = State(arguments: [])
    private let mutex = PThreadMutex()
    private let options: NBDServerOptions
    private let readOnly: Bool
    private let scratch: String
    /// Files this server owns and removes when released (a scratch disk).
    private var ownedFiles: [String] = []

    /// The process group (its leader's PID) of the running server.
    public var pid: pid_t? { withState { $0.group } }
    public var isRunning: Bool { pid.map(ServerProcess.groupHasLiveMembers) ?? false }
    /// Where the server's standard output and error go (kept for the test's life).
    public let logPath: String

    private func withState<T>(_ body: (inout State) -> T) -> T { mutex.withLock { body(&state) } }

    private static let counter = Counter()

    private init(kind: NBDServerKind, transport: NBDTransport, exportName: String, readOnly: Bool,
                 options: NBDServerOptions) throws {
        try kind.requireInstalled()   // else the test is skipped
        self.kind = kind
        self.transport = transport
        self.exportName = exportName
        self.readOnly = readOnly
        self.options = options
        let unique = "\(getpid())-\(Self.counter.next())"
        scratch = "/tmp/nbd-test-\(unique)"
        logPath = scratch + ".log"
        unlink(logPath)
        switch transport {
        case .unixSocket:
            let path = scratch + ".sock"
            socketPath = path
            port = nil
            uri = "nbd+unix:///\(exportName)?socket=\(path)"
            params = uri
        case .tcp:
            let free = try freeTCPPort()
            socketPath = nil
            port = free
            uri = "nbd://127.0.0.1:\(free)/\(exportName)"
            params = exportName.isEmpty ? "nbd:127.0.0.1 \(free)" : uri
        }
    }

    /// `nbdkit [-r] [--filter=F…] PLUGIN ARGS…` in the foreground
    /// (`-f --exit-with-parent`), on a unix socket or a TCP port.
    public static func nbdkit(_ arguments: [String], readOnly: Bool = false,
                              transport: NBDTransport = .unixSocket) throws -> NBDTestServer {
        try withPortRetries(transport) {
            let server = try NBDTestServer(kind: .nbdkit, transport: transport, exportName: "", readOnly: readOnly, options: [])
            try server.start(arguments: arguments)
            return server
        }
    }

    /// nbd-server exporting `file`. Without `options` over TCP, exactly the
    /// Xen form `nbd-server 127.0.0.1:PORT FILE` (the default export, which
    /// `nbd:127.0.0.1 PORT` reaches); with options or on a unix socket, from
    /// a configuration file (`unixsock`, `flush`/`fua`/`trim`) whose export
    /// is named "disk".
    public static func nbdServer(exporting file: String, transport: NBDTransport = .tcp, readOnly: Bool = false,
                                 options: NBDServerOptions = []) throws -> NBDTestServer {
        let commandLineForm = transport == .tcp && options.isEmpty
        return try withPortRetries(transport) {
            let server = try NBDTestServer(kind: .nbdServer, transport: transport,
                                           exportName: commandLineForm ? "" : "disk", readOnly: readOnly, options: options)
            try server.start(exporting: file)
            return server
        }
    }

    /// A free port may be taken by another test before the server binds
    /// it: a TCP server that fails to start is tried twice more on others.
    private static func withPortRetries(_ transport: NBDTransport, _ body: () throws -> NBDTestServer) throws -> NBDTestServer {
        var attempt = 1
        while true {
            do { return try body() } catch is NBDTestServerError where transport == .tcp && attempt < 3 {
                attempt += 1
            }
        }
    }

    /// A writable scratch disk of `megabytes` MiB, all zeros: nbdkit's
    /// memory plugin (on a unix socket), or nbd-server over a sparse file
    /// under /tmp (over TCP, the file removed with the server). nbd-server
    /// runs with `options` (none: its plain command-line export).
    public static func scratchDisk(_ kind: NBDServerKind, megabytes: Int, transport: NBDTransport? = nil,
                                   options: NBDServerOptions = []) throws -> NBDTestServer {
        switch kind {
        case .nbdkit:
            return try nbdkit(["memory", "\(megabytes)M"], transport: transport ?? .unixSocket)
        case .nbdServer:
            let file = try makeSparseFile(megabytes: megabytes)
            do {
                let server = try nbdServer(exporting: file, transport: transport ?? .tcp, options: options)
                server.ownedFiles.append(file)
                return server
            } catch {
                unlink(file)
                throw error
            }
        }
    }

    deinit {
        stop()
        for file in ownedFiles { unlink(file) }
        unlink(logPath)
    }

    /// The file nbd-server exports now.
    public var exportedFile: String? { withState { $0.exportedFile } }

    /// Kills the server (nbdkit, or nbd-server's daemon and every connection
    /// it serves) with SIGKILL and reaps it; the socket path and port stay
    /// reserved for a restart. Clients see their connections drop at once.
    public func stop() {
        guard let group = withState({ state -> pid_t? in
            defer { state.group = nil }
            return state.group
        }) else { return }
        ServerProcess.killGroup(group)
        if let socketPath { unlink(socketPath) }
    }

    /// Sends `signal` to the server's process group.
    public func signal(_ number: Int32) {
        if let group = pid { kill(-group, number) }
    }

    /// Stops the server if it runs and starts it again on the same socket
    /// or port: with the same arguments, or (nbdkit) new plugin arguments,
    /// or (nbd-server) another file.
    public func restart(arguments: [String]? = nil, exporting file: String? = nil) throws {
        stop()
        switch kind {
        case .nbdkit: try start(arguments: arguments ?? withState { $0.arguments })
        case .nbdServer: try start(exporting: file ?? exportedFile!)
        }
    }

    // MARK: starting

    private func start(arguments plugin: [String]) throws {
        let pidFile = scratch + ".pid"
        unlink(pidFile)
        if let socketPath { unlink(socketPath) }
        var command = [kind.executable, "-f", "--exit-with-parent", "-P", pidFile]
        if readOnly { command.append("-r") }
        switch transport {
        case .unixSocket: command += ["-U", socketPath!]
        case .tcp: command += ["-i", "127.0.0.1", "-p", "\(port!)"]
        }
        let pid = try ServerProcess.spawn(command + plugin, logPath: logPath)
        withState { $0.arguments = plugin; $0.group = pid }
        // nbdkit writes its PID file once it listens.
        for _ in 0..<1000 {
            if access(pidFile, F_OK) == 0 { unlink(pidFile); return }
            if let status = ServerProcess.reapIfExited(pid) {
                withState { $0.group = nil }
                throw startFailure("nbdkit exited (wait status \(status))")
            }
            usleep(5_000)
        }
        stop()
        throw startFailure("nbdkit did not listen within 5 s")
    }

    private func start(exporting file: String) throws {
        let pidFile = scratch + ".pid"
        let configFile = scratch + ".conf"
        unlink(pidFile)
        if let socketPath { unlink(socketPath) }
        // No configuration file but ours (not /etc/nbd-server/config).
        var generic = "[generic]\n"
        var command = [kind.executable]
        switch transport {
        case .unixSocket:
            generic += "\tunixsock = \(socketPath!)\n"
        case .tcp where !exportName.isEmpty:
            generic += "\tlistenaddr = 127.0.0.1\n\tport = \(port!)\n"
        case .tcp:
            break
        }
        var config = generic
        if exportName.isEmpty {
            // The command-line export: the default one (empty name).
            command += ["127.0.0.1:\(port!)", file]
            if readOnly { command.append("-r") }
        } else {
            config += "[\(exportName)]\n\texportname = \(file)\n"
            if readOnly { config += "\treadonly = true\n" }
            if options.contains(.flush) { config += "\tflush = true\n" }
            if options.contains(.fua) { config += "\tfua = true\n" }
            if options.contains(.trim) { config += "\ttrim = true\n" }
        }
        try writeFile(configFile, config)
        defer { unlink(configFile) }
        command += ["-C", configFile, "-p", pidFile]
        let launcher = try ServerProcess.spawn(command, logPath: logPath)
        // The launcher forks the daemon (which calls setsid: its own process
        // group) and exits; the daemon writes the PID file.
        var launcherStatus: Int32?
        var daemon: pid_t?
        for _ in 0..<1000 {
            if launcherStatus == nil { launcherStatus = ServerProcess.reapIfExited(launcher) }
            if let text = readSmallFile(pidFile), let value = pid_t(text.trimmingCharacters(in: " \n")), value > 0 {
                daemon = value
                break
            }
            if let status = launcherStatus, status != 0 { break }
            usleep(5_000)
        }
        unlink(pidFile)
        guard let daemon else {
            ServerProcess.killGroup(launcher)
            throw startFailure("nbd-server did not start (launcher wait status \(launcherStatus.map(String.init) ?? "running"))")
        }
        withState { $0.group = daemon; $0.exportedFile = file }
        if launcherStatus == nil {
            for _ in 0..<1000 where launcherStatus == nil {
                launcherStatus = ServerProcess.reapIfExited(launcher)
                if launcherStatus == nil { usleep(2_000) }
            }
        }
        // Listening sockets are open before it daemonizes; check anyway.
        for _ in 0..<1000 {
            if canConnect() { return }
            if !ServerProcess.isAlive(daemon) { break }
            usleep(5_000)
        }
        stop()
        throw startFailure("nbd-server does not accept connections")
    }

    private func canConnect() -> Bool {
        switch transport {
        case .unixSocket: canConnectUnix(socketPath!)
        case .tcp: canConnectTCP(port: port!)
        }
    }

    private func startFailure(_ what: String) -> NBDTestServerError {
        let log = readSmallFile(logPath)?.split(separator: "\n").suffix(5).joined(separator: " | ") ?? ""
        return NBDTestServerError("\(what); \(uri); log: \(log)")
    }
}

private final class Counter: @unchecked Sendable {   // `value` guarded by `mutex`
    private let mutex = PThreadMutex()
    private var value = 0
    func next() -> Int { mutex.withLock { value += 1; return value } }
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var text = Substring(self)
        while let first = text.first, set.contains(first) { text.removeFirst() }
        while let last = text.last, set.contains(last) { text.removeLast() }
        return String(text)
    }
}

/// A sparse file of `megabytes` MiB under /tmp; the caller removes it.
public func makeSparseFile(megabytes: Int, directory: String = "/tmp") throws -> String {
    var template = Array("\(directory)/nbd-test-disk-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    guard fd >= 0 else { throw NBDTestServerError("mkstemp in \(directory): errno \(errno)") }
    defer { close(fd) }
    let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard ftruncate(fd, off_t(megabytes) << 20) == 0 else {
        unlink(path)
        throw NBDTestServerError("ftruncate \(path): errno \(errno)")
    }
    return path
}

private func writeFile(_ path: String, _ text: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw NBDTestServerError("open \(path): errno \(errno)") }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    guard write(fd, bytes, bytes.count) == bytes.count else { throw NBDTestServerError("write \(path): errno \(errno)") }
}
