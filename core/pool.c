/* pool.c -- a fixed set of worker threads running parallel-for jobs.
 *
 * A job is published by bumping `generation`; workers spin briefly on it (a decode
 * step runs a few pool_runs per layer, milliseconds apart, so a sleeping worker
 * would pay a futex wake-up each time) and then sleep on a condition variable.
 * The caller is thread 0 and takes part.
 *
 * Claiming: the tasks are cut into one contiguous segment per thread; a thread
 * claims the tasks of its own segment in order, then claims what is left of the
 * others'. Consecutive tasks usually read consecutive memory (slices of one
 * weight matrix), so each thread streams one long run the hardware prefetcher
 * follows instead of hopping between short pieces (tasks handed out round-robin
 * from one counter cost decode 10-30%), while fine tasks keep the tail at the
 * barrier short and a slow thread (the cores are shared) simply claims fewer. */
#include "core/pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define POOL_MAX_THREADS 256
/* Pause iterations before a waiting thread sleeps (a pause is ~15-40 ns on x86,
 * so tens of microseconds: long enough to bridge the gaps between the jobs of one
 * step, short enough not to steal a shared core for long). */
#define POOL_SPIN 4000

/* One thread's share of the current job's tasks, on its own cache line. */
typedef struct {
    atomic_int next;            /* next unclaimed task of the segment */
    int end;
    char pad[64 - sizeof(atomic_int) - sizeof(int)];
} pool_segment;

struct pool {
    int n_threads;              /* including the caller */
    pthread_t *threads;         /* (n_threads - 1) workers */
    struct worker_arg *args;    /* (n_threads - 1) */
    int n_started;              /* workers actually created (for unwinding) */

    pthread_mutex_t mu;
    pthread_cond_t wake;        /* a new generation (or stop) */
    pthread_cond_t done;        /* pending reached 0 */

    atomic_uint_fast64_t generation;
    atomic_int stop;
    pool_segment *seg;          /* (n_threads) */
    atomic_int pending;         /* workers still inside the current job */

    /* The current job: written by pool_run before the generation bump (release),
     * read by workers after they see it (acquire). */
    int n_tasks;
    pool_fn fn;
    void *ctx;
};

struct worker_arg {
    pool *p;
    int id;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs tasks until none are left: its own segment first, then the
 * rest of the others' in turn. */
static void pool_drain(pool *p, int thread)
{
    int n = p->n_threads;
    for (int i = 0; i < n; i++) {
        pool_segment *s = &p->seg[(thread + i) % n];
        for (;;) {
            int t = atomic_fetch_add_explicit(&s->next, 1, memory_order_relaxed);
            if (t >= s->end) break;
            p->fn(p->ctx, t, thread);
        }
    }
}

/* Waits for a generation other than `seen` (or stop); returns the new one. */
static uint64_t pool_wait_job(pool *p, uint64_t seen)
{
    for (int i = 0; i < POOL_SPIN; i++) {
        uint64_t g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen || atomic_load_explicit(&p->stop, memory_order_relaxed)) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    uint64_t g;
    while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
           !atomic_load_explicit(&p->stop, memory_order_relaxed))
        pthread_cond_wait(&p->wake, &p->mu);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *pool_worker(void *arg)
{
    struct worker_arg *wa = arg;
    pool *p = wa->p;
    uint64_t seen = 0;
    for (;;) {
        seen = pool_wait_job(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) break;
        pool_drain(p, wa->id);
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

/* Stops and joins the started workers, then frees everything. */
void pool_free(pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store_explicit(&p->stop, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p->seg);
    free(p->args);
    free(p->threads);
    free(p);
}

int pool_create(int n_threads, pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > POOL_MAX_THREADS) {
        snprintf(err, errlen, "thread count %d out of range 1..%d", n_threads, POOL_MAX_THREADS);
        return -1;
    }
    pool *p = calloc(1, sizeof *p);
    if (!p) goto fail_alloc;
    p->n_threads = n_threads;
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    p->args = calloc((size_t)n_threads, sizeof *p->args);
    p->seg = aligned_alloc(sizeof(pool_segment), (size_t)n_threads * sizeof(pool_segment));
    if (!p->threads || !p->args || !p->seg) goto fail_arrays;
    for (int i = 0; i < n_threads; i++) {
        atomic_init(&p->seg[i].next, 0);
        p->seg[i].end = 0;
    }
    if (pthread_mutex_init(&p->mu, NULL)) goto fail_arrays;
    if (pthread_cond_init(&p->wake, NULL)) goto fail_mutex;
    if (pthread_cond_init(&p->done, NULL)) goto fail_wake;
    atomic_init(&p->generation, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->pending, 0);
    for (int i = 0; i < n_threads - 1; i++) {
        p->args[i] = (struct worker_arg){p, i + 1};
        int rc = pthread_create(&p->threads[i], NULL, pool_worker, &p->args[i]);
        if (rc) {
            snprintf(err, errlen, "cannot start worker thread: %s", strerror(rc));
            pool_free(p);   /* joins the workers started so far */
            return -1;
        }
        p->n_started++;
    }
    *out = p;
    return 0;

fail_wake:
    pthread_cond_destroy(&p->wake);
fail_mutex:
    pthread_mutex_destroy(&p->mu);
fail_arrays:
    free(p->seg);
    free(p->args);
    free(p->threads);
    free(p);
fail_alloc:
    snprintf(err, errlen, "out of memory creating a pool of %d threads", n_threads);
    return -1;
}

/* Runs fn(ctx, task, thread) for every task in [0, n_tasks) and returns when all
 * have finished. A NULL pool, one thread or one task run inline. */
void pool_run(pool *p, int n_tasks, pool_fn fn, void *ctx)
{
    if (n_tasks <= 0) return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->n_tasks = n_tasks;
    p->fn = fn;
    p->ctx = ctx;
    for (int i = 0; i < p->n_threads; i++) {
        atomic_store_explicit(&p->seg[i].next, (int)((int64_t)n_tasks * i / p->n_threads),
                              memory_order_relaxed);
        p->seg[i].end = (int)((int64_t)n_tasks * (i + 1) / p->n_threads);
    }
    atomic_store_explicit(&p->pending, p->n_threads - 1, memory_order_relaxed);

    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    pool_drain(p, 0);

    for (int i = 0; i < POOL_SPIN; i++) {
        if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0) return;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    while (atomic_load_explicit(&p->pending, memory_order_acquire) != 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

int pool_n_threads(const pool *p)
{
    return p ? p->n_threads : 1;
}
