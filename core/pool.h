/* pool.h -- a fixed set of worker threads running parallel-for jobs.
 *
 *   pool *p; pool_create(2, &p, err, sizeof err);
 *   pool_run(p, n_tasks, fn, ctx);   // fn(ctx, task, thread) for every task, returns when all ran
 *   pool_free(p);
 *
 * The calling thread takes part, so n_threads == 1 means no extra thread. Tasks are
 * claimed dynamically; a task's result must not depend on which thread ran it (use
 * `thread` only to pick per-thread scratch), which is how the engine stays
 * bit-identical across thread counts. One pool_run at a time per pool; a NULL
 * pool runs the tasks serially on the calling thread.
 */
#ifndef MOE_CORE_POOL_H
#define MOE_CORE_POOL_H

#include <stddef.h>

typedef struct pool pool;
typedef void (*pool_fn)(void *ctx, int task, int thread);

int pool_create(int n_threads, pool **out, char *err, size_t errlen);
void pool_free(pool *p);
void pool_run(pool *p, int n_tasks, pool_fn fn, void *ctx);
int pool_n_threads(const pool *p);

#endif
