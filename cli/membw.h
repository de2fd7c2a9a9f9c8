/* membw.h -- the memory read pass the benchmarks take their bandwidth from.
 *
 *   membw r = {.a = array, .n = floats, .n_tasks = 64};
 *   double gbs = membw_read_gbs(pool, &r, reps);   // best of reps passes, GB/s
 *
 * Used by `moe bench` (beside every figure) and tools/decode_bench.c (beside every
 * repetition), so both compare against the same read rate.
 */
#ifndef MOE_CLI_MEMBW_H
#define MOE_CLI_MEMBW_H

#include <stddef.h>

#include "core/pool.h"

#define MEMBW_MAX_TASKS 64

typedef struct {
    const float *a;   /* n floats, the caller's: in huge pages, and many times the L3 */
    size_t n;
    int n_tasks;      /* chunks, claimed dynamically (1..MEMBW_MAX_TASKS; clamped) */
    double sums[MEMBW_MAX_TASKS];   /* per chunk, so the reads cannot be optimised away */
} membw;

/* Best of reps timed passes over r->a; returns GB/s. */
double membw_read_gbs(pool *p, membw *r, int reps);

/* Best of reps timed pool_run(p, n_tasks, fn, ctx), each moving bytes_per_pass;
 * returns GB/s (the read pass above, and other kernels such as STREAM's triad). */
double membw_pass_gbs(pool *p, int n_tasks, pool_fn fn, void *ctx, double bytes_per_pass, int reps);

#endif
