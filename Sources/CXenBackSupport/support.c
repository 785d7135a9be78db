#define _GNU_SOURCE
#include "xenback_support.h"
#include <fcntl.h>
#include <errno.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/prctl.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stddef.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

const int xb_O_DIRECT = O_DIRECT;
const int xb_O_CLOEXEC = O_CLOEXEC;
const int xb_EFD_NONBLOCK = EFD_NONBLOCK;
const int xb_EFD_CLOEXEC = EFD_CLOEXEC;
const int xb_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int xb_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int xb_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const unsigned long xb_BLKGETSIZE64 = BLKGETSIZE64;
const unsigned long xb_BLKSSZGET = BLKSSZGET;
const unsigned long xb_BLKPBSZGET = BLKPBSZGET;
const unsigned long xb_BLKDISCARD = BLKDISCARD;
const unsigned long xb_BLKDISCARDZEROES = BLKDISCARDZEROES;
const uint32_t xb_EPOLLIN = EPOLLIN;
const uint32_t xb_EPOLLOUT = EPOLLOUT;
const uint32_t xb_EPOLLERR = EPOLLERR;
const uint32_t xb_EPOLLHUP = EPOLLHUP;

int xb_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
int xb_open(const char *path, int flags, int mode) { return open(path, flags, mode); }
int xb_fallocate(int fd, int mode, int64_t offset, int64_t len) {
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
}
int xb_block_device_size(int fd, uint64_t *size) { return ioctl(fd, BLKGETSIZE64, size); }
int xb_block_device_sector_sizes(int fd, uint32_t *logical, uint32_t *physical) {
    int l = 0; unsigned int p = 0;
    if (ioctl(fd, BLKSSZGET, &l) < 0) return -1;
    if (ioctl(fd, BLKPBSZGET, &p) < 0) return -1;
    *logical = (uint32_t)l; *physical = p;
    return 0;
}
int xb_block_device_discard(int fd, uint64_t offset, uint64_t len) {
    uint64_t range[2] = { offset, len };
    return ioctl(fd, BLKDISCARD, range);
}
int xb_block_device_secure_discard(int fd, uint64_t offset, uint64_t len) {
    uint64_t range[2] = { offset, len };
    return ioctl(fd, BLKSECDISCARD, range);
}
int xb_block_device_supports_secure_discard(int fd) {
    // The kernel checks the device's secure-erase limit before it reads the
    // range: with no range at all, a device that can erase securely fails
    // the copy (EFAULT) and erases nothing; one that cannot says EOPNOTSUPP.
    return ioctl(fd, BLKSECDISCARD, NULL) < 0 && errno == EFAULT;
}

int xb_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
int xb_epoll_add(int epfd, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data.u64 = token };
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}
int xb_epoll_mod(int epfd, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data.u64 = token };
    return epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}
int xb_epoll_del(int epfd, int fd) { return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL); }
int xb_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n;
    do { n = epoll_wait(epfd, evs, max, timeout_ms); } while (n < 0 && errno == EINTR);
    for (int i = 0; i < n; i++) { tokens[i] = evs[i].data.u64; events[i] = evs[i].events; }
    return n;
}
void xb_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15); buf[15] = 0;
    pthread_setname_np(pthread_self(), buf);
}

int xb_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align) {
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -1;
    if (!(stx.stx_mask & STATX_DIOALIGN)) return 0;
    *memory_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 1;
}
void xb_device_numbers(uint64_t dev, uint32_t *major_number, uint32_t *minor_number) {
    *major_number = major((dev_t)dev);
    *minor_number = minor((dev_t)dev);
}

#if defined(__x86_64__)
#define XB_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define XB_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

int xb_thread_refuse_io_uring_setup(int error) {
#ifndef XB_AUDIT_ARCH
    errno = ENOSYS;
    return -1;
#else
    struct sock_filter program[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, XB_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (error & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog filter = { .len = sizeof(program) / sizeof(program[0]), .filter = program };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    // Without SECCOMP_FILTER_FLAG_TSYNC the filter is this thread's alone.
    return (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter);
#endif
}

int xb_file_system_type(int fd, int64_t *type) {
    struct statfs status;
    int result = fstatfs(fd, &status);
    if (result == 0) *type = (int64_t)status.f_type;
    return result;
}

int xb_interval_timer(uint32_t milliseconds) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0) return -1;
    struct itimerspec spec;
    spec.it_interval.tv_sec = milliseconds / 1000;
    spec.it_interval.tv_nsec = (long)(milliseconds % 1000) * 1000000L;
    spec.it_value = spec.it_interval;
    if (timerfd_settime(fd, 0, &spec, NULL) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}
