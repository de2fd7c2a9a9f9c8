/* decode_bench.c -- throwaway timing of decode steps on a model file, for A/B work
 * on the kernels (faster than `moe bench`: no bandwidth/sgemm/prefill runs).
 * Usage: [DECODE_CTX=N] [DECODE_KV=f32|f16] decode_bench MODEL THREADS STEPS REPS B1 [B2 ...]
 * Each sequence is prefilled with N tokens (default 64, at most 2048: the KV
 * cache is sized for 64 sequences of N + STEPS positions) before its steps, so
 * long contexts show what attention costs. Prints, per batch size, tok/s of each
 * repetition and the best, each repetition preceded by its own read-bandwidth
 * pass ([raw GB/s]) and followed by its step's milliseconds by phase in
 * moe_phase order (projections/attention/routing/experts/combine/logits/other,
 * moe_engine_phase_seconds): the host's bandwidth moves from minute to minute, so an A/B
 * of two builds alternates them and compares rounds that met the same raw rate.
 * Built by `make tools` (and `make test`) as build/tools/decode_bench; the other
 * side of an A/B by `make tools BUILD=DIR` in the other tree.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/membw.h"
#include "core/clock.h"
#include "core/engine.h"
#include "core/hugemem.h"
#include "core/pool.h"
#include "models/model_file.h"

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL THREADS STEPS REPS B...\n", argv[0]);
        return 2;
    }
    char err[256];
    moe_model *m;
    if (moe_model_load(argv[1], &m, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int threads = atoi(argv[2]), steps = atoi(argv[3]), reps = atoi(argv[4]);
    const char *ctx_env = getenv("DECODE_CTX");
    int ctx0 = ctx_env ? atoi(ctx_env) : 64;
    if (ctx0 < 1 || ctx0 > 2048 || steps < 1 || steps > 2048) {
        fprintf(stderr, "DECODE_CTX must be 1..2048 and STEPS 1..2048\n");
        return 2;
    }
    const moe_hparams *hp = &m->weights.hp;
    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = threads;
    ep.max_seqs = 64;
    ep.max_batch_tokens = 512;
    ep.max_seq_len = ctx0 + steps;
    ep.kv_n_blocks = 64 * ((ctx0 + steps + ep.kv_block_size - 1) / ep.kv_block_size);
    const char *kv_env = getenv("DECODE_KV");
    if (kv_env && kv_type_parse(kv_env, &ep.kv_type)) {
        fprintf(stderr, "DECODE_KV must be f32 or f16\n");
        return 2;
    }
    moe_engine *e;
    if (moe_engine_create(&m->weights, &ep, &e, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    size_t bw_n = (size_t)384 * 1024 * 1024;   /* 1.5 GB: well past the L3 */
    float *bw = hugemem_alloc(bw_n * sizeof *bw);
    pool *bw_pool;
    if (!bw || pool_create(threads, &bw_pool, err, sizeof err)) {
        fprintf(stderr, "no memory or threads for the bandwidth pass\n");
        return 1;
    }
    for (size_t i = 0; i < bw_n; i++) bw[i] = 1.0f;
    membw rd = {.a = bw, .n = bw_n, .n_tasks = MEMBW_MAX_TASKS};
    int32_t tok[512], pos[512], seq[512];
    uint8_t want[512];
    float *logits = malloc((size_t)64 * hp->n_vocab * sizeof *logits);
    for (int bi = 5; bi < argc; bi++) {
        int B = atoi(argv[bi]);
        if (B < 1 || B > 64) continue;
        printf("batch %2d:", B);
        double best = 0;
        for (int r = 0; r < reps; r++) {
            for (int q = 0; q < B; q++) {
                moe_engine_seq_release(e, q);
                if (moe_engine_seq_reserve(e, q, ctx0 + steps, err, sizeof err)) {
                    fprintf(stderr, "%s\n", err);
                    return 1;
                }
                for (int p0 = 0; p0 < ctx0; p0 += 512) {   /* prefill in batches of 512 */
                    int n = ctx0 - p0 < 512 ? ctx0 - p0 : 512;
                    for (int i = 0; i < n; i++) {
                        tok[i] = (q * 131 + (p0 + i) * 7919 + 3) % hp->n_vocab;
                        pos[i] = p0 + i; seq[i] = q; want[i] = 0;
                    }
                    moe_batch b = {.n_tokens = n, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
                    if (moe_engine_forward(e, &b, logits, err, sizeof err)) {
                        fprintf(stderr, "%s\n", err);
                        return 1;
                    }
                }
            }
            printf(" [raw %5.1f]", membw_read_gbs(bw_pool, &rd, 1));
            double ph0[MOE_PHASE_COUNT], ph1[MOE_PHASE_COUNT];
            moe_engine_phase_seconds(e, ph0);
            double t0 = clock_mono_s();
            for (int st = 0; st < steps; st++) {
                for (int q = 0; q < B; q++) {
                    tok[q] = (q * 31 + st * 17 + 5) % hp->n_vocab;
                    pos[q] = ctx0 + st; seq[q] = q; want[q] = 1;
                }
                moe_batch b = {.n_tokens = B, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
                if (moe_engine_forward(e, &b, logits, err, sizeof err)) {
                    fprintf(stderr, "%s\n", err);
                    return 1;
                }
            }
            double tps = B * steps / (clock_mono_s() - t0);
            if (tps > best) best = tps;
            moe_engine_phase_seconds(e, ph1);
            printf(" %6.1f (", tps);
            for (int ph = 0; ph < MOE_PHASE_COUNT; ph++)
                printf("%s%.1f", ph ? "/" : "", (ph1[ph] - ph0[ph]) * 1e3 / steps);
            printf(" ms)");
            fflush(stdout);
        }
        printf("   best %6.1f tok/s\n", best);
    }
    moe_engine_free(e);
    pool_free(bw_pool);
    hugemem_free(bw, bw_n * sizeof *bw);
    free(logits);
    moe_model_free(m);
    return 0;
}
