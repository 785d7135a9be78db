/*
 * loopback-c-frontend: a simulated guest for xenbackd's loopback
 * hypervisor, written from docs/loopback-hypervisor.md alone.
 *
 *   loopback-c-frontend --root DIR --domid N --disk PATH
 *                       [--devid 51712] [--first-sector 1000] [--timeout-ms 10000]
 *
 * It plays the toolstack (dom0 socket), then the guest (its own socket):
 * blkfront handshake, a multi-segment WRITE, FLUSH, READ back, reads in
 * flight, a READ past the end, and the unplug. One line per check:
 * "check NAME: ok (...)" or "check NAME: FAILED (...)"; exit status 0 only
 * if every check passed.
 *
 * The data written: byte j of disk sector s is pattern(s, j) below, for
 * sectors first-sector .. first-sector+14.
 */
#define _GNU_SOURCE
#include "frontend.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define WRITE_SECTORS 15u
#define IN_FLIGHT 15u
#define NO_RESPONSE 99   /* not a BLKIF_RSP_*: the ring failed before a response came */

struct options {
    const char *root, *disk;
    unsigned domid, devid;
    uint64_t first_sector;
    int timeout_ms;
};

static unsigned checks_run, checks_failed;

/* One line per check, flushed at once (stdout is a pipe in the tests). */
static bool check(const char *name, bool ok, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    checks_run++;
    if (!ok)
        checks_failed++;
    printf("check %s: %s (%s)\n", name, ok ? "ok" : "FAILED", detail);
    fflush(stdout);
    return ok;
}

static uint8_t pattern(uint64_t sector, unsigned byte)
{
    return (uint8_t)(sector * 37u + byte * 11u + 1u);
}

static void fill_pattern(uint8_t *buf, uint64_t sector, unsigned count)
{
    for (unsigned s = 0; s < count; s++)
        for (unsigned j = 0; j < SECTOR_BYTES; j++)
            buf[s * SECTOR_BYTES + j] = pattern(sector + s, j);
}

static bool matches_pattern(const uint8_t *buf, uint64_t sector, unsigned count)
{
    for (unsigned s = 0; s < count; s++)
        for (unsigned j = 0; j < SECTOR_BYTES; j++)
            if (buf[s * SECTOR_BYTES + j] != pattern(sector + s, j))
                return false;
    return true;
}

static blkif_request_t request(uint8_t op, uint64_t id, uint64_t sector, unsigned devid)
{
    blkif_request_t r;
    memset(&r, 0, sizeof r);
    r.operation = op;
    r.handle = (blkif_vdev_t)devid;
    r.id = id;
    r.sector_number = sector;
    return r;
}

static void add_segment(blkif_request_t *r, const struct page *p, unsigned first, unsigned last)
{
    r->seg[r->nr_segments].gref = p->gref;
    r->seg[r->nr_segments].first_sect = (uint8_t)first;
    r->seg[r->nr_segments].last_sect = (uint8_t)last;
    r->nr_segments++;
}

/* Submits n requests and waits for their n responses; `status[i]` is the
 * status of reqs[i] (matched by id), or NO_RESPONSE if no response carried its id. */
static int run(struct blkfront *f, const blkif_request_t *reqs, unsigned n, int16_t *status)
{
    blkif_response_t rsp[IN_FLIGHT];
    for (unsigned i = 0; i < n; i++)
        status[i] = NO_RESPONSE;
    if (n > IN_FLIGHT || blkfront_submit(f, reqs, n) != 0 || blkfront_collect(f, rsp, n) != 0)
        return -1;
    for (unsigned k = 0; k < n; k++)
        for (unsigned i = 0; i < n; i++)
            if (rsp[k].id == reqs[i].id && rsp[k].operation == reqs[i].operation)
                status[i] = rsp[k].status;
    return 0;
}

static int16_t run_one(struct blkfront *f, const blkif_request_t *r)
{
    int16_t st;
    return run(f, r, 1, &st) == 0 ? st : NO_RESPONSE;
}

/* ": why" when the ring itself failed (no response), for a check's detail. */
static const char *why(const struct blkfront *f, int16_t status)
{
    static char buf[260];
    snprintf(buf, sizeof buf, "%s%s", status == NO_RESPONSE ? ": " : "", status == NO_RESPONSE ? f->error : "");
    return buf;
}

/* ---- the I/O checks ----------------------------------------------------- */

/* 15 sectors in three segments: sectors 3..7 of page A (first_sect > 0),
 * all of page B, sectors 0..1 of page C. Read-only grants suffice. */
static bool check_write(struct blkfront *f, const struct options *o)
{
    struct page a, b, c;
    if (page_alloc(f->dom, true, &a) || page_alloc(f->dom, true, &b) || page_alloc(f->dom, true, &c))
        return check("write", false, "out of guest frames or grants");
    uint64_t s = o->first_sector;
    fill_pattern(a.data + 3 * SECTOR_BYTES, s, 5);
    fill_pattern(b.data, s + 5, 8);
    fill_pattern(c.data, s + 13, 2);
    blkif_request_t r = request(BLKIF_OP_WRITE, 1, s, f->devid);
    add_segment(&r, &a, 3, 7);
    add_segment(&r, &b, 0, 7);
    add_segment(&r, &c, 0, 1);
    int16_t st = run_one(f, &r);
    grant_revoke(f->dom, a.gref);
    grant_revoke(f->dom, b.gref);
    grant_revoke(f->dom, c.gref);
    return check("write", st == BLKIF_RSP_OKAY, "3 segments, first_sect 3, sectors %llu..%llu: status %d%s",
                 (unsigned long long)s, (unsigned long long)(s + WRITE_SECTORS - 1), st, why(f, st));
}

static bool check_flush(struct blkfront *f)
{
    if (!f->flush)
        return check("flush", false, "backend did not offer feature-flush-cache");
    blkif_request_t r = request(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, f->devid);
    int16_t st = run_one(f, &r);
    return check("flush", st == BLKIF_RSP_OKAY, "FLUSH_DISKCACHE: status %d%s", st, why(f, st));
}

/* Reads the 15 sectors back in another shape: sectors 1..7 of page D,
 * then all of page E. Sector 0 of D holds a sentinel the read must not
 * touch. Writable grants: the backend copies into these pages. */
static bool check_read_back(struct blkfront *f, const struct options *o)
{
    struct page d, e;
    if (page_alloc(f->dom, false, &d) || page_alloc(f->dom, false, &e))
        return check("read-back", false, "out of guest frames or grants");
    memset(d.data, 0xEE, PAGE_BYTES);
    memset(e.data, 0xEE, PAGE_BYTES);
    uint64_t s = o->first_sector;
    blkif_request_t r = request(BLKIF_OP_READ, 3, s, f->devid);
    add_segment(&r, &d, 1, 7);
    add_segment(&r, &e, 0, 7);
    int16_t st = run_one(f, &r);
    bool data = matches_pattern(d.data + SECTOR_BYTES, s, 7) && matches_pattern(e.data, s + 7, 8);
    bool sentinel = true;
    for (unsigned j = 0; j < SECTOR_BYTES; j++)
        sentinel = sentinel && d.data[j] == 0xEE;
    grant_revoke(f->dom, d.gref);
    grant_revoke(f->dom, e.gref);
    check("read-back", st == BLKIF_RSP_OKAY, "2 segments, first_sect 1: status %d%s", st, why(f, st));
    check("read-back-data", data, "15 sectors %s the pattern written", data ? "match" : "DO NOT match");
    return check("read-untouched", sentinel, "sector 0 of the first_sect=1 page %s",
                 sentinel ? "kept its sentinel" : "was overwritten");
}

/* 15 one-sector reads at once, each into its own page at a different
 * first_sect; responses may come in any order and are matched by id. */
static bool check_reads_in_flight(struct blkfront *f, const struct options *o)
{
    struct page p[IN_FLIGHT];
    blkif_request_t r[IN_FLIGHT];
    int16_t st[IN_FLIGHT];
    for (unsigned i = 0; i < IN_FLIGHT; i++) {
        if (page_alloc(f->dom, false, &p[i]))
            return check("reads-in-flight", false, "out of guest frames or grants");
        unsigned slot = i % SECTORS_PER_PAGE;
        r[i] = request(BLKIF_OP_READ, 100 + i, o->first_sector + i, f->devid);
        add_segment(&r[i], &p[i], slot, slot);
    }
    bool ok = run(f, r, IN_FLIGHT, st) == 0;
    unsigned good = 0;
    for (unsigned i = 0; i < IN_FLIGHT; i++) {
        unsigned slot = i % SECTORS_PER_PAGE;
        if (st[i] == BLKIF_RSP_OKAY && matches_pattern(p[i].data + slot * SECTOR_BYTES, o->first_sector + i, 1))
            good++;
        grant_revoke(f->dom, p[i].gref);
    }
    return check("reads-in-flight", ok && good == IN_FLIGHT, "%u of %u one-sector reads OKAY with the right data%s%s",
                 good, IN_FLIGHT, ok ? "" : ": ", ok ? "" : f->error);
}

/* A read that crosses the end and one that starts at it: both refused. */
static bool check_read_past_end(struct blkfront *f)
{
    struct page p;
    if (page_alloc(f->dom, false, &p))
        return check("read-past-end", false, "out of guest frames or grants");
    blkif_request_t r[2] = {
        request(BLKIF_OP_READ, 200, f->sectors - 1, f->devid),
        request(BLKIF_OP_READ, 201, f->sectors, f->devid),
    };
    add_segment(&r[0], &p, 0, 1);
    add_segment(&r[1], &p, 0, 0);
    int16_t st[2];
    run(f, r, 2, st);
    grant_revoke(f->dom, p.gref);
    return check("read-past-end", st[0] == BLKIF_RSP_ERROR && st[1] == BLKIF_RSP_ERROR,
                 "sectors %llu..%llu: status %d, sector %llu: status %d (want %d)",
                 (unsigned long long)(f->sectors - 1), (unsigned long long)f->sectors, st[0],
                 (unsigned long long)f->sectors, st[1], BLKIF_RSP_ERROR);
}

/* The file itself, read without the ring, holds the pattern. */
static bool check_disk_file(const struct options *o)
{
    uint8_t buf[WRITE_SECTORS * SECTOR_BYTES];
    int fd = open(o->disk, O_RDONLY);
    ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf, (off_t)(o->first_sector * SECTOR_BYTES));
    if (fd >= 0)
        close(fd);
    bool ok = n == (ssize_t)sizeof buf && matches_pattern(buf, o->first_sector, WRITE_SECTORS);
    return check("disk-file", ok, "%s read with pread %s the pattern", o->disk, ok ? "holds" : "does NOT hold");
}

static void run_io_checks(struct blkfront *f, const struct options *o)
{
    check_write(f, o);
    check_flush(f);
    check_read_back(f, o);
    check_reads_in_flight(f, o);
    check_read_past_end(f);
    check_disk_file(o);
    check("events", f->ev->events > 0, "%lu events read from the FIFO", f->ev->events);
}

/* ---- the handshake ------------------------------------------------------ */

static uint64_t disk_sectors(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_size / SECTOR_BYTES : 0;
}

/* Steps 2-5. Returns false (after a failed check line) if not Connected. */
static bool connect_frontend(struct blkfront *f, const struct options *o)
{
    if (!check("initwait", blkfront_wait_initwait(f) == 0, "backend state 2, max-ring-page-order %u%s",
               f->max_ring_order, f->error))
        return false;
    if (!check("initialised", blkfront_initialise(f) == 0, "ring-ref %u, event-channel %u, state 3%s",
               f->ring_page.gref, f->port, f->error))
        return false;
    if (!check("connected", blkfront_wait_connected(f) == 0, "backend state 4%s", f->error))
        return false;
    uint64_t want = disk_sectors(o->disk);
    check("disk-size", f->sectors == want && f->sector_size == SECTOR_BYTES,
          "sectors %llu (file: %llu), sector-size %u, info %u, feature-flush-cache %d",
          (unsigned long long)f->sectors, (unsigned long long)want, f->sector_size, f->info, f->flush);
    struct evtchn_entry *x = evtchn_entry(f->ev, f->port);
    uint32_t state = __atomic_load_n(&x->state, __ATOMIC_SEQ_CST);
    uint32_t peer = __atomic_load_n(&x->remote_domain, __ATOMIC_SEQ_CST);
    return check("port-bound", state == EVTCHN_INTERDOMAIN && peer == BACKEND_DOMID,
                 "port %u: state %u, remote domain %u, remote port %u", f->port, state, peer,
                 __atomic_load_n(&x->remote_port, __ATOMIC_SEQ_CST));
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: loopback-c-frontend --root DIR --domid N --disk PATH "
                    "[--devid 51712] [--first-sector 1000] [--timeout-ms 10000]\n");
    exit(2);
}

static void parse(int argc, char **argv, struct options *o)
{
    *o = (struct options){ .devid = 51712, .first_sector = 1000, .timeout_ms = 10000 };
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--root"))
            o->root = v;
        else if (!strcmp(k, "--domid"))
            o->domid = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--disk"))
            o->disk = v;
        else if (!strcmp(k, "--devid"))
            o->devid = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(k, "--first-sector"))
            o->first_sector = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--timeout-ms"))
            o->timeout_ms = atoi(v);
        else
            usage();
    }
    if (!o->root || !o->disk || o->domid < 1 || o->domid > 65534)
        usage();
}

int main(int argc, char **argv)
{
    struct options o;
    parse(argc, argv, &o);
    char path[600];

    /* The guest's hypervisor state: memory, grant table, ports. */
    struct domain dom;
    struct evtchn ev;
    bool have_domain = domain_create(&dom, o.root, o.domid, 64, 512) == 0;
    bool have_evtchn = have_domain && evtchn_open(&ev, o.root, o.domid) == 0;
    if (!check("guest-domain", have_domain && have_evtchn, "%s/{memory,grant-table,event-channels}, FIFO handle %u",
               dom.dir, have_evtchn ? ev.handle : 0))
        return 1;

    /* The toolstack, as dom0. */
    snprintf(path, sizeof path, "%s/xenstored.sock", o.root);
    struct xs_handle *dom0 = store_open(path);
    if (!check("toolstack-domain", dom0 && toolstack_create_domain(dom0, o.domid) == 0,
               "/local/domain/%u created and introduced", o.domid))
        return 1;
    snprintf(path, sizeof path, "%s/xenstore/domain-%u.sock", o.root, o.domid);
    check("domain-socket", file_exists(path), "%s %s", path, file_exists(path) ? "exists" : "missing");
    check("toolstack-vbd", toolstack_add_disk(dom0, o.domid, o.devid, o.disk) == 0,
          "vbd %u with libxl's keys, params %s", o.devid, o.disk);

    /* The guest, on its own socket. */
    struct xs_handle *guest = store_open(path);
    struct blkfront f;
    memset(&f, 0, sizeof f);
    bool up = check("guest-store", guest && blkfront_init(&f, guest, &dom, &ev, o.devid, o.timeout_ms) == 0,
                    "connected as dom%u, backend at %s%s", o.domid, f.be, f.error);
    if (up && connect_frontend(&f, &o)) {
        run_io_checks(&f, &o);
        check("closed", blkfront_close(&f) == 0, "state 5, backend 6, state 6%s%s", *f.error ? ": " : "", f.error);
    }

    /* Unplug and destroy, as the toolstack. */
    check("vbd-removed", toolstack_remove_disk(dom0, o.domid, o.devid) == 0, "both vbd directories removed");
    if (guest)
        xs_close(guest);
    evtchn_close(&ev);
    bool released = toolstack_destroy_domain(dom0, o.domid) == 0;
    check("domain-released", released && !file_exists(path), "/local/domain/%u removed, %s %s", o.domid, path,
          file_exists(path) ? "still there" : "gone");
    xs_close(dom0);
    domain_destroy(&dom);
    snprintf(path, sizeof path, "%s/event-channels", dom.dir);
    unlink(path);
    rmdir(dom.dir);

    printf("%s: %u of %u checks passed\n", checks_failed ? "FAILED" : "PASSED", checks_run - checks_failed, checks_run);
    return checks_failed ? 1 : 0;
}
