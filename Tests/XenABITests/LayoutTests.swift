import Testing
import XenABI
import XenABIReference

/// Every size, offset and constant XenABI declares, against Xen's C headers.
struct RingKind: Sendable, CustomStringConvertible {
    var tag: String
    var kind: Int
    var entrySize: Int
    var description: String { tag }

    static let all = [
        RingKind(tag: "blkif", kind: Int(XAR_RING_BLKIF), entrySize: RingEntrySize.blkif),
        RingKind(tag: "netif_tx", kind: Int(XAR_RING_NETIF_TX), entrySize: RingEntrySize.netifTx),
        RingKind(tag: "netif_rx", kind: Int(XAR_RING_NETIF_RX), entrySize: RingEntrySize.netifRx),
    ]
}

@Suite("XenABI sizes, offsets and constants equal Xen's C headers")
struct LayoutTests {
    @Test func referenceTableIsPresent() {
        // If this fails, every other test in the suite fails by "no C reference value".
        #expect(CReference.table.count > 200)
        #expect(CReference.table["sizeof(struct blkif_request)"] == 112)
    }

    @Test func sharedRingHeader() { check(Claims.sharedRingHeader) }
    @Test func ringSlotsAndPages() { check(Claims.ringSlots) }
    @Test func blkifRequestSegment() { check(Claims.blkifSegment) }
    @Test func blkifRequest() { check(Claims.blkifRequest) }
    @Test func blkifRequestDiscard() { check(Claims.blkifDiscard) }
    @Test func blkifRequestIndirect() { check(Claims.blkifIndirect) }
    @Test func blkifResponse() { check(Claims.blkifResponse) }
    @Test func blkifConstants() { check(Claims.blkifConstants) }

    /// Pages of segment descriptors an indirect request needs: whole pages
    /// of C's struct blkif_request_segment, at most the header's maximum.
    @Test func blkifIndirectPages() {
        let segment = Int(CReference.table["sizeof(struct blkif_request_segment)"] ?? 0)
        let page = 1 << Int(CReference.table["XEN_PAGE_SHIFT"] ?? 0)
        let maxPages = Int(CReference.table["BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST"] ?? 0)
        #expect(segment > 0 && page > 1 && maxPages > 0)
        for n in [1, 11, 12, 128, 256, 511, 512, 513, 1024, 4095, 4096] {
            let pages: Int = (n * segment + page - 1) / page
            #expect(Blkif.indirectPages(segments: n) == pages, "\(n) segments")
        }
        #expect(Blkif.indirectPages(segments: maxPages * Blkif.segmentsPerIndirectPage) == maxPages)
    }

    @Test func netifTxRequest() { check(Claims.netifTxRequest) }
    @Test func netifExtraInfo() { check(Claims.netifExtraInfo) }
    @Test func netifTxResponse() { check(Claims.netifTxResponse) }
    @Test func netifRxRequest() { check(Claims.netifRxRequest) }
    @Test func netifRxResponse() { check(Claims.netifRxResponse) }
    @Test func netifConstants() { check(Claims.netifConstants) }
    @Test func grantEntryV1() { check(Claims.grantEntry) }
    @Test func grantConstants() { check(Claims.grantConstants) }
    @Test func xenbusStateRawValues() { check(Claims.xenbus) }
    @Test func xsdSockmsg() { check(Claims.xenstoreHeader) }
    @Test func xenstoreConstants() { check(Claims.xenstoreConstants) }

    /// The claims name every entry of the C table: nothing the reference
    /// exports is left unchecked, and no claim names a value C lacks.
    @Test func claimsCoverTheWholeReferenceTable() {
        var claimed = Set<String>()
        for group in Claims.all {
            for claim in group.claims { claimed.insert(claim.c) }
        }
        let exported = Set(CReference.table.keys)
        for name in exported.subtracting(claimed).sorted() {
            Issue.record("C reference value \(name) = \(CReference.table[name]!) is not checked against XenABI")
        }
        for name in claimed.subtracting(exported).sorted() {
            Issue.record("XenABI claim \(name) has no C reference value")
        }
    }

    /// The rounding rule of SharedRingLayout.slots against __CONST_RING_SIZE
    /// and against __RING_SIZE evaluated on a real buffer of that many pages
    /// (what FRONT_RING_INIT/BACK_RING_INIT store), orders 0...4.
    @Test(arguments: RingKind.all)
    func ringSlotsOnBuffers(ring: RingKind) {
        #expect(xar_ring_entry_size(Int32(ring.kind)) == ring.entrySize, "entry size of \(ring.tag)")
        for order in 0...SharedRingLayout.maxPageOrder {
            let pages = 1 << order
            let swift = SharedRingLayout.slots(pages: pages, entrySize: ring.entrySize)
            let onBuffer = Int(xar_ring_size_on_buffer(Int32(ring.kind), UInt32(pages)))
            #expect(swift == onBuffer, "\(ring.tag) at \(pages) pages: Swift \(swift), __RING_SIZE \(onBuffer)")
            #expect(swift.nonzeroBitCount == 1, "\(ring.tag) at \(pages) pages is a power of two")
        }
    }

    @Test func xenbusStateDomainIsExactlyTheCEnum() {
        for (c, state) in Claims.xenbusStates {
            #expect(XenbusState(rawValue: UInt32(CReference.table[c] ?? -1)) == state, "\(c)")
            #expect(XenbusState(xenstoreValue: String(CReference.table[c] ?? -1)) == state, "\(c) from xenstore text")
        }
        // One past XenbusStateReconfigured is not a state.
        let last = CReference.table["XenbusStateReconfigured"] ?? 8
        #expect(XenbusState(rawValue: UInt32(last + 1)) == nil)
    }

    @Test func grantStatusNamesAreTheCMacroNames() {
        for (c, value, _) in Claims.grantStatuses {
            #expect(GrantStatus.name(value) == c)
        }
    }

    @Test func xenstoreMessageTypesAreAllTheCTypes() {
        // Every raw value below XS_TYPE_COUNT that C defines is a Swift case and vice versa.
        let cValues = Set(Claims.xenstoreTypes.compactMap { CReference.table[$0.c] })
        let count = CReference.table["XS_TYPE_COUNT"] ?? 0
        for raw in 0..<count {
            let swift = XenStoreMessageType(rawValue: UInt32(raw))
            #expect((swift != nil) == cValues.contains(raw), "message type \(raw)")
        }
    }

    @Test func xsdErrorsTable() {
        let c = CReference.xsdErrors
        let swift = XenStoreErrorName.all
        #expect(c.count == 16, "xsd_errors[] length")
        #expect(swift.count == c.count, "XenStoreErrorName.all has \(swift.count) entries, xsd_errors[] \(c.count)")
        for (i, entry) in c.enumerated() {
            guard i < swift.count else {
                Issue.record("XenStoreErrorName.all lacks xsd_errors[\(i)] = {\(entry.errno), \"\(entry.name)\"}")
                continue
            }
            #expect(swift[i].name == entry.name && swift[i].errno == entry.errno,
                    "xsd_errors[\(i)]: C {\(entry.errno), \"\(entry.name)\"}, Swift {\(swift[i].errno), \"\(swift[i].name)\"}")
            #expect(XenStoreErrorName.errno(named: entry.name) == entry.errno, "errno(named: \(entry.name))")
            #expect(XenStoreErrorName.name(of: entry.errno) == entry.name, "name(of: \(entry.errno))")
        }
        // Unknown errno values fall back to the first entry, as xenstored does.
        #expect(XenStoreErrorName.name(of: 9999) == c.first?.name)
    }
}
