/*
 * libhmm-dmirror.so — /dev/hmm_dmirror0..3 for an unmodified program, on the native engine (libhmm).
 *
 * Loaded with LD_PRELOAD by `hmm dmirror -- PROGRAM`. It emulates the devices of the kernel's test_hmm
 * module loaded with spm_addr_dev0/1: minors 0 and 1 device-private, 2 and 3 device-coherent.
 *
 *  - Inert until a process opens a device: no engine, no threads, every call passes straight through.
 *    The first open in a process starts that process's own engine (a machine, a native space with the
 *    .share fork policy, the four devices); a forked child that opens a device gets an engine of its own.
 *  - open/close/ioctl of a device fd: the test_hmm ioctl ABI (struct hmm_dmirror_cmd), each command a
 *    libhmm mirror call, with the driver's errnos and cpages/faults.
 *  - Memory: once the engine runs, private anonymous mmap()s become regions; memory mapped before (or
 *    inherited across fork) is adopted the first time a command names it. munmap() goes through the
 *    engine (hmm_space_unmap), mprotect() and MADV_(NO)HUGEPAGE of region memory too, so the engine sees
 *    every change as the kernel's notifiers would.
 *  - Calls made by libhmm itself (its engine threads map and unmap memory) pass straight through: the
 *    caller's return address tells.
 *  - It never writes to the program's stdout or stderr.
 */
#define _GNU_SOURCE
#include "hmm.h"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

/* The test_hmm ioctl ABI (lib/test_hmm_uapi.h): _IOWR('H', n, struct of five __u64). */
struct dm_cmd {
    uint64_t addr, ptr, npages, cpages, faults;
};
#define DM_IOC(n) _IOWR('H', (n), struct dm_cmd)
enum {
    DM_READ = DM_IOC(0x00),
    DM_WRITE = DM_IOC(0x01),
    DM_MIGRATE_TO_DEV = DM_IOC(0x02),
    DM_MIGRATE_TO_SYS = DM_IOC(0x03),
    DM_SNAPSHOT = DM_IOC(0x04),
    DM_EXCLUSIVE = DM_IOC(0x05),
    DM_CHECK_EXCLUSIVE = DM_IOC(0x06),
    DM_RELEASE = DM_IOC(0x07),
};

#define DM_DEVICES 4
#define DM_MAX_FILES 256
#define PAGE 4096UL

/* ---- the real functions -------------------------------------------------------------------- */

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static int (*real_mprotect)(void *, size_t, int);
static int (*real_madvise)(void *, size_t, int);

/* libhmm's code: calls from there are the engine's own. */
static uintptr_t lib_lo, lib_hi;

static int find_lib(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    uintptr_t probe = (uintptr_t)data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD) continue;
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
        if (probe >= lo && probe < hi) {
            /* The whole object: every loadable segment. */
            uintptr_t min = UINTPTR_MAX, max = 0;
            for (int j = 0; j < info->dlpi_phnum; j++) {
                const ElfW(Phdr) *p = &info->dlpi_phdr[j];
                if (p->p_type != PT_LOAD) continue;
                uintptr_t a = info->dlpi_addr + p->p_vaddr;
                if (a < min) min = a;
                if (a + p->p_memsz > max) max = a + p->p_memsz;
            }
            lib_lo = min;
            lib_hi = max;
            return 1;
        }
    }
    return 0;
}

__attribute__((constructor)) static void dm_init(void) {
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_mmap64 = dlsym(RTLD_NEXT, "mmap64");
    real_munmap = dlsym(RTLD_NEXT, "munmap");
    real_mprotect = dlsym(RTLD_NEXT, "mprotect");
    real_madvise = dlsym(RTLD_NEXT, "madvise");
    dl_iterate_phdr(find_lib, (void *)(uintptr_t)&hmm_api_version);
}

static void after_fork_child(void);

__attribute__((constructor)) static void dm_install_fork_hook(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static int from_engine(void *caller) {
    uintptr_t a = (uintptr_t)caller;
    return a >= lib_lo && a < lib_hi;
}

/* ---- the engine of this process ------------------------------------------------------------ */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pid_t engine_pid;         /* the process whose engine the handles below are */
static hmm_machine *machine;
static hmm_space *space;
static hmm_device *devices[DM_DEVICES];
static struct {
    int fd;
    int minor;
    hmm_mirror *mirror;
} files[DM_MAX_FILES];
static int nfiles;

/*
 * Every libhmm call runs on the interposer's own thread, never on the program's: glibc gives that
 * thread an arena of its own, so the engine never allocates from the program's heap. (The driver's
 * copy_to_user of a MIGRATE_TO_DEV writes whole pages to the mirror pointer, and hmm-tests passes a
 * 7-byte malloc there in `snapshot`: the overrun lands in the program's heap, as on a real kernel, and
 * must not land in ours.)
 */
struct job {
    void (*fn)(struct job *);
    int rc;
    uint64_t a, b, c, d;
    void *p;
    hmm_mirror *mirror;
    unsigned long request;
    struct dm_cmd *cmd;
    int done;
};
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_posted = PTHREAD_COND_INITIALIZER, job_done = PTHREAD_COND_INITIALIZER;
static struct job *pending;
static pthread_t worker;
static int worker_running;
static pid_t worker_pid;

static void *work(void *unused) {
    (void)unused;
    pthread_mutex_lock(&job_lock);
    for (;;) {
        while (!pending) pthread_cond_wait(&job_posted, &job_lock);
        struct job *j = pending;
        pending = NULL;
        pthread_mutex_unlock(&job_lock);
        j->fn(j);
        pthread_mutex_lock(&job_lock);
        j->done = 1;
        pthread_cond_broadcast(&job_done);
    }
    return NULL;
}

/* Runs `j` on the worker (started on first use in each process) and waits for it. */
static void run(struct job *j) {
    pthread_mutex_lock(&job_lock);
    if (!worker_running || worker_pid != getpid()) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* the program's signals stay the program's */
        worker_running = pthread_create(&worker, NULL, work, NULL) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        worker_pid = getpid();
        if (!worker_running) {
            pthread_mutex_unlock(&job_lock);
            j->rc = -EAGAIN;
            return;
        }
        pthread_detach(worker);
    }
    while (pending) pthread_cond_wait(&job_done, &job_lock);
    j->done = 0;
    pending = j;
    pthread_cond_signal(&job_posted);
    while (!j->done) pthread_cond_wait(&job_done, &job_lock);
    pthread_mutex_unlock(&job_lock);
}

/* A fork's child inherits the parent's handles but not its engine: forget them (never used). */
static void forget_engine(void) {
    engine_pid = 0;
    machine = NULL;
    space = NULL;
    memset(devices, 0, sizeof devices);
    nfiles = 0;
}

static void after_fork_child(void) {
    pthread_mutex_init(&lock, NULL);
    pthread_mutex_init(&job_lock, NULL);
    pthread_cond_init(&job_posted, NULL);
    pthread_cond_init(&job_done, NULL);
    pending = NULL;
    worker_running = 0;
    forget_engine();
}

static int engine_running(void) { return space != NULL && engine_pid == getpid(); }

/* Starts this process's engine; 0 or -errno. Called with `lock` held. */
static int start_engine(void) {
    if (engine_running()) return 0;
    forget_engine();
    const char *mem = getenv("HMM_DMIRROR_MEMORY_MB");
    uint64_t mb = mem ? strtoull(mem, NULL, 10) : 512;
    int rc = hmm_machine_create(mb << 20, &machine);
    if (rc) return rc;
    struct hmm_space_options o = {.size = sizeof o, .fault_mode = HMM_FAULT_HANDLER_THREAD,
                                  .fork_policy = HMM_FORK_SHARE, .fault_around_pages = 0};
    rc = hmm_space_create(machine, &o, &space);
    if (rc) {
        hmm_machine_destroy(machine);
        machine = NULL;
        return rc;
    }
    for (int i = 0; i < DM_DEVICES; i++) {
        rc = hmm_device_create(machine, i, i < 2 ? HMM_DEVICE_PRIVATE : HMM_DEVICE_COHERENT, 256 << 20, &devices[i]);
        if (rc) return rc;
    }
    engine_pid = getpid();
    return 0;
}

static int file_index(int fd) {
    for (int i = 0; i < nfiles; i++)
        if (files[i].fd == fd) return i;
    return -1;
}

/* "/dev/hmm_dmirrorN": N, or -1 for another path. */
static int device_minor(const char *path) {
    static const char prefix[] = "/dev/hmm_dmirror";
    if (!path || strncmp(path, prefix, sizeof prefix - 1) != 0) return -1;
    const char *n = path + sizeof prefix - 1;
    if (n[0] < '0' || n[0] > '9' || n[1] != 0) return -2; /* a node that does not exist */
    return n[0] - '0';
}

/* open() of a device node: a descriptor of /dev/null stands for the open file. On the worker. */
static void job_open(struct job *j) {
    int minor = (int)j->a;
    pthread_mutex_lock(&lock);
    int rc = start_engine();
    int fd = -1;
    if (rc == 0 && nfiles == DM_MAX_FILES) rc = -EMFILE;
    if (rc == 0) {
        fd = real_open("/dev/null", O_RDWR);
        if (fd < 0) rc = -errno;
    }
    hmm_mirror *m = NULL;
    if (rc == 0) {
        rc = hmm_mirror_open(devices[minor], space, &m);
        if (rc) real_close(fd);
    }
    if (rc == 0) {
        files[nfiles].fd = fd;
        files[nfiles].minor = minor;
        files[nfiles].mirror = m;
        nfiles++;
    }
    pthread_mutex_unlock(&lock);
    j->rc = rc ? rc : fd;
}

static int open_device(int minor) {
    if (minor < 0 || minor >= DM_DEVICES) {
        errno = ENOENT;
        return -1;
    }
    struct job j = {.fn = job_open, .a = (uint64_t)minor};
    run(&j);
    if (j.rc < 0) {
        errno = -j.rc;
        return -1;
    }
    return j.rc;
}

static int mode_of(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE ? va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int minor = device_minor(path);
    if (minor != -1) return open_device(minor);
    return real_open(path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int minor = device_minor(path);
    if (minor != -1) return open_device(minor);
    return real_open64(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int minor = device_minor(path);
    if (minor != -1) return open_device(minor);
    return real_openat(dirfd, path, flags, mode);
}

static void job_close(struct job *j) { j->rc = hmm_mirror_close(j->mirror); }

int close(int fd) {
    if (!from_engine(__builtin_return_address(0))) {
        pthread_mutex_lock(&lock);
        int i = engine_running() ? file_index(fd) : -1;
        hmm_mirror *m = NULL;
        if (i >= 0) {
            m = files[i].mirror;
            files[i] = files[--nfiles];
        }
        pthread_mutex_unlock(&lock);
        if (m) {
            struct job j = {.fn = job_close, .mirror = m};
            run(&j);
        }
    }
    return real_close(fd);
}

/* ---- memory -------------------------------------------------------------------------------- */

/* Makes every page of [addr, addr + len) region memory if it is private anonymous memory: each host
 * mapping the range touches that no region covers is adopted whole. Other memory is left alone. */
static void adopt_range(uint64_t addr, uint64_t len) {
    uint64_t end = addr + len;
    if (end < addr) return;
    uint64_t a = addr;
    while (a < end) {
        hmm_region *r;
        uint64_t ra, rl;
        if (hmm_space_find_region(space, a, &r) == 0 && hmm_region_range(r, &ra, &rl) == 0) {
            a = ra + rl;
            continue;
        }
        /* The host mapping of `a`, from /proc/self/maps. */
        FILE *maps = fopen("/proc/self/maps", "re");
        if (!maps) return;
        char line[512];
        uint64_t lo = 0, hi = 0;
        int adoptable = 0;
        while (fgets(line, sizeof line, maps)) {
            unsigned long l, h, off;
            char perms[8] = {0};
            unsigned dmaj, dmin;
            unsigned long ino;
            int path = 0;
            if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu %n", &l, &h, perms, &off, &dmaj, &dmin, &ino, &path) < 7) continue;
            if (a < l || a >= h) continue;
            lo = l;
            hi = h;
            adoptable = perms[3] == 'p' && ino == 0 && (path == 0 || line[path] == '\n' || line[path] == 0 ||
                                                      strncmp(line + path, "[heap]", 6) == 0);
            break;
        }
        fclose(maps);
        if (hi == 0) return;
        if (adoptable) {
            if (hmm_region_adopt(space, lo, hi - lo, &r) != 0) return;
        }
        a = hi;
    }
}

static void job_allocate(struct job *j) {
    hmm_region *r;
    uint64_t l;
    j->rc = hmm_region_allocate(space, j->a, (int)j->b, -1, (int)j->c, &r);
    if (j->rc == 0) j->rc = hmm_region_range(r, &j->d, &l);
}

static void *map_anonymous(void *addr, size_t len, int prot, int flags, int fd, off_t off,
                           void *(*real)(void *, size_t, int, int, int, off_t), void *caller) {
    int plain = (flags & (MAP_PRIVATE | MAP_ANONYMOUS)) == (MAP_PRIVATE | MAP_ANONYMOUS) &&
                !(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_HUGETLB | MAP_GROWSDOWN | MAP_STACK | MAP_SHARED)) &&
                addr == NULL && len > 0 && (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) == 0;
    if (plain && !from_engine(caller) && engine_running()) {
        struct job j = {.fn = job_allocate, .a = (len + PAGE - 1) & ~(PAGE - 1), .b = (uint64_t)prot,
                        .c = (flags & MAP_POPULATE) != 0};
        run(&j);
        if (j.rc == 0) return (void *)(uintptr_t)j.d;
    }
    return real(addr, len, prot, flags, fd, off);
}

/* mmap() of a device fd (dmirror_fops_mmap): every page a fresh zeroed driver page inserted at once
 * (vm_insert_page). Here the pages are a memfd's, faulted in: in a private mapping they are mapped
 * read-only until written, as the kernel maps inserted pages in a copy-on-write mapping. */
static void *map_device(void *addr, size_t len, int prot, int flags, off_t off) {
    if (len == 0 || off != 0) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    int memfd = memfd_create("hmm_dmirror", MFD_CLOEXEC);
    if (memfd < 0) return MAP_FAILED;
    void *p = MAP_FAILED;
    if (ftruncate(memfd, (off_t)((len + PAGE - 1) & ~(PAGE - 1))) == 0) {
        p = real_mmap(addr, len, prot, flags & ~MAP_ANONYMOUS, memfd, 0);
        if (p != MAP_FAILED && (prot & PROT_READ)) real_madvise(p, len, MADV_POPULATE_READ);
    }
    int saved = errno;
    real_close(memfd);
    errno = saved;
    return p;
}

static int is_device_fd(int fd) {
    if (fd < 0) return 0;
    pthread_mutex_lock(&lock);
    int found = engine_running() && file_index(fd) >= 0;
    pthread_mutex_unlock(&lock);
    return found;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *caller = __builtin_return_address(0);
    if (!from_engine(caller) && !(flags & MAP_ANONYMOUS) && is_device_fd(fd)) return map_device(addr, len, prot, flags, off);
    return map_anonymous(addr, len, prot, flags, fd, off, real_mmap, caller);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *caller = __builtin_return_address(0);
    if (!from_engine(caller) && !(flags & MAP_ANONYMOUS) && is_device_fd(fd)) return map_device(addr, len, prot, flags, off);
    return map_anonymous(addr, len, prot, flags, fd, off, real_mmap64, caller);
}

static void job_unmap(struct job *j) { j->rc = hmm_space_unmap(space, j->a, j->b); }

int munmap(void *addr, size_t len) {
    if (!from_engine(__builtin_return_address(0)) && engine_running() && ((uintptr_t)addr & (PAGE - 1)) == 0 && len > 0) {
        struct job j = {.fn = job_unmap, .a = (uint64_t)(uintptr_t)addr, .b = (len + PAGE - 1) & ~(PAGE - 1)};
        run(&j);
        int rc = j.rc;
        if (rc == 0) return 0;
        if (rc != -EINVAL) {
            errno = -rc;
            return -1;
        }
    }
    return real_munmap(addr, len);
}

/* The region holding all of [addr, addr + len), with the offset of addr in it. */
static hmm_region *region_of(void *addr, size_t len, uint64_t *offset) {
    hmm_region *r;
    uint64_t ra, rl, a = (uint64_t)(uintptr_t)addr;
    if (hmm_space_find_region(space, a, &r) != 0 || hmm_region_range(r, &ra, &rl) != 0) return NULL;
    if (a + len > ra + rl) return NULL;
    *offset = a - ra;
    return r;
}

/* mprotect() of region memory through the engine; 1 if [p, p + a) is not inside one region. */
static void job_protect(struct job *j) {
    uint64_t off;
    hmm_region *r = region_of(j->p, j->a, &off);
    j->rc = r ? hmm_region_protect(r, off, j->a, (int)j->b) : 1;
}

/* MADV_(NO)HUGEPAGE of region memory through the engine; 1 if not inside one region. */
static void job_advise(struct job *j) {
    uint64_t off;
    hmm_region *r = region_of(j->p, j->a, &off);
    j->rc = r ? hmm_region_advise_huge(r, off, j->a, (int)j->b) : 1;
}

int mprotect(void *addr, size_t len, int prot) {
    if (!from_engine(__builtin_return_address(0)) && engine_running() && len > 0 && ((uintptr_t)addr & (PAGE - 1)) == 0) {
        struct job j = {.fn = job_protect, .p = addr, .a = (len + PAGE - 1) & ~(PAGE - 1), .b = (uint64_t)prot};
        run(&j);
        if (j.rc == 0) return 0;
        if (j.rc != 1) {
            errno = -j.rc;
            return -1;
        }
    }
    return real_mprotect(addr, len, prot);
}

int madvise(void *addr, size_t len, int advice) {
    if ((advice == MADV_HUGEPAGE || advice == MADV_NOHUGEPAGE) && !from_engine(__builtin_return_address(0)) &&
        engine_running() && len > 0 && ((uintptr_t)addr & (PAGE - 1)) == 0) {
        struct job j = {.fn = job_advise, .p = addr, .a = (len + PAGE - 1) & ~(PAGE - 1), .b = advice == MADV_HUGEPAGE};
        run(&j);
        if (j.rc == 0) return 0;
        if (j.rc != 1) {
            errno = -j.rc;
            return -1;
        }
    }
    return real_madvise(addr, len, advice);
}

/* ---- the ioctl ABI ------------------------------------------------------------------------- */

/* The start of the brk heap ("[heap]" in /proc/self/maps; its end is sbrk(0)): a mirror pointer inside it is a
 * malloc chunk (see copy_to_user). 0 if not known yet; found again in each process that starts an engine. */
static uintptr_t heap_lo;

static void find_heap(void) {
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps) return;
    char line[512];
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        if (strstr(line, "[heap]") && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
            heap_lo = lo;
            break;
        }
    }
    fclose(maps);
}

/* The driver's copy_to_user: -EFAULT where the program has no writable memory. One deviation: a pointer
 * into the brk heap gets at most its malloc chunk's usable size. The kernel overruns a short buffer
 * into the program's heap (hmm-tests' `snapshot` migrates a page into a 7-byte malloc); whether the
 * program survives that then depends on what its heap holds next, and under the interposer it holds
 * more than under the kernel. */
static int copy_to_user(uint64_t to, const void *from, size_t n) {
    if (!heap_lo) find_heap();
    if (heap_lo && (uintptr_t)to >= heap_lo && (uintptr_t)to < (uintptr_t)sbrk(0) && (to & 15) == 0) {
        size_t room = malloc_usable_size((void *)(uintptr_t)to);
        if (room > 0 && room < n) n = room;
    }
    struct iovec local = {.iov_base = (void *)from, .iov_len = n};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)to, .iov_len = n};
    return process_vm_writev(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -EFAULT;
}

/* The driver's copy_from_user. */
static int copy_from_user(void *to, uint64_t from, size_t n) {
    struct iovec local = {.iov_base = to, .iov_len = n};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)from, .iov_len = n};
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -EFAULT;
}

/* One command, as dmirror_fops_unlocked_ioctl runs it: the mirror buffer goes through a bounce buffer
 * copied from or to the program's pointer. Runs on the worker. */
static int command(hmm_mirror *m, unsigned long request, struct dm_cmd *cmd) {
    struct hmm_mirror_result r = {0, 0};
    int rc;
    size_t bytes = 0;
    switch (request) {
    case DM_READ:
    case DM_WRITE:
    case DM_MIGRATE_TO_DEV:
    case DM_EXCLUSIVE:
        bytes = cmd->npages * PAGE;
        break;
    case DM_SNAPSHOT:
        bytes = cmd->npages;
        break;
    case DM_MIGRATE_TO_SYS:
    case DM_CHECK_EXCLUSIVE:
    case DM_RELEASE:
        break;
    default:
        return -EINVAL;
    }
    if (request != DM_RELEASE) {
        /* The driver's entry check, before anything is copied: a page-aligned, non-empty, non-wrapping range. */
        if ((cmd->addr & (PAGE - 1)) || cmd->npages == 0 || cmd->npages > (UINT64_MAX - cmd->addr) / PAGE) return -EINVAL;
        adopt_range(cmd->addr, cmd->npages * PAGE);
    }
    void *bounce = NULL;
    if (bytes) {
        bounce = malloc(bytes);
        if (!bounce) return -ENOMEM;
    }
    if (request == DM_WRITE && copy_from_user(bounce, cmd->ptr, bytes)) {
        free(bounce);
        return -EFAULT;
    }
    switch (request) {
    case DM_READ: rc = hmm_mirror_read(m, cmd->addr, cmd->npages, bounce, &r); break;
    case DM_WRITE: rc = hmm_mirror_write(m, cmd->addr, cmd->npages, bounce, &r); break;
    case DM_MIGRATE_TO_DEV: rc = hmm_mirror_migrate_to_device(m, cmd->addr, cmd->npages, bounce, &r); break;
    case DM_MIGRATE_TO_SYS: rc = hmm_mirror_migrate_to_system(m, cmd->addr, cmd->npages, &r); break;
    case DM_SNAPSHOT: rc = hmm_mirror_snapshot(m, cmd->addr, cmd->npages, bounce, &r); break;
    case DM_EXCLUSIVE: rc = hmm_mirror_exclusive(m, cmd->addr, cmd->npages, bounce, &r); break;
    case DM_CHECK_EXCLUSIVE: rc = hmm_mirror_check_exclusive(m, cmd->addr, cmd->npages); break;
    default: rc = hmm_mirror_release(m); break;
    }
    if (rc == 0 && bytes && request != DM_WRITE) rc = copy_to_user(cmd->ptr, bounce, bytes);
    free(bounce);
    if (rc == 0) {
        cmd->cpages = r.cpages;
        cmd->faults = r.faults;
    }
    return rc;
}

static void job_command(struct job *j) { j->rc = command(j->mirror, j->request, j->cmd); }

int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!from_engine(__builtin_return_address(0))) {
        pthread_mutex_lock(&lock);
        int i = engine_running() ? file_index(fd) : -1;
        hmm_mirror *m = i >= 0 ? files[i].mirror : NULL;
        pthread_mutex_unlock(&lock);
        if (m) {
            if (!arg) {
                errno = EFAULT;
                return -1;
            }
            /* The driver copies the command in and out (copy_from_user/copy_to_user). */
            struct dm_cmd cmd;
            memcpy(&cmd, arg, sizeof cmd);
            struct job j = {.fn = job_command, .mirror = m, .request = request, .cmd = &cmd};
            run(&j);
            int rc = j.rc;
            if (rc) {
                errno = -rc;
                return -1;
            }
            memcpy(arg, &cmd, sizeof cmd);
            return 0;
        }
    }
    return real_ioctl(fd, request, arg);
}
