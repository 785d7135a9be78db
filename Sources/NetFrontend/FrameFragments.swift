import Glibc
import NetworkPlumbing

/// A frame laid out over several buffers (the iovecs a TAP read filled or
/// a TAP write will gather): the first `length` bytes of `count` vectors.
/// What the software checksum paths need: read a window of headers,
/// write a few bytes anywhere, sum a range.
struct FrameFragments {
    let vectors: UnsafePointer<iovec>
    let count: Int
    let length: Int

    /// Copies bytes [offset, offset + n) into `destination` (n within the frame).
    func copy(from offset: Int, count n: Int, into destination: UnsafeMutableRawPointer) {
        var skip = offset
        var done = 0
        var i = 0
        while done < n && i < count {
            let len = vectors[i].iov_len
            if skip >= len { skip -= len; i += 1; continue }
            let take = min(len - skip, n - done)
            memcpy(destination + done, vectors[i].iov_base! + skip, take)
            done += take
            skip = 0
            i += 1
        }
    }

    /// Stores `value` big-endian at `offset` (the two bytes may sit in two buffers).
    func storeBigEndian16(_ value: UInt16, at offset: Int) {
        storeByte(UInt8(value >> 8), at: offset)
        storeByte(UInt8(value & 0xff), at: offset + 1)
    }

    private func storeByte(_ b: UInt8, at offset: Int) {
        var skip = offset
        for i in 0..<count {
            let len = vectors[i].iov_len
            if skip < len {
                vectors[i].iov_base!.storeBytes(of: b, toByteOffset: skip, as: UInt8.self)
                return
            }
            skip -= len
        }
    }

    /// The one's complement sum (RFC 1071, not yet folded) of bytes
    /// [offset, length), as big-endian 16-bit words.
    func sum(from offset: Int) -> InternetChecksum {
        var c = InternetChecksum()
        var skip = offset
        var left = length - offset
        var i = 0
        while left > 0 && i < count {
            let len = vectors[i].iov_len
            if skip >= len { skip -= len; i += 1; continue }
            let take = min(len - skip, left)
            c.add(UnsafeRawPointer(vectors[i].iov_base! + skip), take)
            left -= take
            skip = 0
            i += 1
        }
        return c
    }

    /// Completes a partial checksum (virtio NEEDS_CSUM, netif csum_blank):
    /// the field at `start + offset` holds the pseudo-header sum; the sum
    /// from `start` to the end, folded and complemented, replaces it
    /// (0 becomes 0xffff, as UDP needs and the kernel's
    /// skb_checksum_help does).
    func completeChecksum(start: Int, offset: Int) {
        let folded = sum(from: start).folded
        let result = ~folded
        storeBigEndian16(result == 0 ? 0xffff : result, at: start + offset)
    }

    /// Puts the TCP pseudo-header sum (addresses, protocol, TCP length of
    /// the whole frame) in the checksum field, as a partial checksum must
    /// hold it: Linux netfront's fixup of a GSO frame that came without
    /// NETRXF_csum_blank. `headers` is a contiguous copy (or view) of the
    /// frame's first bytes, at least up to the end of the IP addresses.
    func setTCPPseudoHeaderSum(layout: FrameLayout, headers: UnsafeRawBufferPointer) {
        var c = InternetChecksum()
        let tcpLength = UInt32(length - layout.transportOffset)
        let addresses: Int
        let addressBytes: Int
        switch layout.network {
        case .ipv4: addresses = layout.networkOffset + 12; addressBytes = 8
        case .ipv6: addresses = layout.networkOffset + 8; addressBytes = 32
        }
        c.add(headers.baseAddress! + addresses, addressBytes)
        c.addWord(UInt16(truncatingIfNeeded: tcpLength >> 16))
        c.addWord(UInt16(truncatingIfNeeded: tcpLength))
        c.addWord(6)   // IPPROTO_TCP
        storeBigEndian16(c.folded, at: layout.transportOffset + layout.checksumOffset)
    }
}

/// RFC 1071's sum, fed in pieces of any length (a piece may end in the
/// middle of a 16-bit word; the next one finishes it).
struct InternetChecksum {
    private var total: UInt64 = 0
    private var odd = false

    mutating func addWord(_ w: UInt16) {
        precondition(!odd, "words are added on word boundaries")
        total &+= UInt64(w)
    }

    mutating func add(_ p: UnsafeRawPointer, _ n: Int) {
        var i = 0
        if odd && n > 0 {
            total &+= UInt64(p.load(fromByteOffset: 0, as: UInt8.self))
            odd = false
            i = 1
        }
        // 8 bytes at a time: four big-endian words summed in a 64-bit
        // accumulator (at most 2^16 pieces of 2^18 per call never overflow).
        var wide: UInt64 = 0
        while n - i >= 8 {
            let v = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            wide &+= (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff)
            i += 8
        }
        total &+= wide
        while n - i >= 2 {
            total &+= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << 8
                | UInt64(p.load(fromByteOffset: i + 1, as: UInt8.self))
            i += 2
        }
        if i < n {
            total &+= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << 8
            odd = true
        }
    }

    /// The sum folded to 16 bits (not complemented).
    var folded: UInt16 {
        var s = total
        while s >> 16 != 0 { s = (s & 0xffff) + (s >> 16) }
        return UInt16(s)
    }
}
