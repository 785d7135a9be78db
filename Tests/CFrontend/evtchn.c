/*
 * "Event channels" of docs/loopback-hypervisor.md: the port table
 * domN/event-channels, a handle with its FIFO domN/evtchn-H.fifo, and the
 * operations a frontend needs (alloc unbound, notify, read pending,
 * unmask, unbind, close).
 */
#define _GNU_SOURCE
#include "frontend.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define EVTCHN_MAGIC 0x56454258u   /* "XBEV" */
#define EVTCHN_VERSION 1u
#define EVTCHN_PORTS 1024u
#define EVTCHN_HEADER_BYTES 64u

_Static_assert(sizeof(struct evtchn_header) == EVTCHN_HEADER_BYTES, "64-byte header");
_Static_assert(sizeof(struct evtchn_entry) == 32, "32-byte entries");

static size_t table_bytes(uint32_t ports)
{
    return EVTCHN_HEADER_BYTES + (size_t)ports * sizeof(struct evtchn_entry);
}

static void table_path(char *buf, size_t len, const char *root, unsigned domid)
{
    snprintf(buf, len, "%s/dom%u/event-channels", root, domid);
}

/* Maps a domain's port table. With `create`, the file is made and sized for
 * 1024 ports if it is new, and formatted if nobody has yet: the fields
 * first, then the magic by compare-and-swap from 0, so a reader that sees
 * the magic also sees the port count. */
static int table_map(struct evtchn_table *t, const char *path, bool create)
{
    int fd = open(path, create ? O_RDWR | O_CREAT : O_RDWR, 0600);
    if (fd < 0) {
        perror(path);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        perror(path);
        close(fd);
        return -1;
    }
    size_t bytes = (size_t)st.st_size;
    if (create && bytes < table_bytes(EVTCHN_PORTS)) {
        bytes = table_bytes(EVTCHN_PORTS);
        if (ftruncate(fd, (off_t)bytes) != 0) {
            perror(path);
            close(fd);
            return -1;
        }
    }
    if (bytes < EVTCHN_HEADER_BYTES) {
        fprintf(stderr, "%s: %zu bytes, too small for the header\n", path, bytes);
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        perror(path);
        return -1;
    }
    t->header = p;
    t->entries = (struct evtchn_entry *)((uint8_t *)p + EVTCHN_HEADER_BYTES);
    t->map_bytes = bytes;

    if (create && __atomic_load_n(&t->header->magic, __ATOMIC_ACQUIRE) == 0) {
        __atomic_store_n(&t->header->version, EVTCHN_VERSION, __ATOMIC_RELAXED);
        __atomic_store_n(&t->header->nr_ports, EVTCHN_PORTS, __ATOMIC_RELAXED);
        uint32_t zero = 0;
        __atomic_compare_exchange_n(&t->header->magic, &zero, EVTCHN_MAGIC, false,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    if (__atomic_load_n(&t->header->magic, __ATOMIC_ACQUIRE) != EVTCHN_MAGIC ||
        __atomic_load_n(&t->header->version, __ATOMIC_ACQUIRE) != EVTCHN_VERSION) {
        fprintf(stderr, "%s: not a version 1 port table\n", path);
        return -1;
    }
    t->nr_ports = __atomic_load_n(&t->header->nr_ports, __ATOMIC_ACQUIRE);
    if (table_bytes(t->nr_ports) > bytes) {
        fprintf(stderr, "%s: %u ports do not fit in %zu bytes\n", path, t->nr_ports, bytes);
        return -1;
    }
    return 0;
}

static void table_unmap(struct evtchn_table *t)
{
    if (t->header)
        munmap(t->header, t->map_bytes);
    t->header = NULL;
    t->entries = NULL;
}

static bool cas_u32(uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static uint32_t load_u32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static void store_u32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

int evtchn_open(struct evtchn *e, const char *root, unsigned domid)
{
    memset(e, 0, sizeof *e);
    e->fd = -1;
    snprintf(e->root, sizeof e->root, "%s", root);
    e->domid = domid;
    char path[600];
    table_path(path, sizeof path, root, domid);
    if (table_map(&e->own, path, true) != 0)
        return -1;
    /* The handle id: one fetch-add on the header's counter. */
    e->handle = __atomic_fetch_add(&e->own.header->next_handle, 1, __ATOMIC_SEQ_CST);
    snprintf(e->fifo_path, sizeof e->fifo_path, "%s/dom%u/evtchn-%u.fifo", root, domid, e->handle);
    if (mkfifo(e->fifo_path, 0600) != 0) {
        perror(e->fifo_path);
        return -1;
    }
    /* O_RDWR: the FIFO never reports EOF while writers come and go. */
    e->fd = open(e->fifo_path, O_RDWR | O_NONBLOCK);
    if (e->fd < 0) {
        perror(e->fifo_path);
        return -1;
    }
    return 0;
}

struct evtchn_entry *evtchn_entry(struct evtchn *e, uint32_t port)
{
    return port > 0 && port < e->own.nr_ports ? &e->own.entries[port] : NULL;
}

/* Claims a free entry (free -> busy), fills it, and stores the final state
 * last, so a binder never sees a half-made port. */
int evtchn_alloc_unbound(struct evtchn *e, unsigned remote_domid, uint32_t *port)
{
    for (uint32_t p = 1; p < e->own.nr_ports; p++) {
        struct evtchn_entry *x = &e->own.entries[p];
        if (!cas_u32(&x->state, EVTCHN_FREE, EVTCHN_BUSY))
            continue;
        store_u32(&x->remote_domain, remote_domid);
        store_u32(&x->remote_port, 0);
        store_u32(&x->handle, e->handle);
        store_u32(&x->pending, 0);
        store_u32(&x->masked, 0);
        store_u32(&x->state, EVTCHN_UNBOUND);
        *port = p;
        return 0;
    }
    return -1;
}

/* The table of the one remote domain we talk to, mapped on first use. */
static struct evtchn_table *peer_table(struct evtchn *e, unsigned domid)
{
    if (domid == e->domid)
        return &e->own;
    if (e->peer_mapped && e->peer_domid == domid)
        return &e->peer;
    if (e->peer_mapped)
        table_unmap(&e->peer);
    e->peer_mapped = false;
    char path[600];
    table_path(path, sizeof path, e->root, domid);
    if (table_map(&e->peer, path, false) != 0)
        return NULL;
    e->peer_domid = domid;
    e->peer_mapped = true;
    return &e->peer;
}

/* Delivers port P of domain D: only the one who flips `masked` 0 -> 1 and
 * takes `pending` 1 -> 0 writes the port into the owner's FIFO, so a port
 * is in a FIFO at most once until its owner unmasks it. */
static void deliver(struct evtchn *e, unsigned domid, struct evtchn_table *t, uint32_t port)
{
    struct evtchn_entry *x = &t->entries[port];
    if (!cas_u32(&x->masked, 0, 1))
        return;                       /* the owner will see `pending` at unmask */
    if (!cas_u32(&x->pending, 1, 0)) {
        store_u32(&x->masked, 0);     /* someone else delivered it */
        return;
    }
    char path[600];
    snprintf(path, sizeof path, "%s/dom%u/evtchn-%u.fifo", e->root, domid, load_u32(&x->handle));
    int fd = open(path, O_WRONLY | O_NONBLOCK);
    if (fd < 0)
        return;                       /* no reader: the owner is gone */
    ssize_t n = write(fd, &port, sizeof port);
    (void)n;                          /* a full FIFO cannot happen: each port is in it once */
    close(fd);
}

int evtchn_notify(struct evtchn *e, uint32_t port)
{
    struct evtchn_entry *x = evtchn_entry(e, port);
    if (!x)
        return -1;
    if (load_u32(&x->state) != EVTCHN_INTERDOMAIN)
        return 0;                     /* not bound yet: nobody to tell (as Xen: dropped) */
    unsigned rd = load_u32(&x->remote_domain);
    uint32_t rp = load_u32(&x->remote_port);
    struct evtchn_table *t = peer_table(e, rd);
    if (!t || rp == 0 || rp >= t->nr_ports)
        return -1;
    store_u32(&t->entries[rp].pending, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    deliver(e, rd, t, rp);
    return 0;
}

int evtchn_wait(struct evtchn *e, int timeout_ms)
{
    struct pollfd p = { .fd = e->fd, .events = POLLIN };
    int n;
    do
        n = poll(&p, 1, timeout_ms);
    while (n < 0 && errno == EINTR);
    return n;
}

/* 1 and the port when one was pending, 0 when none, -1 on error. */
int evtchn_read_pending(struct evtchn *e, uint32_t *port)
{
    uint32_t p;
    ssize_t n = read(e->fd, &p, sizeof p);
    if (n == (ssize_t)sizeof p) {
        e->events++;
        *port = p;
        return 1;
    }
    if (n < 0 && errno == EAGAIN)
        return 0;
    return -1;
}

/* A delivered port stays masked until here; an event that came in the
 * meantime left `pending` set, and is delivered now. */
int evtchn_unmask(struct evtchn *e, uint32_t port)
{
    struct evtchn_entry *x = evtchn_entry(e, port);
    if (!x)
        return -1;
    store_u32(&x->masked, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (load_u32(&x->pending) == 1)
        deliver(e, e->domid, &e->own, port);
    return 0;
}

/* Takes our entry (-> busy) so the peer cannot change it under us; an
 * interdomain peer goes back to unbound, waiting for us; ours is freed. */
void evtchn_unbind(struct evtchn *e, uint32_t port)
{
    struct evtchn_entry *x = evtchn_entry(e, port);
    if (!x)
        return;
    uint32_t st;
    do {
        st = load_u32(&x->state);
        if (st == EVTCHN_FREE)
            return;
    } while (st == EVTCHN_BUSY || !cas_u32(&x->state, st, EVTCHN_BUSY));

    if (st == EVTCHN_INTERDOMAIN) {
        unsigned rd = load_u32(&x->remote_domain);
        uint32_t rp = load_u32(&x->remote_port);
        struct evtchn_table *t = peer_table(e, rd);
        if (t && rp > 0 && rp < t->nr_ports) {
            struct evtchn_entry *y = &t->entries[rp];
            if (load_u32(&y->remote_domain) == e->domid && load_u32(&y->remote_port) == port &&
                cas_u32(&y->state, EVTCHN_INTERDOMAIN, EVTCHN_BUSY)) {
                store_u32(&y->remote_domain, e->domid);
                store_u32(&y->remote_port, 0);
                store_u32(&y->state, EVTCHN_UNBOUND);
            }
        }
    }
    store_u32(&x->pending, 0);
    store_u32(&x->masked, 0);
    store_u32(&x->state, EVTCHN_FREE);
}

void evtchn_close(struct evtchn *e)
{
    for (uint32_t p = 1; e->own.entries && p < e->own.nr_ports; p++) {
        uint32_t st = load_u32(&e->own.entries[p].state);
        if ((st == EVTCHN_UNBOUND || st == EVTCHN_INTERDOMAIN) && load_u32(&e->own.entries[p].handle) == e->handle)
            evtchn_unbind(e, p);
    }
    if (e->fd >= 0)
        close(e->fd);
    e->fd = -1;
    unlink(e->fifo_path);
    if (e->peer_mapped)
        table_unmap(&e->peer);
    e->peer_mapped = false;
    table_unmap(&e->own);
}
