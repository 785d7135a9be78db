#ifndef XB_URING_H
#define XB_URING_H
// io_uring for the file storage, through liburing, behind an opaque handle:
// liburing's headers carry their own copy of the kernel's io_uring structs,
// which Swift cannot import beside the kernel's own (swift-system's).
#include <stdint.h>
#include <sys/uio.h>

struct xb_uring;

/// io-wq worker threads (each kind: bounded and unbounded work) one ring's
/// submitting thread may have for operations that would block.
#define XB_URING_MAX_WORKERS 4

/// A ring of `entries` submission entries (twice as many completion
/// entries) whose completions signal `eventfd` (none when it is -1: the
/// ring's own descriptor polls readable while completions wait). 0, or
/// -errno with `*failed_call` naming the liburing call that refused.
int xb_uring_open(unsigned entries, int eventfd, struct xb_uring **ring, const char **failed_call);
void xb_uring_close(struct xb_uring *ring);
/// The ring's descriptor: readable while its completion ring holds entries.
int xb_uring_fd(const struct xb_uring *ring);

/// Queue one entry (not yet submitted); `tag` comes back with its
/// completion. 0, or -EBUSY when the submission queue is full.
int xb_uring_queue_readv(struct xb_uring *ring, uint64_t tag, int fd, const struct iovec *iovecs,
                         unsigned count, uint64_t offset);
int xb_uring_queue_writev(struct xb_uring *ring, uint64_t tag, int fd, const struct iovec *iovecs,
                          unsigned count, uint64_t offset);
int xb_uring_queue_fdatasync(struct xb_uring *ring, uint64_t tag, int fd);
/// A writev that must never wait (a TAP queue's frames): with RWF_NOWAIT,
/// a write that would block completes at once with -EAGAIN instead of
/// waiting for room (io_uring otherwise waits for a pollable file such as
/// a TAP or a socket to become writable, whatever its O_NONBLOCK). 0, or
/// -EBUSY when the submission queue is full.
int xb_uring_queue_writev_nowait(struct xb_uring *ring, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count);

/// A writev that may wait, linked to the next entry when `link` is set:
/// the kernel starts the next only once this one has completed in full,
/// and cancels the rest of the chain (-ECANCELED) if it fails or is
/// short. `async` hands it to a worker thread at once (IOSQE_ASYNC, for
/// tests). 0, or -EBUSY when the submission queue is full.
int xb_uring_queue_writev_linked(struct xb_uring *ring, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count, int link, int async);
/// Hands the kernel every queued entry and waits until `want` completions
/// are in the ring (a wait interrupted by a signal is taken up again):
/// what was submitted, or -errno.
int xb_uring_submit_and_wait(struct xb_uring *ring, unsigned want);

/// io_uring_submit: hands the kernel every queued entry. Returns how many
/// stay queued because the kernel did not take them now (0 normally).
unsigned xb_uring_submit(struct xb_uring *ring);
/// Queued entries the kernel has not taken yet.
unsigned xb_uring_unsubmitted(struct xb_uring *ring);

/// Copies up to `max` completions (tag, result: bytes or -errno) out of the
/// completion ring and releases them; no system call. Returns how many.
unsigned xb_uring_reap(struct xb_uring *ring, uint64_t *tags, int64_t *results, unsigned max);

#endif
