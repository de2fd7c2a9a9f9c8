/* matmul_bench.c -- throwaway timing of core/matmul.c on the shapes of MoE decode
 * and prefill: weights streamed (GB/s) and GFLOP/s at m rows, 1 and 2 threads.
 * "cold" rotates through 256 MB of weight matrices (what a step over many experts
 * sees), "hot" reuses one. Build, e.g. with the path forced:
 *   cc -O3 -march=native -I. $(pkg-config --cflags openblas) -DSGEMM_MIN_ROWS=100000 \
 *      tools/matmul_bench.c core/matmul.c core/pool.c -o /tmp/mb $(pkg-config --libs openblas) -lpthread
 */
#include "core/matmul.h"
#include "core/pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clock_s(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

typedef struct {
    const float *a;
    size_t n;
    double sum[8];
} read_job;

typedef float v16 __attribute__((vector_size(64)));

/* Sums 1/64 of the array with 4 vector accumulators and a software prefetch 4 KB
 * ahead (on these VMs one sequential stream without it reaches only 7-10 GB/s). */
static void read_task(void *ctx, int task, int thread)
{
    read_job *j = ctx;
    size_t per = j->n / 64, i0 = (size_t)task * per;
    v16 s[4] = {{0}, {0}, {0}, {0}};
    for (size_t i = i0; i + 64 <= i0 + per; i += 64) {
        for (int u = 0; u < 4; u++) __builtin_prefetch(j->a + i + 1024 + 16 * u, 0, 2);
        for (int u = 0; u < 4; u++) {
            v16 v;
            memcpy(&v, j->a + i + 16 * u, sizeof v);
            s[u] += v;
        }
    }
    v16 t = s[0] + s[1] + s[2] + s[3];
    for (int l = 0; l < 16; l++) j->sum[thread] += t[l];
}

int main(int argc, char **argv)
{
    int reps_min = argc > 1 ? atoi(argv[1]) : 20;
    const size_t pool_bytes = (size_t)256 << 20;
    float *big = malloc(pool_bytes);
    for (size_t i = 0; i < pool_bytes / 4; i++) big[i] = (float)(i % 97) * 0.01f;
    float *x = malloc(512 * 2048 * sizeof *x), *y = malloc(512 * 2048 * sizeof *y);
    for (int i = 0; i < 512 * 2048; i++) x[i] = (float)(i % 13) * 0.1f;
    char err[128];
    pool *pools[2];
    for (int t = 0; t < 2; t++) pool_create(t + 1, &pools[t], err, sizeof err);

    for (int t = 0; t < 2; t++) {
        read_job j = {big, pool_bytes / 4, {0}};
        double best = 1e9;
        for (int r = 0; r < 5; r++) {
            double t0 = now();
            pool_run(pools[t], 64, read_task, &j);
            double dt = now() - t0;
            best = dt < best ? dt : best;
        }
        printf("read bandwidth, %d thread(s): %.1f GB/s (best of 5, sum %g)\n", t + 1,
               pool_bytes / best / 1e9, j.sum[0]);
    }
    printf("sgemm_min_rows %d\n", matmul_sgemm_min_rows());
    /* cpu%: CPU time of the process / (wall * threads): below 100 the threads
     * were not running (shared machine) or were waiting. */
    printf("%-10s %4s %3s %5s %9s %9s %9s %5s %9s\n", "W(n,k)", "m", "thr", "", "us/call", "GB/s",
           "GFLOP/s", "cpu%", "GF/cpu-s");
    int shapes[2][2] = {{1024, 2048}, {2048, 1024}};
    int ms[16], nms = 0;
    if (argc > 2) for (char *p = argv[2]; *p && nms < 16;) { ms[nms++] = (int)strtol(p, &p, 10); if (*p == ',') p++; }
    else { int d[] = {1, 2, 4, 8, 12, 16, 24, 32, 64}; for (; nms < 9; nms++) ms[nms] = d[nms]; }
    for (int s = 0; s < 2; s++) {
        int n = shapes[s][0], k = shapes[s][1];
        size_t wbytes = (size_t)n * k * 4, nmat = pool_bytes / wbytes;
        for (int mi = 0; mi < nms; mi++)
            for (int t = 0; t < 2; t++)
                for (int cold = 1; cold >= 0; cold--) {
                    int m = ms[mi];
                    int reps = m >= 128 ? 2 : reps_min * (m <= 8 ? 2 : 1);
                    matmul(pools[t], x, m, k, big, n, y);   /* warm up */
                    /* best of 7 trials: the cores are shared, the best trial is
                     * the one that had them */
                    double dt = 1e9, dc = 0;
                    for (int trial = 0; trial < 7; trial++) {
                        double t0 = now(), c0 = cpu();
                        for (int r = 0; r < reps; r++)
                            matmul(pools[t], x, m, k,
                                   big + (cold ? (size_t)((r + trial * reps) % nmat) * n * k : 0), n, y);
                        double w = (now() - t0) / reps;
                        if (w < dt) { dt = w; dc = (cpu() - c0) / reps; }
                    }
                    printf("%4dx%-5d %4d %3d %5s %9.1f %9.1f %9.1f %5.0f %9.1f\n", n, k, m, t + 1,
                           cold ? "cold" : "hot", dt * 1e6, wbytes / dt / 1e9,
                           2.0 * m * n * k / dt / 1e9, 100.0 * dc / dt / (t + 1), 2.0 * m * n * k / dc / 1e9);
                }
    }
    for (int t = 0; t < 2; t++) pool_free(pools[t]);
    free(big); free(x); free(y);
    return 0;
}
