/*
 * The C suite of libhmm (hmm.h): every function with good and bad arguments — NULL and closed handles,
 * handles of the wrong kind, misaligned and overflowing ranges, bad enums — each returning its errno with
 * a message and never crashing; an end-to-end flow (migrate, fault back by a plain load, read, write,
 * snapshot, exclusive); and a seeded random-call fuzz of 100,000 calls run in a child process, so a crash
 * is reported rather than fatal.
 *
 * Built by c/build as .build-c/bin/abi-tests. Usage: abi-tests [fuzz-seed] [fuzz-calls]
 */
#define _GNU_SOURCE
#include "hmm.h"
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL

static int failures, checks;

#define CHECK(cond, ...)                                                                                         \
    do {                                                                                                         \
        checks++;                                                                                                \
        if (!(cond)) {                                                                                           \
            failures++;                                                                                          \
            fprintf(stderr, "FAIL %s:%d: %s — ", __FILE__, __LINE__, #cond);                                    \
            fprintf(stderr, __VA_ARGS__);                                                                        \
            fprintf(stderr, " (last error: %s)\n", hmm_last_error());                                            \
        }                                                                                                        \
    } while (0)

/* The call returns -err and leaves a message. */
#define EXPECT_ERR(call, err)                                                                                    \
    do {                                                                                                         \
        int rc_ = (call);                                                                                        \
        CHECK(rc_ == -(err), "%s returned %d, expected -%s", #call, rc_, #err);                                  \
        CHECK(rc_ == 0 || hmm_last_error()[0] != 0, "%s left no message", #call);                                \
    } while (0)

#define EXPECT_OK(call)                                                                                          \
    do {                                                                                                         \
        int rc_ = (call);                                                                                        \
        CHECK(rc_ == 0, "%s returned %d", #call, rc_);                                                           \
    } while (0)

/* ---- bad input, function by function --------------------------------------------------------- */

static void bad_input(void) {
    CHECK(hmm_api_version() == HMM_API_VERSION, "version %d", hmm_api_version());
    hmm_machine *machine = NULL;
    EXPECT_ERR(hmm_machine_create(64 << 20, NULL), EINVAL);
    EXPECT_ERR(hmm_machine_create(3 << 20, &machine), EINVAL); /* not a multiple of 2 MiB */
    EXPECT_ERR(hmm_machine_create(8 << 20, &machine), EINVAL); /* below 16 MiB */
    EXPECT_ERR(hmm_machine_create(UINT64_MAX - 1, &machine), EINVAL);
    CHECK(machine == NULL, "an output was written on failure");
    EXPECT_OK(hmm_machine_create(256 << 20, &machine));

    /* Handles: NULL, forged, of the wrong kind, closed. */
    EXPECT_ERR(hmm_machine_destroy(NULL), EINVAL);
    EXPECT_ERR(hmm_machine_destroy((hmm_machine *)(uintptr_t)0x1234), EBADF);
    EXPECT_ERR(hmm_space_close((hmm_space *)machine), EINVAL);

    struct hmm_space_options o = {.size = sizeof o};
    hmm_space *space = NULL;
    struct hmm_space_options bad = o;
    bad.fault_mode = 7;
    EXPECT_ERR(hmm_space_create(machine, &bad, &space), EINVAL);
    bad = o;
    bad.fork_policy = -1;
    EXPECT_ERR(hmm_space_create(machine, &bad, &space), EINVAL);
    bad = o;
    bad.fault_around_pages = 513;
    EXPECT_ERR(hmm_space_create(machine, &bad, &space), EINVAL);
    bad = o;
    bad.size = 4;
    EXPECT_ERR(hmm_space_create(machine, &bad, &space), EINVAL);
    EXPECT_ERR(hmm_space_create(machine, &o, NULL), EINVAL);
    EXPECT_OK(hmm_space_create(machine, &o, &space));
    hmm_space *second = NULL;
    EXPECT_ERR(hmm_space_create(machine, NULL, &second), EEXIST);
    EXPECT_ERR(hmm_machine_destroy(machine), EBUSY);

    /* Regions. */
    hmm_region *region = NULL;
    EXPECT_ERR(hmm_region_allocate(space, 0, 3, -1, 0, &region), EINVAL);
    EXPECT_ERR(hmm_region_allocate(space, 100, 3, -1, 0, &region), EINVAL);
    EXPECT_ERR(hmm_region_allocate(space, PAGE, 8, -1, 0, &region), EINVAL);
    EXPECT_ERR(hmm_region_allocate(space, PAGE, 3, 2, 0, &region), EINVAL);
    EXPECT_ERR(hmm_region_allocate(space, UINT64_MAX & ~(PAGE - 1), 3, -1, 0, &region), EINVAL);
    EXPECT_ERR(hmm_region_allocate((hmm_space *)machine, PAGE, 3, -1, 0, &region), EINVAL);
    EXPECT_OK(hmm_region_allocate(space, 16 * PAGE, 3, 0, 1, &region));
    uint64_t base = 0, length = 0;
    EXPECT_OK(hmm_region_range(region, &base, &length));
    CHECK(length == 16 * PAGE && base % PAGE == 0, "range %" PRIx64 "+%" PRIu64, base, length);
    EXPECT_ERR(hmm_region_range(region, NULL, &length), EINVAL);
    EXPECT_ERR(hmm_region_protect(region, 1, PAGE, 1), EINVAL);              /* misaligned */
    EXPECT_ERR(hmm_region_protect(region, 15 * PAGE, 2 * PAGE, 1), EINVAL);  /* past the end */
    EXPECT_ERR(hmm_region_protect(region, UINT64_MAX & ~(PAGE - 1), 2 * PAGE, 1), EINVAL); /* wraps */
    EXPECT_ERR(hmm_region_protect(region, 0, PAGE, 9), EINVAL);
    EXPECT_ERR(hmm_region_advise_huge(region, 0, PAGE, 5), EINVAL);
    uint8_t residency[16];
    EXPECT_ERR(hmm_region_residency(region, 0, 16 * PAGE, NULL), EINVAL);
    EXPECT_OK(hmm_region_residency(region, 0, 16 * PAGE, residency));
    CHECK(residency[3] == HMM_RESIDENCY_HOST, "populated page is %d", residency[3]);
    hmm_region *found = NULL;
    EXPECT_OK(hmm_space_find_region(space, base + 5 * PAGE, &found));
    CHECK(found == region, "find gives the same handle");
    EXPECT_ERR(hmm_space_find_region(space, 0x1000, &found), ENOENT);
    EXPECT_ERR(hmm_region_adopt(space, base, 16 * PAGE, &found), EBUSY); /* already a region */
    EXPECT_ERR(hmm_space_unmap(space, base + 1, PAGE), EINVAL);
    EXPECT_ERR(hmm_space_unmap(space, UINT64_MAX & ~(PAGE - 1), 2 * PAGE), EINVAL);

    /* Devices and mirrors. */
    hmm_device *device = NULL;
    EXPECT_ERR(hmm_device_create(machine, 0, 3, 0, &device), EINVAL);
    EXPECT_ERR(hmm_device_create(machine, 300, HMM_DEVICE_PRIVATE, 0, &device), EINVAL);
    EXPECT_ERR(hmm_device_create(machine, 0, HMM_DEVICE_PRIVATE, PAGE, &device), EINVAL);
    EXPECT_ERR(hmm_device_create((hmm_machine *)space, 0, HMM_DEVICE_PRIVATE, 0, &device), EINVAL);
    EXPECT_OK(hmm_device_create(machine, 0, HMM_DEVICE_PRIVATE, 64 << 20, &device));
    hmm_mirror *mirror = NULL;
    EXPECT_ERR(hmm_mirror_open(device, (hmm_space *)device, &mirror), EINVAL);
    EXPECT_OK(hmm_mirror_open(device, space, &mirror));
    struct hmm_mirror_result r;
    void *buf = malloc(16 * PAGE);
    EXPECT_ERR(hmm_mirror_read(mirror, base + 1, 1, buf, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_read(mirror, base, 0, buf, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_read(mirror, base, 1, NULL, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_read(mirror, UINT64_MAX & ~(PAGE - 1), 4, buf, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_read((hmm_mirror *)region, base, 1, buf, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_write(mirror, base, 1, NULL, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_snapshot(mirror, base, 1, NULL, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_exclusive(mirror, base, 1, NULL, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_check_exclusive(mirror, base + 7, 1), EINVAL);
    EXPECT_ERR(hmm_mirror_migrate_to_device(mirror, base, 0, NULL, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_migrate_to_system(mirror, 1, 1, &r), EINVAL);
    EXPECT_ERR(hmm_mirror_release(NULL), EINVAL);

    /* Closed handles: every call on them is -EBADF, never a crash. */
    EXPECT_OK(hmm_mirror_close(mirror));
    EXPECT_ERR(hmm_mirror_close(mirror), EBADF);
    EXPECT_ERR(hmm_mirror_read(mirror, base, 1, buf, &r), EBADF);
    EXPECT_OK(hmm_region_free(region));
    EXPECT_ERR(hmm_region_free(region), EBADF);
    EXPECT_ERR(hmm_region_protect(region, 0, PAGE, 1), EBADF);
    EXPECT_OK(hmm_device_destroy(device));
    EXPECT_ERR(hmm_device_destroy(device), EBADF);
    EXPECT_ERR(hmm_mirror_open(device, space, &mirror), EBADF);
    EXPECT_OK(hmm_space_close(space));
    EXPECT_ERR(hmm_space_close(space), EBADF);
    EXPECT_ERR(hmm_region_allocate(space, PAGE, 3, -1, 0, &region), EBADF);
    struct hmm_space_counters counters;
    EXPECT_ERR(hmm_space_counters(space, &counters), EBADF);
    /* Events. */
    hmm_subscription *sub = NULL;
    EXPECT_ERR(hmm_events_subscribe(machine, 1u << 9, 0, &sub), EINVAL);
    EXPECT_ERR(hmm_events_subscribe(machine, HMM_EVENTS_ALL, 100, &sub), EINVAL);
    EXPECT_ERR(hmm_events_subscribe(machine, HMM_EVENTS_ALL, 0, NULL), EINVAL);
    EXPECT_OK(hmm_events_subscribe(machine, HMM_EVENTS_ALL, 64, &sub));
    struct hmm_event ev;
    EXPECT_ERR(hmm_events_next(sub, &ev), EAGAIN);
    EXPECT_ERR(hmm_events_next(sub, NULL), EINVAL);
    uint64_t dropped = 1;
    EXPECT_OK(hmm_events_dropped(sub, &dropped));
    CHECK(dropped == 0, "dropped %" PRIu64, dropped);
    EXPECT_ERR(hmm_events_next((hmm_subscription *)machine, &ev), EINVAL);
    EXPECT_OK(hmm_events_close(sub));
    EXPECT_ERR(hmm_events_close(sub), EBADF);
    EXPECT_ERR(hmm_events_next(sub, &ev), EBADF);

    EXPECT_OK(hmm_machine_destroy(machine));
    EXPECT_ERR(hmm_machine_destroy(machine), EBADF);
    free(buf);
}

/* ---- the end-to-end flow ----------------------------------------------------------------------- */

static void flow(int kind) {
    hmm_machine *machine;
    hmm_space *space;
    hmm_device *device;
    hmm_mirror *mirror;
    hmm_region *region;
    EXPECT_OK(hmm_machine_create(256 << 20, &machine));
    EXPECT_OK(hmm_space_create(machine, NULL, &space));
    EXPECT_OK(hmm_device_create(machine, 0, kind, 64 << 20, &device));
    EXPECT_OK(hmm_mirror_open(device, space, &mirror));
    hmm_subscription *sub;
    EXPECT_OK(hmm_events_subscribe(machine, 1u << HMM_EVENT_MIGRATION | 1u << HMM_EVENT_CPU_FAULT, 0, &sub));
    const uint64_t pages = 64;
    EXPECT_OK(hmm_region_allocate(space, pages * PAGE, PROT_READ | PROT_WRITE, 0, 0, &region));
    uint64_t base, length;
    EXPECT_OK(hmm_region_range(region, &base, &length));
    int *p = (int *)(uintptr_t)base;
    for (uint64_t i = 0; i < pages * PAGE / sizeof(int); i++) p[i] = (int)i;

    struct hmm_mirror_result r = {0, 0};
    int *mirror_buf = malloc(pages * PAGE);
    EXPECT_OK(hmm_mirror_migrate_to_device(mirror, base, pages, mirror_buf, &r));
    CHECK(r.cpages == pages, "migrated %" PRIu64, r.cpages);
    uint8_t where[64];
    EXPECT_OK(hmm_region_residency(region, 0, pages * PAGE, where));
    uint8_t expected = kind == HMM_DEVICE_PRIVATE ? HMM_RESIDENCY_DEVICE_PRIVATE : HMM_RESIDENCY_DEVICE_COHERENT;
    CHECK(where[10] == expected, "residency %d after migration", where[10]);
    /* A plain load: a device-private page faults back, a coherent one is read in place. */
    CHECK(p[12345] == 12345, "load after migration read %d", p[12345]);
    EXPECT_OK(hmm_mirror_read(mirror, base, pages, mirror_buf, &r));
    CHECK(r.cpages == pages && mirror_buf[777] == 777, "device read %d", mirror_buf[777]);
    for (uint64_t i = 0; i < pages * PAGE / sizeof(int); i++) mirror_buf[i] = -(int)i;
    EXPECT_OK(hmm_mirror_write(mirror, base, pages, mirror_buf, &r));
    CHECK(p[4242] == -4242, "device write seen by the CPU: %d", p[4242]);
    uint8_t snap[64];
    EXPECT_OK(hmm_mirror_snapshot(mirror, base, pages, snap, &r));
    CHECK(r.cpages == pages && (snap[0] & 0x02), "snapshot byte %#x", snap[0]);
    if (kind == HMM_DEVICE_PRIVATE) {
        EXPECT_OK(hmm_mirror_exclusive(mirror, base, 4, mirror_buf, &r));
        EXPECT_ERR(hmm_mirror_check_exclusive(mirror, base, 4), EPERM);
        /* A CPU touch ends a page's exclusive grant. */
        for (int i = 0; i < 4; i++) CHECK(p[i * PAGE / sizeof(int)] == -(int)(i * PAGE / sizeof(int)), "page %d", i);
        EXPECT_OK(hmm_mirror_check_exclusive(mirror, base, 4));
    }
    EXPECT_OK(hmm_mirror_migrate_to_device(mirror, base, pages, NULL, &r));
    EXPECT_OK(hmm_mirror_migrate_to_system(mirror, base, pages, &r));
    CHECK(r.cpages == pages, "migrated back %" PRIu64, r.cpages);
    EXPECT_OK(hmm_mirror_release(mirror));
    /* The event stream saw the migration to the device, in this process, and nothing it was not asked for. */
    struct hmm_event ev;
    int to_device = 0, others = 0;
    while (hmm_events_next(sub, &ev) == 0) {
        if (ev.kind == HMM_EVENT_MIGRATION && ev.detail == 1 && ev.pages > 0 && ev.address >= base &&
            ev.address < base + pages * PAGE && ev.space == (int64_t)getpid())
            to_device++;
        else if (ev.kind != HMM_EVENT_MIGRATION && ev.kind != HMM_EVENT_CPU_FAULT)
            others++;
    }
    CHECK(to_device > 0 && others == 0, "%d migration events to the device, %d of other kinds", to_device, others);
    EXPECT_OK(hmm_events_close(sub));
    struct hmm_space_counters c;
    EXPECT_OK(hmm_space_counters(space, &c));
    CHECK(kind != HMM_DEVICE_PRIVATE || c.fault_backs > 0, "no fault-back counted");
    EXPECT_OK(hmm_space_unmap(space, base, pages * PAGE));
    EXPECT_OK(hmm_mirror_close(mirror));
    EXPECT_OK(hmm_device_destroy(device));
    EXPECT_OK(hmm_space_close(space));
    EXPECT_OK(hmm_machine_destroy(machine));
    free(mirror_buf);
}

/* ---- the fuzz ---------------------------------------------------------------------------------- */

static uint64_t rng;
static uint64_t next(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Random calls on a pool of live, closed and wrong-kind handles. Addresses come from the fuzz's own
 * regions and scratch arena, or are garbage for the calls that only read through the engine; unmap and
 * adopt are kept to the fuzz's own memory (a real munmap of arbitrary memory is the caller's bug). */
static int fuzz(uint64_t seed, long calls) {
    rng = seed;
    hmm_machine *machine;
    hmm_space *space;
    if (hmm_machine_create(128 << 20, &machine) || hmm_space_create(machine, NULL, &space)) return 2;
    hmm_device *devices[2];
    if (hmm_device_create(machine, 0, HMM_DEVICE_PRIVATE, 32 << 20, &devices[0]) ||
        hmm_device_create(machine, 1, HMM_DEVICE_COHERENT, 32 << 20, &devices[1]))
        return 2;
    const size_t arena_pages = 256;
    char *arena = mmap(NULL, arena_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *pool[16] = {0};
    for (int i = 0; i < 2; i++) pool[i] = devices[i];
    pool[2] = space;
    pool[3] = machine;
    hmm_region *regions[8] = {0};
    hmm_mirror *mirrors[4] = {0};
    uint8_t *buf = malloc(64 * PAGE);
    struct hmm_mirror_result r;
    long ok = 0;
    for (long n = 0; n < calls; n++) {
        uint64_t x = next();
        int slot = (int)(x >> 8) & 7;
        void *anyh = pool[(x >> 16) & 15];
        uint64_t pages = 1 + (next() % 32);
        uint64_t addr;
        switch ((x >> 24) % 4) {
        case 0: addr = (uint64_t)(uintptr_t)arena + (next() % arena_pages) * PAGE; break;
        case 1: addr = next(); break;
        default: {
            uint64_t b = 0, l = 0;
            if (regions[slot]) hmm_region_range(regions[slot], &b, &l);
            addr = b + (l ? (next() % (l / PAGE)) * PAGE : 0);
        }
        }
        int rc = 0;
        /* A region handle about to be replaced is freed first: the fuzz leaks nothing of its own. */
        if ((x % 17 == 0 || x % 17 == 14) && regions[slot]) {
            hmm_region_free(regions[slot]);
            regions[slot] = NULL;
        }
        switch (x % 17) {
        case 0: rc = hmm_region_allocate(space, (1 + next() % 64) * PAGE, (int)(next() % 4), (int)(next() % 3) - 1, (int)(next() & 1), &regions[slot]); break;
        case 1: rc = hmm_region_free(regions[slot]); break;
        case 2: rc = hmm_region_protect(regions[slot], (next() % 8) * PAGE, pages * PAGE, (int)(next() % 8)); break;
        case 3: rc = hmm_region_advise_huge(regions[slot], 0, pages * PAGE, (int)(next() % 2)); break;
        case 4: rc = hmm_region_residency(regions[slot], 0, pages * PAGE, buf); break;
        case 5: rc = hmm_mirror_open(devices[next() & 1], space, &mirrors[slot & 3]); break;
        case 6: rc = hmm_mirror_close(mirrors[slot & 3]); break;
        case 7: rc = hmm_mirror_read(mirrors[slot & 3], addr, pages, buf, &r); break;
        case 8: rc = hmm_mirror_write(mirrors[slot & 3], addr, pages, buf, &r); break;
        case 9: rc = hmm_mirror_migrate_to_device(mirrors[slot & 3], addr, pages, (next() & 1) ? buf : NULL, &r); break;
        case 10: rc = hmm_mirror_migrate_to_system(mirrors[slot & 3], addr, pages, &r); break;
        case 11: rc = hmm_mirror_snapshot(mirrors[slot & 3], addr, pages, buf, &r); break;
        case 12: rc = hmm_mirror_exclusive(mirrors[slot & 3], addr, pages, buf, &r); break;
        case 13: rc = hmm_mirror_check_exclusive(mirrors[slot & 3], addr, pages); break;
        case 14: rc = hmm_region_adopt(space, (uint64_t)(uintptr_t)arena + (next() % arena_pages) * PAGE, pages * PAGE, &regions[slot]); break;
        case 15: rc = hmm_mirror_read(anyh, addr, pages, buf, &r); break; /* any handle, any kind */
        default: {
            /* Unmap only what the fuzz owns: a region's pages. */
            uint64_t b = 0, l = 0;
            if (regions[slot] && hmm_region_range(regions[slot], &b, &l) == 0) rc = hmm_space_unmap(space, b, l);
            else rc = hmm_region_range(regions[slot], &b, &l);
        }
        }
        if (rc > 0 || rc < -4095) return 3; /* not 0 or a negative errno */
        if (rc == 0) ok++;
    }
    /* No byte was lost: nothing in the interface poisons a page on purpose. */
    struct hmm_space_counters counters;
    if (hmm_space_counters(space, &counters) || counters.poisoned != 0) {
        fprintf(stderr, "fuzz: %llu page(s) poisoned\n", (unsigned long long)counters.poisoned);
        return 7;
    }
    /* The engine is still sound: a fresh region migrates and comes back. */
    hmm_region *last;
    hmm_mirror *m;
    uint64_t b, l;
    if (hmm_region_allocate(space, 8 * PAGE, 3, 0, 1, &last) || hmm_region_range(last, &b, &l) ||
        hmm_mirror_open(devices[0], space, &m)) {
        fprintf(stderr, "fuzz: the engine is unusable afterwards: %s\n", hmm_last_error());
        return 4;
    }
    ((char *)(uintptr_t)b)[5 * PAGE] = 42;
    if (hmm_mirror_migrate_to_device(m, b, 8, NULL, &r) || r.cpages != 8) {
        fprintf(stderr, "fuzz: migration afterwards: %s (cpages %" PRIu64 ")\n", hmm_last_error(), r.cpages);
        return 5;
    }
    if (((char *)(uintptr_t)b)[5 * PAGE] != 42) return 6;
    for (int i = 0; i < 4; i++) hmm_mirror_close(mirrors[i]);
    hmm_mirror_close(m);
    if (hmm_space_close(space) && errno != 0) { /* poisoned pages are reported, not fatal */ }
    fprintf(stderr, "fuzz: %ld calls, %ld succeeded\n", calls, ok);
    return 0;
}

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 20261207;
    long calls = argc > 2 ? strtol(argv[2], NULL, 0) : 100000;

    /* The fuzz first, in a child forked before this process starts any engine. */
    pid_t pid = fork();
    if (pid == 0) {
        alarm(600); /* bounded: a fuzz that hangs dies of SIGALRM and is reported, CI never wedges */
        _exit(fuzz(seed, calls));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status), "the fuzz child died of signal %d (seed %" PRIu64 ")", WIFSIGNALED(status) ? WTERMSIG(status) : 0, seed);
    CHECK(!WIFEXITED(status) || WEXITSTATUS(status) == 0, "the fuzz child failed with %d (seed %" PRIu64 ")", WEXITSTATUS(status), seed);

    bad_input();
    flow(HMM_DEVICE_PRIVATE);
    flow(HMM_DEVICE_COHERENT);
    printf("libhmm C suite: %d checks, %d failed; fuzz seed %" PRIu64 ", %ld calls\n", checks, failures, seed, calls);
    return failures ? 1 : 0;
}
