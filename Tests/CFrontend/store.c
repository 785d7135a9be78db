/*
 * Xenstore through Xen's libxenstore: small helpers, and the toolstack's
 * part (what libxl writes for a domain and a vbd), played over the dom0
 * socket.
 */
#define _GNU_SOURCE
#include "frontend.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* libxenstore looks XENSTORED_PATH up inside xs_open, so one process can
 * hold connections to two sockets: dom0's and the guest's. */
struct xs_handle *store_open(const char *socket_path)
{
    setenv("XENSTORED_PATH", socket_path, 1);
    struct xs_handle *h = xs_open(0);
    if (!h)
        fprintf(stderr, "xs_open(%s): %s\n", socket_path, strerror(errno));
    return h;
}

bool store_write(struct xs_handle *h, xs_transaction_t t, const char *path, const char *value)
{
    if (xs_write(h, t, path, value, (unsigned)strlen(value)))
        return true;
    fprintf(stderr, "write %s: %s\n", path, strerror(errno));
    return false;
}

/* Xen's permission lists: the first entry names the owner (who may do
 * anything) and everybody else's access; then one reader. */
bool store_set_perms(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned owner, unsigned reader)
{
    struct xs_permissions p[2] = {
        { .id = owner, .perms = XS_PERM_NONE },
        { .id = reader, .perms = XS_PERM_READ },
    };
    if (xs_set_permissions(h, t, path, p, 2))
        return true;
    fprintf(stderr, "set permissions %s: %s\n", path, strerror(errno));
    return false;
}

char *store_read(struct xs_handle *h, const char *path)
{
    unsigned len;
    return xs_read(h, XBT_NULL, path, &len);
}

long store_read_long(struct xs_handle *h, const char *path, long fallback)
{
    char *s = store_read(h, path);
    if (!s)
        return fallback;
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s)
        v = fallback;
    free(s);
    return v;
}

/* Runs body in a transaction, again while the store answers EAGAIN (a node
 * it read or wrote changed meanwhile). */
bool store_transaction(struct xs_handle *h, txn_body body, const void *ctx)
{
    for (int attempt = 0; attempt < 100; attempt++) {
        xs_transaction_t t = xs_transaction_start(h);
        if (t == XBT_NULL) {
            perror("transaction start");
            return false;
        }
        bool ok = body(h, t, ctx);
        if (xs_transaction_end(h, t, !ok) && ok)
            return true;
        if (!ok || errno != EAGAIN) {
            if (ok)
                perror("transaction end");
            return false;
        }
    }
    return false;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until the node reads `want`. A watch wakes us at each change (and
 * fires once at once); we re-read the node every time, so stale or
 * coalesced events do not matter. Gives up early if a wait for a state
 * before Closing sees Closing or Closed. */
int store_wait_state(struct xs_handle *h, const char *state_path, int want, int timeout_ms, int *seen)
{
    const char *token = "state";
    int fd = xs_fileno(h);
    if (fd < 0 || !xs_watch(h, state_path, token)) {
        perror("watch");
        return -1;
    }
    long long deadline = now_ms() + timeout_ms;
    int result = -1;
    for (;;) {
        char **ev;
        while ((ev = xs_check_watch(h)) != NULL)
            free(ev);
        int s = (int)store_read_long(h, state_path, -1);
        *seen = s;
        /* A backend already Closed has gone past Closing. */
        if (s == want || (want == XenbusStateClosing && s == XenbusStateClosed)) {
            result = 0;
            break;
        }
        if (want < XenbusStateClosing && s >= XenbusStateClosing)
            break;
        long long left = deadline - now_ms();
        if (left <= 0)
            break;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        poll(&p, 1, (int)left);
    }
    xs_unwatch(h, state_path, token);
    return result;
}

/* ---- the toolstack ------------------------------------------------------ */

static bool make_domain(struct xs_handle *h, xs_transaction_t t, const void *ctx)
{
    unsigned d = *(const unsigned *)ctx;
    char home[64], path[128], value[32];
    snprintf(home, sizeof home, "/local/domain/%u", d);
    if (!xs_mkdir(h, t, home) || !store_set_perms(h, t, home, 0, d))
        return false;
    snprintf(path, sizeof path, "%s/name", home);
    snprintf(value, sizeof value, "c-guest%u", d);
    if (!store_write(h, t, path, value))
        return false;
    snprintf(path, sizeof path, "%s/domid", home);
    snprintf(value, sizeof value, "%u", d);
    if (!store_write(h, t, path, value))
        return false;
    /* device/ belongs to the guest (it writes its frontends' keys), dom0 reads. */
    snprintf(path, sizeof path, "%s/device", home);
    return xs_mkdir(h, t, path) && store_set_perms(h, t, path, d, 0);
}

/* The domain's home, then XS_INTRODUCE: from then on the store serves the
 * domain's own socket. On Xen the mfn and port name the xenstore ring
 * page and event channel; the loopback store has no ring, so both are 0. */
int toolstack_create_domain(struct xs_handle *dom0, unsigned domid)
{
    if (!store_transaction(dom0, make_domain, &domid))
        return -1;
    if (!xs_introduce_domain(dom0, domid, 0, 0)) {
        perror("introduce");
        return -1;
    }
    return 0;
}

struct disk_keys {
    unsigned domid, devid;
    const char *params;
};

struct key {
    const char *name;
    char value[512];
};

/* Writes a directory and its keys, each with the same permissions. */
static bool write_dir(struct xs_handle *h, xs_transaction_t t, const char *dir, const struct key *keys, size_t n,
                      unsigned owner, unsigned reader)
{
    if (!xs_mkdir(h, t, dir) || !store_set_perms(h, t, dir, owner, reader))
        return false;
    for (size_t i = 0; i < n; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", dir, keys[i].name);
        if (!store_write(h, t, path, keys[i].value) || !store_set_perms(h, t, path, owner, reader))
            return false;
    }
    return true;
}

static bool make_disk(struct xs_handle *h, xs_transaction_t t, const void *ctx)
{
    const struct disk_keys *k = ctx;
    char fe[128], be[128];
    snprintf(fe, sizeof fe, "/local/domain/%u/device/vbd/%u", k->domid, k->devid);
    snprintf(be, sizeof be, "/local/domain/%u/backend/vbd/%u/%u", BACKEND_DOMID, k->domid, k->devid);

    struct key front[] = {
        { "backend", "" }, { "backend-id", "" }, { "device-type", "disk" },
        { "virtual-device", "" }, { "state", "1" }, { "trusted", "1" },
    };
    snprintf(front[0].value, sizeof front[0].value, "%s", be);
    snprintf(front[1].value, sizeof front[1].value, "%u", BACKEND_DOMID);
    snprintf(front[3].value, sizeof front[3].value, "%u", k->devid);

    struct key back[] = {
        { "bootable", "1" }, { "dev", "xvda" }, { "device-type", "disk" }, { "discard-enable", "1" },
        { "frontend", "" }, { "frontend-id", "" }, { "mode", "w" }, { "online", "1" },
        { "params", "" }, { "removable", "0" }, { "specification", "xen" }, { "state", "1" },
        { "type", "phy" },
    };
    snprintf(back[4].value, sizeof back[4].value, "%s", fe);
    snprintf(back[5].value, sizeof back[5].value, "%u", k->domid);
    snprintf(back[8].value, sizeof back[8].value, "%s", k->params);

    /* The frontend directory is the guest's, readable by the backend; the
     * backend directory is the backend's, readable by the guest. */
    return write_dir(h, t, fe, front, sizeof front / sizeof front[0], k->domid, BACKEND_DOMID) &&
           write_dir(h, t, be, back, sizeof back / sizeof back[0], BACKEND_DOMID, k->domid);
}

int toolstack_add_disk(struct xs_handle *dom0, unsigned domid, unsigned devid, const char *params)
{
    struct disk_keys k = { domid, devid, params };
    return store_transaction(dom0, make_disk, &k) ? 0 : -1;
}

/* What `xl block-detach` finally does, once both ends are Closed. */
int toolstack_remove_disk(struct xs_handle *dom0, unsigned domid, unsigned devid)
{
    char fe[128], be[128];
    snprintf(fe, sizeof fe, "/local/domain/%u/device/vbd/%u", domid, devid);
    snprintf(be, sizeof be, "/local/domain/%u/backend/vbd/%u/%u", BACKEND_DOMID, domid, devid);
    bool ok = xs_rm(dom0, XBT_NULL, be);
    ok = xs_rm(dom0, XBT_NULL, fe) && ok;
    return ok ? 0 : -1;
}

int toolstack_destroy_domain(struct xs_handle *dom0, unsigned domid)
{
    char path[128];
    snprintf(path, sizeof path, "/local/domain/%u/backend/vbd/%u", BACKEND_DOMID, domid);
    xs_rm(dom0, XBT_NULL, path);   /* may already be gone */
    snprintf(path, sizeof path, "/local/domain/%u", domid);
    bool ok = xs_rm(dom0, XBT_NULL, path);
    ok = xs_release_domain(dom0, domid) && ok;
    return ok ? 0 : -1;
}
