/* test_engine.c -- the batched forward pass against a naive reference written here.
 *
 * Small random models are built in memory for each architecture (llama MoE, dense
 * llama, qwen2moe, olmoe, qwen3moe). The reference is a whole-sequence forward pass
 * with plain loops in double, written from ../shared/guides/GGUF-MOE-FACTS.md, not
 * from the engine. Logits are compared at every position with
 *   max_i |engine_i - ref_i| / max(1, max_i |ref_i|) <= 1e-4   (per position).
 * Also: batch composition does not change a row's logits, 1 thread == 2 threads
 * bit for bit, bad batches fail without harm, expert counters add up. With an
 * F16 KV cache the reference rounds every key and value as the cache does
 * (core/kv_cache.h) and the same bounds hold. */
#include <math.h>
#include <stdint.h>

#include "core/clock.h"
#include "core/engine.h"
#include "core/packed.h"
#include "core/matmul.h"
#include "core/wconv.h"
#include "tests/testutil.h"

static char err[256];

/* Test models ------------------------------------------------------------- */

enum { CFG_LLAMA_MOE, CFG_LLAMA_DENSE, CFG_QWEN2MOE, CFG_OLMOE, CFG_QWEN3MOE, CFG_COUNT };
#define MAX_LAYERS 4

typedef struct {
    moe_weights w;
    moe_layer_weights L[MAX_LAYERS];
    float *arena;
    size_t used, cap;
    uint64_t rng;
    int tied;
} tmodel;

static double urand(uint64_t *s)   /* uniform in [-1, 1) */
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (double)(*s >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

static const float *fill(tmodel *m, size_t n, double offset, double scale)
{
    ck_assert(m->used + n <= m->cap);
    float *p = m->arena + m->used;
    m->used += n;
    for (size_t i = 0; i < n; i++) p[i] = (float)(offset + scale * urand(&m->rng));
    return p;
}

static moe_hparams cfg_hparams(int cfg)
{
    moe_hparams hp = {.arch = MOE_ARCH_LLAMA, .n_vocab = 61, .n_embd = 32, .n_layer = 2,
                      .n_head = 4, .n_head_kv = 2, .head_dim = 8, .n_ctx_train = 64,
                      .n_ff = 24, .n_expert = 6, .n_expert_used = 2, .n_ff_shexp = 0,
                      .rope_dim = 8, .rope_base = 10000.0f, .rms_eps = 1e-5f};
    switch (cfg) {
    case CFG_LLAMA_DENSE: hp.n_expert = 0; hp.n_expert_used = 0; hp.n_ff = 40; break;
    case CFG_QWEN2MOE:  /* two query heads of 16 on one KV head */
        hp.arch = MOE_ARCH_QWEN2MOE; hp.n_ff_shexp = 16; hp.rope_base = 1e6f;
        hp.n_head = 2; hp.n_head_kv = 1; hp.head_dim = 16; hp.rope_dim = 16; break;
    case CFG_OLMOE: hp.arch = MOE_ARCH_OLMOE; hp.n_head_kv = 4; hp.n_expert = 8; hp.n_expert_used = 3; break;
    case CFG_QWEN3MOE:  /* head_dim * n_head != n_embd, as in the real models */
        hp.arch = MOE_ARCH_QWEN3MOE; hp.head_dim = 20; hp.rope_dim = 20; hp.n_layer = 3;
        hp.n_expert = 8; hp.n_expert_used = 3; hp.rms_eps = 1e-6f; break;
    default: break;
    }
    return hp;
}

static tmodel *model_make(int cfg, uint64_t seed)
{
    tmodel *m = calloc(1, sizeof *m);
    ck_assert_ptr_nonnull(m);
    moe_hparams hp = cfg_hparams(cfg);
    const moe_arch_info *a = moe_arch_get(hp.arch);
    m->rng = seed * 0x9E3779B97F4A7C15ull + 1;
    m->tied = cfg == CFG_OLMOE;
    m->cap = 1u << 20;
    m->arena = malloc(m->cap * sizeof(float));
    ck_assert_ptr_nonnull(m->arena);
    size_t E = (size_t)hp.n_embd, V = (size_t)hp.n_vocab, hd = (size_t)hp.head_dim;
    size_t qd = (size_t)hp.n_head * hd, kvd = (size_t)hp.n_head_kv * hd;
    size_t ff = (size_t)hp.n_ff, ne = (size_t)hp.n_expert;
    double sE = 1.7 / sqrt((double)E);
    m->w.hp = hp;
    m->w.tok_embd = fill(m, V * E, 0, 1);
    m->w.output_norm = fill(m, E, 1, 0.2);
    m->w.output = m->tied ? m->w.tok_embd : fill(m, V * E, 0, sE);
    m->w.layers = m->L;
    for (int l = 0; l < hp.n_layer; l++) {
        moe_layer_weights *L = &m->L[l];
        L->attn_norm = fill(m, E, 1, 0.2);
        L->wq = fill(m, qd * E, 0, sE);
        L->wk = fill(m, kvd * E, 0, sE);
        L->wv = fill(m, kvd * E, 0, sE);
        L->wo = fill(m, E * qd, 0, 1.7 / sqrt((double)qd));
        L->ffn_norm = fill(m, E, 1, 0.2);
        if (a->qkv_bias) {
            L->bq = fill(m, qd, 0, 0.3);
            L->bk = fill(m, kvd, 0, 0.3);
            L->bv = fill(m, kvd, 0, 0.3);
        }
        if (a->qk_norm == MOE_QK_NORM_FULL) {
            L->q_norm = fill(m, qd, 1, 0.2);
            L->k_norm = fill(m, kvd, 1, 0.2);
        } else if (a->qk_norm == MOE_QK_NORM_HEAD) {
            L->q_norm = fill(m, hd, 1, 0.2);
            L->k_norm = fill(m, hd, 1, 0.2);
        }
        if (ne == 0) {
            L->ffn_gate = fill(m, ff * E, 0, sE);
            L->ffn_up = fill(m, ff * E, 0, sE);
            L->ffn_down = fill(m, E * ff, 0, 1.7 / sqrt((double)ff));
        } else {
            L->router = fill(m, ne * E, 0, 3 * sE);   /* spread scores: no near-ties */
            L->exp_gate = fill(m, ne * ff * E, 0, sE);
            L->exp_up = fill(m, ne * ff * E, 0, sE);
            L->exp_down = fill(m, ne * E * ff, 0, 1.7 / sqrt((double)ff));
        }
        if (a->shared_expert) {
            size_t fs = (size_t)hp.n_ff_shexp;
            L->shexp_gate_inp = fill(m, E, 0, sE);
            L->shexp_gate = fill(m, fs * E, 0, sE);
            L->shexp_up = fill(m, fs * E, 0, sE);
            L->shexp_down = fill(m, E * fs, 0, 1.7 / sqrt((double)fs));
        }
    }
    ck_assert_msg(moe_weights_validate(&m->w, err, sizeof err) == 0, "%s", err);
    return m;
}

static void model_free(tmodel *m)
{
    free(m->arena);
    free(m);
}

/* Naive reference (double, whole sequence) --------------------------------- */

static void ref_rmsnorm(double *o, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = x[i] * r * w[i];
}

/* y (n_out) = W (n_out, n_in) x */
static void ref_matvec(double *y, const float *W, const double *x, int n_out, int n_in)
{
    for (int o = 0; o < n_out; o++) {
        double s = 0;
        for (int i = 0; i < n_in; i++) s += (double)W[(size_t)o * n_in + i] * x[i];
        y[o] = s;
    }
}

static void ref_rope(double *h, int rd, int pos, double base, int neox)
{
    for (int i = 0; i < rd / 2; i++) {
        double th = pos * pow(base, -2.0 * i / rd);
        int a = neox ? i : 2 * i, b = neox ? i + rd / 2 : 2 * i + 1;
        double x0 = h[a], x1 = h[b];
        h[a] = x0 * cos(th) - x1 * sin(th);
        h[b] = x0 * sin(th) + x1 * cos(th);
    }
}

static void ref_swiglu(double *out, const float *G, const float *U, const float *D,
                       const double *x, int E, int ff)
{
    double g[64], u[64];
    ck_assert_int_le(ff, 64);
    ref_matvec(g, G, x, ff, E);
    ref_matvec(u, U, x, ff, E);
    for (int i = 0; i < ff; i++) g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
    ref_matvec(out, D, g, E, ff);
}

/* What an F16 KV cache keeps of x: x as a float, clamped to +-65504, rounded
 * to the nearest F16 (ties to even). */
static double ref_f16(double x)
{
    float f = (float)x;
    if (f > 65504.0f) f = 65504.0f;
    if (f < -65504.0f) f = -65504.0f;
    return wconv_f16(wconv_to_f16(f));
}

/* logits (T, V) for tokens[0..T); for MoE models also the routing, ids and
 * weights (T, n_layer, k), when route_ids is not NULL. kv_f16: keys and values
 * as an F16 cache keeps them. */
static void ref_forward(const tmodel *m, const int32_t *tok, int T, double *logits,
                        int32_t *route_ids, double *route_w, int kv_f16)
{
    const moe_hparams *hp = &m->w.hp;
    const moe_arch_info *a = moe_arch_get(hp->arch);
    int E = hp->n_embd, hd = hp->head_dim, H = hp->n_head, KH = hp->n_head_kv;
    int qd = H * hd, kvd = KH * hd, ne = hp->n_expert, k = hp->n_expert_used;
    double eps = hp->rms_eps;
    double *x = calloc((size_t)T * E, sizeof *x), *xn = malloc(sizeof(double) * E);
    double *q = malloc(sizeof(double) * T * qd), *K = malloc(sizeof(double) * T * kvd);
    double *Vv = malloc(sizeof(double) * T * kvd), *att = malloc(sizeof(double) * qd);
    double *o = malloc(sizeof(double) * E), *y = malloc(sizeof(double) * E);
    double sc[64], p[16];
    ck_assert_int_le(T, 64);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < E; i++) x[t * E + i] = m->w.tok_embd[(size_t)tok[t] * E + i];
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_weights *L = &m->w.layers[l];
        for (int t = 0; t < T; t++) {
            double *qt = q + t * qd, *kt = K + t * kvd, *vt = Vv + t * kvd;
            ref_rmsnorm(xn, x + t * E, L->attn_norm, E, eps);
            ref_matvec(qt, L->wq, xn, qd, E);
            ref_matvec(kt, L->wk, xn, kvd, E);
            ref_matvec(vt, L->wv, xn, kvd, E);
            if (a->qkv_bias) {
                for (int i = 0; i < qd; i++) qt[i] += L->bq[i];
                for (int i = 0; i < kvd; i++) { kt[i] += L->bk[i]; vt[i] += L->bv[i]; }
            }
            if (a->qk_norm == MOE_QK_NORM_FULL) {
                ref_rmsnorm(qt, qt, L->q_norm, qd, eps);
                ref_rmsnorm(kt, kt, L->k_norm, kvd, eps);
            } else if (a->qk_norm == MOE_QK_NORM_HEAD) {
                for (int h = 0; h < H; h++) ref_rmsnorm(qt + h * hd, qt + h * hd, L->q_norm, hd, eps);
                for (int h = 0; h < KH; h++) ref_rmsnorm(kt + h * hd, kt + h * hd, L->k_norm, hd, eps);
            }
            int neox = a->rope == MOE_ROPE_NEOX;
            for (int h = 0; h < H; h++) ref_rope(qt + h * hd, hp->rope_dim, t, hp->rope_base, neox);
            for (int h = 0; h < KH; h++) ref_rope(kt + h * hd, hp->rope_dim, t, hp->rope_base, neox);
            for (int i = 0; kv_f16 && i < kvd; i++) {
                kt[i] = ref_f16(kt[i]);
                vt[i] = ref_f16(vt[i]);
            }
        }
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < H; h++) {
                int kh = h / (H / KH);
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += q[t * qd + h * hd + i] * K[s * kvd + kh * hd + i];
                    sc[s] = d / sqrt((double)hd);
                    if (sc[s] > mx) mx = sc[s];
                }
                for (int s = 0; s <= t; s++) { sc[s] = exp(sc[s] - mx); sum += sc[s]; }
                for (int i = 0; i < hd; i++) {
                    double acc = 0;
                    for (int s = 0; s <= t; s++) acc += sc[s] / sum * Vv[s * kvd + kh * hd + i];
                    att[h * hd + i] = acc;
                }
            }
            ref_matvec(o, L->wo, att, E, qd);
            for (int i = 0; i < E; i++) x[t * E + i] += o[i];
        }
        for (int t = 0; t < T; t++) {
            double *xt = x + t * E;
            ref_rmsnorm(xn, xt, L->ffn_norm, E, eps);
            if (ne == 0) {
                ref_swiglu(o, L->ffn_gate, L->ffn_up, L->ffn_down, xn, E, hp->n_ff);
                for (int i = 0; i < E; i++) xt[i] += o[i];
                continue;
            }
            ref_matvec(p, L->router, xn, ne, E);
            double mx = -INFINITY, sum = 0;
            for (int e = 0; e < ne; e++) if (p[e] > mx) mx = p[e];
            for (int e = 0; e < ne; e++) { p[e] = exp(p[e] - mx); sum += p[e]; }
            for (int e = 0; e < ne; e++) p[e] /= sum;
            int ids[16];
            double w[16], wsum = 0;
            int taken[16] = {0};
            for (int j = 0; j < k; j++) {   /* largest remaining, lowest id on ties */
                int best = -1;
                for (int e = 0; e < ne; e++)
                    if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
                taken[best] = 1;
                ids[j] = best;
                w[j] = p[best];
                wsum += p[best];
            }
            for (int j = 0; j < k; j++) {
                double wj = (a->renorm_topk ? w[j] / wsum : w[j]) * a->expert_weight_scale;
                if (route_ids) {
                    size_t at = ((size_t)t * hp->n_layer + l) * k + j;
                    route_ids[at] = ids[j];
                    route_w[at] = wj;
                }
                size_t ge = (size_t)ids[j] * hp->n_ff * E;
                ref_swiglu(o, L->exp_gate + ge, L->exp_up + ge, L->exp_down + ge, xn, E, hp->n_ff);
                for (int i = 0; i < E; i++) xt[i] += wj * o[i];
            }
            if (a->shared_expert) {
                double g = 0;
                for (int i = 0; i < E; i++) g += L->shexp_gate_inp[i] * xn[i];
                double sg = 1.0 / (1.0 + exp(-g));
                ref_swiglu(o, L->shexp_gate, L->shexp_up, L->shexp_down, xn, E, hp->n_ff_shexp);
                for (int i = 0; i < E; i++) xt[i] += sg * o[i];
            }
        }
    }
    for (int t = 0; t < T; t++) {
        ref_rmsnorm(y, x + t * E, m->w.output_norm, E, eps);
        ref_matvec(logits + (size_t)t * hp->n_vocab, m->w.output, y, hp->n_vocab, E);
    }
    free(x); free(xn); free(q); free(K); free(Vv); free(att); free(o); free(y);
}

/* Engine helpers ---------------------------------------------------------- */

static moe_engine *engine_make_kvt(const tmodel *m, int threads, float cf, int packed, int block_size,
                                   kv_type type)
{
    moe_engine_params p = moe_engine_default_params(&m->w.hp);
    p.kv_type = type;
    p.packed_projections = packed;
    p.n_threads = threads;
    p.max_seqs = 4;
    p.max_batch_tokens = 32;
    p.kv_block_size = block_size;
    p.max_seq_len = 64;
    p.kv_n_blocks = 4 * ((p.max_seq_len + block_size - 1) / block_size);
    p.capacity_factor = cf;
    moe_engine *e = NULL;
    ck_assert_msg(moe_engine_create(&m->w, &p, &e, err, sizeof err) == 0, "%s", err);
    return e;
}

static moe_engine *engine_make_kv(const tmodel *m, int threads, float cf, int packed, int block_size)
{
    return engine_make_kvt(m, threads, cf, packed, block_size, KV_F32);
}

static moe_engine *engine_make_packed(const tmodel *m, int threads, float cf, int packed)
{
    return engine_make_kv(m, threads, cf, packed, 4);
}

static moe_engine *engine_make(const tmodel *m, int threads, float cf)
{
    return engine_make_packed(m, threads, cf, packed_supported());
}

/* One batch row. */
typedef struct { int32_t tok, pos, seq; uint8_t want; } row;

static int run_batch_traced(moe_engine *e, const row *r, int n, float *logits,
                            int32_t *trace_expert, float *trace_weight)
{
    int32_t tok[64], pos[64], seq[64];
    uint8_t want[64];
    ck_assert_int_le(n, 64);
    for (int i = 0; i < n; i++) { tok[i] = r[i].tok; pos[i] = r[i].pos; seq[i] = r[i].seq; want[i] = r[i].want; }
    moe_batch b = {.n_tokens = n, .token = tok, .pos = pos, .seq = seq, .want_logits = want,
                   .trace_expert = trace_expert, .trace_weight = trace_weight};
    return moe_engine_forward(e, &b, logits, err, sizeof err);
}

static int run_batch(moe_engine *e, const row *r, int n, float *logits)
{
    return run_batch_traced(e, r, n, logits, NULL, NULL);
}

static void random_tokens(int32_t *t, int n, int V, uint64_t seed)
{
    uint64_t s = seed * 2654435761u + 7;
    for (int i = 0; i < n; i++) t[i] = (int32_t)((urand(&s) + 1.0) * 0.5 * V) % V;
}

static double rel_err(const float *a, const double *ref, int n)
{
    double md = 0, mr = 1;
    for (int i = 0; i < n; i++) {
        double d = fabs(a[i] - ref[i]);
        if (!(d <= md)) md = d;   /* NaN propagates */
        if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
    }
    return md / mr;
}

/* Reference match --------------------------------------------------------- */

/* An 18-token prompt chunk (two attention runs) then 6 single decode steps; every
 * position compared. */
static void check_against_reference(int cfg, kv_type type)
{
    enum { T = 24, CHUNK = 18 };
    tmodel *m = model_make(cfg, 100 + cfg);
    int V = m->w.hp.n_vocab;
    int32_t tok[T];
    random_tokens(tok, T, V, 5 + cfg);
    double *ref = malloc(sizeof(double) * T * V);
    float *got = malloc(sizeof(float) * T * V);
    int nlk = m->w.hp.n_layer * (m->w.hp.n_expert_used > 0 ? m->w.hp.n_expert_used : 1);
    int32_t *ref_ids = malloc(sizeof(int32_t) * T * nlk), *tr_ids = malloc(sizeof(int32_t) * T * nlk);
    double *ref_w = malloc(sizeof(double) * T * nlk);
    float *tr_w = malloc(sizeof(float) * T * nlk);
    ref_forward(m, tok, T, ref, ref_ids, ref_w, type == KV_F16);

    moe_engine *e = engine_make_kvt(m, 2, 0.0f, packed_supported(), 4, type);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 1, T, err, sizeof err), 0);
    row r[T];
    for (int i = 0; i < T; i++) r[i] = (row){tok[i], i, 1, 1};
    ck_assert_msg(run_batch_traced(e, r, CHUNK, got, tr_ids, tr_w) == 0, "%s", err);
    for (int i = CHUNK; i < T; i++)
        ck_assert_msg(run_batch_traced(e, r + i, 1, got + (size_t)i * V, tr_ids + (size_t)i * nlk,
                                       tr_w + (size_t)i * nlk) == 0, "%s", err);
    /* the routing trace, (token, layer, k), is the reference's choice. With an
     * F16 cache a key element the engine computes in float32 can round to the F16
     * next to the reference's (its double differs in the last float bits): with
     * head size 8 that one element moves a router weight of the next layer by up
     * to 2e-5 (seen in the AVX2 and scalar builds), hence the looser bound there. */
    double w_tol = type == KV_F16 ? 1e-4 : 1e-5;
    for (int i = 0; m->w.hp.n_expert > 0 && i < T * nlk; i++) {
        ck_assert_msg(tr_ids[i] == ref_ids[i], "cfg %d trace entry %d: expert %d, reference %d",
                      cfg, i, tr_ids[i], ref_ids[i]);
        ck_assert_double_eq_tol(tr_w[i], ref_w[i], w_tol);
    }
    double worst = 0, spread = 0;
    for (int t = 0; t < T; t++) {
        double re = rel_err(got + (size_t)t * V, ref + (size_t)t * V, V);
        ck_assert_msg(re <= 1e-4, "cfg %d position %d: relative error %g", cfg, t, re);
        if (re > worst) worst = re;
        double lo = INFINITY, hi = -INFINITY;
        for (int i = 0; i < V; i++) { lo = fmin(lo, ref[t * V + i]); hi = fmax(hi, ref[t * V + i]); }
        spread += hi - lo;
    }
    ck_assert_msg(spread / T > 1.0, "cfg %d: logits are flat (mean spread %g)", cfg, spread / T);
    printf("engine vs reference, %s%s, KV %s: max relative error %.2e\n",
           moe_arch_get(m->w.hp.arch)->name, m->w.hp.n_expert ? "" : " (dense)", kv_type_name(type), worst);
    moe_engine_free(e);
    free(ref);
    free(got);
    free(ref_ids);
    free(tr_ids);
    free(ref_w);
    free(tr_w);
    model_free(m);
}

/* Loop index: the config, then the same configs with an F16 cache. */
START_TEST(matches_reference)
{
    check_against_reference(_i % CFG_COUNT, _i < CFG_COUNT ? KV_F32 : KV_F16);
}
END_TEST

/* Batch composition --------------------------------------------------------- */

/* Three sequences (9, 5 and 13 tokens) in interleaved batches of prompt chunks and
 * decode steps, against each sequence alone as one chunk. While every batch stays
 * below the sgemm row threshold all matmuls run the row-independent kernel, so the
 * rows must be bit-identical; otherwise within 1e-6. */
START_TEST(batch_composition_does_not_matter)
{
    tmodel *m = model_make(_i, 200 + _i);
    int V = m->w.hp.n_vocab;
    enum { NA = 9, NB = 5, NC = 13 };
    int len[3] = {NA, NB, NC};
    int32_t toks[3][16];
    for (int s = 0; s < 3; s++) random_tokens(toks[s], len[s], V, 40 + s);

    /* batches of (seq, count) chunks, in this order */
    static const int plan[][3][2] = {
        {{0, 3}, {1, 2}, {2, 4}},
        {{2, 4}, {0, 2}, {-1, 0}},
        {{1, 3}, {0, 1}, {2, 1}},
        {{0, 1}, {2, 1}, {0, 1}},    /* rows of one sequence need not be adjacent */
        {{2, 1}, {0, 1}, {-1, 0}},
        {{2, 2}, {-1, 0}, {-1, 0}},
    };
    float *mixed = calloc((size_t)(NA + NB + NC) * V, sizeof(float));
    float *alone = calloc((size_t)16 * V, sizeof(float));
    float *out = calloc((size_t)32 * V, sizeof(float));
    int done[3] = {0, 0, 0}, max_rows = 0;
    moe_engine *e = engine_make(m, 2, 0.0f);
    /* slots 3, 0, 2 so slot numbers differ from the alone runs */
    int slot[3] = {3, 0, 2};
    for (int s = 0; s < 3; s++) ck_assert_int_eq(moe_engine_seq_reserve(e, slot[s], len[s], err, sizeof err), 0);
    for (size_t b = 0; b < sizeof plan / sizeof plan[0]; b++) {
        row r[32];
        int n = 0, src[32][2];
        for (int c = 0; c < 3; c++) {
            int s = plan[b][c][0];
            if (s < 0) continue;
            for (int j = 0; j < plan[b][c][1]; j++) {
                int p = done[s]++;
                r[n] = (row){toks[s][p], p, slot[s], (uint8_t)(p % 3 != 1)};   /* some rows want none */
                src[n][0] = s;
                src[n][1] = p;
                n++;
            }
        }
        if (n > max_rows) max_rows = n;
        ck_assert_msg(run_batch(e, r, n, out) == 0, "%s", err);
        int o = 0;
        for (int i = 0; i < n; i++) {
            if (!r[i].want) continue;
            int off = (src[i][0] == 0 ? 0 : src[i][0] == 1 ? NA : NA + NB) + src[i][1];
            memcpy(mixed + (size_t)off * V, out + (size_t)o++ * V, sizeof(float) * V);
        }
    }
    for (int s = 0; s < 3; s++) ck_assert_int_eq(done[s], len[s]);
    int bitexact = max_rows < matmul_sgemm_min_rows() && len[2] < matmul_sgemm_min_rows();
    for (int s = 0; s < 3; s++) {
        moe_engine *a = engine_make(m, 1, 0.0f);
        ck_assert_int_eq(moe_engine_seq_reserve(a, 0, len[s], err, sizeof err), 0);
        row r[16];
        for (int p = 0; p < len[s]; p++) r[p] = (row){toks[s][p], p, 0, 1};
        ck_assert_msg(run_batch(a, r, len[s], alone) == 0, "%s", err);
        int base = s == 0 ? 0 : s == 1 ? NA : NA + NB;
        for (int p = 0; p < len[s]; p++) {
            if (p % 3 == 1) continue;
            const float *x = mixed + (size_t)(base + p) * V, *y = alone + (size_t)p * V;
            if (bitexact) {
                ck_assert_msg(memcmp(x, y, sizeof(float) * V) == 0, "seq %d pos %d differs", s, p);
            } else {
                for (int i = 0; i < V; i++) ck_assert_double_eq_tol(x[i], y[i], 1e-6 * fmax(1, fabs(y[i])));
            }
        }
        moe_engine_free(a);
    }
    moe_engine_free(e);
    free(mixed);
    free(alone);
    free(out);
    model_free(m);
}
END_TEST

/* Threads ----------------------------------------------------------------- */

/* Sequence 0's prompt in batches of chunk[0], chunk[1], ... rows, then `steps`
 * decode steps of three sequences (1 and 2 starting from position 0), every row
 * wanting logits, written one batch after another. Tokens from seed + sequence.
 * Frees e. */
enum { RUN_MAX_POS = 48 };
static void schedule_run(moe_engine *e, const tmodel *m, const int *chunk, int n_chunks, int steps,
                         uint64_t seed, float *logits)
{
    int V = m->w.hp.n_vocab, prompt = 0;
    for (int c = 0; c < n_chunks; c++) prompt += chunk[c];
    ck_assert_int_le(prompt + steps, RUN_MAX_POS);
    int32_t t[3][RUN_MAX_POS];
    for (int s = 0; s < 3; s++) {
        random_tokens(t[s], RUN_MAX_POS, V, seed + (uint64_t)s);
        ck_assert_int_eq(moe_engine_seq_reserve(e, s, prompt + steps, err, sizeof err), 0);
    }
    row r[32];
    for (int c = 0, p0 = 0; c < n_chunks; p0 += chunk[c++]) {
        ck_assert_int_le(chunk[c], 32);
        for (int i = 0; i < chunk[c]; i++) r[i] = (row){t[0][p0 + i], p0 + i, 0, 1};
        ck_assert_msg(run_batch(e, r, chunk[c], logits) == 0, "%s", err);
        logits += (size_t)chunk[c] * V;
    }
    for (int step = 0; step < steps; step++) {
        int n = 0;
        for (int s = 0; s < 3; s++) {
            int p = s == 0 ? prompt + step : step;
            r[n++] = (row){t[s][p], p, s, 1};
        }
        ck_assert_msg(run_batch(e, r, n, logits) == 0, "%s", err);
        logits += (size_t)n * V;
    }
    moe_engine_free(e);
}

/* A 20-row prefill (the sgemm path) plus decode steps of three sequences. */
static void thread_run_kvt(const tmodel *m, int threads, int packed, kv_type type, float *logits)
{
    const int chunk[] = {20};
    schedule_run(engine_make_kvt(m, threads, 0.0f, packed, 4, type), m, chunk, 1, 4, 70, logits);
}

static void thread_run(const tmodel *m, int threads, int packed, float *logits)
{
    thread_run_kvt(m, threads, packed, KV_F32, logits);
}

/* Loop index: the config, then the same configs with an F16 cache. */
START_TEST(one_thread_equals_two)
{
    int cfg = _i % CFG_COUNT;
    kv_type type = _i < CFG_COUNT ? KV_F32 : KV_F16;
    tmodel *m = model_make(cfg, 300 + cfg);
    size_t n = (size_t)(20 + 12) * m->w.hp.n_vocab;
    float *a = calloc(n, sizeof(float)), *b = calloc(n, sizeof(float));
    thread_run_kvt(m, 1, packed_supported(), type, a);
    thread_run_kvt(m, 2, packed_supported(), type, b);
    ck_assert(memcmp(a, b, n * sizeof(float)) == 0);
    free(a);
    free(b);
    model_free(m);
}
END_TEST

/* The packed copies of the projections change no bit of the logits (a prompt of
 * 20 and steps of 3 rows, below the sgemm switch), and a build without the
 * kernel refuses to be asked for them. */
START_TEST(packed_projections_change_no_bit)
{
    tmodel *m = model_make(_i, 400 + _i);
    if (!packed_supported()) {
        moe_engine_params p = moe_engine_default_params(&m->w.hp);
        ck_assert_int_eq(p.packed_projections, 0);
        p.packed_projections = 1;
        moe_engine *e = NULL;
        ck_assert_int_ne(moe_engine_create(&m->w, &p, &e, err, sizeof err), 0);
        ck_assert_msg(strstr(err, "AVX-512") != NULL, "%s", err);
        printf("packed projections: not in this build (no AVX-512), refused as it should be\n");
        model_free(m);
        return;
    }
    size_t n = (size_t)(20 + 12) * m->w.hp.n_vocab;
    float *a = calloc(n, sizeof(float)), *b = calloc(n, sizeof(float));
    thread_run(m, 2, MOE_PACK_AT_CREATE, a);
    thread_run(m, 2, MOE_PACK_OFF, b);
    ck_assert(memcmp(a, b, n * sizeof(float)) == 0);
    /* packed in the background: the copies take over whenever they are done */
    thread_run(m, 2, MOE_PACK_BACKGROUND, b);
    ck_assert(memcmp(a, b, n * sizeof(float)) == 0);
    moe_engine *e = engine_make_packed(m, 1, 0.0f, MOE_PACK_AT_CREATE);
    ck_assert(moe_engine_packed_ready(e));
    ck_assert_uint_gt(moe_engine_packed_bytes(e), 0);
    ck_assert_uint_eq(moe_engine_packed_bytes(e), moe_engine_packed_bytes_for(&m->w.hp));
    moe_engine_free(e);
    e = engine_make_packed(m, 1, 0.0f, MOE_PACK_BACKGROUND);
    for (int i = 0; i < 10000 && !moe_engine_packed_ready(e); i++) usleep(1000);
    ck_assert_msg(moe_engine_packed_ready(e), "the background packer did not finish in 10 s");
    moe_engine_free(e);
    moe_engine_free(engine_make_packed(m, 2, 0.0f, MOE_PACK_BACKGROUND));   /* freed while packing */
    e = engine_make_packed(m, 1, 0.0f, MOE_PACK_OFF);
    ck_assert(!moe_engine_packed_ready(e));
    ck_assert_uint_eq(moe_engine_packed_bytes(e), 0);
    moe_engine_free(e);
    free(a);
    free(b);
    model_free(m);
}
END_TEST

/* A 40-token prompt in chunks of 16 and 24, then 6 decode steps of three
 * sequences, with the KV cache in blocks of block_size positions. */
static void block_run(const tmodel *m, int block_size, kv_type type, float *logits)
{
    const int chunk[] = {16, 24};
    schedule_run(engine_make_kvt(m, 2, 0.0f, packed_supported(), block_size, type), m, chunk, 2, 6, 90, logits);
}

/* Attention reads the keys in the cache's own tiles when the block size is a
 * multiple of 16 positions and copies them otherwise; the block size (and so
 * the path) changes no bit. Loop index: the config, then with an F16 cache. */
START_TEST(kv_block_size_changes_no_bit)
{
    int cfg = _i % CFG_COUNT;
    kv_type type = _i < CFG_COUNT ? KV_F32 : KV_F16;
    tmodel *m = model_make(cfg, 500 + cfg);
    size_t n = (size_t)(40 + 18) * m->w.hp.n_vocab;
    float *a = calloc(n, sizeof(float)), *b = calloc(n, sizeof(float));
    block_run(m, 16, type, a);
    const int sizes[] = {4, 24, 32, 48, 7};
    for (int i = 0; i < 5; i++) {
        block_run(m, sizes[i], type, b);
        ck_assert_msg(memcmp(a, b, n * sizeof(float)) == 0, "KV %s: block size %d differs from 16",
                      kv_type_name(type), sizes[i]);
    }
    if (type == KV_F16) {   /* and the F16 cache is not the F32 one */
        block_run(m, 16, KV_F32, b);
        ck_assert(memcmp(a, b, n * sizeof(float)) != 0);
    }
    free(a);
    free(b);
    model_free(m);
}
END_TEST

/* Truncating a sequence and continuing it differently gives what a fresh
 * sequence with that continuation gives (label scoring relies on it). */
START_TEST(truncate_then_continue_equals_fresh)
{
    tmodel *m = model_make(0, 77);
    /* blocks of 4 (keys copied for attention) and 16 (read in the cache's tiles,
     * where the truncated keys stay behind the new ones in the same tile) */
    moe_engine *e = engine_make_kv(m, 1, 0.0f, packed_supported(), _i ? 16 : 4);
    int V = m->w.hp.n_vocab;
    int32_t prompt[6], a[3], b[2];
    random_tokens(prompt, 6, V, 1);
    random_tokens(a, 3, V, 2);
    random_tokens(b, 2, V, 3);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, 16, err, sizeof err), 0);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 1, 16, err, sizeof err), 0);
    row r[16];
    int n = 0;
    for (int i = 0; i < 6; i++) r[n++] = (row){prompt[i], i, 0, 0};
    for (int i = 0; i < 3; i++) r[n++] = (row){a[i], 6 + i, 0, 1};
    float *la = calloc((size_t)3 * V, sizeof(float)), *lb = calloc((size_t)2 * V, sizeof(float));
    float *lf = calloc((size_t)2 * V, sizeof(float));
    ck_assert_int_eq(run_batch(e, r, n, la), 0);
    ck_assert_int_ne(moe_engine_seq_truncate(e, 0, 10, err, sizeof err), 0);  /* holds 9 */
    ck_assert_int_eq(moe_engine_seq_truncate(e, 0, 6, err, sizeof err), 0);
    n = 0;
    for (int i = 0; i < 2; i++) r[n++] = (row){b[i], 6 + i, 0, 1};
    ck_assert_int_eq(run_batch(e, r, n, lb), 0);
    n = 0;  /* the same continuation on a fresh sequence */
    for (int i = 0; i < 6; i++) r[n++] = (row){prompt[i], i, 1, 0};
    for (int i = 0; i < 2; i++) r[n++] = (row){b[i], 6 + i, 1, 1};
    ck_assert_int_eq(run_batch(e, r, n, lf), 0);
    for (int i = 0; i < 2 * V; i++)
        ck_assert_msg(fabsf(lb[i] - lf[i]) <= 1e-4f * (1.0f + fabsf(lf[i])), "logit %d: %g vs %g", i, lb[i], lf[i]);
    free(la); free(lb); free(lf);
    moe_engine_free(e);
    model_free(m);
}
END_TEST

/* Random schedules ---------------------------------------------------------- */

/* Continuous batching as a server does it, at random: sequences of 1-24 tokens
 * arrive over time into whichever of the 4 slots is free (a slot is reused
 * right after the sequence before it is released), and each batch takes a chunk
 * of 1-8 rows from a random subset of the running sequences, their rows
 * interleaved in random order, each row wanting logits or not. The KV block
 * size (4, 7 or 16) and the thread count (1 or 2) are drawn too. Every logits
 * row must equal, to the bit, that sequence run alone on a fresh engine. */
enum { SCHED_RUNS = 20, SCHED_SEQS = 7, SCHED_MAX_LEN = 24, SCHED_SLOTS = 4 };

typedef struct {
    int len, done, slot;             /* slot -1: not started or finished */
    int32_t tok[SCHED_MAX_LEN];
    uint8_t want[SCHED_MAX_LEN];
    float *logits;                   /* (len, V): the rows that wanted them */
} sched_seq;

static int rand_below(uint64_t *rng, int n)
{
    return (int)((urand(rng) + 1.0) * 0.5 * n) % n;
}

/* One batch: returns its rows (at most 32), each (sequence index, position). */
static int sched_batch(sched_seq *q, uint64_t *rng, int src[32][2])
{
    int take[SCHED_SEQS] = {0}, n = 0;
    for (int i = 0; i < SCHED_SEQS && n < 32; i++) {
        if (q[i].slot < 0 || q[i].done == q[i].len || rand_below(rng, 10) < 3) continue;
        int left = q[i].len - q[i].done, c = 1 + rand_below(rng, left < 8 ? left : 8);
        if (n + c > 32) c = 32 - n;
        take[i] = c;
        n += c;
    }
    for (int r = 0; r < n; r++) {   /* interleave: a random sequence's next row each time */
        int i;
        do i = rand_below(rng, SCHED_SEQS); while (!take[i]);
        src[r][0] = i;
        src[r][1] = q[i].done++;
        take[i]--;
    }
    return n;
}

START_TEST(random_schedules_equal_alone)
{
    tmodel *m = model_make(_i, 900 + _i);
    int V = m->w.hp.n_vocab;
    float *out = calloc((size_t)32 * V, sizeof(float)), *alone = calloc((size_t)SCHED_MAX_LEN * V, sizeof(float));
    long batches = 0, rows = 0;
    for (uint64_t run = 0; run < SCHED_RUNS; run++) {
        uint64_t rng = 0x9E3779B97F4A7C15ull * (run + 1) + (uint64_t)_i;
        static const int block_sizes[] = {4, 7, 16};
        int bs = block_sizes[rand_below(&rng, 3)], threads = 1 + rand_below(&rng, 2);
        kv_type type = rand_below(&rng, 2) ? KV_F16 : KV_F32;
        moe_engine *e = engine_make_kvt(m, threads, 0.0f, packed_supported(), bs, type);
        sched_seq q[SCHED_SEQS];
        for (int i = 0; i < SCHED_SEQS; i++) {
            q[i] = (sched_seq){.len = 1 + rand_below(&rng, SCHED_MAX_LEN), .slot = -1};
            random_tokens(q[i].tok, q[i].len, V, rng + (uint64_t)i);
            for (int p = 0; p < q[i].len; p++) q[i].want[p] = (uint8_t)(rand_below(&rng, 3) != 0);
            q[i].logits = calloc((size_t)q[i].len * V, sizeof(float));
        }
        int started = 0, finished = 0, used[SCHED_SLOTS] = {0};
        while (finished < SCHED_SEQS) {
            for (int sl = 0; sl < SCHED_SLOTS && started < SCHED_SEQS; sl++) {
                if (used[sl]) continue;
                ck_assert_int_eq(moe_engine_seq_reserve(e, sl, q[started].len, err, sizeof err), 0);
                q[started++].slot = sl;
                used[sl] = 1;
            }
            int src[32][2], n = sched_batch(q, &rng, src);
            if (n == 0) continue;
            batches++;
            rows += n;
            row r[32];
            for (int k = 0; k < n; k++) {
                const sched_seq *s = &q[src[k][0]];
                r[k] = (row){s->tok[src[k][1]], src[k][1], s->slot, s->want[src[k][1]]};
            }
            ck_assert_msg(run_batch(e, r, n, out) == 0, "%s", err);
            for (int k = 0, o = 0; k < n; k++)
                if (r[k].want)
                    memcpy(q[src[k][0]].logits + (size_t)src[k][1] * V, out + (size_t)o++ * V, sizeof(float) * V);
            for (int i = 0; i < SCHED_SEQS; i++)
                if (q[i].slot >= 0 && q[i].done == q[i].len) {
                    moe_engine_seq_release(e, q[i].slot);
                    used[q[i].slot] = 0;
                    q[i].slot = -1;
                    finished++;
                }
        }
        moe_engine_free(e);
        for (int i = 0; i < SCHED_SEQS; i++) {
            moe_engine *a = engine_make_kvt(m, 1, 0.0f, packed_supported(), 4, type);
            ck_assert_int_eq(moe_engine_seq_reserve(a, 0, q[i].len, err, sizeof err), 0);
            row r[SCHED_MAX_LEN];
            for (int p = 0; p < q[i].len; p++) r[p] = (row){q[i].tok[p], p, 0, 1};
            ck_assert_msg(run_batch(a, r, q[i].len, alone) == 0, "%s", err);
            for (int p = 0; p < q[i].len; p++)
                ck_assert_msg(!q[i].want[p] || memcmp(q[i].logits + (size_t)p * V, alone + (size_t)p * V,
                                                      sizeof(float) * V) == 0,
                              "run %d (block size %d, %d threads, KV %s): sequence %d position %d differs",
                              (int)run, bs, threads, kv_type_name(type), i, p);
            moe_engine_free(a);
            free(q[i].logits);
        }
    }
    printf("random schedules, config %d: %ld batches, %ld rows, %d sequences\n", _i, batches, rows, SCHED_RUNS * SCHED_SEQS);
    free(out);
    free(alone);
    model_free(m);
}
END_TEST

/* Errors ------------------------------------------------------------------ */

START_TEST(bad_batches_fail_and_change_nothing)
{
    tmodel *m = model_make(CFG_QWEN2MOE, 400);
    int V = m->w.hp.n_vocab;
    int32_t t[8];
    random_tokens(t, 8, V, 9);
    float *ok = calloc((size_t)8 * V, sizeof(float)), *got = calloc((size_t)40 * V, sizeof(float));

    /* the expected logits: an engine that sees only good batches */
    moe_engine *e = engine_make(m, 1, 0.0f);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, 8, err, sizeof err), 0);
    row r[40];
    for (int p = 0; p < 8; p++) r[p] = (row){t[p], p, 0, 1};
    ck_assert_int_eq(run_batch(e, r, 3, ok), 0);
    ck_assert_int_eq(run_batch(e, r + 3, 5, ok + (size_t)3 * V), 0);
    moe_engine_free(e);

    e = engine_make(m, 2, 0.0f);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, 8, err, sizeof err), 0);
    ck_assert_int_eq(run_batch(e, r, 3, got), 0);
    row bad[3];
#define EXPECT_FAIL(n_rows, what)                                            \
    do {                                                                     \
        err[0] = '\0';                                                       \
        ck_assert_int_eq(run_batch(e, bad, n_rows, got), -1);                \
        ck_assert_msg(strstr(err, what) != NULL, "'%s' lacks '%s'", err, what); \
    } while (0)
    bad[0] = (row){V, 3, 0, 1};                       EXPECT_FAIL(1, "token");
    bad[0] = (row){-1, 3, 0, 1};                      EXPECT_FAIL(1, "token");
    bad[0] = (row){t[3], 0, 1, 1};                    EXPECT_FAIL(1, "reserved");   /* unreserved slot */
    bad[0] = (row){t[3], 3, 4, 1};                    EXPECT_FAIL(1, "slot");       /* no such slot */
    bad[0] = (row){t[3], 3, -1, 1};                   EXPECT_FAIL(1, "slot");
    bad[0] = (row){t[3], 4, 0, 1};                    EXPECT_FAIL(1, "position");   /* gap */
    bad[0] = (row){t[3], 2, 0, 1};                    EXPECT_FAIL(1, "position");   /* rewrite */
    bad[0] = (row){t[3], 3, 0, 1}; bad[1] = bad[0];   EXPECT_FAIL(2, "position");   /* duplicate */
    bad[1] = (row){t[4], 4, 0, 1}; bad[2] = (row){1, 0, 2, 0};
    EXPECT_FAIL(3, "reserved");   /* first two rows fine, the third is not */
    for (int i = 0; i < 40; i++) r[i] = (row){1, 3 + i, 0, 1};
    err[0] = '\0';
    ck_assert_int_eq(run_batch(e, r, 33, got), -1);  /* > max_batch_tokens */
    ck_assert(strstr(err, "max_batch_tokens") != NULL);
    ck_assert_int_eq(run_batch(e, r, 6, got), -1);   /* positions 3..8, only 8 reserved */
    ck_assert(strstr(err, "reserved") != NULL);
    int32_t one = t[3], p3 = 3, s0 = 0;
    uint8_t w1 = 1;
    moe_batch nolog = {.n_tokens = 1, .token = &one, .pos = &p3, .seq = &s0, .want_logits = &w1};
    ck_assert_int_eq(moe_engine_forward(e, &nolog, NULL, err, sizeof err), -1);
    moe_batch neg = {.n_tokens = -1};
    ck_assert_int_eq(moe_engine_forward(e, &neg, got, err, sizeof err), -1);
    moe_batch empty = {.n_tokens = 0};
    ck_assert_int_eq(moe_engine_forward(e, &empty, NULL, err, sizeof err), 0);

    /* after all that, the sequence continues exactly as if nothing happened */
    for (int p = 0; p < 8; p++) r[p] = (row){t[p], p, 0, 1};
    ck_assert_int_eq(run_batch(e, r + 3, 5, got + (size_t)3 * V), 0);
    ck_assert(memcmp(got + (size_t)3 * V, ok + (size_t)3 * V, sizeof(float) * 5 * V) == 0);

    /* release and reuse the slot: starts again at position 0 */
    int free_before = moe_engine_kv_blocks_free(e);
    moe_engine_seq_release(e, 0);
    ck_assert_int_eq(moe_engine_kv_blocks_free(e), free_before + 2);
    bad[0] = (row){t[0], 0, 0, 1};
    EXPECT_FAIL(1, "reserved");
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, 8, err, sizeof err), 0);
    ck_assert_int_eq(run_batch(e, r, 8, got), 0);
    ck_assert(memcmp(got, ok, sizeof(float) * 8 * V) == 0);
#undef EXPECT_FAIL
    moe_engine_free(e);
    free(ok);
    free(got);
    model_free(m);
}
END_TEST

START_TEST(create_rejects_bad_input)
{
    tmodel *m = model_make(CFG_LLAMA_MOE, 500);
    moe_engine_params p = moe_engine_default_params(&m->w.hp);
    ck_assert_int_eq(p.n_threads, 1);
    ck_assert_int_eq(p.max_seqs, 8);
    ck_assert_int_eq(p.max_batch_tokens, 512);
    ck_assert_int_ge(p.kv_n_blocks * p.kv_block_size, 8 * p.max_seq_len);
    ck_assert_int_le(p.max_seq_len, m->w.hp.n_ctx_train);
    moe_engine *e = (moe_engine *)1;
    moe_engine_params q = p;
    q.n_threads = 0;
    ck_assert_int_eq(moe_engine_create(&m->w, &q, &e, err, sizeof err), -1);
    ck_assert_ptr_null(e);
    q = p;
    q.max_seq_len = m->w.hp.n_ctx_train + 1;
    ck_assert_int_eq(moe_engine_create(&m->w, &q, &e, err, sizeof err), -1);
    q = p;
    q.max_batch_tokens = 0;
    ck_assert_int_eq(moe_engine_create(&m->w, &q, &e, err, sizeof err), -1);
    q = p;
    q.packed_projections = 3;
    ck_assert_int_eq(moe_engine_create(&m->w, &q, &e, err, sizeof err), -1);
    ck_assert(strstr(err, "packed_projections") != NULL);
    /* weights that do not validate: a type no kernel reads, a missing matrix */
    static const unsigned char bytes[64];
    m->L[0].wv_raw = (moe_wraw){bytes, MOE_WT_COUNT};
    ck_assert_int_eq(moe_engine_create(&m->w, &p, &e, err, sizeof err), -1);
    ck_assert(strstr(err, "layer 0") != NULL && strstr(err, "attention") != NULL);
    m->L[0].wv_raw = (moe_wraw){NULL, MOE_WT_F32};
    m->w.output_raw = (moe_wraw){bytes, MOE_WT_Q4_K};   /* rows not whole super-blocks */
    ck_assert_int_eq(moe_engine_create(&m->w, &p, &e, err, sizeof err), -1);
    ck_assert(strstr(err, "output") != NULL);
    m->w.output_raw = (moe_wraw){NULL, MOE_WT_F32};
    m->L[1].exp_raw = (moe_ffn_raw){(moe_wtype)7, (moe_wtype)7, (moe_wtype)7, bytes, bytes, bytes};
    ck_assert_int_eq(moe_engine_create(&m->w, &p, &e, err, sizeof err), -1);
    ck_assert(strstr(err, "layer 1") != NULL);
    m->L[1].exp_raw = (moe_ffn_raw){MOE_WT_F32, MOE_WT_F32, MOE_WT_F32, NULL, NULL, NULL};
    ck_assert_int_eq(moe_engine_create(&m->w, &p, &e, err, sizeof err), 0);
    moe_engine_free(e);
    m->L[1].exp_up = NULL;
    ck_assert_int_eq(moe_engine_create(&m->w, &p, &e, err, sizeof err), -1);
    ck_assert(strstr(err, "layer 1") != NULL);
    model_free(m);
}
END_TEST

/* Expert counters and trace ------------------------------------------------ */

static void counters_run(int cfg, float cf, int *n_out, uint64_t *routed_sum, uint64_t *dropped_sum)
{
    tmodel *m = model_make(cfg, 600);
    const moe_hparams *hp = &m->w.hp;
    int V = hp->n_vocab, k = hp->n_expert_used, ne = hp->n_expert, nl = hp->n_layer;
    enum { N = 12 };
    int32_t t[N];
    random_tokens(t, N, V, 3);
    moe_engine *e = engine_make(m, 2, cf);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, N, err, sizeof err), 0);
    int32_t tok[N], pos[N], seq[N], tr_e[N * MAX_LAYERS * 4];
    uint8_t want[N];
    float tr_w[N * MAX_LAYERS * 4], *logits = malloc(sizeof(float) * N * V);
    for (int i = 0; i < N; i++) { tok[i] = t[i]; pos[i] = i; seq[i] = 0; want[i] = 1; }
    moe_batch b = {N, tok, pos, seq, want, tr_e, tr_w};
    ck_assert_msg(moe_engine_forward(e, &b, logits, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < N * V; i++) ck_assert(isfinite(logits[i]));
    const uint64_t *ro = moe_engine_expert_routed(e), *dr = moe_engine_expert_dropped(e);
    for (int l = 0; l < nl; l++) {
        uint64_t r = 0, d = 0;
        for (int x = 0; x < ne; x++) { r += ro[l * ne + x]; d += dr[l * ne + x]; }
        ck_assert_uint_eq(r + d, (uint64_t)N * k);
        routed_sum[l] = r;
        dropped_sum[l] = d;
        if (cf <= 0) ck_assert_uint_eq(d, 0);
    }
    /* trace: (token, layer, k) distinct valid ids, positive weights */
    for (int i = 0; i < N; i++)
        for (int l = 0; l < nl; l++) {
            const int32_t *id = tr_e + ((size_t)i * nl + l) * k;
            const float *w = tr_w + ((size_t)i * nl + l) * k;
            double ws = 0;
            for (int j = 0; j < k; j++) {
                ck_assert(id[j] >= 0 && id[j] < ne);
                for (int j2 = 0; j2 < j; j2++) ck_assert_int_ne(id[j], id[j2]);
                ck_assert(w[j] > 0.0f && w[j] <= 1.0f);
                ws += w[j];
            }
            if (moe_arch_get(hp->arch)->renorm_topk) ck_assert_double_eq_tol(ws, 1.0, 1e-5);
        }
    *n_out = N * k;
    free(logits);
    moe_engine_free(e);
    model_free(m);
}

START_TEST(routed_counters_sum_to_tokens_times_k)
{
    int nk;
    uint64_t r[MAX_LAYERS], d[MAX_LAYERS];
    counters_run(CFG_QWEN3MOE, 0.0f, &nk, r, d);
    for (int l = 0; l < 3; l++) ck_assert_uint_eq(r[l], (uint64_t)nk);
    counters_run(CFG_LLAMA_MOE, 0.0f, &nk, r, d);
    for (int l = 0; l < 2; l++) ck_assert_uint_eq(r[l], (uint64_t)nk);
}
END_TEST

/* capacity factor 0.5 with 12 tokens, k 2, 6 experts: each queue keeps at most
 * ceil(0.5 * 24 / 6) = 2 rows, so at most 12 of the 24 pairs survive. */
START_TEST(capacity_factor_drops_are_counted)
{
    int nk;
    uint64_t r[MAX_LAYERS], d[MAX_LAYERS];
    counters_run(CFG_LLAMA_MOE, 0.5f, &nk, r, d);
    for (int l = 0; l < 2; l++) {
        ck_assert_uint_le(r[l], 12);
        ck_assert_uint_ge(d[l], 12);
    }
}
END_TEST

/* The phase timings: zero before any forward, each phase that ran counted,
 * none negative, their sum the forwards' time (so no more than the wall time
 * around the calls), and a rejected batch adds nothing. */
static void phases_check(int cfg)
{
    tmodel *m = model_make(cfg, 700);
    const moe_hparams *hp = &m->w.hp;
    int V = hp->n_vocab;
    enum { N = 10, STEPS = 3 };
    moe_engine *e = engine_make(m, 2, 0.0f);
    double ph[MOE_PHASE_COUNT], after[MOE_PHASE_COUNT];
    moe_engine_phase_seconds(e, ph);
    for (int i = 0; i < MOE_PHASE_COUNT; i++) ck_assert(ph[i] == 0.0);
    ck_assert_int_eq(moe_engine_seq_reserve(e, 0, N + STEPS, err, sizeof err), 0);
    int32_t tok[N], pos[N], seq[N];
    uint8_t want[N];
    float *logits = malloc(sizeof(float) * N * V);
    random_tokens(tok, N, V, 7);
    for (int i = 0; i < N; i++) { pos[i] = i; seq[i] = 0; want[i] = i == N - 1; }
    moe_batch b = {.n_tokens = N, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
    double t0 = clock_mono_s();
    ck_assert_msg(moe_engine_forward(e, &b, logits, err, sizeof err) == 0, "%s", err);
    for (int s = 0; s < STEPS; s++) {
        moe_batch d = {.n_tokens = 1, .token = tok + s, .pos = (int32_t[]){N + s}, .seq = seq, .want_logits = want + N - 1};
        ck_assert_msg(moe_engine_forward(e, &d, logits, err, sizeof err) == 0, "%s", err);
    }
    double wall = clock_mono_s() - t0, sum = 0;
    moe_engine_phase_seconds(e, ph);
    for (int i = 0; i < MOE_PHASE_COUNT; i++) {
        ck_assert_msg(ph[i] >= 0.0, "%s: %g", moe_phase_name((moe_phase)i), ph[i]);
        sum += ph[i];
    }
    ck_assert_msg(sum > 0.0 && sum <= wall, "phases add to %g s, the calls took %g s", sum, wall);
    int moe = hp->n_expert > 0;
    ck_assert(ph[MOE_PHASE_PROJECTIONS] > 0.0 && ph[MOE_PHASE_ATTENTION] > 0.0);
    ck_assert(ph[MOE_PHASE_EXPERTS] > 0.0 && ph[MOE_PHASE_LOGITS] > 0.0);
    ck_assert(moe ? ph[MOE_PHASE_ROUTING] > 0.0 : ph[MOE_PHASE_ROUTING] == 0.0);
    ck_assert(moe ? ph[MOE_PHASE_COMBINE] > 0.0 : ph[MOE_PHASE_COMBINE] == 0.0);
    /* a rejected batch: a token id past the vocabulary */
    int32_t bad = V, p = N + STEPS;
    moe_batch x = {.n_tokens = 1, .token = &bad, .pos = &p, .seq = seq, .want_logits = want};
    ck_assert_int_ne(moe_engine_forward(e, &x, logits, err, sizeof err), 0);
    moe_engine_phase_seconds(e, after);
    for (int i = 0; i < MOE_PHASE_COUNT; i++) ck_assert(after[i] == ph[i]);
    ck_assert_str_eq(moe_phase_name(MOE_PHASE_EXPERTS), "experts");
    ck_assert_str_eq(moe_phase_name(MOE_PHASE_COUNT), "?");
    free(logits);
    moe_engine_free(e);
    model_free(m);
}

START_TEST(phase_seconds_account_for_forwards)
{
    phases_check(_i);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, matches_reference, 0, 2 * CFG_COUNT);
    tcase_add_loop_test(tc, batch_composition_does_not_matter, 0, CFG_COUNT);
    tcase_add_loop_test(tc, one_thread_equals_two, 0, 2 * CFG_COUNT);
    tcase_add_loop_test(tc, packed_projections_change_no_bit, 0, CFG_COUNT);
    tcase_add_loop_test(tc, kv_block_size_changes_no_bit, 0, 2 * CFG_COUNT);
    tcase_add_loop_test(tc, truncate_then_continue_equals_fresh, 0, 2);
    tcase_add_loop_test(tc, random_schedules_equal_alone, 0, CFG_COUNT);
    tcase_add_test(tc, bad_batches_fail_and_change_nothing);
    tcase_add_test(tc, create_rejects_bad_input);
    tcase_add_test(tc, routed_counters_sum_to_tokens_times_k);
    tcase_add_test(tc, capacity_factor_drops_are_counted);
    tcase_add_loop_test(tc, phase_seconds_account_for_forwards, 0, CFG_COUNT);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
