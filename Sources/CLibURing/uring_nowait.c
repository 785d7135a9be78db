#define _GNU_SOURCE
#include "xb_uring_nowait.h"
#include <errno.h>
#include <liburing.h>
#include <linux/fs.h>

// The same definition as uring.c's (the handle is only ever a liburing ring).
struct xb_uring {
    struct io_uring ring;
};

int xb_uring_queue_writev_nowait(struct xb_uring *handle, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, iovecs, count, 0);
    sqe->rw_flags = RWF_NOWAIT;
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}
