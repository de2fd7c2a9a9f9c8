/* test_pool.c -- the worker pool runs every task exactly once, on valid threads. */
#include "core/pool.h"
#include "tests/testutil.h"

#include <stdatomic.h>

#define MAX_TASKS 5000

typedef struct {
    atomic_int count[MAX_TASKS];
    atomic_int bad_thread;
    int n_threads;
} tally;

static void count_task(void *ctx, int task, int thread)
{
    tally *t = ctx;
    atomic_fetch_add(&t->count[task], 1);
    if (thread < 0 || thread >= t->n_threads) atomic_fetch_add(&t->bad_thread, 1);
}

static void tally_reset(tally *t, int n_threads)
{
    for (int i = 0; i < MAX_TASKS; i++) atomic_store(&t->count[i], 0);
    atomic_store(&t->bad_thread, 0);
    t->n_threads = n_threads;
}

START_TEST(every_task_runs_exactly_once)
{
    static tally t;
    char err[128];
    for (int nt = 1; nt <= 4; nt++) {
        pool *p = NULL;
        ck_assert_int_eq(pool_create(nt, &p, err, sizeof err), 0);
        ck_assert_int_eq(pool_n_threads(p), nt);
        /* Many runs of varying size, back to back, reusing the same workers. */
        for (int run = 0; run < 300; run++) {
            int n = (run * 37) % 131;
            if (run % 50 == 7) n = MAX_TASKS;
            tally_reset(&t, nt);
            pool_run(p, n, count_task, &t);
            /* count mismatches first: a Check assertion costs a syscall */
            int wrong = 0;
            for (int i = 0; i < MAX_TASKS; i++) wrong += atomic_load(&t.count[i]) != (i < n);
            ck_assert_msg(wrong == 0, "%d threads, run %d: %d tasks ran != once", nt, run, wrong);
            ck_assert_int_eq(atomic_load(&t.bad_thread), 0);
        }
        pool_free(p);
    }
}
END_TEST

typedef struct {
    atomic_int used[4];
} spread;

/* Slow tasks: with several threads, more than one thread ends up taking part. */
static void slow_task(void *ctx, int task, int thread)
{
    spread *s = ctx;
    (void)task;
    atomic_fetch_add(&s->used[thread], 1);
    usleep(2000);
}

START_TEST(workers_take_part)
{
    char err[128];
    pool *p = NULL;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    spread s;
    for (int i = 0; i < 4; i++) atomic_store(&s.used[i], 0);
    pool_run(p, 200, slow_task, &s);
    ck_assert_int_eq(atomic_load(&s.used[0]) + atomic_load(&s.used[1]), 200);
    ck_assert_int_gt(atomic_load(&s.used[1]), 0);
    pool_free(p);
}
END_TEST

START_TEST(null_pool_runs_inline)
{
    static tally t;
    tally_reset(&t, 1);
    pool_run(NULL, 10, count_task, &t);
    for (int i = 0; i < 10; i++) ck_assert_int_eq(atomic_load(&t.count[i]), 1);
    ck_assert_int_eq(pool_n_threads(NULL), 1);
    pool_run(NULL, 0, count_task, &t);
    pool_run(NULL, -3, count_task, &t);
    ck_assert_int_eq(atomic_load(&t.count[10]), 0);
}
END_TEST

START_TEST(bad_thread_counts_rejected)
{
    char err[128] = "";
    pool *p = (pool *)&err;
    ck_assert_int_eq(pool_create(0, &p, err, sizeof err), -1);
    ck_assert_ptr_null(p);
    ck_assert(strstr(err, "thread count") != NULL);
    ck_assert_int_eq(pool_create(-1, &p, err, sizeof err), -1);
    ck_assert_int_eq(pool_create(100000, &p, err, sizeof err), -1);
    pool_free(NULL);
}
END_TEST

START_TEST(create_and_free_without_runs)
{
    char err[128];
    for (int i = 0; i < 20; i++) {
        pool *p = NULL;
        ck_assert_int_eq(pool_create(1 + i % 4, &p, err, sizeof err), 0);
        pool_free(p);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("pool");
    TCase *tc = tcase_create("pool");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, every_task_runs_exactly_once);
    tcase_add_test(tc, workers_take_part);
    tcase_add_test(tc, null_pool_runs_inline);
    tcase_add_test(tc, bad_thread_counts_rejected);
    tcase_add_test(tc, create_and_free_without_runs);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
