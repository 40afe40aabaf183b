/*
 * The C half of `hmm bench c-abi`: times one libhmm operation and prints nanoseconds per operation.
 * Usage: abi-bench read1|migrate64 ITERATIONS
 *   read1      hmm_mirror_read of one page (a device read of CPU-resident memory)
 *   migrate64  hmm_mirror_migrate_to_device + _to_system of 64 pages (one round trip)
 * The Swift half measures the same calls through the Swift API, alternately, in the same run.
 */
#define _GNU_SOURCE
#include "hmm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: abi-bench read1|migrate64 ITERATIONS\n");
        return 2;
    }
    int migrate = strcmp(argv[1], "migrate64") == 0;
    if (!migrate && strcmp(argv[1], "read1") != 0) return 2;
    long n = strtol(argv[2], NULL, 10);
    hmm_machine *machine;
    hmm_space *space;
    hmm_device *device;
    hmm_mirror *mirror;
    hmm_region *region;
    if (hmm_machine_create(256 << 20, &machine) || hmm_space_create(machine, NULL, &space) ||
        hmm_device_create(machine, 0, HMM_DEVICE_PRIVATE, 64 << 20, &device) ||
        hmm_mirror_open(device, space, &mirror) ||
        hmm_region_allocate(space, 64 * 4096, PROT_READ | PROT_WRITE, 0, 1, &region)) {
        fprintf(stderr, "abi-bench: %s\n", hmm_last_error());
        return 1;
    }
    uint64_t base, length;
    hmm_region_range(region, &base, &length);
    memset((void *)(uintptr_t)base, 7, length);
    char *buf = aligned_alloc(4096, 64 * 4096); /* as the Swift half's buffer */
    struct hmm_mirror_result r;
    for (int warm = 0; warm < 2; warm++) {
        double t0 = now_ns();
        for (long i = 0; i < n; i++) {
            int rc = migrate ? hmm_mirror_migrate_to_device(mirror, base, 64, NULL, &r) ||
                                   hmm_mirror_migrate_to_system(mirror, base, 64, &r)
                             : hmm_mirror_read(mirror, base, 1, buf, &r);
            if (rc) {
                fprintf(stderr, "abi-bench: %s\n", hmm_last_error());
                return 1;
            }
        }
        if (warm) printf("%.1f\n", (now_ns() - t0) / (double)n);
    }
    hmm_mirror_close(mirror);
    hmm_device_destroy(device);
    hmm_space_close(space);
    hmm_machine_destroy(machine);
    return 0;
}
