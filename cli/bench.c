/* bench.c -- `moe bench` and `moe eval`.
 *
 * bench measures, in one run, this machine's memory bandwidth and sgemm peak, then
 * the engine's prefill and decode throughput, and prints each figure beside its
 * roofline bound: decode is bound by the weight bytes a step must read (the experts
 * actually selected in that step, attention, router and output) over the measured
 * bandwidth; prefill by its FLOPs over the measured matmul peak.
 */
#include "cli/bench.h"
#include "cli/membw.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/engine.h"
#include "core/hugemem.h"
#include "core/matmul.h"
#include "core/packed.h"
#include "core/pool.h"
#include "models/model_file.h"
#include "models/tokenizer.h"

/* Memory bandwidth ------------------------------------------------------- */

typedef struct {
    float *a, *b, *c;
    size_t n;          /* floats per array */
    int n_tasks;
    membw read;        /* the read pass over a */
} bw_ctx;

static void bw_init_task(void *vctx, int task, int thread)
{
    (void)thread;
    bw_ctx *x = vctx;
    size_t lo = x->n * (size_t)task / (size_t)x->n_tasks, hi = x->n * (size_t)(task + 1) / (size_t)x->n_tasks;
    for (size_t i = lo; i < hi; i++) { x->a[i] = 1.0f; x->b[i] = 2.0f; x->c[i] = 0.5f; }
}

static void bw_triad_task(void *vctx, int task, int thread)
{
    (void)thread;
    bw_ctx *x = vctx;
    size_t lo = x->n * (size_t)task / (size_t)x->n_tasks, hi = x->n * (size_t)(task + 1) / (size_t)x->n_tasks;
    for (size_t i = lo; i < hi; i++) x->a[i] = x->b[i] + 3.0f * x->c[i];
}

/* Floats per bandwidth array: STREAM's rule, each array at least 4x the last-level
 * cache, so the figure is memory's and not the cache's. This host's L3 reports
 * 508 MiB (a big shared cache the VM sees); 512 MB arrays read 6-10 GB/s faster
 * than 1-4 GB ones, measured back to back. At least 512 MB (128 MB --quick), and
 * at most 1/8 of the memory per array (three for triad). */
static size_t bw_array_floats(int quick)
{
    size_t bytes = (size_t)(quick ? 128 : 512) << 20;
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (!quick && l3 > 0 && (size_t)l3 <= SIZE_MAX / 4 && 4 * (size_t)l3 > bytes) bytes = 4 * (size_t)l3;
    if (pages > 0 && psz > 0 && (double)bytes > (double)pages * (double)psz / 8.0)
        bytes = (size_t)((double)pages * (double)psz / 8.0);
    bytes = (bytes + ((size_t)64 << 20) - 1) / ((size_t)64 << 20) * ((size_t)64 << 20);
    return bytes / sizeof(float);
}

static void bw_free(bw_ctx *x)
{
    size_t bytes = x->n * sizeof(float);
    hugemem_free(x->a, bytes); hugemem_free(x->b, bytes); hugemem_free(x->c, bytes);
    x->a = x->b = x->c = NULL;
}

/* Measures read and triad bandwidth, then keeps the read array (x->a) for the
 * read measurements taken beside each decode figure (bench_engine); the caller
 * frees it with bw_free. */
static int measure_bandwidth(pool *p, int quick, bw_ctx *x, double *read_gbs, double *triad_gbs,
                             char *err, size_t errlen)
{
    /* Many chunks claimed dynamically: one descheduled thread does not stall the pass. */
    *x = (bw_ctx){.n = bw_array_floats(quick), .n_tasks = 16 * pool_n_threads(p)};
    if (x->n_tasks > MEMBW_MAX_TASKS) x->n_tasks = MEMBW_MAX_TASKS;
    size_t bytes = x->n * sizeof(float);
    x->a = hugemem_alloc(bytes);
    x->b = hugemem_alloc(bytes);
    x->c = hugemem_alloc(bytes);
    if (!x->a || !x->b || !x->c) {
        bw_free(x);
        snprintf(err, errlen, "out of memory for the bandwidth arrays (3 x %zu MB)", bytes >> 20);
        return -1;
    }
    pool_run(p, x->n_tasks, bw_init_task, x);   /* first touch on the threads that read */
    x->read = (membw){.a = x->a, .n = x->n, .n_tasks = x->n_tasks};
    *read_gbs = membw_read_gbs(p, &x->read, quick ? 3 : 8);
    *triad_gbs = membw_pass_gbs(p, x->n_tasks, bw_triad_task, x, 3.0 * (double)bytes, quick ? 2 : 5);
    hugemem_free(x->b, bytes); hugemem_free(x->c, bytes);
    x->b = x->c = NULL;
    return 0;
}

/* Matmul peak, the compute roof: the best of OpenBLAS sgemm on a large square
 * (the experts' path in prefill), the engine's few-rows kernel at 48 rows (the
 * experts' path in decode) and, where the build has it, the packed kernel of the
 * projections (core/packed.h) on the same square, all on the pool. The kernels
 * are AVX-512 where the CPU has it, while OpenBLAS may run 256-bit kernels
 * (OPENBLAS_CORETYPE), so any can be the fastest; the roof is whichever is. Like
 * the bandwidth, it is measured again beside every timed figure: the host's share
 * of the cores moves. */
typedef struct {
    int n;                        /* square side */
    float *x, *w, *y;             /* (n, n) each */
    packed_w *pw;                 /* w packed, when the build has the kernel */
    packed_scratch *ps;
    double sgemm, kernel, packed; /* GFLOP/s of the last measure (packed 0: none; sgemm
                                   * the first, where the engine never calls it) */
} peak_ctx;

#define PEAK_KERNEL_ROWS 48
#define PEAK_PACKED_ROWS 512   /* a prefill chunk (the engine's default batch) */

static void peak_free(peak_ctx *c)
{
    free(c->x); free(c->w); free(c->y);
    packed_w_free(c->pw);
    packed_scratch_free(c->ps);
}

static int peak_init(pool *p, peak_ctx *c, char *err, size_t errlen)
{
    c->n = 2048;   /* --quick too: a smaller square runs sgemm below its peak */
    size_t sz = (size_t)c->n * (size_t)c->n;
    c->x = malloc(sz * sizeof *c->x); c->w = malloc(sz * sizeof *c->w); c->y = malloc(sz * sizeof *c->y);
    if (!c->x || !c->w || !c->y) {
        peak_free(c);
        snprintf(err, errlen, "out of memory for the matmul peak arrays");
        return -1;
    }
    for (size_t i = 0; i < sz; i++) { c->x[i] = (float)(i % 7) * 0.1f; c->w[i] = (float)(i % 5) * 0.1f; }
    if (packed_supported() &&
        (packed_w_create(p, c->w, c->n, c->n, &c->pw, err, errlen) ||
         packed_scratch_create(PEAK_PACKED_ROWS, c->n, pool_n_threads(p), &c->ps, err, errlen))) {
        peak_free(c);
        return -1;
    }
    return 0;
}

/* The best of reps runs of m rows against the square: the whole square on
 * OpenBLAS sgemm, fewer rows on core/matmul.c's kernel, or, with packed, on the
 * packed kernel. */
static double best_gflops(pool *p, const peak_ctx *c, int m, int reps, int packed)
{
    double best = 1e30;
    packed_out o = {c->pw, c->y};
    for (int r = 0; r < reps; r++) {
        double t0 = clock_mono_s();
        if (packed) packed_matmul(p, c->ps, c->x, m, c->n, &o, 1);
        else if (m == c->n) matmul_blas(p, c->x, m, c->n, c->w, c->n, c->y);
        else matmul(p, c->x, m, c->n, c->w, c->n, c->y);
        double dt = clock_mono_s() - t0;
        if (dt < best) best = dt;
    }
    return 2.0 * m * (double)c->n * c->n / best / 1e9;
}

/* Returns the roof in GFLOP/s; c->sgemm, c->kernel and c->packed keep the parts. */
static double peak_measure(pool *p, peak_ctx *c, int quick)
{
    /* an sgemm the engine never calls bounds nothing: measured once, for the
     * machine line (on Prescott kernels its runs took about 1.3 s a measure) */
    if (matmul_blas_used() || c->sgemm == 0.0) c->sgemm = best_gflops(p, c, c->n, quick ? 2 : 3, 0);
    c->kernel = best_gflops(p, c, PEAK_KERNEL_ROWS, quick ? 4 : 10, 0);
    /* the packed kernel at decode's and prefill's row counts: its x is re-read
     * for every panel, so it is slower on the whole square (docs/PERFORMANCE.md) */
    c->packed = 0.0;
    for (int i = 0; c->pw && i < 2; i++) {
        double g = best_gflops(p, c, i ? PEAK_PACKED_ROWS : PEAK_KERNEL_ROWS, quick ? 3 : 6, 1);
        if (g > c->packed) c->packed = g;
    }
    /* sgemm is a roof only where the engine uses it (core/matmul.h) */
    double sg = matmul_blas_used() ? c->sgemm : 0.0;
    double roof = sg > c->kernel ? sg : c->kernel;
    return roof > c->packed ? roof : c->packed;
}

/* Engine benchmarks ------------------------------------------------------ */

typedef struct {
    const moe_model *m;
    moe_engine *e;
    int32_t *tok, *pos, *seq;
    uint8_t *want;
    int32_t *trace;      /* (max_tokens, n_layer, k) */
    float *logits;       /* (max_tokens, n_vocab) */
    int max_tokens;
    uint8_t *used;       /* (n_layer, n_expert) scratch for the step's expert union */
    kv_type kv;          /* the KV cache's element type */
} bench_state;

static size_t f32_bytes(uint64_t n) { return (size_t)n * sizeof(float); }

/* Multiply-adds of one token through one layer's Q, K, V and output projections. */
static double proj_macs(const moe_hparams *hp)
{
    double e = hp->n_embd, q = (double)hp->n_head * hp->head_dim, kv = (double)hp->n_head_kv * hp->head_dim;
    return 2 * q * e + 2 * kv * e;
}

/* FLOPs a forward pass must do, by the phase that does them: 2 per multiply-add
 * of every matmul a token goes through (attention projections, router, its k
 * experts, a shared expert), the output projection only for the rows that want
 * logits, and attention's scores and weighted values over `attn_pairs` (query,
 * key) pairs. The embedding is a lookup, not a matmul, so it does not count. */
typedef struct {
    double proj, attention, router, experts, logits;
} phase_flops;

static phase_flops forward_phase_flops(const moe_hparams *hp, double n_tokens, double n_logits, double attn_pairs)
{
    const moe_arch_info *a = moe_arch_get(hp->arch);
    double e = hp->n_embd, L = hp->n_layer, ffn = 3.0 * hp->n_ff * e;
    phase_flops f = {
        .proj = 2.0 * L * proj_macs(hp) * n_tokens,
        .attention = 4.0 * L * (double)hp->n_head * hp->head_dim * attn_pairs,
        .router = 2.0 * L * hp->n_expert * e * n_tokens,
        .experts = 2.0 * L * (hp->n_expert ? hp->n_expert_used * ffn : ffn) * n_tokens,
        .logits = 2.0 * (double)hp->n_vocab * e * n_logits,
    };
    if (hp->n_expert && a->shared_expert) f.experts += 2.0 * L * (e + 3.0 * hp->n_ff_shexp * e) * n_tokens;
    return f;
}

static double phase_flops_sum(const phase_flops *f)
{
    return f->proj + f->attention + f->router + f->experts + f->logits;
}

static double forward_flops(const moe_hparams *hp, double n_tokens, double n_logits, double attn_pairs)
{
    phase_flops f = forward_phase_flops(hp, n_tokens, n_logits, attn_pairs);
    return phase_flops_sum(&f);
}

/* Bytes of a projection of `rows` outputs over k inputs as a step of n_tokens
 * rows reads it: in the file's narrower type where the engine reads that (up
 * to MOE_RAW_PROJ_MAX_ROWS rows, or always when it has no F32 form). */
static double proj_bytes(const float *f32, moe_wraw raw, uint64_t rows, uint64_t k, int n_tokens)
{
    if (raw.raw && (n_tokens <= MOE_RAW_PROJ_MAX_ROWS || !f32))
        return (double)rows * (double)moe_wtype_row_bytes(raw.type, k);
    return (double)f32_bytes(rows * k);
}

/* Bytes of one FFN of width ff: F32, or in the types the file keeps it in. */
static double ffn_bytes(const moe_ffn_raw *r, uint64_t e, uint64_t ff)
{
    if (r->type == MOE_WT_F32) return (double)f32_bytes(3 * ff * e);
    return (double)ff * (double)(moe_wtype_row_bytes(r->type, e) + moe_wtype_row_bytes(r->up_type, e)) +
           (double)e * (double)moe_wtype_row_bytes(r->down_type, ff);
}

/* Bytes of the FFN weights (the experts it selected, the shared expert; a
 * dense model's FFN) one decode step must read, from the step's trace. */
static double step_ffn_bytes(const bench_state *s, int n_tokens)
{
    const moe_weights *w = &s->m->weights;
    const moe_hparams *hp = &w->hp;
    const moe_arch_info *a = moe_arch_get(hp->arch);
    uint64_t e = (uint64_t)hp->n_embd;
    double bytes = 0;
    if (hp->n_expert == 0) {
        for (int l = 0; l < hp->n_layer; l++) bytes += ffn_bytes(&w->layers[l].ffn_raw, e, (uint64_t)hp->n_ff);
        return bytes;
    }
    int k = hp->n_expert_used;
    memset(s->used, 0, (size_t)hp->n_layer * hp->n_expert);
    for (int t = 0; t < n_tokens; t++)
        for (int l = 0; l < hp->n_layer; l++)
            for (int j = 0; j < k; j++) {
                int32_t id = s->trace[((size_t)t * hp->n_layer + l) * k + j];
                if (id >= 0 && id < hp->n_expert) s->used[(size_t)l * hp->n_expert + id] = 1;
            }
    for (int l = 0; l < hp->n_layer; l++) {
        size_t n_used = 0;
        for (int x = 0; x < hp->n_expert; x++) n_used += s->used[(size_t)l * hp->n_expert + x];
        /* experts the file keeps narrower are read in its bytes (2 a weight for
         * 16-bit, 34 a block of 32 for Q8_0, ...) */
        bytes += (double)n_used * ffn_bytes(&w->layers[l].exp_raw, e, (uint64_t)hp->n_ff);
        if (a->shared_expert) bytes += ffn_bytes(&w->layers[l].shexp_raw, e, (uint64_t)hp->n_ff_shexp);
    }
    return bytes;
}

/* Bytes of every layer's attention projections as a step of n_tokens rows reads them. */
static double step_proj_bytes(const bench_state *s, int n_tokens)
{
    const moe_weights *w = &s->m->weights;
    const moe_hparams *hp = &w->hp;
    uint64_t e = (uint64_t)hp->n_embd, q = (uint64_t)hp->n_head * hp->head_dim;
    uint64_t kv = (uint64_t)hp->n_head_kv * hp->head_dim;
    double bytes = 0;
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_weights *L = &w->layers[l];
        bytes += proj_bytes(L->wq, L->wq_raw, q, e, n_tokens) + proj_bytes(L->wk, L->wk_raw, kv, e, n_tokens) +
                 proj_bytes(L->wv, L->wv_raw, kv, e, n_tokens) + proj_bytes(L->wo, L->wo_raw, e, q, n_tokens);
    }
    return bytes;
}

static double step_logit_bytes(const bench_state *s, int n_tokens)
{
    const moe_weights *w = &s->m->weights;
    return proj_bytes(w->output, w->output_raw, (uint64_t)w->hp.n_vocab, (uint64_t)w->hp.n_embd, n_tokens);
}

static double router_bytes(const moe_hparams *hp)
{
    return (double)hp->n_layer * f32_bytes((uint64_t)hp->n_expert * (uint64_t)hp->n_embd);
}

static int forward(bench_state *s, int n, char *err, size_t errlen)
{
    moe_batch b = {.n_tokens = n, .token = s->tok, .pos = s->pos, .seq = s->seq,
                   .want_logits = s->want, .trace_expert = s->trace};
    return moe_engine_forward(s->e, &b, s->logits, err, errlen);
}

/* Prefill a prompt of n tokens for seq 0 in one batch; returns seconds. */
static int bench_prefill(bench_state *s, int n, double *secs, char *err, size_t errlen)
{
    const moe_hparams *hp = &s->m->weights.hp;
    if (moe_engine_seq_reserve(s->e, 0, n, err, errlen)) return -1;
    for (int i = 0; i < n; i++) {
        s->tok[i] = (int32_t)((i * 7919 + 13) % hp->n_vocab);
        s->pos[i] = i; s->seq[i] = 0; s->want[i] = (i == n - 1);
    }
    double t0 = clock_mono_s();
    int rc = forward(s, n, err, errlen);
    *secs = clock_mono_s() - t0;
    moe_engine_seq_release(s->e, 0);
    return rc;
}

/* Read passes taken between decode steps, outside their timing: the host's
 * bandwidth moves within the seconds a round of steps takes (a round of batch 64
 * read anywhere from 54% to 87% of a bound set by passes right before it), so the
 * bound takes the mean of passes before the first step, every `every` steps and
 * after the last. */
typedef struct {
    pool *p;
    membw *read;
    int every;
    double sum;
    int n;
} bw_probe;

static void bw_probe_take(bw_probe *b)
{
    if (!b) return;
    b->sum += membw_read_gbs(b->p, b->read, 1);
    b->n++;
}

/* What the decode steps of bench_decode took, per step. */
typedef struct {
    double secs;                     /* wall seconds */
    double bytes;                    /* weights and KV cache it must read, of which: */
    double ffn_bytes;                /* the FFN weights (step_ffn_bytes) */
    double proj_bytes, logit_bytes;  /* the attention and output projections */
    double kv_bytes;                 /* the KV cache */
    double phase[MOE_PHASE_COUNT];   /* seconds by phase (moe_engine_phase_seconds) */
} decode_tally;

/* B sequences, each prefilled with `ctx0` tokens, then `steps` decode steps of B
 * tokens, tallied in *t; takes probe's read passes (probe may be NULL). */
static int bench_decode(bench_state *s, int B, int ctx0, int steps, bw_probe *probe, decode_tally *t,
                        char *err, size_t errlen)
{
    const moe_hparams *hp = &s->m->weights.hp;
    for (int q = 0; q < B; q++)
        if (moe_engine_seq_reserve(s->e, q, ctx0 + steps, err, errlen)) return -1;
    int n = 0;
    for (int q = 0; q < B; q++)
        for (int i = 0; i < ctx0; i++, n++) {
            if (n == s->max_tokens) {
                if (forward(s, n, err, errlen)) return -1;
                n = 0;
            }
            s->tok[n] = (int32_t)((q * 131 + i * 7919 + 3) % hp->n_vocab);
            s->pos[n] = i; s->seq[n] = q; s->want[n] = 0;
        }
    if (n && forward(s, n, err, errlen)) return -1;
    double total = 0, ffn = 0, kv = 0, ph0[MOE_PHASE_COUNT], ph1[MOE_PHASE_COUNT];
    moe_engine_phase_seconds(s->e, ph0);
    bw_probe_take(probe);
    for (int st = 0; st < steps; st++) {
        for (int q = 0; q < B; q++) {
            s->tok[q] = (int32_t)((q * 31 + st * 17 + 5) % hp->n_vocab);
            s->pos[q] = ctx0 + st; s->seq[q] = q; s->want[q] = 1;
        }
        double t0 = clock_mono_s();
        if (forward(s, B, err, errlen)) return -1;
        total += clock_mono_s() - t0;
        ffn += step_ffn_bytes(s, B);
        /* KV read: every sequence attends over its whole context */
        kv += (double)B * (ctx0 + st + 1) *
              (double)kv_position_bytes(hp->n_layer, hp->n_head_kv, hp->head_dim, s->kv);
        if (probe && ((st + 1) % probe->every == 0 || st + 1 == steps)) bw_probe_take(probe);
    }
    moe_engine_phase_seconds(s->e, ph1);
    for (int q = 0; q < B; q++) moe_engine_seq_release(s->e, q);
    *t = (decode_tally){.secs = total, .ffn_bytes = ffn / steps, .kv_bytes = kv / steps,
                        .proj_bytes = step_proj_bytes(s, B), .logit_bytes = step_logit_bytes(s, B)};
    t->bytes = t->ffn_bytes + t->kv_bytes + t->proj_bytes + t->logit_bytes + router_bytes(hp);
    for (int i = 0; i < MOE_PHASE_COUNT; i++) t->phase[i] = (ph1[i] - ph0[i]) / steps;
    return 0;
}

static void bench_state_free(bench_state *s)
{
    moe_engine_free(s->e);
    free(s->tok); free(s->pos); free(s->seq); free(s->want);
    free(s->trace); free(s->logits); free(s->used);
}

static int bench_state_init(bench_state *s, const moe_model *m, int threads, kv_type kv,
                            char *err, size_t errlen)
{
    const moe_hparams *hp = &m->weights.hp;
    s->m = m;
    s->kv = kv;
    s->max_tokens = 512;
    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = threads;
    ep.max_seqs = 64;
    ep.max_batch_tokens = s->max_tokens;
    ep.max_seq_len = hp->n_ctx_train < 600 ? hp->n_ctx_train : 600;
    ep.kv_n_blocks = 64 * ((128 + ep.kv_block_size - 1) / ep.kv_block_size) +
                     (ep.max_seq_len + ep.kv_block_size - 1) / ep.kv_block_size;
    ep.kv_type = kv;
    size_t n = (size_t)s->max_tokens;
    int k = hp->n_expert_used > 0 ? hp->n_expert_used : 1;
    s->tok = malloc(n * sizeof *s->tok); s->pos = malloc(n * sizeof *s->pos);
    s->seq = malloc(n * sizeof *s->seq); s->want = malloc(n);
    s->trace = malloc(n * (size_t)hp->n_layer * (size_t)k * sizeof *s->trace);
    s->logits = malloc(64 * (size_t)hp->n_vocab * sizeof *s->logits);
    s->used = malloc((size_t)hp->n_layer * (size_t)(hp->n_expert > 0 ? hp->n_expert : 1));
    if (!s->tok || !s->pos || !s->seq || !s->want || !s->trace || !s->logits || !s->used) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return moe_engine_create(&m->weights, &ep, &s->e, err, errlen);
}

/* One decode figure: B sequences, `steps` steps, with the read bandwidth measured
 * among them (bw_probe) and the matmul peak right before. */
typedef struct {
    double bw;            /* GB/s, the mean of the read passes among the steps */
    double peak;          /* GFLOP/s, matmul roof measured just before */
    double tps;           /* generated tok/s */
    double bound_tps;     /* roofline */
    double ratio;         /* bound time / actual time */
    double flops;         /* per step */
    phase_flops phase_fl; /* the same by phase */
    int mem_bound;        /* the bound is bandwidth (else the matmul peak) */
    decode_tally tally;   /* the steps: time, bytes, phases */
} decode_round;

static double max2(double a, double b) { return a > b ? a : b; }

/* A roof's time: the bytes over the bandwidth or the FLOPs over the peak, the longer. */
static double roof_s(double bytes, double flops, double gbs, double gflops)
{
    return max2(bytes / (gbs * 1e9), flops / (gflops * 1e9));
}

/* What a phase of the steps ran at, in G a second: its bytes or FLOPs over its seconds. */
static double phase_rate(double amount, double secs) { return secs > 0 ? amount / secs / 1e9 : 0.0; }

static int decode_measure(bench_state *s, pool *p, bw_ctx *x, peak_ctx *pc, int quick, int B, int steps,
                          decode_round *r, char *err, size_t errlen)
{
    const moe_hparams *hp = &s->m->weights.hp;
    double peak_before = peak_measure(p, pc, quick);
    bw_probe probe = {.p = p, .read = &x->read, .every = 4};
    if (bench_decode(s, B, 64, steps, &probe, &r->tally, err, errlen)) return -1;
    const decode_tally *t = &r->tally;
    double ctx = 64 + (steps + 1) / 2.0;   /* mean positions attended per step */
    r->phase_fl = forward_phase_flops(hp, B, B, ctx * B);
    const phase_flops *f = &r->phase_fl;
    r->flops = phase_flops_sum(f);
    /* The roofs are the best this host showed around and during the steps: the
     * peak measured before and after them, the read passes among them, and no
     * less than any phase of the steps ran at (a phase faster than its roof means
     * the host was faster than the measures caught, and a bound it beats bounds
     * nothing). */
    const double *ph = t->phase;
    r->peak = max2(max2(peak_before, peak_measure(p, pc, quick)),
                   max2(phase_rate(f->proj, ph[MOE_PHASE_PROJECTIONS]), phase_rate(f->logits, ph[MOE_PHASE_LOGITS])));
    r->bw = max2(max2(probe.sum / probe.n, phase_rate(t->ffn_bytes, ph[MOE_PHASE_EXPERTS])),
                 max2(phase_rate(t->proj_bytes, ph[MOE_PHASE_PROJECTIONS]), phase_rate(t->logit_bytes, ph[MOE_PHASE_LOGITS])));
    /* Roofline: a step takes at least its bytes over the bandwidth and at least
     * its FLOPs over the matmul peak; small batches hit the first, big ones the second. */
    double per_step = t->secs / steps, bound_step = roof_s(t->bytes, r->flops, r->bw, r->peak);
    r->mem_bound = t->bytes / (r->bw * 1e9) >= r->flops / (r->peak * 1e9);
    r->tps = B / per_step;
    r->bound_tps = B / bound_step;
    r->ratio = bound_step / per_step;
    return 0;
}

/* The shared host's bandwidth and share of the cores move by tens of percent
 * within a minute, so a figure is only comparable with a roof measured beside it:
 * each figure runs `rounds` times, each round measuring its roof beside its
 * timing (the matmul peak right before and right after, a decode round's read
 * passes among its steps), and the round with the median ratio is printed, all
 * ratios after it. */
enum { MAX_ROUNDS = 5 };

/* order[] = round indices by ascending ratio; returns the median round. */
static int rounds_sort(const double *ratio, int n, int *order)
{
    for (int k = 0; k < n; k++) {
        int at = k;
        while (at > 0 && ratio[order[at - 1]] > ratio[k]) { order[at] = order[at - 1]; at--; }
        order[at] = k;
    }
    return order[n / 2];
}

static void rounds_print(const double *ratio, int n, const int *order)
{
    if (n > 1) {
        printf("   [rounds:");
        for (int k = 0; k < n; k++) printf(" %.1f%%", 100.0 * ratio[order[k]]);
        printf("]");
    }
    printf("\n");
}

/* The step's time if each phase ran at its own roof (its bytes over the read
 * bandwidth or its FLOPs over the matmul peak, whichever is longer), one phase
 * after another, as a layer's data dependencies order them here. The round's
 * bound lets the step's reads and FLOPs overlap across phases; this one does
 * not, so it says how much of the gap to that bound the phases' order alone
 * makes. */
static double serial_roof_s(const moe_hparams *hp, const decode_round *r)
{
    const decode_tally *t = &r->tally;
    const phase_flops *f = &r->phase_fl;
    return roof_s(t->proj_bytes, f->proj, r->bw, r->peak) + roof_s(t->kv_bytes, f->attention, r->bw, r->peak) +
           roof_s(router_bytes(hp), f->router, r->bw, r->peak) + roof_s(t->ffn_bytes, f->experts, r->bw, r->peak) +
           roof_s(t->logit_bytes, f->logits, r->bw, r->peak);
}

/* Where the printed round's steps went, phase by phase (moe_engine_phase_seconds),
 * with the rates of those that read the step's bytes: GB/s of what each must
 * read and, for the projections, GFLOP/s (the rate that bounds them at big
 * batches); then the serial roof. */
static void phases_print(const moe_hparams *hp, int B, const decode_round *r)
{
    const decode_tally *t = &r->tally;
    const phase_flops *f = &r->phase_fl;
    printf("         per step:");
    for (int i = 0; i < MOE_PHASE_COUNT; i++) {
        double ph = t->phase[i];
        printf("%s %s %.1f ms", i ? "," : "", moe_phase_name((moe_phase)i), ph * 1e3);
        if (ph <= 0) continue;
        if (i == MOE_PHASE_PROJECTIONS)
            printf(" (%.0f GFLOP/s, %.1f GB/s)", phase_rate(f->proj, ph), phase_rate(t->proj_bytes, ph));
        else if (i == MOE_PHASE_LOGITS)
            printf(" (%.0f GFLOP/s, %.1f GB/s)", phase_rate(f->logits, ph), phase_rate(t->logit_bytes, ph));
        else if (i == MOE_PHASE_EXPERTS)
            printf(" (%.1f GB/s of %.0f MB)", phase_rate(t->ffn_bytes, ph), t->ffn_bytes / 1e6);
        else if (i == MOE_PHASE_ATTENTION)
            printf(" (%.1f GB/s of KV cache)", phase_rate(t->kv_bytes, ph));
    }
    double serial = serial_roof_s(hp, r), bound = B / r->bound_tps, step = B / r->tps;
    printf("\n         serial roof: %.1f ms/step (each phase at its own roof, in turn), %.1f%% of the bound; "
           "these steps %.1f%% of it\n", serial * 1e3, 100.0 * bound / serial, 100.0 * serial / step);
}

static int bench_engine(const moe_model *m, pool *p, bw_ctx *x, peak_ctx *pc, int threads, int quick,
                        kv_type kv, char *err, size_t errlen)
{
    const moe_hparams *hp = &m->weights.hp;
    bench_state s = {0};
    int rc = -1;
    if (bench_state_init(&s, m, threads, kv, err, errlen)) goto done;
    int n_prefill = hp->n_ctx_train >= 512 ? 512 : hp->n_ctx_train;
    double secs = 0;
    if (bench_prefill(&s, 32, &secs, err, errlen)) goto done;              /* warm-up */
    /* and the KV pool: it faults in at first use (core/hugemem.h), which a server
     * pays once in its life; the timed rounds should see it as a server does */
    decode_tally unused;
    if (bench_decode(&s, 64, 64, 2, NULL, &unused, err, errlen)) goto done;
    int rounds = quick ? 1 : 3, steps = quick ? 4 : 16, order[MAX_ROUNDS];
    /* causal: token i attends to i + 1 positions; only the last row wants logits */
    double flops = forward_flops(hp, n_prefill, 1, n_prefill * (n_prefill + 1.0) / 2);
    /* The issue sets prefill's bound at the sgemm peak (its big expert queues run
     * on sgemm, its projections on the packed kernel where the build has it); the
     * share of the best matmul of this process is printed beside it. Where the
     * engine never calls sgemm (OpenBLAS fell back to slow kernels on this CPU),
     * its peak bounds nothing, and the bound is the best matmul. */
    double pf_secs[MAX_ROUNDS], pf_sgemm[MAX_ROUNDS], pf_best[MAX_ROUNDS], pf_ratio[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        pf_best[r] = peak_measure(p, pc, quick);
        pf_sgemm[r] = pc->sgemm;
        if (bench_prefill(&s, n_prefill, &pf_secs[r], err, errlen)) goto done;
        pf_best[r] = max2(pf_best[r], peak_measure(p, pc, quick));   /* and after: the better roof */
        pf_sgemm[r] = max2(pf_sgemm[r], pc->sgemm);
        pf_ratio[r] = flops / ((matmul_blas_used() ? pf_sgemm[r] : pf_best[r]) * 1e9) / pf_secs[r];
    }
    int pm = rounds_sort(pf_ratio, rounds, order);
    if (matmul_blas_used())
        printf("prefill  %4d tokens: %9.1f tok/s   bound %9.1f tok/s (%.1f GFLOP at %.0f GFLOP/s sgemm peak; "
               "%.0f%% of the best matmul, %.0f GFLOP/s)   %5.1f%%",
               n_prefill, n_prefill / pf_secs[pm], n_prefill / (flops / (pf_sgemm[pm] * 1e9)), flops / 1e9,
               pf_sgemm[pm], 100.0 * flops / (pf_best[pm] * 1e9) / pf_secs[pm], pf_best[pm], 100.0 * pf_ratio[pm]);
    else
        printf("prefill  %4d tokens: %9.1f tok/s   bound %9.1f tok/s (%.1f GFLOP at %.0f GFLOP/s, the best matmul; "
               "sgemm not used, %.0f GFLOP/s)   %5.1f%%",
               n_prefill, n_prefill / pf_secs[pm], n_prefill / (flops / (pf_best[pm] * 1e9)), flops / 1e9,
               pf_best[pm], pf_sgemm[pm], 100.0 * pf_ratio[pm]);
    rounds_print(pf_ratio, rounds, order);

    static const int batches[] = {1, 4, 16, 64};
    for (size_t i = 0; i < sizeof batches / sizeof *batches; i++) {
        int B = batches[i];
        decode_round r[MAX_ROUNDS];
        double ratio[MAX_ROUNDS];
        for (int k = 0; k < rounds; k++) {
            if (decode_measure(&s, p, x, pc, quick, B, steps, &r[k], err, errlen)) goto done;
            ratio[k] = r[k].ratio;
        }
        const decode_round *med = &r[rounds_sort(ratio, rounds, order)];
        printf("decode   batch %2d:    %9.1f tok/s   bound %9.1f tok/s (%s: %.0f MB/step at %.1f GB/s, %.2f GFLOP/step at %.0f GFLOP/s)   %5.1f%%",
               B, med->tps, med->bound_tps, med->mem_bound ? "bandwidth" : "matmul peak",
               med->tally.bytes / 1e6, med->bw, med->flops / 1e9, med->peak, 100.0 * med->ratio);
        rounds_print(ratio, rounds, order);
        phases_print(hp, B, med);
    }
    rc = 0;
done:
    bench_state_free(&s);
    return rc;
}

static int bench_tokenizer(const moe_model *m, const char *path)
{
    if (!m->tokenizer || !path) return 0;
    FILE *f = fopen(path, "rb");
    if (!f) { printf("tokenizer: cannot open %s, skipped\n", path); return 0; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = len > 0 ? malloc((size_t)len) : NULL;
    if (!text || fread(text, 1, (size_t)len, f) != (size_t)len) { fclose(f); free(text); return 0; }
    fclose(f);
    char err[256];
    int32_t *ids = NULL;
    size_t n = 0;
    double t0 = clock_mono_s();
    int rc = tokenizer_encode(m->tokenizer, text, (size_t)len, 0, &ids, &n, err, sizeof err);
    double dt = clock_mono_s() - t0;
    if (rc == 0)
        printf("tokenizer: %.1f MB/s (%ld bytes -> %zu tokens, one core)\n", len / dt / 1e6, len, n);
    free(ids);
    free(text);
    return 0;
}

int bench_run(const bench_opts *o, char *err, size_t errlen)
{
    if (!o->model) { snprintf(err, errlen, "bench needs -m FILE (make bench writes the bench model)"); return -1; }
    pool *p = NULL;
    moe_model *m = NULL;
    int rc = -1;
    if (pool_create(o->threads, &p, err, errlen)) return -1;
    double rd, triad;
    bw_ctx bw = {0};
    peak_ctx pc = {0};
    if (measure_bandwidth(p, o->quick, &bw, &rd, &triad, err, errlen)) goto done;
    if (peak_init(p, &pc, err, errlen)) goto done;
    double peak = peak_measure(p, &pc, o->quick);
    printf("machine: %d threads, memory read %.1f GB/s, triad %.1f GB/s (%zu MB arrays), matmul peak %.1f GFLOP/s "
           "(OpenBLAS sgemm %.1f with its %s kernels%s, engine kernel %.1f at %d rows, packed kernel %.1f at %d or %d)\n",
           o->threads, rd, triad, bw.n * sizeof(float) >> 20, peak, pc.sgemm, matmul_blas_corename(),
           matmul_blas_used() ? "" : ", not used", pc.kernel,
           PEAK_KERNEL_ROWS, pc.packed, PEAK_KERNEL_ROWS, PEAK_PACKED_ROWS);
    if (moe_model_load_opts(o->model, &(moe_load_opts){o->weights, o->projections}, &m, err, errlen)) goto done;
    const moe_hparams *hp = &m->weights.hp;
    printf("model: %s, %s, %.2f G params (%.2f G active), %d experts top-%d, %d layers; weights %s in %.0f ms; "
           "KV cache %s\n",
           o->model, moe_arch_get(hp->arch)->name,
           moe_hparams_n_params(hp, m->tied_output) / 1e9,
           moe_hparams_n_params_active(hp, m->tied_output) / 1e9, hp->n_expert,
           hp->n_expert_used, hp->n_layer, gguf_placement(m->gguf), m->load_ms, kv_type_name(o->kv));
    if (bench_engine(m, p, &bw, &pc, o->threads, o->quick, o->kv, err, errlen)) goto done;
    bench_tokenizer(m, o->text);
    rc = 0;
done:
    bw_free(&bw);
    peak_free(&pc);
    moe_model_free(m);
    pool_free(p);
    return rc;
}

/* eval ------------------------------------------------------------------- */

static int read_file(const char *path, char **data, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "cannot open %s", path); return -1; }
    if (fseek(f, 0, SEEK_END) || ftell(f) < 0) { fclose(f); snprintf(err, errlen, "cannot size %s", path); return -1; }
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    *data = malloc((size_t)n + 1);
    if (!*data || fread(*data, 1, (size_t)n, f) != (size_t)n) {
        fclose(f); free(*data);
        snprintf(err, errlen, "cannot read %s", path);
        return -1;
    }
    fclose(f);
    *len = (size_t)n;
    return 0;
}

/* Log-softmax probability (natural log) of `target` in a row of logits. */
static double logprob(const float *row, int n, int target)
{
    float mx = row[0];
    for (int i = 1; i < n; i++) if (row[i] > mx) mx = row[i];
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)row[i] - mx);
    return (double)row[target] - mx - log(s);
}

/* Windows of `ctx` tokens starting at 0, ctx, 2ctx...: inputs t[i..i+ctx), each
 * predicting the next token, so every token but the first is scored once.
 * bits per byte = total bits / bytes of the text. */
int eval_run(const eval_opts *o, char *err, size_t errlen)
{
    moe_model *m = NULL;
    moe_engine *e = NULL;
    char *text = NULL;
    int32_t *ids = NULL, *pos = NULL, *seq = NULL;
    uint8_t *want = NULL;
    float *logits = NULL;
    size_t len, n;
    int rc = -1;
    if (read_file(o->text, &text, &len, err, errlen)) return -1;
    if (moe_model_load(o->model, &m, err, errlen)) goto done;
    if (!m->tokenizer) { snprintf(err, errlen, "the model has no tokenizer"); goto done; }
    if (tokenizer_encode(m->tokenizer, text, len, 0, &ids, &n, err, errlen)) goto done;
    if (n < 2) { snprintf(err, errlen, "the text is shorter than two tokens"); goto done; }
    const moe_hparams *hp = &m->weights.hp;
    int ctx = o->ctx > 0 ? o->ctx : (hp->n_ctx_train < 256 ? hp->n_ctx_train : 256);
    if (ctx > hp->n_ctx_train) { snprintf(err, errlen, "--ctx %d exceeds the context length %d", ctx, hp->n_ctx_train); goto done; }
    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = o->threads;
    ep.max_seqs = 1;
    ep.max_seq_len = ctx;
    ep.max_batch_tokens = ctx;
    ep.kv_n_blocks = (ctx + ep.kv_block_size - 1) / ep.kv_block_size;
    if (moe_engine_create(&m->weights, &ep, &e, err, errlen)) goto done;
    pos = malloc((size_t)ctx * sizeof *pos); seq = calloc((size_t)ctx, sizeof *seq);
    want = malloc((size_t)ctx);
    logits = malloc((size_t)ctx * (size_t)hp->n_vocab * sizeof *logits);
    if (!pos || !seq || !want || !logits) { snprintf(err, errlen, "out of memory"); goto done; }
    memset(want, 1, (size_t)ctx);
    for (int i = 0; i < ctx; i++) pos[i] = i;
    double nats = 0;
    size_t scored = 0;
    double t0 = clock_mono_s();
    for (size_t start = 0; start + 1 < n; start += (size_t)ctx) {
        int w = (int)(n - 1 - start < (size_t)ctx ? n - 1 - start : (size_t)ctx);
        if (moe_engine_seq_reserve(e, 0, w, err, errlen)) goto done;
        moe_batch b = {.n_tokens = w, .token = ids + start, .pos = pos, .seq = seq, .want_logits = want};
        if (moe_engine_forward(e, &b, logits, err, errlen)) goto done;
        for (int i = 0; i < w; i++)
            nats -= logprob(logits + (size_t)i * hp->n_vocab, hp->n_vocab, ids[start + (size_t)i + 1]);
        scored += (size_t)w;
        moe_engine_seq_release(e, 0);
        double dt = clock_mono_s() - t0;
        fprintf(stderr, "\reval: %zu/%zu tokens, %.0f tok/s, bits/byte so far %.4f   ",
                scored, n - 1, scored / dt, nats / log(2.0) / (double)len * (double)(n - 1) / (double)scored);
    }
    fprintf(stderr, "\n");
    printf("tokens %zu, bytes %zu, nats/token %.4f, perplexity %.3f, bits per byte %.4f\n",
           n, len, nats / scored, exp(nats / scored), nats / log(2.0) / (double)len);
    rc = 0;
done:
    free(text); free(ids); free(pos); free(seq); free(want); free(logits);
    moe_engine_free(e);
    moe_model_free(m);
    return rc;
}
