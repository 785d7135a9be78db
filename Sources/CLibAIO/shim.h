#include <libaio.h>

/* The completion ring that an AIO context's address points at, shared by
 * the kernel with user space (struct aio_ring in Linux's fs/aio.c, the
 * same layout since 2.6). The kernel writes events and then `tail`; the
 * reader takes events and then writes `head`, which the kernel reads to
 * know how much room is left. libaio's io_getevents enters the kernel
 * whenever the ring holds events; reading it here does not. */
struct xb_aio_ring {
    unsigned id;
    unsigned nr;
    unsigned head;
    unsigned tail;
    unsigned magic;
    unsigned compat_features;
    unsigned incompat_features;
    unsigned header_length;
    struct io_event events[];
};

/* Whether the context's ring has the layout above (its magic, no
 * incompatible features): 1 if so, 0 if events must come through
 * io_getevents. */
static inline int xb_aio_ring_usable(io_context_t ctx) {
    const struct xb_aio_ring *ring = (const struct xb_aio_ring *)ctx;
    return ring != 0 && ring->magic == 0xa10a10a1u && ring->incompat_features == 0 && ring->nr > 0;
}

/* Events the ring holds at most. */
static inline unsigned xb_aio_ring_entries(io_context_t ctx) {
    return ((const struct xb_aio_ring *)ctx)->nr;
}

/* Copies up to `max` finished events into `out` and gives their entries
 * back to the kernel; returns how many, or -1 if the ring's indexes are
 * out of range (then nothing was taken: ask io_getevents). */
static inline int xb_aio_ring_reap(io_context_t ctx, struct io_event *out, int max) {
    struct xb_aio_ring *ring = (struct xb_aio_ring *)ctx;
    unsigned entries = ring->nr;
    unsigned head = __atomic_load_n(&ring->head, __ATOMIC_RELAXED);
    unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    if (head >= entries || tail >= entries) return -1;
    int taken = 0;
    while (head != tail && taken < max) {
        out[taken++] = ring->events[head];
        head = head + 1 == entries ? 0 : head + 1;
    }
    if (taken > 0) __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    return taken;
}
