#define _GNU_SOURCE
#include "xb_uring.h"
#include <errno.h>
#include <liburing.h>
#include <linux/fs.h>
#include <stdlib.h>

struct xb_uring {
    struct io_uring ring;
};

int xb_uring_open(unsigned entries, int eventfd, struct xb_uring **out, const char **failed_call) {
    struct xb_uring *handle = calloc(1, sizeof *handle);
    if (!handle) { *failed_call = "calloc"; return -ENOMEM; }
    // SUBMIT_ALL (5.18): an entry refused at submission completes with its
    // error and the rest of the batch still goes in; older kernels: without.
    struct io_uring_params params = { .flags = IORING_SETUP_SUBMIT_ALL };
    int result = io_uring_queue_init_params(entries, &handle->ring, &params);
    if (result == -EINVAL) {
        struct io_uring_params plain = { 0 };
        result = io_uring_queue_init_params(entries, &handle->ring, &plain);
    }
    if (result < 0) {
        free(handle);
        *failed_call = "io_uring_queue_init";
        return result;
    }
    result = eventfd < 0 ? 0 : io_uring_register_eventfd(&handle->ring, eventfd);
    if (result < 0) {
        io_uring_queue_exit(&handle->ring);
        free(handle);
        *failed_call = "io_uring_register_eventfd";
        return result;
    }
    // What the kernel cannot do without blocking (an fdatasync, a write that
    // allocates blocks, a bio that must be split, anything on tmpfs) runs on
    // the submitting thread's io-wq workers, one kernel thread per such
    // operation in flight by default. A few per ring are enough to keep the
    // disk busy; bounded, so that 200 disks cannot make thousands of threads.
    // Applied to whichever thread submits (Linux >= 5.15; ignored before).
    unsigned limits[2] = { XB_URING_MAX_WORKERS, XB_URING_MAX_WORKERS };
    (void)io_uring_register_iowq_max_workers(&handle->ring, limits);
    *out = handle;
    return 0;
}

int xb_uring_fd(const struct xb_uring *handle) {
    return handle->ring.ring_fd;
}

void xb_uring_close(struct xb_uring *handle) {
    io_uring_queue_exit(&handle->ring);
    free(handle);
}

int xb_uring_queue_readv(struct xb_uring *handle, uint64_t tag, int fd, const struct iovec *iovecs,
                         unsigned count, uint64_t offset) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_readv(sqe, fd, iovecs, count, offset);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int xb_uring_queue_writev(struct xb_uring *handle, uint64_t tag, int fd, const struct iovec *iovecs,
                          unsigned count, uint64_t offset) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, iovecs, count, offset);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int xb_uring_queue_writev_nowait(struct xb_uring *handle, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, iovecs, count, 0);
    sqe->rw_flags = RWF_NOWAIT;
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int xb_uring_queue_writev_linked(struct xb_uring *handle, uint64_t tag, int fd, const struct iovec *iovecs,
                                 unsigned count, int link, int async) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, iovecs, count, 0);
    io_uring_sqe_set_data64(sqe, tag);
    io_uring_sqe_set_flags(sqe, (link ? IOSQE_IO_LINK : 0) | (async ? IOSQE_ASYNC : 0));
    return 0;
}

int xb_uring_submit_and_wait(struct xb_uring *handle, unsigned want) {
    int result;
    do {
        result = io_uring_submit_and_wait(&handle->ring, want);
    } while (result == -EINTR);
    return result;
}

int xb_uring_queue_fdatasync(struct xb_uring *handle, uint64_t tag, int fd) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&handle->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

unsigned xb_uring_submit(struct xb_uring *handle) {
    // Interrupted, or short of memory (EAGAIN, EBUSY): what was not taken
    // stays in the submission ring for the next call.
    (void)io_uring_submit(&handle->ring);
    return io_uring_sq_ready(&handle->ring);
}

unsigned xb_uring_unsubmitted(struct xb_uring *handle) {
    return io_uring_sq_ready(&handle->ring);
}

unsigned xb_uring_reap(struct xb_uring *handle, uint64_t *tags, int64_t *results, unsigned max) {
    unsigned head, count = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&handle->ring, head, cqe) {
        if (count == max) break;
        tags[count] = io_uring_cqe_get_data64(cqe);
        results[count] = cqe->res;
        count++;
    }
    io_uring_cq_advance(&handle->ring, count);
    return count;
}
