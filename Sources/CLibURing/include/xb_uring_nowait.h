#ifndef XB_URING_NOWAIT_H
#define XB_URING_NOWAIT_H
// A write that must never wait (a TAP queue's frames): beside xb_uring.h.
#include <stdint.h>
#include <sys/uio.h>

struct xb_uring;

/// Like xb_uring_queue_writev, with RWF_NOWAIT: a write that would block
/// completes at once with -EAGAIN instead of waiting for room (io_uring
/// otherwise waits for a pollable file such as a TAP or a socket to become
/// writable, whatever its O_NONBLOCK). 0, or -EBUSY when the submission
/// queue is full.
int xb_uring_queue_writev_nowait(struct xb_uring *ring, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count);

#endif
