/*
 * hmm.h — the C interface of swift-hmm (libhmm).
 *
 * Heterogeneous memory management on this process's own memory (the native engine): a machine holds
 * device memory and the staging pool; a space manages regions of the process's address space through
 * userfaultfd; devices (the kernel's test_hmm "dmirror" driver, device-private or device-coherent)
 * migrate, read, write and snapshot pages; a CPU touch of a device-private page faults it back.
 *
 * Conventions
 *  - Every function returns 0 or a negative errno value (-EINVAL, -EBADF, ...). On failure,
 *    hmm_last_error() returns a message for the calling thread; on success it is not changed.
 *  - Handles are opaque. A handle that was destroyed or closed is detected: calls on it return
 *    -EBADF (never undefined behaviour). A handle of the wrong kind returns -EINVAL.
 *  - Output parameters are written only on success.
 *  - Every function is thread-safe. Functions that may wait for the engine (migrations, faults,
 *    close) must not be called from inside a signal handler.
 *  - Addresses and lengths are bytes; ranges must be page-aligned (4096) unless stated.
 *
 * Build and link: see the README ("Using swift-hmm from C").
 */
#ifndef SWIFT_HMM_H
#define SWIFT_HMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The version of this interface. A library answers hmm_api_version() with the version it implements. */
#define HMM_API_VERSION 1

typedef struct hmm_machine hmm_machine;
typedef struct hmm_space hmm_space;
typedef struct hmm_region hmm_region;
typedef struct hmm_device hmm_device;
typedef struct hmm_mirror hmm_mirror;

/** The interface version the library implements (HMM_API_VERSION of its build). */
int hmm_api_version(void);

/** The message of the calling thread's last failed call ("" if none). Valid until that thread's next
 *  failing call. */
const char *hmm_last_error(void);

/* ---- machine ------------------------------------------------------------------------------- */

/** Creates a machine with `system_memory` bytes of staging RAM (a multiple of 2 MiB, at least
 *  16 MiB, at most 64 GiB). Device memory is added by hmm_device_create(). */
int hmm_machine_create(uint64_t system_memory, hmm_machine **out);

/** Destroys a machine. Fails with -EBUSY while a space or device of it is open. */
int hmm_machine_destroy(hmm_machine *machine);

/* ---- space --------------------------------------------------------------------------------- */

/** Who resolves CPU faults on device-private pages. */
enum hmm_fault_mode {
    /** The space's fault thread (default): system calls touching device pages fault them back too. */
    HMM_FAULT_HANDLER_THREAD = 0,
    /** The faulting thread's SIGBUS handler; system calls touching device pages get EFAULT. */
    HMM_FAULT_IN_THREAD = 1,
};

/** What a child created by fork() gets of the regions. */
enum hmm_fork_policy {
    /** Regions are MADV_DONTFORK: the child gets SIGSEGV touching one (default). */
    HMM_FORK_DENY = 0,
    /** The child inherits every page as at the fork (needs CAP_SYS_PTRACE). */
    HMM_FORK_SHARE = 1,
};

struct hmm_space_options {
    /** sizeof(struct hmm_space_options): lets later versions grow the struct. */
    uint32_t size;
    /** enum hmm_fault_mode. */
    int32_t fault_mode;
    /** enum hmm_fork_policy. */
    int32_t fork_policy;
    /** Pages brought back per CPU fault (1...512; 0 means the default, 16). */
    int32_t fault_around_pages;
};

/** Opens the machine's native space (one per machine and process). `options` may be NULL.
 *  -EOPNOTSUPP if the kernel lacks what the engine needs (hmm_last_error() names it), -EPERM if a
 *  policy needs a privilege the process lacks, -EEXIST if the machine already has a space. */
int hmm_space_create(hmm_machine *machine, const struct hmm_space_options *options, hmm_space **out);

/** Evicts every device page back to memory, stops the engine's threads and closes the space; its
 *  regions stay mapped as ordinary memory and their handles become invalid. -EFAULT if some pages
 *  could not come back and were poisoned (the space is closed anyway). */
int hmm_space_close(hmm_space *space);

/** munmap() through the engine: exact against migrations in flight (see the README). */
int hmm_space_unmap(hmm_space *space, uint64_t address, uint64_t length);

/** The region containing `address`, or -ENOENT. The handle stays valid until the region is freed. */
int hmm_space_find_region(hmm_space *space, uint64_t address, hmm_region **out);

struct hmm_space_counters {
    uint64_t cpu_faults;
    uint64_t fault_backs;
    uint64_t events;
    uint64_t poisoned;
};

/** The engine's counters. */
int hmm_space_counters(hmm_space *space, struct hmm_space_counters *out);

/* ---- regions ------------------------------------------------------------------------------- */

/** `PROT_*` bits as mmap(2) takes them (PROT_READ 1, PROT_WRITE 2, PROT_EXEC 4). */

/** Maps `length` bytes of fresh private anonymous memory as a region. `huge_pages`: 1 advises THP,
 *  0 forbids it, -1 keeps the host's default. `populate` faults every page in. */
int hmm_region_allocate(hmm_space *space, uint64_t length, int protection, int huge_pages, int populate,
                        hmm_region **out);

/** Takes private anonymous memory the process already has into the space as a region (bytes and
 *  protection kept). */
int hmm_region_adopt(hmm_space *space, uint64_t address, uint64_t length, hmm_region **out);

/** The region's start address and length. */
int hmm_region_range(hmm_region *region, uint64_t *address, uint64_t *length);

/** mprotect() of `[offset, offset + length)` of the region through the engine (notifiers told). */
int hmm_region_protect(hmm_region *region, uint64_t offset, uint64_t length, int protection);

/** MADV_HUGEPAGE (`huge` 1) or MADV_NOHUGEPAGE (0) through the engine. */
int hmm_region_advise_huge(hmm_region *region, uint64_t offset, uint64_t length, int huge);

/** Where each page is. */
enum hmm_residency {
    HMM_RESIDENCY_UNTOUCHED = 0,
    HMM_RESIDENCY_HOST = 1,
    HMM_RESIDENCY_HOST_HUGE = 2,
    HMM_RESIDENCY_ZERO_PAGE = 3,
    HMM_RESIDENCY_DEVICE_PRIVATE = 4,
    HMM_RESIDENCY_DEVICE_COHERENT = 5,
    HMM_RESIDENCY_EXCLUSIVE = 6,
    HMM_RESIDENCY_REVOKED = 7,
    HMM_RESIDENCY_UNMAPPED = 8,
};

/** One enum hmm_residency byte per page of `[offset, offset + length)` into `out` (length / 4096
 *  bytes). */
int hmm_region_residency(hmm_region *region, uint64_t offset, uint64_t length, uint8_t *out);

/** Unmaps the region (its device pages freed) and invalidates the handle. */
int hmm_region_free(hmm_region *region);

/* ---- devices (the test_hmm dmirror driver) ------------------------------------------------- */

enum hmm_device_kind {
    HMM_DEVICE_PRIVATE = 1,
    HMM_DEVICE_COHERENT = 2,
};

/** Adds device `minor` (0...255) of `kind` to the machine, its memory allocated in chunks of
 *  `chunk_size` bytes (a multiple of 2 MiB; 0 means 256 MiB). */
int hmm_device_create(hmm_machine *machine, int minor, int kind, uint64_t chunk_size, hmm_device **out);

/** Removes the device: every page comes back to memory first. */
int hmm_device_destroy(hmm_device *device);

/** Opens the device for `space` (open() of /dev/hmm_dmirrorN). */
int hmm_mirror_open(hmm_device *device, hmm_space *space, hmm_mirror **out);

/** close(): drops the device's page table and evicts the device's pages. */
int hmm_mirror_close(hmm_mirror *mirror);

/** What a command did: pages it handled and device faults it took (struct hmm_dmirror_cmd). */
struct hmm_mirror_result {
    uint64_t cpages;
    uint64_t faults;
};

/** HMM_DMIRROR_READ: the device reads `pages` pages at `address` into `buffer` (pages * 4096 bytes). */
int hmm_mirror_read(hmm_mirror *mirror, uint64_t address, uint64_t pages, void *buffer,
                    struct hmm_mirror_result *result);
/** HMM_DMIRROR_WRITE: the device writes `buffer` to the pages. */
int hmm_mirror_write(hmm_mirror *mirror, uint64_t address, uint64_t pages, const void *buffer,
                     struct hmm_mirror_result *result);
/** HMM_DMIRROR_MIGRATE_TO_DEV; `buffer` (may be NULL) receives the migrated bytes. */
int hmm_mirror_migrate_to_device(hmm_mirror *mirror, uint64_t address, uint64_t pages, void *buffer,
                                 struct hmm_mirror_result *result);
/** HMM_DMIRROR_MIGRATE_TO_SYS. */
int hmm_mirror_migrate_to_system(hmm_mirror *mirror, uint64_t address, uint64_t pages,
                                 struct hmm_mirror_result *result);
/** HMM_DMIRROR_SNAPSHOT: one HMM_DMIRROR_PROT_* byte per page into `out`. */
int hmm_mirror_snapshot(hmm_mirror *mirror, uint64_t address, uint64_t pages, uint8_t *out,
                        struct hmm_mirror_result *result);
/** HMM_DMIRROR_EXCLUSIVE: grants the device exclusive access; `buffer` receives the bytes. */
int hmm_mirror_exclusive(hmm_mirror *mirror, uint64_t address, uint64_t pages, void *buffer,
                         struct hmm_mirror_result *result);
/** HMM_DMIRROR_CHECK_EXCLUSIVE: 0 if every page is still exclusive to the device, else -EPERM. */
int hmm_mirror_check_exclusive(hmm_mirror *mirror, uint64_t address, uint64_t pages);
/** HMM_DMIRROR_RELEASE: evicts every page of the device back to memory. */
int hmm_mirror_release(hmm_mirror *mirror);

/* ---- events --------------------------------------------------------------------------------- */

typedef struct hmm_subscription hmm_subscription;

/** What happened (bit `1 << kind` in a subscription's mask). */
enum hmm_event_kind {
    HMM_EVENT_CPU_FAULT = 0,    /* a CPU fault the engine resolved (detail: 1 for a write) */
    HMM_EVENT_MIGRATION = 1,    /* pages moved (detail: 1 to a device, 0 to system memory) */
    HMM_EVENT_EVICTION = 2,     /* a device evicted pages */
    HMM_EVENT_INVALIDATION = 3, /* the notifiers heard of a change [address, address + pages * 4096) */
    HMM_EVENT_EXCLUSIVE = 4,    /* a device-exclusive grant (detail 0) or restore (detail 1) */
    HMM_EVENT_REVOKE = 5,       /* pages poisoned, or P2PDMA mappings revoked by an unbind */
    HMM_EVENT_HOST = 6,         /* the host's userfaultfd event: detail 0 unmap, 1 remove, 2 remap, 3 fork */
    HMM_EVENT_POLICY = 7,       /* a managed-memory policy decision */
};

/** Every kind. */
#define HMM_EVENTS_ALL 0xffu

struct hmm_event {
    /** enum hmm_event_kind. */
    uint32_t kind;
    /** Per kind, see enum hmm_event_kind. */
    uint32_t detail;
    /** The event space id (the process id for a native space). */
    int64_t space;
    /** The first address concerned. */
    uint64_t address;
    /** Pages concerned (rounded up for byte ranges). */
    uint64_t pages;
    /** When it started, in the engine's clock (nanoseconds). */
    uint64_t timestamp_ns;
    /** How long it took, where measured; else 0. */
    uint64_t duration_ns;
};

/** Subscribes to the machine's events of the kinds in `mask` (bits `1 << enum hmm_event_kind`), held in a
 *  ring of `capacity` slots (a power of two, 64...2^20; 0 means 16384): a full ring drops new events and
 *  counts them. */
int hmm_events_subscribe(hmm_machine *machine, uint32_t mask, uint32_t capacity, hmm_subscription **out);

/** The oldest undelivered event into `out`: 0, or -EAGAIN when there is none (never waits). */
int hmm_events_next(hmm_subscription *subscription, struct hmm_event *out);

/** Events lost because the ring was full. */
int hmm_events_dropped(hmm_subscription *subscription, uint64_t *out);

/** Ends the subscription. */
int hmm_events_close(hmm_subscription *subscription);

#ifdef __cplusplus
}
#endif

#endif /* SWIFT_HMM_H */
