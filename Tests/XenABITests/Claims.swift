import XenABI

// What XenABI claims about Xen's wire ABI, written as C expressions and the
// Swift declaration that corresponds to each. LayoutTests checks every group
// against the C table; CoverageTests checks that together they name every
// entry of the C table (so nothing the reference exports goes unchecked).
//
// Field sizes come from the Swift property's type where XenABI has a typed
// property, and from the distance to the next declared offset where it only
// declares an offset (marked "implied").

enum Claims {
    static let u32Size = MemoryLayout<UInt32>.size

    // MARK: shared ring header

    static var sharedRingHeader: [Claim] {
        typealias O = SharedRingLayout.Offset
        var s = StructClaims("struct blkif_sring", size: SharedRingLayout.headerSize + Blkif.slotSize,
                             "SharedRingLayout.headerSize + Blkif.slotSize (ring[1])")
        s.field("req_prod", offset: O.reqProd, size: u32Size, "SharedRingLayout.Offset.reqProd")
        s.field("req_event", offset: O.reqEvent, size: u32Size, "SharedRingLayout.Offset.reqEvent")
        s.field("rsp_prod", offset: O.rspProd, size: u32Size, "SharedRingLayout.Offset.rspProd")
        s.field("rsp_event", offset: O.rspEvent, size: u32Size, "SharedRingLayout.Offset.rspEvent")
        s.field("pvt", offset: O.pvt, size: O.pad - O.pvt, "SharedRingLayout.Offset.pvt", impliedSize: true)
        s.field("__pad", offset: O.pad, size: O.ring - O.pad, "SharedRingLayout.Offset.pad", impliedSize: true)
        s.field("ring", offset: O.ring, size: Blkif.slotSize, "SharedRingLayout.Offset.ring")
        var claims = s.claims
        claims.append(Claim("offsetof(struct blkif_sring, ring)", SharedRingLayout.headerSize,
                            "SharedRingLayout.headerSize"))
        claims.append(Claim("offsetof(struct netif_tx_sring, ring)", SharedRingLayout.headerSize,
                            "SharedRingLayout.headerSize (netif tx)"))
        claims.append(Claim("fieldsize(struct netif_tx_sring, ring)", RingEntrySize.netifTx,
                            "RingEntrySize.netifTx (ring[1])"))
        claims.append(Claim("offsetof(struct netif_rx_sring, ring)", SharedRingLayout.headerSize,
                            "SharedRingLayout.headerSize (netif rx)"))
        claims.append(Claim("fieldsize(struct netif_rx_sring, ring)", RingEntrySize.netifRx,
                            "RingEntrySize.netifRx (ring[1])"))
        claims.append(Claim("offsetof(struct xen_netif_ctrl_sring, ring)", SharedRingLayout.headerSize,
                            "SharedRingLayout.headerSize (netif ctrl)"))
        claims.append(Claim("fieldsize(struct xen_netif_ctrl_sring, ring)", RingEntrySize.netifCtrl,
                            "RingEntrySize.netifCtrl (ring[1])"))
        claims.append(Claim("sizeof(RING_IDX)", u32Size, "UInt32 ring indices (BackRing/FrontRing)"))
        return claims
    }

    // MARK: ring slots

    static let ringPages = [1, 2, 4, 8, 16]

    static var ringSlots: [Claim] {
        var claims = [
            Claim("sizeof(union blkif_sring_entry)", Blkif.slotSize, "Blkif.slotSize"),
            Claim("sizeof(union blkif_sring_entry)", RingEntrySize.blkif, "RingEntrySize.blkif"),
            Claim("sizeof(union netif_tx_sring_entry)", RingEntrySize.netifTx, "RingEntrySize.netifTx"),
            Claim("sizeof(union netif_rx_sring_entry)", RingEntrySize.netifRx, "RingEntrySize.netifRx"),
            Claim("sizeof(union xen_netif_ctrl_sring_entry)", RingEntrySize.netifCtrl, "RingEntrySize.netifCtrl"),
            Claim("__CONST_RING_SIZE(xen_netif_ctrl, 1 pages)",
                  SharedRingLayout.slots(pages: 1, entrySize: RingEntrySize.netifCtrl),
                  "SharedRingLayout.slots(pages: 1, entrySize: RingEntrySize.netifCtrl)"),
            Claim("XEN_PAGE_SHIFT", XenPage.shift, "XenPage.shift"),
            Claim("1 << XEN_PAGE_SHIFT", XenPage.size, "XenPage.size"),
        ]
        for (tag, entry) in [("blkif", RingEntrySize.blkif), ("netif_tx", RingEntrySize.netifTx),
                             ("netif_rx", RingEntrySize.netifRx)] {
            for order in 0...SharedRingLayout.maxPageOrder {
                let pages = 1 << order
                claims.append(Claim("__CONST_RING_SIZE(\(tag), \(pages) pages)",
                                    SharedRingLayout.slots(pages: pages, entrySize: entry),
                                    "SharedRingLayout.slots(pages: \(pages), entrySize: \(entry))"))
            }
        }
        return claims
    }

    // MARK: blkif

    static var blkifSegment: [Claim] {
        let v = BlkifSegment(gref: 0, firstSect: 0, lastSect: 0)
        typealias O = BlkifSegment.Offset
        var s = StructClaims("struct blkif_request_segment", size: BlkifSegment.size, "BlkifSegment.size")
        s.field("gref", offset: O.gref, size: MemoryLayout.size(ofValue: v.gref), "BlkifSegment.gref")
        s.field("first_sect", offset: O.firstSect, size: MemoryLayout.size(ofValue: v.firstSect), "BlkifSegment.firstSect")
        s.field("last_sect", offset: O.lastSect, size: MemoryLayout.size(ofValue: v.lastSect), "BlkifSegment.lastSect")
        var claims = s.claims
        claims.append(Claim("sizeof(grant_ref_t)", MemoryLayout.size(ofValue: v.gref), "BlkifSegment.gref type"))
        return claims
    }

    static var blkifRequest: [Claim] {
        let v = BlkifRequest(operation: 0, id: 0)
        typealias O = BlkifRequest.Offset
        var s = StructClaims("struct blkif_request", size: BlkifRequest.size, "BlkifRequest.size")
        s.field("operation", offset: O.operation, size: MemoryLayout.size(ofValue: v.operation), "BlkifRequest.operation")
        s.field("nr_segments", offset: O.nrSegments, size: MemoryLayout.size(ofValue: v.nrSegments), "BlkifRequest.nrSegments")
        s.field("handle", offset: O.handle, size: MemoryLayout.size(ofValue: v.handle), "BlkifRequest.handle")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "BlkifRequest.id")
        s.field("sector_number", offset: O.sectorNumber, size: MemoryLayout.size(ofValue: v.sectorNumber), "BlkifRequest.sectorNumber")
        s.field("seg", offset: O.seg, size: v.segments.count * BlkifSegment.size, "BlkifRequest.segments")
        var claims = s.claims
        claims.append(Claim("sizeof(blkif_vdev_t)", MemoryLayout.size(ofValue: v.handle), "BlkifRequest.handle type"))
        claims.append(Claim("sizeof(blkif_sector_t)", MemoryLayout.size(ofValue: v.sectorNumber), "BlkifRequest.sectorNumber type"))
        return claims
    }

    static var blkifDiscard: [Claim] {
        let v = BlkifDiscardRequest(id: 0, sectorNumber: 0, nrSectors: 0)
        typealias O = BlkifDiscardRequest.Offset
        var s = StructClaims("struct blkif_request_discard", size: BlkifDiscardRequest.size, "BlkifDiscardRequest.size")
        s.field("operation", offset: O.operation, size: MemoryLayout.size(ofValue: v.operation), "BlkifDiscardRequest.operation")
        s.field("flag", offset: O.flag, size: MemoryLayout.size(ofValue: v.flag), "BlkifDiscardRequest.flag")
        s.field("handle", offset: O.handle, size: MemoryLayout.size(ofValue: v.handle), "BlkifDiscardRequest.handle")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "BlkifDiscardRequest.id")
        s.field("sector_number", offset: O.sectorNumber, size: MemoryLayout.size(ofValue: v.sectorNumber), "BlkifDiscardRequest.sectorNumber")
        s.field("nr_sectors", offset: O.nrSectors, size: MemoryLayout.size(ofValue: v.nrSectors), "BlkifDiscardRequest.nrSectors")
        return s.claims
    }

    static var blkifIndirect: [Claim] {
        let v = BlkifIndirectRequest(indirectOp: 0, nrSegments: 0, id: 0, sectorNumber: 0,
                                     indirectGrefs: .init(repeating: 0))
        typealias O = BlkifIndirectRequest.Offset
        var s = StructClaims("struct blkif_request_indirect", size: BlkifIndirectRequest.size, "BlkifIndirectRequest.size")
        s.field("operation", offset: O.operation, size: MemoryLayout.size(ofValue: v.operation), "BlkifIndirectRequest.operation")
        s.field("indirect_op", offset: O.indirectOp, size: MemoryLayout.size(ofValue: v.indirectOp), "BlkifIndirectRequest.indirectOp")
        s.field("nr_segments", offset: O.nrSegments, size: MemoryLayout.size(ofValue: v.nrSegments), "BlkifIndirectRequest.nrSegments")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "BlkifIndirectRequest.id")
        s.field("sector_number", offset: O.sectorNumber, size: MemoryLayout.size(ofValue: v.sectorNumber), "BlkifIndirectRequest.sectorNumber")
        s.field("handle", offset: O.handle, size: MemoryLayout.size(ofValue: v.handle), "BlkifIndirectRequest.handle")
        s.field("indirect_grefs", offset: O.indirectGrefs,
                size: v.indirectGrefs.count * MemoryLayout.size(ofValue: v.indirectGrefs[0]), "BlkifIndirectRequest.indirectGrefs")
        return s.claims
    }

    static var blkifResponse: [Claim] {
        let v = BlkifResponse(id: 0, operation: 0, status: 0)
        typealias O = BlkifResponse.Offset
        var s = StructClaims("struct blkif_response", size: BlkifResponse.size, "BlkifResponse.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "BlkifResponse.id")
        s.field("operation", offset: O.operation, size: MemoryLayout.size(ofValue: v.operation), "BlkifResponse.operation")
        s.field("status", offset: O.status, size: MemoryLayout.size(ofValue: v.status), "BlkifResponse.status")
        return s.claims
    }

    static var blkifConstants: [Claim] {
        [
            Claim("BLKIF_OP_READ", BlkifOperation.read, "BlkifOperation.read"),
            Claim("BLKIF_OP_WRITE", BlkifOperation.write, "BlkifOperation.write"),
            Claim("BLKIF_OP_WRITE_BARRIER", BlkifOperation.writeBarrier, "BlkifOperation.writeBarrier"),
            Claim("BLKIF_OP_FLUSH_DISKCACHE", BlkifOperation.flushDiskCache, "BlkifOperation.flushDiskCache"),
            Claim("BLKIF_OP_RESERVED_1", BlkifOperation.reserved1, "BlkifOperation.reserved1"),
            Claim("BLKIF_OP_DISCARD", BlkifOperation.discard, "BlkifOperation.discard"),
            Claim("BLKIF_OP_INDIRECT", BlkifOperation.indirect, "BlkifOperation.indirect"),
            Claim("BLKIF_RSP_OKAY", BlkifStatus.okay, "BlkifStatus.okay"),
            Claim("BLKIF_RSP_ERROR", BlkifStatus.error, "BlkifStatus.error"),
            Claim("BLKIF_RSP_EOPNOTSUPP", BlkifStatus.notSupported, "BlkifStatus.notSupported"),
            Claim("BLKIF_MAX_SEGMENTS_PER_REQUEST", Blkif.maxSegmentsPerRequest, "Blkif.maxSegmentsPerRequest"),
            Claim("BLKIF_MAX_SEGMENTS_PER_REQUEST", BlkifRequest(operation: 0, id: 0).segments.count,
                  "BlkifRequest.segments.count"),
            Claim("BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", Blkif.maxIndirectPagesPerRequest,
                  "Blkif.maxIndirectPagesPerRequest"),
            Claim("BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
                  BlkifIndirectRequest(indirectOp: 0, nrSegments: 0, id: 0, sectorNumber: 0,
                                       indirectGrefs: .init(repeating: 0)).indirectGrefs.count,
                  "BlkifIndirectRequest.indirectGrefs.count"),
            Claim("(1 << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment)", Blkif.segmentsPerIndirectPage,
                  "Blkif.segmentsPerIndirectPage"),
            Claim("BLKIF_DISCARD_SECURE", Blkif.discardSecure, "Blkif.discardSecure"),
            Claim("VDISK_CDROM", Blkif.vdiskCDROM, "Blkif.vdiskCDROM"),
            Claim("VDISK_REMOVABLE", Blkif.vdiskRemovable, "Blkif.vdiskRemovable"),
            Claim("VDISK_READONLY", Blkif.vdiskReadOnly, "Blkif.vdiskReadOnly"),
        ]
    }

    // MARK: netif

    static var netifTxRequest: [Claim] {
        let v = NetifTxRequest(gref: 0, offset: 0, flags: 0, id: 0, size: 0)
        typealias O = NetifTxRequest.Offset
        var s = StructClaims("struct netif_tx_request", size: NetifTxRequest.size, "NetifTxRequest.size")
        s.field("gref", offset: O.gref, size: MemoryLayout.size(ofValue: v.gref), "NetifTxRequest.gref")
        s.field("offset", offset: O.offset, size: MemoryLayout.size(ofValue: v.offset), "NetifTxRequest.offset")
        s.field("flags", offset: O.flags, size: MemoryLayout.size(ofValue: v.flags), "NetifTxRequest.flags")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifTxRequest.id")
        s.field("size", offset: O.size, size: MemoryLayout.size(ofValue: v.size), "NetifTxRequest.size")
        return s.claims
    }

    static var netifExtraInfo: [Claim] {
        let v = NetifExtraInfo(type: 0, flags: 0)
        typealias O = NetifExtraInfo.Offset
        let size = NetifExtraInfo.size
        var s = StructClaims("struct netif_extra_info", size: size, "NetifExtraInfo.size")
        s.field("type", offset: O.type, size: MemoryLayout.size(ofValue: v.type), "NetifExtraInfo.type")
        s.field("flags", offset: O.flags, size: MemoryLayout.size(ofValue: v.flags), "NetifExtraInfo.flags")
        s.field("u", offset: O.gsoSize, size: v.payload.count, "NetifExtraInfo.payload")
        s.field("u.pad", offset: O.gsoSize, size: v.payload.count, "NetifExtraInfo.payload")
        s.field("u.gso.size", offset: O.gsoSize, size: MemoryLayout.size(ofValue: v.gsoSize), "NetifExtraInfo.Offset.gsoSize / .gsoSize")
        s.field("u.gso.type", offset: O.gsoType, size: MemoryLayout.size(ofValue: v.gsoType), "NetifExtraInfo.Offset.gsoType / .gsoType")
        s.field("u.gso.pad", offset: O.gsoPad, size: O.gsoFeatures - O.gsoPad, "NetifExtraInfo.Offset.gsoPad", impliedSize: true)
        s.field("u.gso.features", offset: O.gsoFeatures, size: size - O.gsoFeatures, "NetifExtraInfo.Offset.gsoFeatures", impliedSize: true)
        s.field("u.mcast.addr", offset: O.mcastAddr, size: size - O.mcastAddr, "NetifExtraInfo.Offset.mcastAddr", impliedSize: true)
        s.field("u.hash.type", offset: O.hashType, size: O.hashAlgorithm - O.hashType, "NetifExtraInfo.Offset.hashType", impliedSize: true)
        s.field("u.hash.algorithm", offset: O.hashAlgorithm, size: O.hashValue - O.hashAlgorithm, "NetifExtraInfo.Offset.hashAlgorithm", impliedSize: true)
        s.field("u.hash.value", offset: O.hashValue, size: size - O.hashValue, "NetifExtraInfo.Offset.hashValue", impliedSize: true)
        return s.claims
    }

    static var netifTxResponse: [Claim] {
        let v = NetifTxResponse(id: 0, status: 0)
        typealias O = NetifTxResponse.Offset
        var s = StructClaims("struct netif_tx_response", size: NetifTxResponse.size, "NetifTxResponse.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifTxResponse.id")
        s.field("status", offset: O.status, size: MemoryLayout.size(ofValue: v.status), "NetifTxResponse.status")
        return s.claims
    }

    static var netifRxRequest: [Claim] {
        let v = NetifRxRequest(id: 0, gref: 0)
        typealias O = NetifRxRequest.Offset
        var s = StructClaims("struct netif_rx_request", size: NetifRxRequest.size, "NetifRxRequest.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifRxRequest.id")
        s.field("pad", offset: O.pad, size: O.gref - O.pad, "NetifRxRequest.Offset.pad", impliedSize: true)
        s.field("gref", offset: O.gref, size: MemoryLayout.size(ofValue: v.gref), "NetifRxRequest.gref")
        return s.claims
    }

    static var netifRxResponse: [Claim] {
        let v = NetifRxResponse(id: 0, offset: 0, flags: 0, status: 0)
        typealias O = NetifRxResponse.Offset
        var s = StructClaims("struct netif_rx_response", size: NetifRxResponse.size, "NetifRxResponse.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifRxResponse.id")
        s.field("offset", offset: O.offset, size: MemoryLayout.size(ofValue: v.offset), "NetifRxResponse.offset")
        s.field("flags", offset: O.flags, size: MemoryLayout.size(ofValue: v.flags), "NetifRxResponse.flags")
        s.field("status", offset: O.status, size: MemoryLayout.size(ofValue: v.status), "NetifRxResponse.status")
        return s.claims
    }

    static var netifConstants: [Claim] {
        [
            Claim("NETTXF_csum_blank", NetifTxFlags.csumBlank, "NetifTxFlags.csumBlank"),
            Claim("NETTXF_data_validated", NetifTxFlags.dataValidated, "NetifTxFlags.dataValidated"),
            Claim("NETTXF_more_data", NetifTxFlags.moreData, "NetifTxFlags.moreData"),
            Claim("NETTXF_extra_info", NetifTxFlags.extraInfo, "NetifTxFlags.extraInfo"),
            Claim("NETRXF_data_validated", NetifRxFlags.dataValidated, "NetifRxFlags.dataValidated"),
            Claim("NETRXF_csum_blank", NetifRxFlags.csumBlank, "NetifRxFlags.csumBlank"),
            Claim("NETRXF_more_data", NetifRxFlags.moreData, "NetifRxFlags.moreData"),
            Claim("NETRXF_extra_info", NetifRxFlags.extraInfo, "NetifRxFlags.extraInfo"),
            Claim("NETRXF_gso_prefix", NetifRxFlags.gsoPrefix, "NetifRxFlags.gsoPrefix"),
            Claim("XEN_NETIF_EXTRA_TYPE_NONE", NetifExtraType.none, "NetifExtraType.none"),
            Claim("XEN_NETIF_EXTRA_TYPE_GSO", NetifExtraType.gso, "NetifExtraType.gso"),
            Claim("XEN_NETIF_EXTRA_TYPE_MCAST_ADD", NetifExtraType.mcastAdd, "NetifExtraType.mcastAdd"),
            Claim("XEN_NETIF_EXTRA_TYPE_MCAST_DEL", NetifExtraType.mcastDel, "NetifExtraType.mcastDel"),
            Claim("XEN_NETIF_EXTRA_TYPE_HASH", NetifExtraType.hash, "NetifExtraType.hash"),
            Claim("XEN_NETIF_EXTRA_TYPE_MAX", NetifExtraType.max, "NetifExtraType.max"),
            Claim("XEN_NETIF_EXTRA_FLAG_MORE", NetifExtraType.flagMore, "NetifExtraType.flagMore"),
            Claim("XEN_NETIF_GSO_TYPE_NONE", NetifGSOType.none, "NetifGSOType.none"),
            Claim("XEN_NETIF_GSO_TYPE_TCPV4", NetifGSOType.tcpv4, "NetifGSOType.tcpv4"),
            Claim("XEN_NETIF_GSO_TYPE_TCPV6", NetifGSOType.tcpv6, "NetifGSOType.tcpv6"),
            Claim("NETIF_RSP_DROPPED", NetifStatus.dropped, "NetifStatus.dropped"),
            Claim("NETIF_RSP_ERROR", NetifStatus.error, "NetifStatus.error"),
            Claim("NETIF_RSP_OKAY", NetifStatus.okay, "NetifStatus.okay"),
            Claim("NETIF_RSP_NULL", NetifStatus.null, "NetifStatus.null"),
            Claim("XEN_NETIF_NR_SLOTS_MIN", Netif.nrSlotsMin, "Netif.nrSlotsMin"),
            Claim("XEN_NETIF_MAX_TX_SIZE", Netif.maxTxSize, "Netif.maxTxSize"),
        ]
    }

    // MARK: grant table

    static var grantEntry: [Claim] {
        let v = GrantEntryV1(flags: 0, domid: 0, frame: 0)
        typealias O = GrantEntryV1.Offset
        var s = StructClaims("struct grant_entry_v1", size: GrantEntryV1.size, "GrantEntryV1.size")
        s.field("flags", offset: O.flags, size: MemoryLayout.size(ofValue: v.flags), "GrantEntryV1.flags")
        s.field("domid", offset: O.domid, size: MemoryLayout.size(ofValue: v.domid), "GrantEntryV1.domid")
        s.field("frame", offset: O.frame, size: MemoryLayout.size(ofValue: v.frame), "GrantEntryV1.frame")
        return s.claims
    }

    static let grantStatuses: [(c: String, swift: Int16, declaration: String)] = [
        ("GNTST_okay", GrantStatus.okay, "GrantStatus.okay"),
        ("GNTST_general_error", GrantStatus.generalError, "GrantStatus.generalError"),
        ("GNTST_bad_domain", GrantStatus.badDomain, "GrantStatus.badDomain"),
        ("GNTST_bad_gntref", GrantStatus.badGntref, "GrantStatus.badGntref"),
        ("GNTST_bad_handle", GrantStatus.badHandle, "GrantStatus.badHandle"),
        ("GNTST_bad_virt_addr", GrantStatus.badVirtAddr, "GrantStatus.badVirtAddr"),
        ("GNTST_bad_dev_addr", GrantStatus.badDevAddr, "GrantStatus.badDevAddr"),
        ("GNTST_no_device_space", GrantStatus.noDeviceSpace, "GrantStatus.noDeviceSpace"),
        ("GNTST_permission_denied", GrantStatus.permissionDenied, "GrantStatus.permissionDenied"),
        ("GNTST_bad_page", GrantStatus.badPage, "GrantStatus.badPage"),
        ("GNTST_bad_copy_arg", GrantStatus.badCopyArg, "GrantStatus.badCopyArg"),
        ("GNTST_address_too_big", GrantStatus.addressTooBig, "GrantStatus.addressTooBig"),
        ("GNTST_eagain", GrantStatus.eagain, "GrantStatus.eagain"),
        ("GNTST_no_space", GrantStatus.noSpace, "GrantStatus.noSpace"),
    ]

    static var grantConstants: [Claim] {
        [
            Claim("GTF_invalid", GrantFlags.invalid, "GrantFlags.invalid"),
            Claim("GTF_permit_access", GrantFlags.permitAccess, "GrantFlags.permitAccess"),
            Claim("GTF_type_mask", GrantFlags.typeMask, "GrantFlags.typeMask"),
            Claim("GTF_readonly", GrantFlags.readonly, "GrantFlags.readonly"),
            Claim("GTF_reading", GrantFlags.reading, "GrantFlags.reading"),
            Claim("GTF_writing", GrantFlags.writing, "GrantFlags.writing"),
            Claim("GNTMAP_device_map", GrantMapFlags.deviceMap, "GrantMapFlags.deviceMap"),
            Claim("GNTMAP_host_map", GrantMapFlags.hostMap, "GrantMapFlags.hostMap"),
            Claim("GNTMAP_readonly", GrantMapFlags.readonly, "GrantMapFlags.readonly"),
        ] + grantStatuses.map { Claim($0.c, $0.swift, $0.declaration) }
    }

    // MARK: netif control ring

    static var netifCtrlRequest: [Claim] {
        let v = NetifCtrlRequest(id: 0, type: 0)
        typealias O = NetifCtrlRequest.Offset
        var s = StructClaims("struct xen_netif_ctrl_request", size: NetifCtrlRequest.size, "NetifCtrlRequest.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifCtrlRequest.id")
        s.field("type", offset: O.type, size: MemoryLayout.size(ofValue: v.type), "NetifCtrlRequest.type")
        s.field("data", offset: O.data0, size: MemoryLayout.size(ofValue: v.data), "NetifCtrlRequest.data (data0...data2)")
        return s.claims
    }

    static var netifCtrlResponse: [Claim] {
        let v = NetifCtrlResponse(id: 0, type: 0, status: 0)
        typealias O = NetifCtrlResponse.Offset
        var s = StructClaims("struct xen_netif_ctrl_response", size: NetifCtrlResponse.size, "NetifCtrlResponse.size")
        s.field("id", offset: O.id, size: MemoryLayout.size(ofValue: v.id), "NetifCtrlResponse.id")
        s.field("type", offset: O.type, size: MemoryLayout.size(ofValue: v.type), "NetifCtrlResponse.type")
        s.field("status", offset: O.status, size: MemoryLayout.size(ofValue: v.status), "NetifCtrlResponse.status")
        s.field("data", offset: O.data, size: MemoryLayout.size(ofValue: v.data), "NetifCtrlResponse.data")
        return s.claims
    }

    static var netifCtrlConstants: [Claim] {
        let types: [(String, UInt16, String)] = [
            ("INVALID", NetifCtrlType.invalid, "invalid"), ("GET_HASH_FLAGS", NetifCtrlType.getHashFlags, "getHashFlags"),
            ("SET_HASH_FLAGS", NetifCtrlType.setHashFlags, "setHashFlags"), ("SET_HASH_KEY", NetifCtrlType.setHashKey, "setHashKey"),
            ("GET_HASH_MAPPING_SIZE", NetifCtrlType.getHashMappingSize, "getHashMappingSize"),
            ("SET_HASH_MAPPING_SIZE", NetifCtrlType.setHashMappingSize, "setHashMappingSize"),
            ("SET_HASH_MAPPING", NetifCtrlType.setHashMapping, "setHashMapping"),
            ("SET_HASH_ALGORITHM", NetifCtrlType.setHashAlgorithm, "setHashAlgorithm"),
            ("GET_GREF_MAPPING_SIZE", NetifCtrlType.getGrefMappingSize, "getGrefMappingSize"),
            ("ADD_GREF_MAPPING", NetifCtrlType.addGrefMapping, "addGrefMapping"),
            ("DEL_GREF_MAPPING", NetifCtrlType.delGrefMapping, "delGrefMapping"),
        ]
        let statuses: [(String, UInt32, String)] = [
            ("SUCCESS", NetifCtrlStatus.success, "success"), ("NOT_SUPPORTED", NetifCtrlStatus.notSupported, "notSupported"),
            ("INVALID_PARAMETER", NetifCtrlStatus.invalidParameter, "invalidParameter"),
            ("BUFFER_OVERFLOW", NetifCtrlStatus.bufferOverflow, "bufferOverflow"),
        ]
        let hashTypes: [(String, UInt8, UInt32, String)] = [
            ("IPV4", NetifHashType.ipv4Bit, NetifHashType.ipv4, "ipv4"),
            ("IPV4_TCP", NetifHashType.ipv4TCPBit, NetifHashType.ipv4TCP, "ipv4TCP"),
            ("IPV6", NetifHashType.ipv6Bit, NetifHashType.ipv6, "ipv6"),
            ("IPV6_TCP", NetifHashType.ipv6TCPBit, NetifHashType.ipv6TCP, "ipv6TCP"),
        ]
        return types.map { Claim("XEN_NETIF_CTRL_TYPE_\($0.0)", $0.1, "NetifCtrlType.\($0.2)") }
            + statuses.map { Claim("XEN_NETIF_CTRL_STATUS_\($0.0)", $0.1, "NetifCtrlStatus.\($0.2)") }
            + hashTypes.flatMap { t in [
                Claim("_XEN_NETIF_CTRL_HASH_TYPE_\(t.0)", t.1, "NetifHashType.\(t.3)Bit"),
                Claim("XEN_NETIF_CTRL_HASH_TYPE_\(t.0)", t.2, "NetifHashType.\(t.3)"),
            ] }
            + [Claim("XEN_NETIF_CTRL_HASH_ALGORITHM_NONE", NetifHashAlgorithm.none, "NetifHashAlgorithm.none"),
               Claim("XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ", NetifHashAlgorithm.toeplitz, "NetifHashAlgorithm.toeplitz")]
    }

    // MARK: xenbus

    static let xenbusStates: [(c: String, swift: XenbusState)] = [
        ("XenbusStateUnknown", .unknown),
        ("XenbusStateInitialising", .initialising),
        ("XenbusStateInitWait", .initWait),
        ("XenbusStateInitialised", .initialised),
        ("XenbusStateConnected", .connected),
        ("XenbusStateClosing", .closing),
        ("XenbusStateClosed", .closed),
        ("XenbusStateReconfiguring", .reconfiguring),
        ("XenbusStateReconfigured", .reconfigured),
    ]

    static var xenbus: [Claim] {
        xenbusStates.map { Claim($0.c, $0.swift.rawValue, "XenbusState.\($0.swift)") }
    }

    // MARK: xenstore

    static let xenstoreTypes: [(c: String, swift: XenStoreMessageType)] = [
        ("XS_CONTROL", .control),
        ("XS_DEBUG", .control),
        ("XS_DIRECTORY", .directory),
        ("XS_READ", .read),
        ("XS_GET_PERMS", .getPerms),
        ("XS_WATCH", .watch),
        ("XS_UNWATCH", .unwatch),
        ("XS_TRANSACTION_START", .transactionStart),
        ("XS_TRANSACTION_END", .transactionEnd),
        ("XS_INTRODUCE", .introduce),
        ("XS_RELEASE", .release),
        ("XS_GET_DOMAIN_PATH", .getDomainPath),
        ("XS_WRITE", .write),
        ("XS_MKDIR", .mkdir),
        ("XS_RM", .rm),
        ("XS_SET_PERMS", .setPerms),
        ("XS_WATCH_EVENT", .watchEvent),
        ("XS_ERROR", .error),
        ("XS_IS_DOMAIN_INTRODUCED", .isDomainIntroduced),
        ("XS_RESUME", .resume),
        ("XS_SET_TARGET", .setTarget),
        ("XS_RESET_WATCHES", .resetWatches),
        ("XS_DIRECTORY_PART", .directoryPart),
        ("XS_INVALID", .invalid),
    ]

    static var xenstoreHeader: [Claim] {
        let v = XenStoreMessageHeader(type: 0, reqId: 0, txId: 0, len: 0)
        typealias O = XenStoreMessageHeader.Offset
        var s = StructClaims("struct xsd_sockmsg", size: XenStoreMessageHeader.size, "XenStoreMessageHeader.size")
        s.field("type", offset: O.type, size: MemoryLayout.size(ofValue: v.type), "XenStoreMessageHeader.type")
        s.field("req_id", offset: O.reqId, size: MemoryLayout.size(ofValue: v.reqId), "XenStoreMessageHeader.reqId")
        s.field("tx_id", offset: O.txId, size: MemoryLayout.size(ofValue: v.txId), "XenStoreMessageHeader.txId")
        s.field("len", offset: O.len, size: MemoryLayout.size(ofValue: v.len), "XenStoreMessageHeader.len")
        return s.claims
    }

    static var xenstoreConstants: [Claim] {
        xenstoreTypes.map { Claim($0.c, $0.swift.rawValue, "XenStoreMessageType.\($0.swift)") } + [
            Claim("XS_TYPE_COUNT", XenStoreMessageType.typeCount, "XenStoreMessageType.typeCount"),
            Claim("XS_WATCH_PATH", XenStoreLimits.watchPathIndex, "XenStoreLimits.watchPathIndex"),
            Claim("XS_WATCH_TOKEN", XenStoreLimits.watchTokenIndex, "XenStoreLimits.watchTokenIndex"),
            Claim("XENSTORE_PAYLOAD_MAX", XenStoreLimits.payloadMax, "XenStoreLimits.payloadMax"),
            Claim("XENSTORE_ABS_PATH_MAX", XenStoreLimits.absolutePathMax, "XenStoreLimits.absolutePathMax"),
            Claim("XENSTORE_REL_PATH_MAX", XenStoreLimits.relativePathMax, "XenStoreLimits.relativePathMax"),
            Claim("XENSTORE_RING_SIZE", XenStoreLimits.ringSize, "XenStoreLimits.ringSize"),
        ]
    }

    /// Every group, by name.
    static var all: [(group: String, claims: [Claim])] {
        [
            ("shared ring header", sharedRingHeader),
            ("ring slots", ringSlots),
            ("blkif_request_segment", blkifSegment),
            ("blkif_request", blkifRequest),
            ("blkif_request_discard", blkifDiscard),
            ("blkif_request_indirect", blkifIndirect),
            ("blkif_response", blkifResponse),
            ("blkif constants", blkifConstants),
            ("netif_tx_request", netifTxRequest),
            ("netif_extra_info", netifExtraInfo),
            ("netif_tx_response", netifTxResponse),
            ("netif_rx_request", netifRxRequest),
            ("netif_rx_response", netifRxResponse),
            ("netif constants", netifConstants),
            ("xen_netif_ctrl_request", netifCtrlRequest),
            ("xen_netif_ctrl_response", netifCtrlResponse),
            ("netif ctrl constants", netifCtrlConstants),
            ("grant_entry_v1", grantEntry),
            ("grant constants", grantConstants),
            ("xenbus states", xenbus),
            ("xsd_sockmsg", xenstoreHeader),
            ("xenstore constants", xenstoreConstants),
        ]
    }
}
