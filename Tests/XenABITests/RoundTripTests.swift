import Testing
import XenABI
import XenABIReference

/// Each Swift wire struct against a struct built field-by-field in C:
/// C bytes -> Swift decode gives the same fields; Swift encode (into a
/// poisoned buffer) gives exactly C's bytes, padding included; and C reads
/// the Swift bytes back as the same fields.
@Suite("XenABI encode/decode round trips against C-built structs")
struct RoundTripTests {
    static let iterations = 200

    @Test func blkifRequestSegment() {
        var rng = XorShift(seed: 0x5E6)
        for _ in 0..<Self.iterations {
            let seg = BlkifSegment(gref: .random(in: .min ... .max, using: &rng),
                                   firstSect: .random(in: .min ... .max, using: &rng),
                                   lastSect: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(BlkifSegment.size, poison: 0)
            xar_blkif_segment_encode(c.pointer, seg.gref, seg.firstSect, seg.lastSect)
            #expect(BlkifSegment(decoding: c.pointer) == seg)
            let s = WireBuffer(BlkifSegment.size)
            seg.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(seg): \(byteDiff(s.bytes, c.bytes))")
        }
    }

    @Test func blkifRequest() {
        var rng = XorShift(seed: 0xB10C)
        for iteration in 0..<Self.iterations {
            let op = UInt8.random(in: 0...6, using: &rng)
            let nseg = UInt8.random(in: 0...11, using: &rng)
            let handle = UInt16.random(in: .min ... .max, using: &rng)
            let id = UInt64.random(in: .min ... .max, using: &rng)
            let sector = UInt64.random(in: .min ... .max, using: &rng)
            let grefs = (0..<11).map { _ in UInt32.random(in: .min ... .max, using: &rng) }
            let firsts = (0..<11).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
            let lasts = (0..<11).map { _ in UInt8.random(in: .min ... .max, using: &rng) }

            // C -> Swift
            let c = WireBuffer(BlkifRequest.size, poison: 0)
            xar_blkif_request_encode(c.pointer, op, nseg, handle, id, sector, grefs, firsts, lasts)
            let d = BlkifRequest(decoding: c.pointer)
            #expect(d.operation == op && d.nrSegments == nseg && d.handle == handle
                    && d.id == id && d.sectorNumber == sector, "iteration \(iteration): header fields")
            for i in 0..<11 {
                #expect(d.segments[i] == BlkifSegment(gref: grefs[i], firstSect: firsts[i], lastSect: lasts[i]),
                        "iteration \(iteration): seg[\(i)]")
            }

            // Swift -> bytes identical to C's (the whole 112-byte slot, padding zero)
            let swift = BlkifRequest(operation: op, nrSegments: nseg, handle: handle, id: id, sectorNumber: sector,
                                     segments: InlineArray { i in
                                         BlkifSegment(gref: grefs[i], firstSect: firsts[i], lastSect: lasts[i])
                                     })
            let s = WireBuffer(BlkifRequest.size)
            swift.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "iteration \(iteration): \(byteDiff(s.bytes, c.bytes))")

            // Swift bytes -> C
            var o = (op: UInt8(0), nseg: UInt8(0), handle: UInt16(0), id: UInt64(0), sector: UInt64(0))
            var og = [UInt32](repeating: 0, count: 11)
            var of = [UInt8](repeating: 0, count: 11)
            var ol = [UInt8](repeating: 0, count: 11)
            xar_blkif_request_decode(s.pointer, &o.op, &o.nseg, &o.handle, &o.id, &o.sector, &og, &of, &ol)
            #expect(o.op == op && o.nseg == nseg && o.handle == handle && o.id == id && o.sector == sector)
            #expect(og == grefs && of == firsts && ol == lasts, "iteration \(iteration): segments read by C")
        }
    }

    @Test func blkifRequestDiscard() {
        var rng = XorShift(seed: 0xD15C)
        for iteration in 0..<Self.iterations {
            let flag = UInt8.random(in: .min ... .max, using: &rng)
            let handle = UInt16.random(in: .min ... .max, using: &rng)
            let id = UInt64.random(in: .min ... .max, using: &rng)
            let sector = UInt64.random(in: .min ... .max, using: &rng)
            let count = UInt64.random(in: .min ... .max, using: &rng)

            let c = WireBuffer(BlkifRequest.size, poison: 0)
            xar_blkif_discard_encode(c.pointer, flag, handle, id, sector, count)
            let d = BlkifDiscardRequest(decoding: c.pointer)
            #expect(d.operation == BlkifOperation.discard && d.flag == flag && d.handle == handle
                    && d.id == id && d.sectorNumber == sector && d.nrSectors == count, "iteration \(iteration)")

            let s = WireBuffer(BlkifRequest.size)
            BlkifDiscardRequest(flag: flag, handle: handle, id: id, sectorNumber: sector, nrSectors: count)
                .encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "iteration \(iteration): \(byteDiff(s.bytes, c.bytes))")

            var o = (op: UInt8(0), flag: UInt8(0), handle: UInt16(0), id: UInt64(0), sector: UInt64(0), n: UInt64(0))
            xar_blkif_discard_decode(s.pointer, &o.op, &o.flag, &o.handle, &o.id, &o.sector, &o.n)
            #expect(o.op == BlkifOperation.discard && o.flag == flag && o.handle == handle
                    && o.id == id && o.sector == sector && o.n == count)
        }
    }

    @Test func blkifRequestIndirect() {
        var rng = XorShift(seed: 0x1D1)
        for iteration in 0..<Self.iterations {
            let indirectOp = UInt8.random(in: .min ... .max, using: &rng)
            let nseg = UInt16.random(in: .min ... .max, using: &rng)
            let id = UInt64.random(in: .min ... .max, using: &rng)
            let sector = UInt64.random(in: .min ... .max, using: &rng)
            let handle = UInt16.random(in: .min ... .max, using: &rng)
            let grefs = (0..<8).map { _ in UInt32.random(in: .min ... .max, using: &rng) }

            let c = WireBuffer(BlkifRequest.size, poison: 0)
            xar_blkif_indirect_encode(c.pointer, indirectOp, nseg, id, sector, handle, grefs)
            let d = BlkifIndirectRequest(decoding: c.pointer)
            #expect(d.operation == BlkifOperation.indirect && d.indirectOp == indirectOp && d.nrSegments == nseg
                    && d.id == id && d.sectorNumber == sector && d.handle == handle, "iteration \(iteration)")
            for i in 0..<8 { #expect(d.indirectGrefs[i] == grefs[i], "iteration \(iteration): indirect_grefs[\(i)]") }

            let s = WireBuffer(BlkifRequest.size)
            BlkifIndirectRequest(indirectOp: indirectOp, nrSegments: nseg, id: id, sectorNumber: sector,
                                 handle: handle, indirectGrefs: InlineArray { grefs[$0] })
                .encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "iteration \(iteration): \(byteDiff(s.bytes, c.bytes))")

            var o = (op: UInt8(0), iop: UInt8(0), nseg: UInt16(0), id: UInt64(0), sector: UInt64(0), handle: UInt16(0))
            var og = [UInt32](repeating: 0, count: 8)
            xar_blkif_indirect_decode(s.pointer, &o.op, &o.iop, &o.nseg, &o.id, &o.sector, &o.handle, &og)
            #expect(o.op == BlkifOperation.indirect && o.iop == indirectOp && o.nseg == nseg
                    && o.id == id && o.sector == sector && o.handle == handle && og == grefs)
        }
    }

    @Test func blkifResponse() {
        var rng = XorShift(seed: 0x2E5)
        for _ in 0..<Self.iterations {
            let r = BlkifResponse(id: .random(in: .min ... .max, using: &rng),
                                  operation: .random(in: .min ... .max, using: &rng),
                                  status: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(BlkifResponse.size, poison: 0)
            xar_blkif_response_encode(c.pointer, r.id, r.operation, r.status)
            #expect(BlkifResponse(decoding: c.pointer) == r)
            let s = WireBuffer(BlkifResponse.size)
            r.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(r): \(byteDiff(s.bytes, c.bytes))")
            var o = (id: UInt64(0), op: UInt8(0), status: Int16(0))
            xar_blkif_response_decode(s.pointer, &o.id, &o.op, &o.status)
            #expect(BlkifResponse(id: o.id, operation: o.op, status: o.status) == r)
        }
    }

    @Test func netifTxRequest() {
        var rng = XorShift(seed: 0x7E1)
        for _ in 0..<Self.iterations {
            let r = NetifTxRequest(gref: .random(in: .min ... .max, using: &rng),
                                   offset: .random(in: .min ... .max, using: &rng),
                                   flags: .random(in: .min ... .max, using: &rng),
                                   id: .random(in: .min ... .max, using: &rng),
                                   size: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(NetifTxRequest.size, poison: 0)
            xar_netif_tx_request_encode(c.pointer, r.gref, r.offset, r.flags, r.id, r.size)
            #expect(NetifTxRequest(decoding: c.pointer) == r)
            let s = WireBuffer(NetifTxRequest.size)
            r.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(r): \(byteDiff(s.bytes, c.bytes))")
            var o = (gref: UInt32(0), offset: UInt16(0), flags: UInt16(0), id: UInt16(0), size: UInt16(0))
            xar_netif_tx_request_decode(s.pointer, &o.gref, &o.offset, &o.flags, &o.id, &o.size)
            #expect(NetifTxRequest(gref: o.gref, offset: o.offset, flags: o.flags, id: o.id, size: o.size) == r)
        }
    }

    @Test func netifExtraInfoGSO() {
        var rng = XorShift(seed: 0x650)
        for _ in 0..<Self.iterations {
            let type = UInt8.random(in: .min ... .max, using: &rng)
            let flags = UInt8.random(in: .min ... .max, using: &rng)
            let size = UInt16.random(in: .min ... .max, using: &rng)
            let gsoType = UInt8.random(in: .min ... .max, using: &rng)
            let features = UInt16.random(in: .min ... .max, using: &rng)

            let c = WireBuffer(NetifExtraInfo.size, poison: 0)
            xar_netif_extra_gso_encode(c.pointer, type, flags, size, gsoType, features)
            let d = NetifExtraInfo(decoding: c.pointer)
            #expect(d.type == type && d.flags == flags && d.gsoSize == size && d.gsoType == gsoType)
            for i in 0..<6 { #expect(d.payload[i] == c.bytes[2 + i], "payload[\(i)] is u byte \(i)") }

            // Build the union through the Swift offsets.
            typealias O = NetifExtraInfo.Offset
            let payload = payloadAtOffsets { p in
                p.storeBytes(of: size.littleEndian, toByteOffset: O.gsoSize, as: UInt16.self)
                p.storeBytes(of: gsoType, toByteOffset: O.gsoType, as: UInt8.self)
                p.storeBytes(of: features.littleEndian, toByteOffset: O.gsoFeatures, as: UInt16.self)
            }
            let s = WireBuffer(NetifExtraInfo.size)
            NetifExtraInfo(type: type, flags: flags, payload: payload).encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(byteDiff(s.bytes, c.bytes))")

            var o = (type: UInt8(0), flags: UInt8(0), size: UInt16(0), gsoType: UInt8(0), pad: UInt8(0xff), features: UInt16(0))
            xar_netif_extra_decode_gso(s.pointer, &o.type, &o.flags, &o.size, &o.gsoType, &o.pad, &o.features)
            #expect(o.type == type && o.flags == flags && o.size == size && o.gsoType == gsoType
                    && o.pad == 0 && o.features == features)
        }
    }

    @Test func netifExtraInfoMcastAndHash() {
        var rng = XorShift(seed: 0x3C)
        typealias O = NetifExtraInfo.Offset
        for _ in 0..<Self.iterations {
            let flags = UInt8.random(in: .min ... .max, using: &rng)
            let addr = (0..<6).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
            let c = WireBuffer(NetifExtraInfo.size, poison: 0)
            xar_netif_extra_mcast_encode(c.pointer, NetifExtraType.mcastAdd, flags, addr)
            let payload = payloadAtOffsets { p in
                for i in 0..<6 { p.storeBytes(of: addr[i], toByteOffset: O.mcastAddr + i, as: UInt8.self) }
            }
            let s = WireBuffer(NetifExtraInfo.size)
            NetifExtraInfo(type: NetifExtraType.mcastAdd, flags: flags, payload: payload).encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "mcast: \(byteDiff(s.bytes, c.bytes))")
            let d = NetifExtraInfo(decoding: c.pointer)
            #expect(d.type == NetifExtraType.mcastAdd && d.flags == flags)
            for i in 0..<6 { #expect(d.payload[i] == c.bytes[2 + i]) }

            let hashType = UInt8.random(in: .min ... .max, using: &rng)
            let algorithm = UInt8.random(in: .min ... .max, using: &rng)
            let value = (0..<4).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
            let ch = WireBuffer(NetifExtraInfo.size, poison: 0)
            xar_netif_extra_hash_encode(ch.pointer, NetifExtraType.hash, flags, hashType, algorithm, value)
            let hp = payloadAtOffsets { p in
                p.storeBytes(of: hashType, toByteOffset: O.hashType, as: UInt8.self)
                p.storeBytes(of: algorithm, toByteOffset: O.hashAlgorithm, as: UInt8.self)
                for i in 0..<4 { p.storeBytes(of: value[i], toByteOffset: O.hashValue + i, as: UInt8.self) }
            }
            let sh = WireBuffer(NetifExtraInfo.size)
            NetifExtraInfo(type: NetifExtraType.hash, flags: flags, payload: hp).encode(to: sh.pointer)
            #expect(sh.bytes == ch.bytes, "hash: \(byteDiff(sh.bytes, ch.bytes))")
        }
    }

    @Test func netifTxResponse() {
        var rng = XorShift(seed: 0x7E2)
        for _ in 0..<Self.iterations {
            let r = NetifTxResponse(id: .random(in: .min ... .max, using: &rng),
                                    status: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(NetifTxResponse.size, poison: 0)
            xar_netif_tx_response_encode(c.pointer, r.id, r.status)
            #expect(NetifTxResponse(decoding: c.pointer) == r)
            let s = WireBuffer(NetifTxResponse.size)
            r.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(r): \(byteDiff(s.bytes, c.bytes))")
            var o = (id: UInt16(0), status: Int16(0))
            xar_netif_tx_response_decode(s.pointer, &o.id, &o.status)
            #expect(NetifTxResponse(id: o.id, status: o.status) == r)
        }
    }

    @Test func netifRxRequest() {
        var rng = XorShift(seed: 0x2E1)
        for _ in 0..<Self.iterations {
            let r = NetifRxRequest(id: .random(in: .min ... .max, using: &rng),
                                   gref: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(NetifRxRequest.size, poison: 0)
            xar_netif_rx_request_encode(c.pointer, r.id, r.gref)
            #expect(NetifRxRequest(decoding: c.pointer) == r)
            let s = WireBuffer(NetifRxRequest.size)
            r.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(r): \(byteDiff(s.bytes, c.bytes))")
            var o = (id: UInt16(0), gref: UInt32(0))
            xar_netif_rx_request_decode(s.pointer, &o.id, &o.gref)
            #expect(NetifRxRequest(id: o.id, gref: o.gref) == r)
        }
    }

    @Test func netifRxResponse() {
        var rng = XorShift(seed: 0x2E2)
        for _ in 0..<Self.iterations {
            let r = NetifRxResponse(id: .random(in: .min ... .max, using: &rng),
                                    offset: .random(in: .min ... .max, using: &rng),
                                    flags: .random(in: .min ... .max, using: &rng),
                                    status: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(NetifRxResponse.size, poison: 0)
            xar_netif_rx_response_encode(c.pointer, r.id, r.offset, r.flags, r.status)
            #expect(NetifRxResponse(decoding: c.pointer) == r)
            let s = WireBuffer(NetifRxResponse.size)
            r.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(r): \(byteDiff(s.bytes, c.bytes))")
            var o = (id: UInt16(0), offset: UInt16(0), flags: UInt16(0), status: Int16(0))
            xar_netif_rx_response_decode(s.pointer, &o.id, &o.offset, &o.flags, &o.status)
            #expect(NetifRxResponse(id: o.id, offset: o.offset, flags: o.flags, status: o.status) == r)
        }
    }

    /// GrantEntryV1 has no codec of its own: its declared offsets are used
    /// directly on the shared grant table.
    @Test func grantEntryV1() {
        var rng = XorShift(seed: 0x6E7)
        typealias O = GrantEntryV1.Offset
        for _ in 0..<Self.iterations {
            let g = GrantEntryV1(flags: .random(in: .min ... .max, using: &rng),
                                 domid: .random(in: .min ... .max, using: &rng),
                                 frame: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(4 * GrantEntryV1.size, poison: 0)   // oversized: see below
            xar_grant_entry_v1_encode(c.pointer, g.flags, g.domid, g.frame)
            let p = UnsafeRawPointer(c.pointer)
            let read = GrantEntryV1(flags: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: O.flags, as: UInt16.self)),
                                    domid: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: O.domid, as: UInt16.self)),
                                    frame: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: O.frame, as: UInt32.self)))
            #expect(read == g)

            // Oversized so that a wrong offset shows up as a difference, not a crash.
            let s = WireBuffer(4 * GrantEntryV1.size, poison: 0)
            s.pointer.storeBytes(of: g.flags.littleEndian, toByteOffset: O.flags, as: UInt16.self)
            s.pointer.storeBytes(of: g.domid.littleEndian, toByteOffset: O.domid, as: UInt16.self)
            s.pointer.storeBytes(of: g.frame.littleEndian, toByteOffset: O.frame, as: UInt32.self)
            let cImage = c.bytes
            #expect(s.bytes == cImage, "\(byteDiff(s.bytes, cImage))")
            var o = (flags: UInt16(0), domid: UInt16(0), frame: UInt32(0))
            xar_grant_entry_v1_decode(s.pointer, &o.flags, &o.domid, &o.frame)
            #expect(GrantEntryV1(flags: o.flags, domid: o.domid, frame: o.frame) == g)
        }
    }

    @Test func xsdSockmsg() {
        var rng = XorShift(seed: 0x5D)
        for _ in 0..<Self.iterations {
            let h = XenStoreMessageHeader(type: .random(in: .min ... .max, using: &rng),
                                          reqId: .random(in: .min ... .max, using: &rng),
                                          txId: .random(in: .min ... .max, using: &rng),
                                          len: .random(in: .min ... .max, using: &rng))
            let c = WireBuffer(XenStoreMessageHeader.size, poison: 0)
            xar_xsd_sockmsg_encode(c.pointer, h.type, h.reqId, h.txId, h.len)
            #expect(XenStoreMessageHeader(decoding: c.pointer) == h)
            let s = WireBuffer(XenStoreMessageHeader.size)
            h.encode(to: s.pointer)
            #expect(s.bytes == c.bytes, "\(h): \(byteDiff(s.bytes, c.bytes))")
            var o = (type: UInt32(0), reqId: UInt32(0), txId: UInt32(0), len: UInt32(0))
            xar_xsd_sockmsg_decode(s.pointer, &o.type, &o.reqId, &o.txId, &o.len)
            #expect(XenStoreMessageHeader(type: o.type, reqId: o.reqId, txId: o.txId, len: o.len) == h)
        }
    }
}

/// The 6-byte netif_extra_info union, built by storing at the Swift offsets
/// (which count from the start of the struct) into a zeroed, oversized
/// scratch struct; a store outside the union shows up as a failure.
func payloadAtOffsets(sourceLocation: SourceLocation = #_sourceLocation,
                      _ store: (UnsafeMutableRawPointer) -> Void) -> InlineArray<6, UInt8> {
    let scratch = WireBuffer(4 * NetifExtraInfo.size, poison: 0)
    store(scratch.pointer)
    let b = scratch.bytes
    #expect(b[0..<2].allSatisfy { $0 == 0 } && b[NetifExtraInfo.size...].allSatisfy { $0 == 0 },
            "a union field offset points outside u (bytes 2..<8): \(b)", sourceLocation: sourceLocation)
    return InlineArray { b[2 + $0] }
}
