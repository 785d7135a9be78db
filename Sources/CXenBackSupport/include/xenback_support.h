// C glue for xenbackd: what Swift cannot express or import directly.
#ifndef XENBACK_SUPPORT_H
#define XENBACK_SUPPORT_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/types.h>

// ---- Memory ordering on memory shared with another domain/process ----
// xen/io/ring.h's rmb/wmb/mb. Loads and stores of ring indices go through
// these so the compiler neither caches nor reorders them.
static inline uint32_t xb_load_acquire_u32(const void *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}
static inline uint32_t xb_load_relaxed_u32(const void *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}
static inline void xb_store_release_u32(void *p, uint32_t v) {
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}
static inline void xb_store_relaxed_u32(void *p, uint32_t v) {
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}
static inline uint16_t xb_load_acquire_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void xb_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}
static inline int xb_cas_u16(void *p, uint16_t *expected, uint16_t desired) {
    return __atomic_compare_exchange_n((uint16_t *)p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int xb_cas_u32(void *p, uint32_t *expected, uint32_t desired) {
    return __atomic_compare_exchange_n((uint32_t *)p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int xb_cas_u64(void *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t xb_load_acquire_u64(const void *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}
static inline void xb_store_release_u64(void *p, uint64_t v) {
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}
static inline uint32_t xb_fetch_or_u32(void *p, uint32_t bits) {
    return __atomic_fetch_or((uint32_t *)p, bits, __ATOMIC_SEQ_CST);
}
static inline uint32_t xb_fetch_and_u32(void *p, uint32_t bits) {
    return __atomic_fetch_and((uint32_t *)p, bits, __ATOMIC_SEQ_CST);
}
static inline uint32_t xb_fetch_add_u32(void *p, uint32_t v) {
    return __atomic_fetch_add((uint32_t *)p, v, __ATOMIC_SEQ_CST);
}
static inline uint64_t xb_fetch_add_u64(void *p, uint64_t v) {
    return __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_SEQ_CST);
}
/// ring.h xen_rmb(): order earlier loads before later loads.
static inline void xb_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/// ring.h xen_wmb(): order earlier stores before later stores.
static inline void xb_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/// ring.h xen_mb(): full barrier (store->load ordering included).
static inline void xb_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/// Copy `len` bytes out of memory another party may change concurrently, so
/// that every later check runs on a private copy (read-once discipline).
static inline void xb_copy_from_shared(void *dst, const void *src, size_t len) {
    memcpy(dst, src, len);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

// ---- Linux constants hidden from Swift's Glibc module ----
extern const int xb_O_DIRECT;
extern const int xb_O_CLOEXEC;
extern const int xb_EFD_NONBLOCK;
extern const int xb_EFD_CLOEXEC;
extern const int xb_FALLOC_FL_PUNCH_HOLE;
extern const int xb_FALLOC_FL_KEEP_SIZE;
extern const int xb_FALLOC_FL_ZERO_RANGE;
extern const unsigned long xb_BLKGETSIZE64;
extern const unsigned long xb_BLKSSZGET;
extern const unsigned long xb_BLKPBSZGET;
extern const unsigned long xb_BLKDISCARD;
extern const unsigned long xb_BLKDISCARDZEROES;

// ---- Small syscall wrappers (return -1 and set errno on failure) ----
int xb_eventfd(unsigned int initval, int flags);
int xb_open(const char *path, int flags, int mode);
int xb_fallocate(int fd, int mode, int64_t offset, int64_t len);
/// Size in bytes of a block device (BLKGETSIZE64).
int xb_block_device_size(int fd, uint64_t *size);
/// Logical and physical sector size of a block device.
int xb_block_device_sector_sizes(int fd, uint32_t *logical, uint32_t *physical);
/// BLKDISCARD on [offset, offset+len).
int xb_block_device_discard(int fd, uint64_t offset, uint64_t len);
/// BLKSECDISCARD (secure erase) on [offset, offset+len).
int xb_block_device_secure_discard(int fd, uint64_t offset, uint64_t len);
/// 1 if the device can erase securely (BLKSECDISCARD), probed without
/// erasing anything; needs a descriptor open for writing.
int xb_block_device_supports_secure_discard(int fd);
/// The file system's type (fstatfs's f_type, a linux/magic.h number).
int xb_file_system_type(int fd, int64_t *type);

/// Makes io_uring_setup fail with `error` on the calling thread only (a
/// seccomp filter, after PR_SET_NO_NEW_PRIVS on this thread), as a container's
/// seccomp profile would: tests of the io_uring fallback. 0, or -1 and errno.
int xb_thread_refuse_io_uring_setup(int error);

// epoll, because struct epoll_event is packed and imports awkwardly.
int xb_epoll_create(void);
int xb_epoll_add(int epfd, int fd, uint32_t events, uint64_t token);
int xb_epoll_mod(int epfd, int fd, uint32_t events, uint64_t token);
int xb_epoll_del(int epfd, int fd);
/// Waits for events; fills tokens[i]/events[i]; returns count, 0 on timeout, -1 with errno.
int xb_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms);
extern const uint32_t xb_EPOLLIN;
extern const uint32_t xb_EPOLLOUT;
extern const uint32_t xb_EPOLLERR;
extern const uint32_t xb_EPOLLHUP;

/// Sets the calling thread's name (shown by top -H, gdb).
void xb_set_thread_name(const char *name);

// A non-blocking timerfd (CLOCK_MONOTONIC) readable every `milliseconds`;
// -1 with errno on failure.
int xb_interval_timer(uint32_t milliseconds);

// ---- Block storage probes (BlockStorage) ----
/// Direct-I/O alignment of an open file from statx(STATX_DIOALIGN): returns 1
/// and fills both values when the file system reports it (offset_align 0 means
/// no direct I/O), 0 when it does not report it, -1 with errno on failure.
int xb_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align);
/// Splits a dev_t (st_rdev) into major and minor numbers.
void xb_device_numbers(uint64_t dev, uint32_t *major_number, uint32_t *minor_number);

#endif
