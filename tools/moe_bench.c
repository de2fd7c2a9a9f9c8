/* moe_bench.c -- throwaway timing of moe_ffn_forward on the bench preset's MoE
 * shape (n_embd 1024, 32 experts of width 512, top-4), rotating through 4 layers
 * of weights (768 MB) so they come from DRAM. Prints time per layer and the
 * GB/s of the selected experts' weights. Build:
 *   cc -O3 -march=native -I. $(pkg-config --cflags openblas) tools/moe_bench.c \
 *      core/moe_layer.c core/matmul.c core/pool.c core/ops.c core/arch.c \
 *      -o /tmp/moeb $(pkg-config --libs openblas) -lpthread -lm
 */
#include "core/moe_layer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D 1024
#define FF 512
#define E 32
#define K 4
#define LAYERS 4
#define MAXN 64

static double clock_s(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float *rand_array(size_t n, float scale, uint32_t *s)
{
    float *a = malloc(n * sizeof *a);
    for (size_t i = 0; i < n; i++) {
        *s = *s * 1664525u + 1013904223u;
        a[i] = ((float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f) * scale;
    }
    return a;
}

int main(void)
{
    uint32_t seed = 1;
    moe_hparams hp = {.arch = MOE_ARCH_LLAMA, .n_embd = D, .n_ff = FF, .n_expert = E, .n_expert_used = K};
    moe_layer_weights L[LAYERS];
    memset(L, 0, sizeof L);
    for (int l = 0; l < LAYERS; l++) {
        L[l].router = rand_array((size_t)E * D, 0.1f, &seed);
        L[l].exp_gate = rand_array((size_t)E * FF * D, 0.03f, &seed);
        L[l].exp_up = rand_array((size_t)E * FF * D, 0.03f, &seed);
        L[l].exp_down = rand_array((size_t)E * D * FF, 0.04f, &seed);
    }
    float *x = rand_array((size_t)MAXN * D, 1.0f, &seed), *out = malloc((size_t)MAXN * D * sizeof *out);
    const moe_arch_info *a = moe_arch_get(MOE_ARCH_LLAMA);
    char err[128];
    printf("%4s %3s %10s %6s %9s %5s\n", "rows", "thr", "us/layer", "exp", "GB/s", "cpu%");
    for (int t = 1; t <= 2; t++) {
        pool *p;
        moe_ffn *f;
        if (pool_create(t, &p, err, sizeof err) || moe_ffn_create(&hp, MAXN, t, &f, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        int ns[] = {1, 4, 16, 64};
        for (int ni = 0; ni < 4; ni++) {
            int n = ns[ni], reps = 16;
            double best = 1e9, best_cpu = 0, bytes = 0;
            for (int trial = 0; trial < 5; trial++) {
                uint64_t routed[E] = {0};
                moe_ffn_opts o = {.routed = routed};
                double t0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
                for (int r = 0; r < reps; r++) moe_ffn_forward(f, p, a, &L[r % LAYERS], x, n, out, &o);
                double dt = (clock_s(CLOCK_MONOTONIC) - t0) / reps;
                double dc = (clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0) / reps;
                /* distinct experts per layer call are not kept; approximate with
                 * the routed counts, capped at one read per expert per call */
                (void)routed;
                if (dt < best) { best = dt; best_cpu = dc; }
            }
            /* bytes: union of experts the n rows select (same x for every layer
             * call, so compute it once per layer from the trace) */
            int32_t trace[MAXN * K];
            moe_ffn_opts o = {.trace_expert = trace, .trace_stride = K};
            double used = 0;
            for (int l = 0; l < LAYERS; l++) {
                moe_ffn_forward(f, p, a, &L[l], x, n, out, &o);
                int sel[E] = {0};
                for (int i = 0; i < n * K; i++) sel[trace[i]] = 1;
                for (int e = 0; e < E; e++) used += sel[e];
            }
            used /= LAYERS;
            bytes = used * 3.0 * FF * D * 4 + (double)E * D * 4;
            printf("%4d %3d %10.1f %6.1f %9.1f %5.0f\n", n, t, best * 1e6, used, bytes / best / 1e9,
                   100.0 * best_cpu / best / t);
        }
        moe_ffn_free(f);
        pool_free(p);
    }
    return 0;
}
