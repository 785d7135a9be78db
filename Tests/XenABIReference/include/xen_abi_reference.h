// XenABIReference: the Xen wire ABI as Xen's own C headers define it.
//
// Everything here is computed in reference.c, which is compiled against
// <xen/io/ring.h>, <xen/io/blkif.h>, <xen/io/netif.h>, <xen/io/xenbus.h>,
// <xen/io/xs_wire.h> and <xen/grant_table.h>. This header deliberately
// includes no Xen header, so Swift imports it without __XEN_TOOLS__ games:
// structs cross the boundary as raw bytes, rings as opaque handles.
#ifndef XEN_ABI_REFERENCE_H
#define XEN_ABI_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

// ---------------------------------------------------------------------------
// Sizes, offsets and constants.
//
// Names are the C spelling, produced by stringifying the expression:
//   "sizeof(struct blkif_request)"
//   "offsetof(struct blkif_request, sector_number)"
//   "fieldsize(struct blkif_request, sector_number)"   (sizeof the member)
//   "offsetof(struct netif_extra_info, u.gso.size)"
//   "BLKIF_OP_READ", "XenbusStateConnected", "XS_TYPE_COUNT", ...
//   "__CONST_RING_SIZE(blkif, 4 pages)"
// ---------------------------------------------------------------------------
typedef struct {
    const char *name;
    int64_t value;
} xar_entry;

/// The whole table; *count receives its length.
const xar_entry *xen_abi_reference_table(size_t *count);
/// Looks one name up; returns 1 and sets *value if present, 0 otherwise.
int xen_abi_reference_lookup(const char *name, int64_t *value);

/// xs_wire.h's xsd_errors[] in header order: {errnum, errstring}.
typedef struct {
    int errnum;
    const char *errstring;
} xar_xsd_error;
const xar_xsd_error *xen_abi_reference_xsd_errors(size_t *count);

// ---------------------------------------------------------------------------
// Ring sizes computed at run time with __RING_SIZE on a real, page-aligned
// buffer of `pages` pages (what FRONT_RING_INIT/BACK_RING_INIT store as
// nr_ents). Returns 0 for an unknown kind.
// ---------------------------------------------------------------------------
enum {
    XAR_RING_BLKIF = 0,
    XAR_RING_NETIF_TX = 1,
    XAR_RING_NETIF_RX = 2,
};
unsigned xar_ring_size_on_buffer(int kind, unsigned pages);
/// sizeof(union <kind>_sring_entry).
size_t xar_ring_entry_size(int kind);

// ---------------------------------------------------------------------------
// Struct builders/readers. Encoders memset the C struct to zero, assign the
// fields by name, and copy the struct's bytes to dst (sizeof the struct,
// except the blkif request views which write a whole 112-byte ring slot,
// union blkif_sring_entry). Decoders read fields by name from src.
// Arrays: segments are 11 entries, indirect grefs 8, mcast addr 6, hash 4.
// ---------------------------------------------------------------------------
void xar_blkif_request_encode(void *dst, uint8_t operation, uint8_t nr_segments, uint16_t handle,
                              uint64_t id, uint64_t sector_number,
                              const uint32_t *gref, const uint8_t *first_sect, const uint8_t *last_sect);
void xar_blkif_request_decode(const void *src, uint8_t *operation, uint8_t *nr_segments, uint16_t *handle,
                              uint64_t *id, uint64_t *sector_number,
                              uint32_t *gref, uint8_t *first_sect, uint8_t *last_sect);

void xar_blkif_segment_encode(void *dst, uint32_t gref, uint8_t first_sect, uint8_t last_sect);

void xar_blkif_discard_encode(void *dst, uint8_t flag, uint16_t handle, uint64_t id,
                              uint64_t sector_number, uint64_t nr_sectors);
void xar_blkif_discard_decode(const void *src, uint8_t *operation, uint8_t *flag, uint16_t *handle,
                              uint64_t *id, uint64_t *sector_number, uint64_t *nr_sectors);

void xar_blkif_indirect_encode(void *dst, uint8_t indirect_op, uint16_t nr_segments, uint64_t id,
                               uint64_t sector_number, uint16_t handle, const uint32_t *indirect_grefs);
void xar_blkif_indirect_decode(const void *src, uint8_t *operation, uint8_t *indirect_op,
                               uint16_t *nr_segments, uint64_t *id, uint64_t *sector_number,
                               uint16_t *handle, uint32_t *indirect_grefs);

void xar_blkif_response_encode(void *dst, uint64_t id, uint8_t operation, int16_t status);
void xar_blkif_response_decode(const void *src, uint64_t *id, uint8_t *operation, int16_t *status);

void xar_netif_tx_request_encode(void *dst, uint32_t gref, uint16_t offset, uint16_t flags,
                                 uint16_t id, uint16_t size);
void xar_netif_tx_request_decode(const void *src, uint32_t *gref, uint16_t *offset, uint16_t *flags,
                                 uint16_t *id, uint16_t *size);

void xar_netif_extra_gso_encode(void *dst, uint8_t type, uint8_t flags, uint16_t gso_size,
                                uint8_t gso_type, uint16_t gso_features);
void xar_netif_extra_mcast_encode(void *dst, uint8_t type, uint8_t flags, const uint8_t *addr);
void xar_netif_extra_hash_encode(void *dst, uint8_t type, uint8_t flags, uint8_t hash_type,
                                 uint8_t algorithm, const uint8_t *value);
void xar_netif_extra_decode_gso(const void *src, uint8_t *type, uint8_t *flags, uint16_t *gso_size,
                                uint8_t *gso_type, uint8_t *gso_pad, uint16_t *gso_features);

void xar_netif_tx_response_encode(void *dst, uint16_t id, int16_t status);
void xar_netif_tx_response_decode(const void *src, uint16_t *id, int16_t *status);

void xar_netif_rx_request_encode(void *dst, uint16_t id, uint32_t gref);
void xar_netif_rx_request_decode(const void *src, uint16_t *id, uint32_t *gref);

void xar_netif_rx_response_encode(void *dst, uint16_t id, uint16_t offset, uint16_t flags, int16_t status);
void xar_netif_rx_response_decode(const void *src, uint16_t *id, uint16_t *offset, uint16_t *flags,
                                  int16_t *status);

void xar_grant_entry_v1_encode(void *dst, uint16_t flags, uint16_t domid, uint32_t frame);
void xar_grant_entry_v1_decode(const void *src, uint16_t *flags, uint16_t *domid, uint32_t *frame);

void xar_xsd_sockmsg_encode(void *dst, uint32_t type, uint32_t req_id, uint32_t tx_id, uint32_t len);
void xar_xsd_sockmsg_decode(const void *src, uint32_t *type, uint32_t *req_id, uint32_t *tx_id,
                            uint32_t *len);

/// The deterministic request the C frontend queues for `id` (field
/// assignment in C). The Swift tests build the same request with the same
/// formula: operation = id % 2 (READ/WRITE), nr_segments = 1 + id % 11,
/// handle = (uint16_t)(id * 7 + 3), sector_number = id * 8 + 0x123400000000,
/// seg[i] = { gref = (uint32_t)(id * 16 + i + 1), first_sect = i % 8,
/// last_sect = 7 } for i < nr_segments, zero for the others.
void xar_blkif_request_for_id(void *dst, uint64_t id);

// ---------------------------------------------------------------------------
// Shared ring header, read and written through the C field names of
// blkif_sring_t (struct blkif_sring).
// ---------------------------------------------------------------------------
typedef struct {
    uint32_t req_prod, req_event, rsp_prod, rsp_event;
} xar_sring_indices;
void xar_sring_get(const void *sring, xar_sring_indices *out);
void xar_sring_set(void *sring, const xar_sring_indices *in);
/// SHARED_RING_INIT on a blkif ring.
void xar_sring_init(void *sring);

// ---------------------------------------------------------------------------
// A C blkif frontend (blkif_front_ring_t) on caller-provided ring memory.
// All operations are ring.h macros; nothing is re-implemented.
// ---------------------------------------------------------------------------
typedef struct xar_front xar_front;
/// SHARED_RING_INIT + FRONT_RING_INIT(size = pages * 4096).
xar_front *xar_front_init(void *sring, unsigned pages);
/// FRONT_RING_ATTACH at index `idx`; the shared header is left as it is.
xar_front *xar_front_attach(void *sring, unsigned pages, uint32_t idx);
void xar_front_free(xar_front *f);
unsigned xar_front_ring_size(const xar_front *f);           // RING_SIZE
unsigned xar_front_free_requests(const xar_front *f);       // RING_FREE_REQUESTS
int xar_front_full(const xar_front *f);                     // RING_FULL
uint32_t xar_front_req_prod_pvt(const xar_front *f);
uint32_t xar_front_rsp_cons(const xar_front *f);
/// Queues n requests (xar_blkif_request_for_id(first_id + i)) with
/// RING_GET_REQUEST, without pushing. Stops early at RING_FULL; returns
/// how many were queued.
unsigned xar_front_queue(xar_front *f, unsigned n, uint64_t first_id);
/// Queues one request given as raw slot bytes (sizeof(struct blkif_request)).
int xar_front_queue_raw(xar_front *f, const void *req);
/// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY; returns notify.
int xar_front_push(xar_front *f);
/// RING_HAS_UNCONSUMED_RESPONSES (the count).
unsigned xar_front_unconsumed_responses(const xar_front *f);
/// RING_COPY_RESPONSE at rsp_cons into out (sizeof(struct blkif_response)), rsp_cons++.
void xar_front_take_response(xar_front *f, void *out);
/// RING_FINAL_CHECK_FOR_RESPONSES; returns work_to_do.
int xar_front_final_check(xar_front *f);
/// RING_RESPONSE_PROD_OVERFLOW(f, sring->rsp_prod).
int xar_front_response_prod_overflow(const xar_front *f);

// ---------------------------------------------------------------------------
// A C blkif backend (blkif_back_ring_t).
// ---------------------------------------------------------------------------
typedef struct xar_back xar_back;
/// BACK_RING_INIT(size = pages * 4096).
xar_back *xar_back_init(void *sring, unsigned pages);
/// BACK_RING_ATTACH at index `idx`.
xar_back *xar_back_attach(void *sring, unsigned pages, uint32_t idx);
void xar_back_free(xar_back *b);
unsigned xar_back_ring_size(const xar_back *b);
uint32_t xar_back_req_cons(const xar_back *b);
uint32_t xar_back_rsp_prod_pvt(const xar_back *b);
/// RING_REQUEST_PROD_OVERFLOW(b, prod).
int xar_back_request_prod_overflow(const xar_back *b, uint32_t prod);
/// RING_REQUEST_CONS_OVERFLOW(b, b->req_cons).
int xar_back_request_cons_overflow(const xar_back *b);
/// Reads req_prod; returns -1 if RING_REQUEST_PROD_OVERFLOW, else
/// XEN_RING_NR_UNCONSUMED_REQUESTS (RING_UNCONSUMED_REQUESTS in older headers).
long xar_back_unconsumed_requests(const xar_back *b);
/// RING_COPY_REQUEST at req_cons into out (sizeof(struct blkif_request)), req_cons++.
void xar_back_take_request(xar_back *b, void *out);
/// Fills RING_GET_RESPONSE(rsp_prod_pvt) by field, rsp_prod_pvt++.
void xar_back_put_response(xar_back *b, uint64_t id, uint8_t operation, int16_t status);
/// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY; returns notify.
int xar_back_push(xar_back *b);
/// RING_FINAL_CHECK_FOR_REQUESTS; returns -1 on RING_REQUEST_PROD_OVERFLOW,
/// else work_to_do (as 0/1).
int xar_back_final_check(xar_back *b);

/// netif.h's xen_netif_toeplitz_hash, the header's reference implementation.
uint32_t xar_toeplitz_hash(const uint8_t *key, unsigned keylen, const uint8_t *buf, unsigned buflen);

#endif
