/* clock.h -- monotonic wall time in seconds: the one clock of the engine's
 * phase timings (moe_engine_phase_seconds: a vDSO call of tens of nanoseconds,
 * a few hundred of them a forward), the server's durations, the loader's and
 * the benchmarks'. */
#ifndef MOE_CORE_CLOCK_H
#define MOE_CORE_CLOCK_H

#include <time.h>

static inline double clock_mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
