import Foundation
import Glibc
import Hypervisor
import LoopbackHost
import LoopbackHypervisor
import NetBackend
import NetFrontend
import NetworkPlumbing
import SystemSupport
import Testing
import XenBus

func requireNetworkTools() throws {
    if geteuid() != 0 { try Test.cancel("network tests need root (TAP, bridges, namespaces)") }
    for tool in ["/usr/sbin/ip", "/usr/bin/python3", "/usr/bin/ping"] where access(tool, X_OK) != 0 {
        try Test.cancel("\(tool) is missing (scripts/setup installs it)")
    }
}

typealias NetTestBed = NetworkBed

/// Runs `body` with a fresh bed (see LoopbackHost/NetworkBed.swift), tearing
/// it down afterwards in every case.
func withNetTestBed(netOptions: NetBackendOptions = .init(), _ body: (NetTestBed) throws -> Void) throws {
    try requireNetworkTools()
    let bed = try NetTestBed(netOptions: netOptions)
    defer { bed.tearDown() }
    try body(bed)
}

/// A TCP stream of `bytes` pseudo-random bytes from `sender` to `receiver`
/// (python3 on both ends); returns both ends' SHA-256 digests.
func tcpStream(from sender: BedGuest, to receiverNamespace: String, address: String, bytes: Int,
               port: Int = 5001) throws -> (sent: String, received: String) {
    let server = """
    import hashlib, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('\(address)', \(port))); s.listen(1); s.settimeout(30)
    c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d: break
        h.update(d); n += len(d)
    print(n, h.hexdigest())
    """
    let client = """
    import hashlib, random, socket, time
    r = random.Random(\(bytes)); h = hashlib.sha256(); left = \(bytes)
    for attempt in range(100):
        try:
            c = socket.create_connection(('\(address)', \(port)), timeout=30); break
        except OSError:
            time.sleep(0.05)
    while left > 0:
        d = r.randbytes(min(left, 1 << 16)); h.update(d); c.sendall(d); left -= len(d)
    c.close(); print(\(bytes), h.hexdigest())
    """
    let received = Handoff<Result<String, Error>>()
    let serverThread = try NativeThread(name: "tcp-server") {
        received.put(Result { try sh(["ip", "netns", "exec", receiverNamespace, "python3", "-c", server], timeout: 90) })
    }
    defer { serverThread.join() }
    usleep(200_000)   // the client retries anyway
    let sent = try sender.run(["python3", "-c", client], timeout: 90)
    let got = try received.take().get()
    return (sent.trimmingCharacters(in: .whitespacesAndNewlines), got.trimmingCharacters(in: .whitespacesAndNewlines))
}
