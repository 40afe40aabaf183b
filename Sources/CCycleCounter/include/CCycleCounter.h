#ifndef CCYCLECOUNTER_H
#define CCYCLECOUNTER_H
#include <stdint.h>

/// The CPU's free-running cycle counter (x86-64 TSC, AArch64 CNTVCT_EL0), or 0 where there is none:
/// about 10 ns a read against about 23 ns for clock_gettime(CLOCK_MONOTONIC) through the vDSO.
static inline uint64_t cc_cycles(void) {
#if defined(__x86_64__)
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#elif defined(__aarch64__)
    uint64_t v;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(v));
    return v;
#else
    return 0;
#endif
}

#endif
