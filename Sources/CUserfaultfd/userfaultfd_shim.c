#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // REG_ERR (the page-fault error code in the signal context)
#endif
#include "CUserfaultfd.h"
#include <errno.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

// Back-fills for the 6.1 headers (values from include/uapi/linux/userfaultfd.h and fs.h of 6.8).
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst, src, len, mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct uffdio_poison)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
    __u64 start, end, categories;
};
struct pm_scan_arg {
    __u64 size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
        category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

int cu_uffd_open(uint64_t features, int user_mode_only, uint64_t *supported) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0));
    if (fd < 0) return -errno;
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api)) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (supported) *supported = api.features;
    return fd;
}

int cu_uffd_probe(int user_mode_only, uint64_t *supported) {
    int fd = cu_uffd_open(0, user_mode_only, supported);
    if (fd < 0) return fd;
    close(fd);
    return 0;
}

int cu_register(int fd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_register r = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(fd, UFFDIO_REGISTER, &r) ? -errno : 0;
}

int cu_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &r) ? -errno : 0;
}

int cu_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied) {
    struct uffdio_copy c = {.dst = dst, .src = src, .len = len, .mode = mode};
    int r = ioctl(fd, UFFDIO_COPY, &c) ? -errno : 0;
    if (copied) *copied = c.copy;
    return r;
}

int cu_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved) {
    struct uffdio_move m = {.dst = dst, .src = src, .len = len, .mode = mode};
    int r = ioctl(fd, UFFDIO_MOVE, &m) ? -errno : 0;
    if (moved) *moved = m.move;
    return r;
}

int cu_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed) {
    struct uffdio_zeropage z = {.range = {.start = start, .len = len}, .mode = mode};
    int r = ioctl(fd, UFFDIO_ZEROPAGE, &z) ? -errno : 0;
    if (zeroed) *zeroed = z.zeropage;
    return r;
}

int cu_poison(int fd, uint64_t start, uint64_t len) {
    struct uffdio_poison p = {.range = {.start = start, .len = len}};
    return ioctl(fd, UFFDIO_POISON, &p) ? -errno : 0;
}

int cu_continue(int fd, uint64_t start, uint64_t len) {
    struct uffdio_continue c = {.range = {.start = start, .len = len}};
    return ioctl(fd, UFFDIO_CONTINUE, &c) ? -errno : 0;
}

int cu_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &r) ? -errno : 0;
}

int cu_poll(int fd, int wake_fd, int timeout_ms) {
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
    int r = poll(p, wake_fd >= 0 ? 2 : 1, timeout_ms);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    if (wake_fd >= 0 && (p[1].revents & POLLIN)) {
        uint64_t v;
        if (read(wake_fd, &v, sizeof v) < 0) { /* drained by another reader */ }
    }
    return (p[0].revents & POLLIN) ? 1 : 0;
}

int cu_read_messages(int fd, struct cu_message *out, int max) {
    struct uffd_msg m[64];
    if (max > 64) max = 64;
    ssize_t n = read(fd, m, sizeof m[0] * (size_t)max);
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    int count = (int)(n / (ssize_t)sizeof m[0]);
    for (int i = 0; i < count; i++) {
        struct cu_message *o = &out[i];
        memset(o, 0, sizeof *o);
        o->kind = m[i].event;
        switch (m[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            o->a = m[i].arg.pagefault.address;
            o->b = m[i].arg.pagefault.flags;
            o->c = m[i].arg.pagefault.feat.ptid;
            o->thread = m[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_FORK: o->a = m[i].arg.fork.ufd; break;
        case UFFD_EVENT_REMAP:
            o->a = m[i].arg.remap.from;
            o->b = m[i].arg.remap.to;
            o->c = m[i].arg.remap.len;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            o->a = m[i].arg.remove.start;
            o->b = m[i].arg.remove.end;
            break;
        default: break;
        }
    }
    return count;
}

int cu_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, struct cu_page_region *out, int max,
                    uint64_t return_mask, uint64_t *walk_end) {
    struct pm_scan_arg a = {
        .size = sizeof a, .start = start, .end = end, .vec = (uint64_t)(uintptr_t)out, .vec_len = (uint64_t)max,
        .return_mask = return_mask};
    _Static_assert(sizeof(struct cu_page_region) == sizeof(struct page_region), "page_region layout");
    int r = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
    if (walk_end) *walk_end = a.walk_end;
    return r < 0 ? -errno : r;
}

int cu_madvise(uint64_t start, uint64_t len, int advice) {
    return madvise((void *)(uintptr_t)start, len, advice) ? -errno : 0;
}

uint64_t cu_map_aligned(uint64_t len, uint64_t align, int prot, int *error) {
    size_t total = len + align;
    char *p = mmap(NULL, total, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        if (error) *error = -errno;
        return 0;
    }
    uintptr_t a = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    if (a > (uintptr_t)p) munmap(p, a - (uintptr_t)p);
    uintptr_t tail = (uintptr_t)p + total - (a + len);
    if (tail) munmap((void *)(a + len), tail);
    return a;
}

int cu_munmap(uint64_t start, uint64_t len) { return munmap((void *)(uintptr_t)start, len) ? -errno : 0; }
long cu_self_read(void *dst, const void *src, size_t len) {
    struct iovec local = {.iov_base = dst, .iov_len = len};
    struct iovec remote = {.iov_base = (void *)src, .iov_len = len};
    ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    return n < 0 ? -errno : (long)n;
}

long cu_self_write(void *dst, const void *src, size_t len) {
    struct iovec local = {.iov_base = (void *)src, .iov_len = len};
    struct iovec remote = {.iov_base = dst, .iov_len = len};
    ssize_t n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
    return n < 0 ? -errno : (long)n;
}

int cu_thread_stack(uint64_t *lo, uint64_t *size) {
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) return -1;
    void *base = NULL;
    size_t n = 0;
    int rc = pthread_attr_getstack(&attr, &base, &n);
    pthread_attr_destroy(&attr);
    if (rc != 0) return -1;
    *lo = (uint64_t)(uintptr_t)base;
    *size = n;
    return 0;
}

int cu_map_shared_fixed(uint64_t addr, uint64_t len, int prot, int fd, uint64_t offset, int populate) {
    void *p = mmap((void *)(uintptr_t)addr, len, prot, MAP_FIXED | MAP_SHARED | (populate ? MAP_POPULATE : 0), fd,
                   (off_t)offset);
    return p == MAP_FAILED ? -errno : 0;
}
uint64_t cu_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_address, int *error) {
    void *p = mremap((void *)(uintptr_t)old, old_len, new_len, flags, (void *)(uintptr_t)new_address);
    if (p == MAP_FAILED) {
        if (error) *error = -errno;
        return 0;
    }
    return (uint64_t)(uintptr_t)p;
}
int cu_mprotect(uint64_t start, uint64_t len, int prot) {
    return mprotect((void *)(uintptr_t)start, len, prot) ? -errno : 0;
}
int cu_eventfd(void) {
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}
int cu_eventfd_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) < 0 ? -errno : 0;
}
int cu_close(int fd) { return close(fd) ? -errno : 0; }

long cu_anon_huge_kb(uint64_t addr) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    int in = 0;
    long kb = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char *dash = strchr(line, '-'), *space = strchr(line, ' ');
        if (dash && space && dash < space && sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {
            in = addr >= lo && addr < hi;
            continue;
        }
        if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}

uint64_t cu_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

// MARK: the signal probe

static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static struct sigaction previous_bus, previous_segv;
static __thread sigjmp_buf probe_jump;
static __thread volatile sig_atomic_t probe_armed;
static __thread volatile int probe_code;

static void chain(int sig, siginfo_t *si, void *uc) {
    struct sigaction *prev = sig == SIGBUS ? &previous_bus : &previous_segv;
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction) {
            prev->sa_sigaction(sig, si, uc);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    // Nobody else handles it: die of the signal, as the process would have without us.
    signal(sig, SIG_DFL);
    raise(sig);
}

static _Atomic(cu_fault_hook) fault_hook;

// Whether the faulting access was a store: the page-fault error code's W bit on x86-64; elsewhere a
// store is assumed (the page then comes back writable, as a store needs).
static int fault_was_write(void *uc) {
#if defined(__x86_64__)
    return (((ucontext_t *)uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
    (void)uc;
    return 1;
#endif
}

static void probe_handler(int sig, siginfo_t *si, void *uc) {
    if (sig == SIGBUS && si->si_code == BUS_ADRERR) {
        cu_fault_hook hook = atomic_load_explicit(&fault_hook, memory_order_acquire);
        if (hook) {
            int saved = errno;
            int resolved = hook((uint64_t)(uintptr_t)si->si_addr, fault_was_write(uc));
            errno = saved;
            if (resolved) return;  // the access runs again and finds its page
        }
    }
    if (probe_armed) {
        probe_armed = 0;
        probe_code = si->si_code;
        siglongjmp(probe_jump, sig);
    }
    chain(sig, si, uc);
}

static void probe_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = probe_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &previous_bus);
    sigaction(SIGSEGV, &sa, &previous_segv);
}

// One probed access: a load into *out, or a store of `value`.
static int probe_access(volatile uint8_t *p, int store, uint8_t value, uint8_t *out, int *code) {
    pthread_once(&probe_once, probe_install);
    int s = sigsetjmp(probe_jump, 1);
    if (s) {
        if (code) *code = probe_code;
        return s;
    }
    probe_armed = 1;
    if (store) *p = value; else *out = *p;
    probe_armed = 0;
    return 0;
}

int cu_probe_read(const void *p, uint8_t *out, int *code) {
    return probe_access((volatile uint8_t *)(uintptr_t)p, 0, 0, out, code);
}

int cu_probe_write(void *p, uint8_t value, int *code) { return probe_access(p, 1, value, NULL, code); }

cu_fault_hook cu_set_fault_hook(cu_fault_hook hook) {
    pthread_once(&probe_once, probe_install);
    return atomic_exchange_explicit(&fault_hook, hook, memory_order_acq_rel);
}

int cu_gettid(void) { return (int)syscall(SYS_gettid); }

int cu_open_direct(const char *path, int flags) {
    int fd = open(path, flags | O_DIRECT | O_CLOEXEC, 0600);
    return fd < 0 ? -errno : fd;
}
