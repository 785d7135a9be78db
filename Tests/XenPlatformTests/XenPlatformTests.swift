import CXenStableLibs
import Glibc
import Hypervisor
import Testing
@testable import XenPlatform

@Suite struct XenPlatformTests {
    static var onXen: Bool { access(XenHypervisorPlatform.grantDevice, F_OK) == 0 }

    @Test func initFailsClearlyWithoutXen() throws {
        if Self.onXen {
            let platform = try XenHypervisorPlatform()
            #expect(platform.name == "xen")
            #expect(platform.ownDomain == 0)
            return
        }
        do {
            _ = try XenHypervisorPlatform()
            Issue.record("XenHypervisorPlatform() succeeded without \(XenHypervisorPlatform.grantDevice)")
        } catch {
            #expect(error.errno == ENOENT)
            #expect(error.description.contains("/dev/xen/gntdev"))
            #expect(error.description.contains("--platform loopback"))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func librariesAnswerWithoutXen() throws {
        // Only meaningful here: the handles fail with ENOENT, and say so.
        guard !Self.onXen else { return }
        #expect(throws: HypervisorError.self) { try XenGrantTable() }
        #expect(throws: HypervisorError.self) { try XenEventChannels() }
        do { _ = try XenGrantTable() } catch {
            #expect(error.operation == "xengnttab_open")
            #expect(error.errno == ENOENT)
        }
        do { _ = try XenEventChannels() } catch {
            #expect(error.operation == "xenevtchn_open")
            #expect(error.errno == ENOENT)
        }
    }

    @Test func missingFacilitiesNamesWhatIsMissing() {
        let nothing = XenHypervisorPlatform.missingFacilities(exists: { _ in false }, accessible: { _ in false },
                                                              xenStoredPath: nil)
        #expect(nothing?.errno == ENOENT)
        #expect(nothing?.message.hasPrefix("/dev/xen/gntdev is missing") == true)

        let noGntdev = XenHypervisorPlatform.missingFacilities(
            exists: { $0 == "/dev/xen" || $0 == "/dev/xen/evtchn" || $0 == "/dev/xen/xenbus" },
            accessible: { _ in true }, xenStoredPath: nil)
        #expect(noGntdev?.message.hasPrefix("/dev/xen/gntdev is missing") == true)
        #expect(noGntdev?.message.contains("xen-gntdev") == true)

        let neither = XenHypervisorPlatform.missingFacilities(
            exists: { $0 == "/dev/xen" || $0 == "/dev/xen/xenbus" }, accessible: { _ in true }, xenStoredPath: nil)
        #expect(neither?.message.hasPrefix("/dev/xen/gntdev and /dev/xen/evtchn are missing") == true)

        let noStore = XenHypervisorPlatform.missingFacilities(
            exists: { $0.hasPrefix("/dev/xen") && $0 != "/dev/xen/xenbus" }, accessible: { _ in true }, xenStoredPath: nil)
        #expect(noStore?.message.contains("xenstore") == true)

        let storeFromEnvironment = XenHypervisorPlatform.missingFacilities(
            exists: { $0.hasPrefix("/dev/xen") && $0 != "/dev/xen/xenbus" || $0 == "/tmp/xs.sock" },
            accessible: { _ in true }, xenStoredPath: "/tmp/xs.sock")
        #expect(storeFromEnvironment == nil)

        let notRoot = XenHypervisorPlatform.missingFacilities(exists: { _ in true }, accessible: { _ in false },
                                                              xenStoredPath: nil)
        #expect(notRoot?.errno == EACCES)
        #expect(notRoot?.message.contains("/dev/xen/gntdev") == true)

        let fine = XenHypervisorPlatform.missingFacilities(exists: { _ in true }, accessible: { _ in true },
                                                           xenStoredPath: nil)
        #expect(fine == nil)
    }

    @Test func copySegmentFromGuest() {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let op = GrantCopyOperation(direction: .fromGuest, domain: 7, ref: 0x1234_5678, guestOffset: 512,
                                    length: 1024, local: buffer + 64)
        let seg = grantCopySegment(op)
        #expect(seg.flags == UInt16(GNTCOPY_source_gref))
        #expect(seg.flags == 1)
        #expect(seg.source.foreign.ref == 0x1234_5678)
        #expect(seg.source.foreign.offset == 512)
        #expect(seg.source.foreign.domid == 7)
        #expect(seg.dest.virt == buffer + 64)
        #expect(seg.len == 1024)
        #expect(seg.status == -1)   // GNTST_general_error until the kernel answers
    }

    @Test func copySegmentToGuest() {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let op = GrantCopyOperation(direction: .toGuest, domain: 0x7ff0, ref: 9, guestOffset: 3584,
                                    length: 512, local: buffer)
        let seg = grantCopySegment(op)
        #expect(seg.flags == UInt16(GNTCOPY_dest_gref))
        #expect(seg.flags == 2)
        #expect(seg.source.virt == buffer)
        #expect(seg.dest.foreign.ref == 9)
        #expect(seg.dest.foreign.offset == 3584)
        #expect(seg.dest.foreign.domid == 0x7ff0)
        #expect(seg.len == 512)
    }

    @Test func copySegmentLayoutIsGntdevs() {
        // struct ioctl_gntdev_grant_copy_segment: two 8-byte unions, then len, flags, status
        // (the library hands its array to the ioctl as is); C's sizeof is 24.
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.size == 24)
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.stride == 24)
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.offset(of: \.dest) == 8)
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.offset(of: \.len) == 16)
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.offset(of: \.flags) == 18)
        #expect(MemoryLayout<xengnttab_grant_copy_segment_t>.offset(of: \.status) == 20)
    }

    /// The built `xenbackd`, in the folder of the test bundle (this process).
    static func xenbackdPath() throws -> String {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBufferPointer { b in
            b.withMemoryRebound(to: CChar.self) { readlink("/proc/self/exe", $0.baseAddress!, $0.count) }
        }
        try #require(n > 0, "readlink /proc/self/exe failed")
        let exe = String(decoding: buffer[..<n], as: UTF8.self)
        let directory = exe.lastIndex(of: "/").map { String(exe[..<$0]) } ?? "."
        let candidate = directory + "/xenbackd"
        var st = stat()
        try #require(stat(candidate, &st) == 0 && st.st_mode & S_IFMT == S_IFREG,
                     "no xenbackd executable at \(candidate) (next to \(exe)): build with --build-tests first")
        return candidate
    }

    @Test(.timeLimit(.minutes(1))) func daemonRefusesXenPlatformWithoutXen() throws {
        guard !Self.onXen else { return }
        let path = try Self.xenbackdPath()
        let result = try runWithTimeout([path, "run", "--platform", "xen"], seconds: 5)
        #expect(!result.timedOut, "xenbackd run --platform xen did not exit within 5 s")
        #expect(result.status != 0)
        let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
        #expect(lines.count == 1, "stderr: \(result.stderr)")
        #expect(result.stderr.contains("/dev/xen"), "stderr: \(result.stderr)")
        #expect(result.stdout.isEmpty, "stdout: \(result.stdout)")
    }
}

struct ProcessResult {
    var status: Int32
    var timedOut: Bool
    var stdout: String
    var stderr: String
}

/// Runs `argv` with stdout and stderr captured; kills it (by its pid) after `seconds`.
func runWithTimeout(_ argv: [String], seconds: Double) throws -> ProcessResult {
    var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
    try #require(pipe(&outPipe) == 0 && pipe(&errPipe) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    for fd in outPipe + errPipe { posix_spawn_file_actions_addclose(&actions, fd) }
    var cArgs = argv.map { strdup($0) } + [nil]
    defer { for p in cArgs { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, argv[0], &actions, nil, &cArgs, environ)
    close(outPipe[1]); close(errPipe[1])
    defer { close(outPipe[0]); close(errPipe[0]) }
    try #require(rc == 0, "posix_spawn \(argv[0]): \(String(cString: strerror(rc)))")

    var out: [UInt8] = [], err: [UInt8] = []
    var open = [outPipe[0], errPipe[0]]
    var start = timespec(); clock_gettime(CLOCK_MONOTONIC, &start)
    func elapsed() -> Double {
        var now = timespec(); clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec - start.tv_sec) + Double(now.tv_nsec - start.tv_nsec) / 1e9
    }
    var timedOut = false
    while !open.isEmpty {
        let left = seconds - elapsed()
        if left <= 0 { timedOut = true; break }
        var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let n = poll(&fds, nfds_t(fds.count), Int32(left * 1000) + 1)
        if n < 0 && errno == EINTR { continue }
        for f in fds where f.revents != 0 {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let got = read(f.fd, &chunk, chunk.count)
            if got > 0 {
                if f.fd == outPipe[0] { out += chunk[..<got] } else { err += chunk[..<got] }
            } else {
                open.removeAll { $0 == f.fd }
            }
        }
    }
    if timedOut { kill(pid, SIGKILL) }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let exitStatus: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return ProcessResult(status: exitStatus, timedOut: timedOut,
                         stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self))
}
