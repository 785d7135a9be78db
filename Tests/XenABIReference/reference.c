// The Xen wire ABI and ring protocol, straight from Xen's public headers.
// See include/xen_abi_reference.h for what is exported and why.

// A dom0 user-space backend builds against the latest interface version
// (what xenctrl.h arranges); ring.h then expects the includer to provide
// the barriers. These are the x86_64 definitions xenctrl.h uses.
#define __XEN_TOOLS__ 1
#define xen_mb()  __asm__ __volatile__("mfence" ::: "memory")
#define xen_rmb() __asm__ __volatile__("" ::: "memory")
#define xen_wmb() __asm__ __volatile__("" ::: "memory")

#include <errno.h>   // before xs_wire.h: xsd_errors[] exists only if EINVAL does
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#define XEN_NETIF_DEFINE_TOEPLITZ 1   // netif.h's own hash, exported below
#include <xen/io/netif.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>

#include "xen_abi_reference.h"

#if !defined(__x86_64__)
#error "the reference values are the x86_64 ABI"
#endif

#define PAGE 4096u

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------
#define FSIZE_(T, f) sizeof(((T *)0)->f)
#define SIZE(T)     { "sizeof(" #T ")", (int64_t)sizeof(T) }
#define OFF(T, f)   { "offsetof(" #T ", " #f ")", (int64_t)offsetof(T, f) }, \
                    { "fieldsize(" #T ", " #f ")", (int64_t)FSIZE_(T, f) }
#define K(name)     { #name, (int64_t)(name) }
#define RING(tag, pages) { "__CONST_RING_SIZE(" #tag ", " #pages " pages)", \
                           (int64_t)__CONST_RING_SIZE(tag, (pages) * PAGE) }
#define RINGS(tag) RING(tag, 1), RING(tag, 2), RING(tag, 4), RING(tag, 8), RING(tag, 16)

static const xar_entry table[] = {
    // ---- shared ring header (DEFINE_RING_TYPES; identical for every ring) ----
    SIZE(struct blkif_sring),
    OFF(struct blkif_sring, req_prod),
    OFF(struct blkif_sring, req_event),
    OFF(struct blkif_sring, rsp_prod),
    OFF(struct blkif_sring, rsp_event),
    OFF(struct blkif_sring, pvt),
    OFF(struct blkif_sring, __pad),
    OFF(struct blkif_sring, ring),
    OFF(struct netif_tx_sring, ring),
    OFF(struct netif_rx_sring, ring),
    SIZE(RING_IDX),
    SIZE(union blkif_sring_entry),
    SIZE(union netif_tx_sring_entry),
    SIZE(union netif_rx_sring_entry),
    RINGS(blkif),
    RINGS(netif_tx),
    RINGS(netif_rx),
    RING(xen_netif_ctrl, 1),
    SIZE(union xen_netif_ctrl_sring_entry),
    OFF(struct xen_netif_ctrl_sring, ring),
    K(XEN_PAGE_SHIFT),
    { "1 << XEN_PAGE_SHIFT", (int64_t)1 << XEN_PAGE_SHIFT },

    // ---- blkif.h ----
    SIZE(blkif_vdev_t),
    SIZE(blkif_sector_t),
    SIZE(grant_ref_t),
    SIZE(struct blkif_request_segment),
    OFF(struct blkif_request_segment, gref),
    OFF(struct blkif_request_segment, first_sect),
    OFF(struct blkif_request_segment, last_sect),
    SIZE(struct blkif_request),
    OFF(struct blkif_request, operation),
    OFF(struct blkif_request, nr_segments),
    OFF(struct blkif_request, handle),
    OFF(struct blkif_request, id),
    OFF(struct blkif_request, sector_number),
    OFF(struct blkif_request, seg),
    SIZE(struct blkif_request_discard),
    OFF(struct blkif_request_discard, operation),
    OFF(struct blkif_request_discard, flag),
    OFF(struct blkif_request_discard, handle),
    OFF(struct blkif_request_discard, id),
    OFF(struct blkif_request_discard, sector_number),
    OFF(struct blkif_request_discard, nr_sectors),
    SIZE(struct blkif_request_indirect),
    OFF(struct blkif_request_indirect, operation),
    OFF(struct blkif_request_indirect, indirect_op),
    OFF(struct blkif_request_indirect, nr_segments),
    OFF(struct blkif_request_indirect, id),
    OFF(struct blkif_request_indirect, sector_number),
    OFF(struct blkif_request_indirect, handle),
    OFF(struct blkif_request_indirect, indirect_grefs),
    SIZE(struct blkif_response),
    OFF(struct blkif_response, id),
    OFF(struct blkif_response, operation),
    OFF(struct blkif_response, status),
    K(BLKIF_OP_READ),
    K(BLKIF_OP_WRITE),
    K(BLKIF_OP_WRITE_BARRIER),
    K(BLKIF_OP_FLUSH_DISKCACHE),
    K(BLKIF_OP_RESERVED_1),
    K(BLKIF_OP_DISCARD),
    K(BLKIF_OP_INDIRECT),
    K(BLKIF_MAX_SEGMENTS_PER_REQUEST),
    K(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
    K(BLKIF_DISCARD_SECURE),
    K(BLKIF_RSP_EOPNOTSUPP),
    K(BLKIF_RSP_ERROR),
    K(BLKIF_RSP_OKAY),
    K(VDISK_CDROM),
    K(VDISK_REMOVABLE),
    K(VDISK_READONLY),
    { "(1 << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment)",
      (int64_t)((1u << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment)) },

    // ---- netif.h ----
    SIZE(struct netif_tx_request),
    OFF(struct netif_tx_request, gref),
    OFF(struct netif_tx_request, offset),
    OFF(struct netif_tx_request, flags),
    OFF(struct netif_tx_request, id),
    OFF(struct netif_tx_request, size),
    SIZE(struct netif_extra_info),
    OFF(struct netif_extra_info, type),
    OFF(struct netif_extra_info, flags),
    OFF(struct netif_extra_info, u),
    OFF(struct netif_extra_info, u.gso.size),
    OFF(struct netif_extra_info, u.gso.type),
    OFF(struct netif_extra_info, u.gso.pad),
    OFF(struct netif_extra_info, u.gso.features),
    OFF(struct netif_extra_info, u.mcast.addr),
    OFF(struct netif_extra_info, u.hash.type),
    OFF(struct netif_extra_info, u.hash.algorithm),
    OFF(struct netif_extra_info, u.hash.value),
    OFF(struct netif_extra_info, u.pad),
    SIZE(struct netif_tx_response),
    OFF(struct netif_tx_response, id),
    OFF(struct netif_tx_response, status),
    SIZE(struct netif_rx_request),
    OFF(struct netif_rx_request, id),
    OFF(struct netif_rx_request, pad),
    OFF(struct netif_rx_request, gref),
    SIZE(struct netif_rx_response),
    OFF(struct netif_rx_response, id),
    OFF(struct netif_rx_response, offset),
    OFF(struct netif_rx_response, flags),
    OFF(struct netif_rx_response, status),
    K(NETTXF_csum_blank),
    K(NETTXF_data_validated),
    K(NETTXF_more_data),
    K(NETTXF_extra_info),
    K(NETRXF_data_validated),
    K(NETRXF_csum_blank),
    K(NETRXF_more_data),
    K(NETRXF_extra_info),
    K(NETRXF_gso_prefix),
    K(XEN_NETIF_EXTRA_TYPE_NONE),
    K(XEN_NETIF_EXTRA_TYPE_GSO),
    K(XEN_NETIF_EXTRA_TYPE_MCAST_ADD),
    K(XEN_NETIF_EXTRA_TYPE_MCAST_DEL),
    K(XEN_NETIF_EXTRA_TYPE_HASH),
    K(XEN_NETIF_EXTRA_TYPE_MAX),
    K(XEN_NETIF_EXTRA_FLAG_MORE),
    K(XEN_NETIF_GSO_TYPE_NONE),
    K(XEN_NETIF_GSO_TYPE_TCPV4),
    K(XEN_NETIF_GSO_TYPE_TCPV6),
    K(XEN_NETIF_NR_SLOTS_MIN),
    K(XEN_NETIF_MAX_TX_SIZE),
    K(NETIF_RSP_DROPPED),
    K(NETIF_RSP_ERROR),
    K(NETIF_RSP_OKAY),
    K(NETIF_RSP_NULL),

    // ---- netif.h's control ring ----
    SIZE(struct xen_netif_ctrl_request),
    OFF(struct xen_netif_ctrl_request, id),
    OFF(struct xen_netif_ctrl_request, type),
    OFF(struct xen_netif_ctrl_request, data),
    SIZE(struct xen_netif_ctrl_response),
    OFF(struct xen_netif_ctrl_response, id),
    OFF(struct xen_netif_ctrl_response, type),
    OFF(struct xen_netif_ctrl_response, status),
    OFF(struct xen_netif_ctrl_response, data),
    K(XEN_NETIF_CTRL_TYPE_INVALID),
    K(XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS),
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS),
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_KEY),
    K(XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE),
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE),
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING),
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM),
    K(XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE),
    K(XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING),
    K(XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING),
    K(XEN_NETIF_CTRL_STATUS_SUCCESS),
    K(XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED),
    K(XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER),
    K(XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW),
    K(_XEN_NETIF_CTRL_HASH_TYPE_IPV4),
    K(_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP),
    K(_XEN_NETIF_CTRL_HASH_TYPE_IPV6),
    K(_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP),
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV4),
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP),
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV6),
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP),
    K(XEN_NETIF_CTRL_HASH_ALGORITHM_NONE),
    K(XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ),

    // ---- grant_table.h ----
    SIZE(struct grant_entry_v1),
    OFF(struct grant_entry_v1, flags),
    OFF(struct grant_entry_v1, domid),
    OFF(struct grant_entry_v1, frame),
    K(GTF_invalid),
    K(GTF_permit_access),
    K(GTF_type_mask),
    K(GTF_readonly),
    K(GTF_reading),
    K(GTF_writing),
    K(GNTMAP_device_map),
    K(GNTMAP_host_map),
    K(GNTMAP_readonly),
    K(GNTST_okay),
    K(GNTST_general_error),
    K(GNTST_bad_domain),
    K(GNTST_bad_gntref),
    K(GNTST_bad_handle),
    K(GNTST_bad_virt_addr),
    K(GNTST_bad_dev_addr),
    K(GNTST_no_device_space),
    K(GNTST_permission_denied),
    K(GNTST_bad_page),
    K(GNTST_bad_copy_arg),
    K(GNTST_address_too_big),
    K(GNTST_eagain),
    K(GNTST_no_space),

    // ---- xenbus.h ----
    K(XenbusStateUnknown),
    K(XenbusStateInitialising),
    K(XenbusStateInitWait),
    K(XenbusStateInitialised),
    K(XenbusStateConnected),
    K(XenbusStateClosing),
    K(XenbusStateClosed),
    K(XenbusStateReconfiguring),
    K(XenbusStateReconfigured),

    // ---- xs_wire.h ----
    SIZE(struct xsd_sockmsg),
    OFF(struct xsd_sockmsg, type),
    OFF(struct xsd_sockmsg, req_id),
    OFF(struct xsd_sockmsg, tx_id),
    OFF(struct xsd_sockmsg, len),
    K(XS_CONTROL),
    K(XS_DEBUG),
    K(XS_DIRECTORY),
    K(XS_READ),
    K(XS_GET_PERMS),
    K(XS_WATCH),
    K(XS_UNWATCH),
    K(XS_TRANSACTION_START),
    K(XS_TRANSACTION_END),
    K(XS_INTRODUCE),
    K(XS_RELEASE),
    K(XS_GET_DOMAIN_PATH),
    K(XS_WRITE),
    K(XS_MKDIR),
    K(XS_RM),
    K(XS_SET_PERMS),
    K(XS_WATCH_EVENT),
    K(XS_ERROR),
    K(XS_IS_DOMAIN_INTRODUCED),
    K(XS_RESUME),
    K(XS_SET_TARGET),
    K(XS_RESET_WATCHES),
    K(XS_DIRECTORY_PART),
    K(XS_TYPE_COUNT),
    K(XS_INVALID),
    K(XS_WATCH_PATH),
    K(XS_WATCH_TOKEN),
    K(XENSTORE_PAYLOAD_MAX),
    K(XENSTORE_ABS_PATH_MAX),
    K(XENSTORE_REL_PATH_MAX),
    K(XENSTORE_RING_SIZE),
};

const xar_entry *xen_abi_reference_table(size_t *count) {
    *count = sizeof(table) / sizeof(table[0]);
    return table;
}

int xen_abi_reference_lookup(const char *name, int64_t *value) {
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strcmp(table[i].name, name) == 0) {
            *value = table[i].value;
            return 1;
        }
    }
    return 0;
}

// The header's own table, re-exported as-is.
static xar_xsd_error xsd_error_copy[sizeof(xsd_errors) / sizeof(xsd_errors[0])];

const xar_xsd_error *xen_abi_reference_xsd_errors(size_t *count) {
    size_t n = sizeof(xsd_errors) / sizeof(xsd_errors[0]);
    for (size_t i = 0; i < n; i++) {   // idempotent; constant data
        xsd_error_copy[i].errnum = xsd_errors[i].errnum;
        xsd_error_copy[i].errstring = xsd_errors[i].errstring;
    }
    *count = n;
    return xsd_error_copy;
}

// ---------------------------------------------------------------------------
// Ring sizes on real buffers
// ---------------------------------------------------------------------------
unsigned xar_ring_size_on_buffer(int kind, unsigned pages) {
    size_t bytes = (size_t)pages * PAGE;
    void *buf = aligned_alloc(PAGE, bytes);
    if (buf == NULL) return 0;
    unsigned n = 0;
    switch (kind) {
    case XAR_RING_BLKIF: {
        blkif_sring_t *s = buf;
        blkif_front_ring_t fr;
        SHARED_RING_INIT(s);
        FRONT_RING_INIT(&fr, s, bytes);
        n = RING_SIZE(&fr);
        if (n != __RING_SIZE(s, bytes)) n = 0;
        break;
    }
    case XAR_RING_NETIF_TX: {
        netif_tx_sring_t *s = buf;
        netif_tx_back_ring_t br;
        SHARED_RING_INIT(s);
        BACK_RING_INIT(&br, s, bytes);
        n = RING_SIZE(&br);
        if (n != __RING_SIZE(s, bytes)) n = 0;
        break;
    }
    case XAR_RING_NETIF_RX: {
        netif_rx_sring_t *s = buf;
        netif_rx_back_ring_t br;
        SHARED_RING_INIT(s);
        BACK_RING_INIT(&br, s, bytes);
        n = RING_SIZE(&br);
        if (n != __RING_SIZE(s, bytes)) n = 0;
        break;
    }
    default:
        break;
    }
    free(buf);
    return n;
}

size_t xar_ring_entry_size(int kind) {
    switch (kind) {
    case XAR_RING_BLKIF: return sizeof(union blkif_sring_entry);
    case XAR_RING_NETIF_TX: return sizeof(union netif_tx_sring_entry);
    case XAR_RING_NETIF_RX: return sizeof(union netif_rx_sring_entry);
    default: return 0;
    }
}

// ---------------------------------------------------------------------------
// Struct builders / readers
// ---------------------------------------------------------------------------
void xar_blkif_request_encode(void *dst, uint8_t operation, uint8_t nr_segments, uint16_t handle,
                              uint64_t id, uint64_t sector_number,
                              const uint32_t *gref, const uint8_t *first_sect, const uint8_t *last_sect) {
    union blkif_sring_entry e;
    memset(&e, 0, sizeof(e));
    e.req.operation = operation;
    e.req.nr_segments = nr_segments;
    e.req.handle = handle;
    e.req.id = id;
    e.req.sector_number = sector_number;
    for (int i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        e.req.seg[i].gref = gref[i];
        e.req.seg[i].first_sect = first_sect[i];
        e.req.seg[i].last_sect = last_sect[i];
    }
    memcpy(dst, &e, sizeof(e));
}

void xar_blkif_request_decode(const void *src, uint8_t *operation, uint8_t *nr_segments, uint16_t *handle,
                              uint64_t *id, uint64_t *sector_number,
                              uint32_t *gref, uint8_t *first_sect, uint8_t *last_sect) {
    struct blkif_request r;
    memcpy(&r, src, sizeof(r));
    *operation = r.operation;
    *nr_segments = r.nr_segments;
    *handle = r.handle;
    *id = r.id;
    *sector_number = r.sector_number;
    for (int i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        gref[i] = r.seg[i].gref;
        first_sect[i] = r.seg[i].first_sect;
        last_sect[i] = r.seg[i].last_sect;
    }
}

void xar_blkif_segment_encode(void *dst, uint32_t gref, uint8_t first_sect, uint8_t last_sect) {
    struct blkif_request_segment s;
    memset(&s, 0, sizeof(s));
    s.gref = gref;
    s.first_sect = first_sect;
    s.last_sect = last_sect;
    memcpy(dst, &s, sizeof(s));
}

void xar_blkif_discard_encode(void *dst, uint8_t flag, uint16_t handle, uint64_t id,
                              uint64_t sector_number, uint64_t nr_sectors) {
    union blkif_sring_entry e;
    memset(&e, 0, sizeof(e));
    struct blkif_request_discard *d = (struct blkif_request_discard *)&e.req;
    d->operation = BLKIF_OP_DISCARD;
    d->flag = flag;
    d->handle = handle;
    d->id = id;
    d->sector_number = sector_number;
    d->nr_sectors = nr_sectors;
    memcpy(dst, &e, sizeof(e));
}

void xar_blkif_discard_decode(const void *src, uint8_t *operation, uint8_t *flag, uint16_t *handle,
                              uint64_t *id, uint64_t *sector_number, uint64_t *nr_sectors) {
    struct blkif_request_discard d;
    memcpy(&d, src, sizeof(d));
    *operation = d.operation;
    *flag = d.flag;
    *handle = d.handle;
    *id = d.id;
    *sector_number = d.sector_number;
    *nr_sectors = d.nr_sectors;
}

void xar_blkif_indirect_encode(void *dst, uint8_t indirect_op, uint16_t nr_segments, uint64_t id,
                               uint64_t sector_number, uint16_t handle, const uint32_t *indirect_grefs) {
    union blkif_sring_entry e;
    memset(&e, 0, sizeof(e));
    struct blkif_request_indirect *r = (struct blkif_request_indirect *)&e.req;
    r->operation = BLKIF_OP_INDIRECT;
    r->indirect_op = indirect_op;
    r->nr_segments = nr_segments;
    r->id = id;
    r->sector_number = sector_number;
    r->handle = handle;
    for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
        r->indirect_grefs[i] = indirect_grefs[i];
    memcpy(dst, &e, sizeof(e));
}

void xar_blkif_indirect_decode(const void *src, uint8_t *operation, uint8_t *indirect_op,
                               uint16_t *nr_segments, uint64_t *id, uint64_t *sector_number,
                               uint16_t *handle, uint32_t *indirect_grefs) {
    struct blkif_request_indirect r;
    memcpy(&r, src, sizeof(r));
    *operation = r.operation;
    *indirect_op = r.indirect_op;
    *nr_segments = r.nr_segments;
    *id = r.id;
    *sector_number = r.sector_number;
    *handle = r.handle;
    for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
        indirect_grefs[i] = r.indirect_grefs[i];
}

void xar_blkif_response_encode(void *dst, uint64_t id, uint8_t operation, int16_t status) {
    struct blkif_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.operation = operation;
    r.status = status;
    memcpy(dst, &r, sizeof(r));
}

void xar_blkif_response_decode(const void *src, uint64_t *id, uint8_t *operation, int16_t *status) {
    struct blkif_response r;
    memcpy(&r, src, sizeof(r));
    *id = r.id;
    *operation = r.operation;
    *status = r.status;
}

void xar_netif_tx_request_encode(void *dst, uint32_t gref, uint16_t offset, uint16_t flags,
                                 uint16_t id, uint16_t size) {
    struct netif_tx_request r;
    memset(&r, 0, sizeof(r));
    r.gref = gref;
    r.offset = offset;
    r.flags = flags;
    r.id = id;
    r.size = size;
    memcpy(dst, &r, sizeof(r));
}

void xar_netif_tx_request_decode(const void *src, uint32_t *gref, uint16_t *offset, uint16_t *flags,
                                 uint16_t *id, uint16_t *size) {
    struct netif_tx_request r;
    memcpy(&r, src, sizeof(r));
    *gref = r.gref;
    *offset = r.offset;
    *flags = r.flags;
    *id = r.id;
    *size = r.size;
}

void xar_netif_extra_gso_encode(void *dst, uint8_t type, uint8_t flags, uint16_t gso_size,
                                uint8_t gso_type, uint16_t gso_features) {
    struct netif_extra_info x;
    memset(&x, 0, sizeof(x));
    x.type = type;
    x.flags = flags;
    x.u.gso.size = gso_size;
    x.u.gso.type = gso_type;
    x.u.gso.pad = 0;
    x.u.gso.features = gso_features;
    memcpy(dst, &x, sizeof(x));
}

void xar_netif_extra_mcast_encode(void *dst, uint8_t type, uint8_t flags, const uint8_t *addr) {
    struct netif_extra_info x;
    memset(&x, 0, sizeof(x));
    x.type = type;
    x.flags = flags;
    memcpy(x.u.mcast.addr, addr, sizeof(x.u.mcast.addr));
    memcpy(dst, &x, sizeof(x));
}

void xar_netif_extra_hash_encode(void *dst, uint8_t type, uint8_t flags, uint8_t hash_type,
                                 uint8_t algorithm, const uint8_t *value) {
    struct netif_extra_info x;
    memset(&x, 0, sizeof(x));
    x.type = type;
    x.flags = flags;
    x.u.hash.type = hash_type;
    x.u.hash.algorithm = algorithm;
    memcpy(x.u.hash.value, value, sizeof(x.u.hash.value));
    memcpy(dst, &x, sizeof(x));
}

void xar_netif_extra_decode_gso(const void *src, uint8_t *type, uint8_t *flags, uint16_t *gso_size,
                                uint8_t *gso_type, uint8_t *gso_pad, uint16_t *gso_features) {
    struct netif_extra_info x;
    memcpy(&x, src, sizeof(x));
    *type = x.type;
    *flags = x.flags;
    *gso_size = x.u.gso.size;
    *gso_type = x.u.gso.type;
    *gso_pad = x.u.gso.pad;
    *gso_features = x.u.gso.features;
}

void xar_netif_tx_response_encode(void *dst, uint16_t id, int16_t status) {
    struct netif_tx_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.status = status;
    memcpy(dst, &r, sizeof(r));
}

void xar_netif_tx_response_decode(const void *src, uint16_t *id, int16_t *status) {
    struct netif_tx_response r;
    memcpy(&r, src, sizeof(r));
    *id = r.id;
    *status = r.status;
}

void xar_netif_rx_request_encode(void *dst, uint16_t id, uint32_t gref) {
    struct netif_rx_request r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.gref = gref;
    memcpy(dst, &r, sizeof(r));
}

void xar_netif_rx_request_decode(const void *src, uint16_t *id, uint32_t *gref) {
    struct netif_rx_request r;
    memcpy(&r, src, sizeof(r));
    *id = r.id;
    *gref = r.gref;
}

void xar_netif_rx_response_encode(void *dst, uint16_t id, uint16_t offset, uint16_t flags, int16_t status) {
    struct netif_rx_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.offset = offset;
    r.flags = flags;
    r.status = status;
    memcpy(dst, &r, sizeof(r));
}

void xar_netif_rx_response_decode(const void *src, uint16_t *id, uint16_t *offset, uint16_t *flags,
                                  int16_t *status) {
    struct netif_rx_response r;
    memcpy(&r, src, sizeof(r));
    *id = r.id;
    *offset = r.offset;
    *flags = r.flags;
    *status = r.status;
}

void xar_grant_entry_v1_encode(void *dst, uint16_t flags, uint16_t domid, uint32_t frame) {
    struct grant_entry_v1 g;
    memset(&g, 0, sizeof(g));
    g.flags = flags;
    g.domid = domid;
    g.frame = frame;
    memcpy(dst, &g, sizeof(g));
}

void xar_grant_entry_v1_decode(const void *src, uint16_t *flags, uint16_t *domid, uint32_t *frame) {
    struct grant_entry_v1 g;
    memcpy(&g, src, sizeof(g));
    *flags = g.flags;
    *domid = g.domid;
    *frame = g.frame;
}

void xar_xsd_sockmsg_encode(void *dst, uint32_t type, uint32_t req_id, uint32_t tx_id, uint32_t len) {
    struct xsd_sockmsg m;
    memset(&m, 0, sizeof(m));
    m.type = type;
    m.req_id = req_id;
    m.tx_id = tx_id;
    m.len = len;
    memcpy(dst, &m, sizeof(m));
}

void xar_xsd_sockmsg_decode(const void *src, uint32_t *type, uint32_t *req_id, uint32_t *tx_id,
                            uint32_t *len) {
    struct xsd_sockmsg m;
    memcpy(&m, src, sizeof(m));
    *type = m.type;
    *req_id = m.req_id;
    *tx_id = m.tx_id;
    *len = m.len;
}

static void fill_request_for_id(struct blkif_request *r, uint64_t id) {
    memset(r, 0, sizeof(*r));
    r->operation = (uint8_t)(id % 2 ? BLKIF_OP_WRITE : BLKIF_OP_READ);
    r->nr_segments = (uint8_t)(1 + id % BLKIF_MAX_SEGMENTS_PER_REQUEST);
    r->handle = (uint16_t)(id * 7 + 3);
    r->id = id;
    r->sector_number = id * 8 + 0x123400000000ull;
    for (unsigned i = 0; i < r->nr_segments; i++) {
        r->seg[i].gref = (uint32_t)(id * 16 + i + 1);
        r->seg[i].first_sect = (uint8_t)(i % 8);
        r->seg[i].last_sect = 7;
    }
}

void xar_blkif_request_for_id(void *dst, uint64_t id) {
    union blkif_sring_entry e;
    memset(&e, 0, sizeof(e));
    fill_request_for_id(&e.req, id);
    memcpy(dst, &e, sizeof(e));
}

// ---------------------------------------------------------------------------
// Shared header
// ---------------------------------------------------------------------------
void xar_sring_get(const void *sring, xar_sring_indices *out) {
    const volatile blkif_sring_t *s = sring;
    out->req_prod = s->req_prod;
    out->req_event = s->req_event;
    out->rsp_prod = s->rsp_prod;
    out->rsp_event = s->rsp_event;
}

void xar_sring_set(void *sring, const xar_sring_indices *in) {
    volatile blkif_sring_t *s = sring;
    s->req_prod = in->req_prod;
    s->req_event = in->req_event;
    s->rsp_prod = in->rsp_prod;
    s->rsp_event = in->rsp_event;
    xen_mb();
}

void xar_sring_init(void *sring) {
    blkif_sring_t *s = sring;
    SHARED_RING_INIT(s);
}

// ---------------------------------------------------------------------------
// C frontend
// ---------------------------------------------------------------------------
struct xar_front {
    blkif_front_ring_t r;
};

xar_front *xar_front_init(void *sring, unsigned pages) {
    xar_front *f = calloc(1, sizeof(*f));
    if (f == NULL) return NULL;
    blkif_sring_t *s = sring;
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&f->r, s, (size_t)pages * PAGE);
    return f;
}

xar_front *xar_front_attach(void *sring, unsigned pages, uint32_t idx) {
    xar_front *f = calloc(1, sizeof(*f));
    if (f == NULL) return NULL;
    blkif_sring_t *s = sring;
    FRONT_RING_ATTACH(&f->r, s, idx, (size_t)pages * PAGE);
    return f;
}

void xar_front_free(xar_front *f) { free(f); }
unsigned xar_front_ring_size(const xar_front *f) { return RING_SIZE(&f->r); }
unsigned xar_front_free_requests(const xar_front *f) { return RING_FREE_REQUESTS(&f->r); }
int xar_front_full(const xar_front *f) { return RING_FULL(&f->r) ? 1 : 0; }
uint32_t xar_front_req_prod_pvt(const xar_front *f) { return f->r.req_prod_pvt; }
uint32_t xar_front_rsp_cons(const xar_front *f) { return f->r.rsp_cons; }

unsigned xar_front_queue(xar_front *f, unsigned n, uint64_t first_id) {
    unsigned queued = 0;
    while (queued < n && !RING_FULL(&f->r)) {
        struct blkif_request *req = RING_GET_REQUEST(&f->r, f->r.req_prod_pvt);
        fill_request_for_id(req, first_id + queued);
        f->r.req_prod_pvt++;
        queued++;
    }
    return queued;
}

int xar_front_queue_raw(xar_front *f, const void *req) {
    if (RING_FULL(&f->r)) return 0;
    memcpy(RING_GET_REQUEST(&f->r, f->r.req_prod_pvt), req, sizeof(struct blkif_request));
    f->r.req_prod_pvt++;
    return 1;
}

int xar_front_push(xar_front *f) {
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->r, notify);
    return notify ? 1 : 0;
}

unsigned xar_front_unconsumed_responses(const xar_front *f) {
    return RING_HAS_UNCONSUMED_RESPONSES(&f->r);
}

void xar_front_take_response(xar_front *f, void *out) {
    struct blkif_response rsp;
    RING_COPY_RESPONSE(&f->r, f->r.rsp_cons, &rsp);
    memcpy(out, &rsp, sizeof(rsp));
    f->r.rsp_cons++;
}

int xar_front_final_check(xar_front *f) {
    int work;
    RING_FINAL_CHECK_FOR_RESPONSES(&f->r, work);
    return work ? 1 : 0;
}

int xar_front_response_prod_overflow(const xar_front *f) {
    return RING_RESPONSE_PROD_OVERFLOW(&f->r, f->r.sring->rsp_prod) ? 1 : 0;
}

// ---------------------------------------------------------------------------
// C backend
// ---------------------------------------------------------------------------
struct xar_back {
    blkif_back_ring_t r;
};

xar_back *xar_back_init(void *sring, unsigned pages) {
    xar_back *b = calloc(1, sizeof(*b));
    if (b == NULL) return NULL;
    blkif_sring_t *s = sring;
    BACK_RING_INIT(&b->r, s, (size_t)pages * PAGE);
    return b;
}

xar_back *xar_back_attach(void *sring, unsigned pages, uint32_t idx) {
    xar_back *b = calloc(1, sizeof(*b));
    if (b == NULL) return NULL;
    blkif_sring_t *s = sring;
    BACK_RING_ATTACH(&b->r, s, idx, (size_t)pages * PAGE);
    return b;
}

void xar_back_free(xar_back *b) { free(b); }
unsigned xar_back_ring_size(const xar_back *b) { return RING_SIZE(&b->r); }
uint32_t xar_back_req_cons(const xar_back *b) { return b->r.req_cons; }
uint32_t xar_back_rsp_prod_pvt(const xar_back *b) { return b->r.rsp_prod_pvt; }

int xar_back_request_prod_overflow(const xar_back *b, uint32_t prod) {
    return RING_REQUEST_PROD_OVERFLOW(&b->r, prod) ? 1 : 0;
}

int xar_back_request_cons_overflow(const xar_back *b) {
    return RING_REQUEST_CONS_OVERFLOW(&b->r, b->r.req_cons) ? 1 : 0;
}

long xar_back_unconsumed_requests(const xar_back *b) {
    RING_IDX prod = b->r.sring->req_prod;
    xen_rmb();
    if (RING_REQUEST_PROD_OVERFLOW(&b->r, prod)) return -1;
    return (long)XEN_RING_NR_UNCONSUMED_REQUESTS(&b->r);
}

void xar_back_take_request(xar_back *b, void *out) {
    struct blkif_request req;
    RING_COPY_REQUEST(&b->r, b->r.req_cons, &req);
    memcpy(out, &req, sizeof(req));
    b->r.req_cons++;
}

void xar_back_put_response(xar_back *b, uint64_t id, uint8_t operation, int16_t status) {
    struct blkif_response *rsp = RING_GET_RESPONSE(&b->r, b->r.rsp_prod_pvt);
    rsp->id = id;
    rsp->operation = operation;
    rsp->status = status;
    b->r.rsp_prod_pvt++;
}

int xar_back_push(xar_back *b) {
    int notify;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b->r, notify);
    return notify ? 1 : 0;
}

int xar_back_final_check(xar_back *b) {
    if (RING_REQUEST_PROD_OVERFLOW(&b->r, b->r.sring->req_prod)) return -1;
    int work;
    RING_FINAL_CHECK_FOR_REQUESTS(&b->r, work);
    if (RING_REQUEST_PROD_OVERFLOW(&b->r, b->r.sring->req_prod)) return -1;
    return work ? 1 : 0;
}

uint32_t xar_toeplitz_hash(const uint8_t *key, unsigned keylen, const uint8_t *buf, unsigned buflen) {
    return xen_netif_toeplitz_hash(key, keylen, buf, buflen);
}
