/*
 * LD_PRELOAD shim that lets Debian's oxenstored (xen-utils-4.17) run on a
 * machine without Xen, for scripts/oxenstored-sandbox and OXenstoredTests.
 * Not a SwiftPM target: the script builds it with gcc -shared -fPIC.
 *
 * oxenstored started with --no-fork --no-domain-init serves its Unix
 * sockets like on a dom0, but at start it still
 *   - raises RLIMIT_NOFILE above the hard limit (fails without
 *     CAP_SYS_RESOURCE headroom; here it is clamped to the hard limit),
 *   - opens libxenctrl (/dev/xen/privcmd) and libxenevtchn
 *     (/dev/xen/evtchn) and binds VIRQ_DOM_EXC, and polls that fd.
 * The stubs below hand it a dummy handle and an eventfd that nobody ever
 * signals, so the event channel side simply stays quiet. Nothing here is
 * reached by the socket protocol, which is what the tests exercise.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

/* setrlimit: never ask for more than the hard limit (oxenstored asks for a
 * fixed, large RLIMIT_NOFILE and exits when refused). */
int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    static int (*real)(__rlimit_resource_t, const struct rlimit *);
    if (!real)
        real = (int (*)(__rlimit_resource_t, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
    if (resource == RLIMIT_NOFILE) {   /* rlim is nonnull by contract */
        struct rlimit cur, want = *rlim;
        if (getrlimit(RLIMIT_NOFILE, &cur) == 0 && cur.rlim_max != RLIM_INFINITY) {
            if (want.rlim_max == RLIM_INFINITY || want.rlim_max > cur.rlim_max) want.rlim_max = cur.rlim_max;
            if (want.rlim_cur == RLIM_INFINITY || want.rlim_cur > want.rlim_max) want.rlim_cur = want.rlim_max;
        }
        return real(resource, &want);
    }
    return real(resource, rlim);
}

/* libxenctrl: an opaque handle that is never dereferenced by the caller. */
static char dummy_xc;
void *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags)
{
    (void)logger; (void)dombuild_logger; (void)open_flags;
    return &dummy_xc;
}
int xc_interface_close(void *xch) { (void)xch; return 0; }

/* libxenevtchn: one handle whose fd is an eventfd nobody writes, so
 * oxenstored's poll never sees it readable. */
struct dummy_evtchn { int fd; };
static struct dummy_evtchn dummy_evtchn = { -1 };
static uint32_t next_port = 1;

void *xenevtchn_open(void *logger, unsigned open_flags)
{
    (void)logger; (void)open_flags;
    if (dummy_evtchn.fd < 0) {
        dummy_evtchn.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (dummy_evtchn.fd < 0) return NULL;
    }
    return &dummy_evtchn;
}
int xenevtchn_close(void *xce) { (void)xce; return 0; }
int xenevtchn_fd(void *xce) { (void)xce; return dummy_evtchn.fd; }
/* Plausible local ports, counted up from 1. */
int xenevtchn_bind_virq(void *xce, unsigned virq) { (void)xce; (void)virq; return (int)next_port++; }
int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port)
{
    (void)xce; (void)domid; (void)remote_port;
    return (int)next_port++;
}
/* Nothing is ever pending (only called after the fd polls readable). */
int xenevtchn_pending(void *xce) { (void)xce; errno = EAGAIN; return -1; }
int xenevtchn_unmask(void *xce, uint32_t port) { (void)xce; (void)port; return 0; }
int xenevtchn_notify(void *xce, uint32_t port) { (void)xce; (void)port; return 0; }
int xenevtchn_unbind(void *xce, uint32_t port) { (void)xce; (void)port; return 0; }
