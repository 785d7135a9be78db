/*
 * blkfront: the xenbus handshake of "A frontend, step by step" and the
 * ring, with ring.h's macros (blkif.h's DEFINE_RING_TYPES).
 */
#define _GNU_SOURCE
#include "frontend.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(struct blkfront *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->error, sizeof f->error, fmt, ap);
    va_end(ap);
    return -1;
}

static bool write_key(struct blkfront *f, xs_transaction_t t, const char *key, const char *fmt, ...)
{
    char path[192], value[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    snprintf(path, sizeof path, "%s/%s", f->fe, key);
    return store_write(f->xs, t, path, value);
}

static long read_backend_long(struct blkfront *f, const char *key, long fallback)
{
    char path[192];
    snprintf(path, sizeof path, "%s/%s", f->be, key);
    return store_read_long(f->xs, path, fallback);
}

/* The frontend finds its backend where the toolstack said: its own
 * `backend` key (the guest cannot list dom0's tree). */
int blkfront_init(struct blkfront *f, struct xs_handle *xs, struct domain *dom, struct evtchn *ev,
                  unsigned devid, int timeout_ms)
{
    memset(f, 0, sizeof *f);
    f->xs = xs;
    f->dom = dom;
    f->ev = ev;
    f->devid = devid;
    f->timeout_ms = timeout_ms;
    snprintf(f->fe, sizeof f->fe, "/local/domain/%u/device/vbd/%u", dom->domid, devid);
    char path[192];
    snprintf(path, sizeof path, "%s/backend", f->fe);
    char *be = store_read(xs, path);
    if (!be)
        return fail(f, "read %s: %s", path, strerror(errno));
    snprintf(f->be, sizeof f->be, "%s", be);
    free(be);
    return 0;
}

static int wait_backend(struct blkfront *f, int want)
{
    char path[192];
    int seen = -1;
    snprintf(path, sizeof path, "%s/state", f->be);
    if (store_wait_state(f->xs, path, want, f->timeout_ms, &seen) != 0)
        return fail(f, "backend state %d, waited for %d", seen, want);
    return 0;
}

/* Step 2. */
int blkfront_wait_initwait(struct blkfront *f)
{
    if (wait_backend(f, XenbusStateInitWait) != 0)
        return -1;
    f->max_ring_order = (unsigned)read_backend_long(f, "max-ring-page-order", 0);
    return 0;
}

static bool publish_ring(struct xs_handle *h, xs_transaction_t t, const void *ctx)
{
    struct blkfront *f = (struct blkfront *)ctx;
    (void)h;
    return write_key(f, t, "ring-ref", "%u", f->ring_page.gref) &&
           write_key(f, t, "event-channel", "%u", f->port) &&
           write_key(f, t, "protocol", "%s", XEN_IO_PROTO_ABI_X86_64) &&
           write_key(f, t, "state", "%d", XenbusStateInitialised);
}

/* Steps 3 and 4, with a one-page ring (order 0: `ring-ref`). */
int blkfront_initialise(struct blkfront *f)
{
    if (page_alloc(f->dom, false, &f->ring_page) != 0)
        return fail(f, "no frame or grant for the ring");
    blkif_sring_t *sring = (blkif_sring_t *)f->ring_page.data;
    SHARED_RING_INIT(sring);              /* producers 0, req_event = rsp_event = 1 */
    FRONT_RING_INIT(&f->ring, sring, PAGE_BYTES);
    if (evtchn_alloc_unbound(f->ev, BACKEND_DOMID, &f->port) != 0)
        return fail(f, "no free event channel port");

    if (!store_transaction(f->xs, publish_ring, f))
        return fail(f, "publishing the ring: %s", strerror(errno));
    return 0;
}

/* Step 5. */
int blkfront_wait_connected(struct blkfront *f)
{
    if (wait_backend(f, XenbusStateConnected) != 0)
        return -1;
    long sectors = read_backend_long(f, "sectors", -1);
    long sector_size = read_backend_long(f, "sector-size", -1);
    if (sectors < 0 || sector_size <= 0)
        return fail(f, "backend Connected without sectors/sector-size");
    f->sectors = (uint64_t)sectors;
    f->sector_size = (unsigned)sector_size;
    f->info = (unsigned)read_backend_long(f, "info", 0);
    f->flush = read_backend_long(f, "feature-flush-cache", 0) == 1;
    if (!write_key(f, XBT_NULL, "state", "%d", XenbusStateConnected))
        return fail(f, "writing state 4");
    return 0;
}

/* Step 6, requests: fill slots, publish req_prod once (ring.h puts the
 * write barrier before it), and notify only if req_event says the backend
 * sleeps. */
int blkfront_submit(struct blkfront *f, const blkif_request_t *reqs, unsigned n)
{
    if (RING_FREE_REQUESTS(&f->ring) < n)
        return fail(f, "ring full: %u free, %u asked", RING_FREE_REQUESTS(&f->ring), n);
    for (unsigned i = 0; i < n; i++) {
        *RING_GET_REQUEST(&f->ring, f->ring.req_prod_pvt) = reqs[i];
        f->ring.req_prod_pvt++;
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->ring, notify);
    if (notify && evtchn_notify(f->ev, f->port) != 0)
        return fail(f, "notify on port %u failed", f->port);
    return 0;
}

/* Reads every port waiting in our FIFO and unmasks it: until unmasked, a
 * port that fired is not delivered again (its events only set `pending`). */
static int drain_events(struct blkfront *f)
{
    uint32_t p;
    int r;
    while ((r = evtchn_read_pending(f->ev, &p)) == 1)
        if (evtchn_unmask(f->ev, p) != 0)
            return fail(f, "unmask of port %u failed", p);
    return r == 0 ? 0 : fail(f, "reading the event FIFO: %s", strerror(errno));
}

/* Step 6, responses: take what rsp_prod shows (acquire: the slots are
 * written before it); when nothing is left, RING_FINAL_CHECK re-arms
 * rsp_event and looks once more, and only then do we sleep on the FIFO. */
int blkfront_collect(struct blkfront *f, blkif_response_t *out, unsigned n)
{
    unsigned got = 0;
    while (got < n) {
        RING_IDX prod = __atomic_load_n(&f->ring.sring->rsp_prod, __ATOMIC_ACQUIRE);
        if (prod - f->ring.rsp_cons > RING_SIZE(&f->ring))
            return fail(f, "rsp_prod %u runs more than a ring ahead of %u", prod, f->ring.rsp_cons);
        while (f->ring.rsp_cons != prod) {
            if (got == n)
                return fail(f, "more responses than requests");
            out[got++] = *RING_GET_RESPONSE(&f->ring, f->ring.rsp_cons);
            f->ring.rsp_cons++;
        }
        if (got == n)
            break;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->ring, more);
        if (more)
            continue;
        int r = evtchn_wait(f->ev, f->timeout_ms);
        if (r == 0)
            return fail(f, "no event in %d ms (%u of %u responses)", f->timeout_ms, got, n);
        if (r < 0 || drain_events(f) != 0)
            return fail(f, "waiting for events: %s", strerror(errno));
    }
    return 0;
}

/* Step 7: Closing, wait for the backend's Closing (or Closed), Closed, wait
 * for the backend's Closed; then the ring's grant and port can go (the
 * backend no longer maps or binds them). */
int blkfront_close(struct blkfront *f)
{
    if (!write_key(f, XBT_NULL, "state", "%d", XenbusStateClosing))
        return fail(f, "writing state 5");
    if (wait_backend(f, XenbusStateClosing) != 0)
        return -1;
    if (!write_key(f, XBT_NULL, "state", "%d", XenbusStateClosed))
        return fail(f, "writing state 6");
    if (wait_backend(f, XenbusStateClosed) != 0)
        return -1;
    drain_events(f);
    grant_revoke(f->dom, f->ring_page.gref);
    evtchn_unbind(f->ev, f->port);
    return 0;
}
