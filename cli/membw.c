/* membw.c -- the memory read pass (see membw.h). */
#include "cli/membw.h"
#include "core/clock.h"

#include <string.h>

/* Eight independent vector sums, so the loop is limited by memory, not by the
 * latency of one chain of additions (a too-slow read loop would understate the
 * bandwidth and flatter every roofline ratio). */
typedef float membw_vec __attribute__((vector_size(32)));

static void read_task(void *vctx, int task, int thread)
{
    (void)thread;
    membw *r = vctx;
    size_t lo = r->n * (size_t)task / (size_t)r->n_tasks, hi = r->n * (size_t)(task + 1) / (size_t)r->n_tasks;
    membw_vec acc[8] = {{0}};
    size_t i = lo;
    for (; i + 64 <= hi; i += 64)
        for (int j = 0; j < 8; j++) {
            membw_vec v;
            memcpy(&v, r->a + i + 8 * j, sizeof v);
            acc[j] += v;
        }
    double t = 0;
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 8; l++) t += acc[j][l];
    for (; i < hi; i++) t += r->a[i];
    r->sums[task] = t;
}

double membw_pass_gbs(pool *p, int n_tasks, pool_fn fn, void *ctx, double bytes_per_pass, int reps)
{
    double best = 1e30;
    for (int i = 0; i < reps; i++) {
        double t0 = clock_mono_s();
        pool_run(p, n_tasks, fn, ctx);
        double dt = clock_mono_s() - t0;
        if (dt < best) best = dt;
    }
    return bytes_per_pass / best / 1e9;
}

double membw_read_gbs(pool *p, membw *r, int reps)
{
    if (r->n_tasks < 1) r->n_tasks = 1;
    if (r->n_tasks > MEMBW_MAX_TASKS) r->n_tasks = MEMBW_MAX_TASKS;
    return membw_pass_gbs(p, r->n_tasks, read_task, r, (double)r->n * sizeof(float), reps);
}
