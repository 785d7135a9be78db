import CLibNBD
import Glibc

/// A third client of an export: libnbd's synchronous API on a connection of
/// its own, sharing no code with the storage under test (NBDStorage), to
/// see what really reached the server. One thread at a time.
public final class NBDReader {
    private var handle: OpaquePointer?
    /// The export's size in bytes, from the handshake.
    public let size: UInt64

    /// Connects to an NBD URI (`nbd://…`, `nbd+unix://…`) or the old Xen
    /// form (`nbd:HOST:PORT`, `nbd:HOST PORT`), read-only.
    public init(uri: String) throws {
        guard let handle = nbd_create() else { throw NBDTestServerError("nbd_create: \(Self.lastError)") }
        self.handle = handle
        nbd_set_handshake_flags(handle, nbd_get_handshake_flags(handle))
        if nbd_connect_uri(handle, Self.libnbdURI(uri)) != 0 {
            let error = Self.lastError
            nbd_close(handle)
            self.handle = nil
            throw NBDTestServerError("nbd_connect_uri \(uri): \(error)")
        }
        let size = nbd_get_size(handle)
        guard size >= 0 else {
            let error = Self.lastError
            nbd_close(handle)
            self.handle = nil
            throw NBDTestServerError("nbd_get_size \(uri): \(error)")
        }
        self.size = UInt64(size)
    }

    deinit { close() }

    /// Disconnects politely (NBD_CMD_DISC), then frees the handle.
    public func close() {
        guard let handle else { return }
        self.handle = nil
        _ = nbd_shutdown(handle, 0)
        nbd_close(handle)
    }

    /// The bytes at [offset, offset+length), in requests of at most 1 MiB.
    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: length)
        try bytes.withUnsafeMutableBytes { try read(offset: offset, into: $0) }
        return bytes
    }

    /// Fills `buffer` with the bytes at `offset`.
    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard let handle else { throw NBDTestServerError("reader closed") }
        var done = 0
        while done < buffer.count {
            let chunk = min(buffer.count - done, 1 << 20)
            if nbd_pread(handle, buffer.baseAddress! + done, chunk, offset + UInt64(done), 0) != 0 {
                throw NBDTestServerError("nbd_pread \(chunk) bytes at \(offset + UInt64(done)): \(Self.lastError)")
            }
            done += chunk
        }
    }

    /// The 64-bit FNV-1a checksum of [offset, offset+length).
    public func checksum(offset: UInt64, length: Int) throws -> UInt64 {
        try read(offset: offset, length: length).withUnsafeBytes(fnv1a64)
    }

    private static var lastError: String {
        nbd_get_error().map { String(cString: $0) } ?? "errno \(nbd_get_errno())"
    }

    /// libnbd parses URIs only: the old Xen forms become `nbd://HOST:PORT/`.
    static func libnbdURI(_ address: String) -> String {
        guard address.hasPrefix("nbd:"), !address.hasPrefix("nbd://"), !address.hasPrefix("nbd+") else { return address }
        let rest = address.dropFirst(4)
        guard let separator = rest.lastIndex(where: { $0 == ":" || $0 == " " }) else { return address }
        return "nbd://\(rest[..<separator]):\(rest[rest.index(after: separator)...])/"
    }
}

/// 64-bit FNV-1a of some bytes: the tests' checksum of data.
public func fnv1a64(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
    return hash
}

/// 64-bit FNV-1a of a byte array.
public func fnv1a64(_ bytes: [UInt8]) -> UInt64 { bytes.withUnsafeBytes(fnv1a64) }
