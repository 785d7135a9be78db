/*
 * A blkfront for xenbackd's loopback hypervisor, written in C from
 * docs/loopback-hypervisor.md and Xen's public headers alone.
 *
 * Files: domain.c (memory, grant table), evtchn.c (ports, FIFOs),
 * store.c (libxenstore helpers and the toolstack's writes), blkfront.c
 * (the xenbus handshake and the ring), main.c (the checks).
 */
#ifndef LOOPBACK_C_FRONTEND_H
#define LOOPBACK_C_FRONTEND_H

/* Xen's headers give the current interface (grant_entry_v1, ring.h without
 * the legacy mb() aliases) only to "tools"; we are one. */
#define __XEN_TOOLS__ 1

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ring.h leaves barriers to the includer. The peer is another process on
 * the same machine, so CPU fences are what Xen's smp barriers are. */
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>
#include <xen/io/xenbus.h>
#include <xenstore.h>

#define PAGE_BYTES 4096u
#define SECTOR_BYTES 512u
#define SECTORS_PER_PAGE (PAGE_BYTES / SECTOR_BYTES)
#define BACKEND_DOMID 0u

/* ---- domain.c: the guest's memory and grant table ---------------------- */

struct domain {
    unsigned domid;
    char dir[512];                 /* ROOT/domN */
    uint8_t *memory;               /* domN/memory, MAP_SHARED */
    uint32_t pages;
    uint32_t next_frame;           /* bump allocator: frames are never freed */
    grant_entry_v1_t *grants;      /* domN/grant-table, MAP_SHARED */
    uint32_t nr_grants;
    uint32_t next_gref;            /* bump allocator above the reserved refs */
};

/* A guest page: its frame, its bytes, and the grant that shares it with dom0. */
struct page {
    uint32_t frame;
    uint8_t *data;
    grant_ref_t gref;
};

int domain_create(struct domain *d, const char *root, unsigned domid, uint32_t pages, uint32_t grants);
int domain_alloc_frames(struct domain *d, uint32_t count, uint32_t *first);
uint8_t *domain_frame(struct domain *d, uint32_t frame);
int grant_access(struct domain *d, uint32_t frame, unsigned to_domid, bool readonly, grant_ref_t *ref);
void grant_revoke(struct domain *d, grant_ref_t ref);
int page_alloc(struct domain *d, bool readonly, struct page *p);
void domain_destroy(struct domain *d);

/* ---- evtchn.c: event channel ports and the handle's FIFO ---------------- */

/* domN/event-channels, as the page describes it: all fields 32-bit. */
struct evtchn_header {
    uint32_t magic;
    uint32_t version;
    uint32_t nr_ports;
    uint32_t next_handle;
    uint8_t reserved[48];
};

struct evtchn_entry {
    uint32_t state;
    uint32_t remote_domain;
    uint32_t remote_port;
    uint32_t handle;
    uint32_t pending;
    uint32_t masked;
    uint32_t reserved[2];
};

enum { EVTCHN_FREE = 0, EVTCHN_UNBOUND = 1, EVTCHN_INTERDOMAIN = 2, EVTCHN_BUSY = 3 };

struct evtchn_table {
    struct evtchn_header *header;
    struct evtchn_entry *entries;
    size_t map_bytes;
    uint32_t nr_ports;
};

struct evtchn {
    char root[512];
    unsigned domid;
    struct evtchn_table own;       /* domN/event-channels */
    uint32_t handle;               /* H of domN/evtchn-H.fifo */
    char fifo_path[600];
    int fd;                        /* the FIFO, O_RDWR | O_NONBLOCK: poll it */
    /* The one peer we notify (dom0): its table, mapped on first notify. */
    unsigned peer_domid;
    struct evtchn_table peer;
    bool peer_mapped;
    unsigned long events;          /* ports read from our FIFO */
};

int evtchn_open(struct evtchn *e, const char *root, unsigned domid);
int evtchn_alloc_unbound(struct evtchn *e, unsigned remote_domid, uint32_t *port);
struct evtchn_entry *evtchn_entry(struct evtchn *e, uint32_t port);
int evtchn_notify(struct evtchn *e, uint32_t port);
int evtchn_wait(struct evtchn *e, int timeout_ms);
int evtchn_read_pending(struct evtchn *e, uint32_t *port);
int evtchn_unmask(struct evtchn *e, uint32_t port);
void evtchn_unbind(struct evtchn *e, uint32_t port);
void evtchn_close(struct evtchn *e);

/* ---- store.c: xenstore --------------------------------------------------- */

struct xs_handle *store_open(const char *socket_path);
bool store_write(struct xs_handle *h, xs_transaction_t t, const char *path, const char *value);
bool store_set_perms(struct xs_handle *h, xs_transaction_t t, const char *path,
                     unsigned owner, unsigned reader);
char *store_read(struct xs_handle *h, const char *path);
typedef bool (*txn_body)(struct xs_handle *h, xs_transaction_t t, const void *ctx);
bool store_transaction(struct xs_handle *h, txn_body body, const void *ctx);
long store_read_long(struct xs_handle *h, const char *path, long fallback);
int store_wait_state(struct xs_handle *h, const char *state_path, int want, int timeout_ms, int *seen);

int toolstack_create_domain(struct xs_handle *dom0, unsigned domid);
int toolstack_add_disk(struct xs_handle *dom0, unsigned domid, unsigned devid, const char *params);
int toolstack_remove_disk(struct xs_handle *dom0, unsigned domid, unsigned devid);
int toolstack_destroy_domain(struct xs_handle *dom0, unsigned domid);

/* ---- blkfront.c ---------------------------------------------------------- */

struct blkfront {
    struct xs_handle *xs;          /* as the guest */
    struct domain *dom;
    struct evtchn *ev;
    unsigned devid;
    char fe[128], be[128];         /* frontend and backend directories */
    int timeout_ms;
    blkif_front_ring_t ring;
    struct page ring_page;
    uint32_t port;
    /* What the backend advertised at Connected. */
    uint64_t sectors;
    unsigned sector_size;
    unsigned info;
    bool flush;
    unsigned max_ring_order;
    char error[256];               /* why the last call failed */
};

int blkfront_init(struct blkfront *f, struct xs_handle *xs, struct domain *dom, struct evtchn *ev,
                  unsigned devid, int timeout_ms);
int blkfront_wait_initwait(struct blkfront *f);
int blkfront_initialise(struct blkfront *f);
int blkfront_wait_connected(struct blkfront *f);
int blkfront_submit(struct blkfront *f, const blkif_request_t *reqs, unsigned n);
int blkfront_collect(struct blkfront *f, blkif_response_t *out, unsigned n);
int blkfront_close(struct blkfront *f);

#endif
