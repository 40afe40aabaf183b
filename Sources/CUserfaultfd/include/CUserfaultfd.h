// CUserfaultfd: the userfaultfd and PAGEMAP_SCAN system interface the native engine (HMMNative) needs,
// as plain C functions Swift can call. Every function returns 0 (or a count / descriptor) on success
// and -errno on failure; nothing here allocates or keeps state except the signal probe.
//
// The Linux 6.1 UAPI headers this machine kind ships lack UFFDIO_MOVE (6.8), UFFDIO_POISON (6.6) and
// PAGEMAP_SCAN (6.7); the shim carries their definitions (see userfaultfd_shim.c).
#ifndef CUSERFAULTFD_H
#define CUSERFAULTFD_H
#include <stddef.h>
#include <stdint.h>

// UFFDIO_API feature bits (include/uapi/linux/userfaultfd.h).
#define CU_FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#define CU_FEATURE_EVENT_FORK (1ULL << 1)
#define CU_FEATURE_EVENT_REMAP (1ULL << 2)
#define CU_FEATURE_EVENT_REMOVE (1ULL << 3)
#define CU_FEATURE_MISSING_SHMEM (1ULL << 5)
#define CU_FEATURE_EVENT_UNMAP (1ULL << 6)
#define CU_FEATURE_SIGBUS (1ULL << 7)
#define CU_FEATURE_THREAD_ID (1ULL << 8)
#define CU_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define CU_FEATURE_POISON (1ULL << 14)
#define CU_FEATURE_WP_ASYNC (1ULL << 15)
#define CU_FEATURE_MOVE (1ULL << 16)

// UFFDIO_REGISTER modes.
#define CU_REGISTER_MISSING (1ULL << 0)
#define CU_REGISTER_WP (1ULL << 1)
#define CU_REGISTER_MINOR (1ULL << 2)

// Copy / move modes.
#define CU_MODE_DONTWAKE (1ULL << 0)
#define CU_MOVE_ALLOW_SRC_HOLES (1ULL << 1)

// The kinds of cu_message.
#define CU_MSG_PAGEFAULT 0x12
#define CU_MSG_FORK 0x13
#define CU_MSG_REMAP 0x14
#define CU_MSG_REMOVE 0x15
#define CU_MSG_UNMAP 0x16

// Page-fault flags.
#define CU_PAGEFAULT_WRITE (1ULL << 0)
#define CU_PAGEFAULT_WP (1ULL << 1)
#define CU_PAGEFAULT_MINOR (1ULL << 2)

/// One userfaultfd message, flattened (struct uffd_msg):
/// - PAGEFAULT: a = address, b = flags, c = thread id (with THREAD_ID);
/// - FORK: a = the child's uffd;
/// - REMAP: a = from, b = to, c = length;
/// - REMOVE / UNMAP: a = start, b = end.
struct cu_message {
    uint32_t kind;
    /// PAGEFAULT: the faulting thread's id (with THREAD_ID), kept when the engine reuses c.
    uint32_t thread;
    uint64_t a, b, c;
    /// When the engine read the message (CLOCK_MONOTONIC ns); 0 unless its events are observed.
    uint64_t read_at;
};

// PAGEMAP_SCAN categories (fs/proc/task_mmu.c, 6.7).
#define CU_PAGE_IS_WPALLOWED (1ULL << 0)
#define CU_PAGE_IS_WRITTEN (1ULL << 1)
#define CU_PAGE_IS_FILE (1ULL << 2)
#define CU_PAGE_IS_PRESENT (1ULL << 3)
#define CU_PAGE_IS_SWAPPED (1ULL << 4)
#define CU_PAGE_IS_PFNZERO (1ULL << 5)
#define CU_PAGE_IS_HUGE (1ULL << 6)

/// One run of pages with the same categories (struct page_region).
struct cu_page_region {
    uint64_t start, end, categories;
};

/// userfaultfd(O_CLOEXEC | O_NONBLOCK [| UFFD_USER_MODE_ONLY]) + UFFDIO_API with `features`; on success
/// the new descriptor, with what the kernel supports in *supported.
int cu_uffd_open(uint64_t features, int user_mode_only, uint64_t *supported);
/// UFFDIO_API probe: the features this kernel offers (opens and closes a descriptor).
int cu_uffd_probe(int user_mode_only, uint64_t *supported);
int cu_register(int fd, uint64_t start, uint64_t len, uint64_t mode);
int cu_unregister(int fd, uint64_t start, uint64_t len);
/// UFFDIO_COPY; *copied receives the bytes copied (also on a partial failure).
int cu_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied);
/// UFFDIO_MOVE; *moved receives the bytes moved (also on a partial failure).
int cu_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved);
int cu_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed);
int cu_poison(int fd, uint64_t start, uint64_t len);
/// UFFDIO_CONTINUE: maps the page-cache pages already behind [start, start + len) of a MINOR-registered
/// shared-memory range.
int cu_continue(int fd, uint64_t start, uint64_t len);
int cu_wake(int fd, uint64_t start, uint64_t len);
/// poll(fd, POLLIN) for up to `timeout_ms` (or an eventfd `wake_fd` >= 0): 1 readable, 0 timeout or woken.
int cu_poll(int fd, int wake_fd, int timeout_ms);
/// Reads up to `max` messages without blocking; the count read (0 when none is queued).
int cu_read_messages(int fd, struct cu_message *out, int max);
/// The calling thread's kernel id (gettid), async-signal-safe.
int cu_gettid(void);
/// PAGEMAP_SCAN of [start, end) on an open /proc/self/pagemap: up to `max` runs, reporting the
/// categories in `return_mask`; *walk_end receives where the walk stopped. Returns the runs written.
int cu_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, struct cu_page_region *out, int max,
                    uint64_t return_mask, uint64_t *walk_end);
/// madvise(start, len, advice) as 0 / -errno.
int cu_madvise(uint64_t start, uint64_t len, int advice);
/// An anonymous private mapping of `len` bytes aligned to `align` (a power of two); 0 on failure
/// (-errno in *error).
uint64_t cu_map_aligned(uint64_t len, uint64_t align, int prot, int *error);
int cu_munmap(uint64_t start, uint64_t len);
/// mmap(addr, len, prot, MAP_FIXED | MAP_SHARED [| MAP_POPULATE], fd, offset) as 0 / -errno: replaces
/// whatever was mapped at [addr, addr + len).
int cu_map_shared_fixed(uint64_t addr, uint64_t len, int prot, int fd, uint64_t offset, int populate);
/// mremap(old, old_len, new_len, flags[, new_address]); the new address, or 0 with -errno in *error.
/// Flags: 1 MREMAP_MAYMOVE, 2 MREMAP_FIXED, 4 MREMAP_DONTUNMAP.
uint64_t cu_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_address, int *error);
int cu_mprotect(uint64_t start, uint64_t len, int prot);
int cu_eventfd(void);
int cu_eventfd_signal(int fd);
int cu_close(int fd);
/// The AnonHugePages of the mapping containing `addr`, in kB, from /proc/self/smaps (-1 if not found).
long cu_anon_huge_kb(uint64_t addr);
/// Copies `len` bytes from `src` in this process's address space into `dst` with process_vm_readv on
/// the process itself: the bytes copied, or -errno (EFAULT where `src` is not mapped) instead of a
/// SIGSEGV. A userfaultfd hole in the range faults through its handler, as a load would.
long cu_self_read(void *dst, const void *src, size_t len);
/// The same for a write of `len` bytes from `src` to `dst` (process_vm_writev).
long cu_self_write(void *dst, const void *src, size_t len);
/// The calling thread's stack (pthread_getattr_np): 0 with its lowest address and size, or -1.
int cu_thread_stack(uint64_t *lo, uint64_t *size);
/// CLOCK_MONOTONIC in nanoseconds.
uint64_t cu_now_ns(void);
/// open(path, flags | O_DIRECT | O_CLOEXEC, 0600): the descriptor, or -errno. O_DIRECT's value is
/// per-architecture and not visible to Swift.
int cu_open_direct(const char *path, int flags);

/// Reads the byte at `p` in the calling thread and reports instead of dying: 0 with the byte in *out,
/// or the signal number (SIGBUS, SIGSEGV) the read raised, with its si_code in *code. The probe's
/// handler is installed on first use and chains every signal it did not cause to the handler that was
/// installed before it (the Swift runtime's backtracer), so a real crash still crashes.
int cu_probe_read(const void *p, uint8_t *out, int *code);
/// The same for a one-byte store of `value`.
int cu_probe_write(void *p, uint8_t value, int *code);

/// The in-thread fault hook (UFFD_FEATURE_SIGBUS): `hook(address, write)` runs in the thread whose
/// access raised SIGBUS (BUS_ADRERR), inside the signal handler, before the probe and the chained
/// handlers; it returns nonzero if the page is now in place and the access should run again, zero to
/// let the signal take its course (a poisoned page). Installs the chaining handler if needed. Pass
/// NULL to remove the hook. Returns the hook it replaced.
typedef int (*cu_fault_hook)(uint64_t address, int write);
cu_fault_hook cu_set_fault_hook(cu_fault_hook hook);

#endif
