/* engine.c -- the batched forward pass over a ragged batch.
 *
 * Per layer, for the n rows of a batch (docs/ARCHITECTURE.md):
 *   RMSNorm -> Q, K, V (one matmul each for all rows) -> per row: biases, q/k norm,
 *   RoPE, K/V into the sequence's cache blocks -> causal attention of each row over
 *   its own sequence up to its position (tasks: runs of one sequence's rows x KV
 *   heads) -> output projection + residual -> RMSNorm ->
 *   MoE (or dense) FFN + residual.
 * Then final norm and output projection for the rows that want logits only.
 *
 * Every row is computed on its own (no reduction mixes rows), and every parallel
 * task writes a fixed part of the output in a fixed order, so a row's logits do not
 * depend on the thread count or, outside the matmul/expert kernels, on what else
 * shares the batch. All scratch is sized at create; forward allocates nothing.
 */
#include "core/engine.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define HAVE_PREFETCH 1
#else
#define HAVE_PREFETCH 0
#endif

#include "core/clock.h"
#include "core/kv_cache.h"
#include "core/matmul.h"
#include "core/moe_layer.h"
#include "core/ops.h"
#include "core/packed.h"
#include "core/pool.h"
#include "core/vexp.h"
#include "core/wconv.h"

/* Attention tiling (see attend()). */
#define ATT_RUN 16   /* rows per run */
#define ATT_T 16     /* positions per score vector; Kt rows are padded to this */
#define ATT_Q 4      /* query vectors per pass */
/* ATT_T-wide blocks per kernel pass: 4 (16 accumulators) where there are 32
 * vector registers, 2 with AVX2's 16 (see att_scores_blocks) */
#if defined(__AVX512F__)
#define ATT_NB 4
#else
#define ATT_NB 2
#endif

struct moe_engine {
    moe_weights w;              /* pointers borrowed: the model must outlive the engine */
    const moe_arch_info *arch;
    moe_engine_params p;
    int q_dim;                  /* n_head * head_dim */
    int kv_dim;                 /* n_head_kv * head_dim */

    pool *pool;
    moe_ffn *ffn;
    /* packed copies (p.packed_projections): per layer, then the output. With
     * MOE_PACK_BACKGROUND a thread of the engine's own fills them while forwards
     * run on the row kernel, then sets pk_ready (release); forwards read pk_ready
     * (acquire) before they touch them. */
    packed_w **pk_q, **pk_k, **pk_v, **pk_o;
    packed_w *pk_out;
    packed_scratch *pk_scratch;
    float *proj_wide;        /* projections read only in the file's type: (n_threads) slices
                              * widened at once (matmul_multi_scratch_floats), else NULL */
    int proj_sgemm;          /* sgemm takes the projections' many-row products, else (only
                              * some in the file's type, where F32 ones would be packed)
                              * the row kernels, whose bits the packed kernel has */
    atomic_int pk_ready;
    atomic_int pk_stop;         /* engine free: the packer stops at the next matrix */
    pthread_t pk_thread;
    int pk_thread_started;
    kv_cache *kv;
    int32_t *n_past;            /* (max_seqs) positions the cache holds per sequence */
    int32_t *next_pos;          /* (max_seqs) validation scratch */
    uint64_t *routed;           /* (n_layer, n_expert) cumulative */
    uint64_t *dropped;          /* (n_layer, n_expert) cumulative */
    /* cumulative wall seconds of the forwards (moe_engine_phase_seconds): the
     * whole pass, and the phases timed in it */
    double total_s, proj_s, att_s, logits_s;
    moe_ffn_times ffn_s;        /* routing, experts (the dense FFN too), combine */
    double *inv_freq;           /* (rope_dim / 2) base^(-2i / rope_dim) */

    /* scratch, B = max_batch_tokens rows */
    float *x;                   /* (B, n_embd) residual stream */
    float *xb;                  /* (B, n_embd) normalised input of a sublayer */
    float *q;                   /* (B, q_dim) */
    float *k;                   /* (B, kv_dim) */
    float *v;                   /* (B, kv_dim) */
    float *att;                 /* (B, q_dim) attention output per head */
    float *out;                 /* (B, n_embd) sublayer output before the residual */
    float *rope_cs;             /* (B, rope_dim) cos, sin of each rotated pair per row */
    int att_ld;                 /* max_seq_len rounded up to ATT_T */
    size_t att_scratch_stride;  /* floats per thread: Kt (head_dim, att_ld), w (ATT_Q, att_ld) */
    float *att_scratch;         /* (n_threads, att_scratch_stride) */
    const void **att_vrow;      /* (n_threads, att_ld) V row of each position (cache elements) */
    const void **att_kp;        /* (n_threads, att_ld / ATT_T) keys of each ATT_T positions */
    int32_t *run_start;         /* (B) first row of each attention run */
    int32_t *run_len;           /* (B) rows in it */
    int n_runs;
    int32_t *logit_rows;        /* (B) rows that want logits */
};

/* Parameters ------------------------------------------------------------- */

/* The header's defaults. A context longer than 4096 is capped there: 8 full
 * contexts of a 32k-token model would ask for tens of GB of KV; callers that want
 * long contexts set max_seq_len and kv_n_blocks themselves. */
moe_engine_params moe_engine_default_params(const moe_hparams *hp)
{
    int len = hp && hp->n_ctx_train > 0 ? hp->n_ctx_train : 2048;
    if (len > 4096) len = 4096;
    moe_engine_params p = {
        .n_threads = 1,
        .max_seqs = 8,
        .max_batch_tokens = 512,
        .kv_block_size = 16,
        .kv_type = KV_F32,
        .max_seq_len = len,
        .capacity_factor = 0.0f,
        .packed_projections = packed_supported() ? MOE_PACK_AT_CREATE : MOE_PACK_OFF,
    };
    p.kv_n_blocks = 8 * ((len + p.kv_block_size - 1) / p.kv_block_size);
    return p;
}

static int params_validate(const moe_hparams *hp, const moe_engine_params *p, char *err, size_t errlen)
{
    if (p->n_threads < 1 || p->n_threads > 1024) {
        snprintf(err, errlen, "engine: n_threads must be in [1, 1024], got %d", p->n_threads);
        return -1;
    }
    if (p->max_seqs < 1 || p->max_batch_tokens < 1 || p->kv_block_size < 1 ||
        p->kv_n_blocks < 1 || p->max_seq_len < 1) {
        snprintf(err, errlen, "engine: max_seqs, max_batch_tokens, kv_block_size, kv_n_blocks "
                 "and max_seq_len must be positive");
        return -1;
    }
    if ((int64_t)p->max_batch_tokens * hp->n_head > INT32_MAX ||
        (int64_t)p->max_batch_tokens * hp->n_layer * (hp->n_expert_used + 1) > INT32_MAX) {
        snprintf(err, errlen, "engine: max_batch_tokens %d too large", p->max_batch_tokens);
        return -1;
    }
    if (hp->n_ctx_train > 0 && p->max_seq_len > hp->n_ctx_train) {
        snprintf(err, errlen, "engine: max_seq_len %d exceeds the model's context length %d",
                 p->max_seq_len, hp->n_ctx_train);
        return -1;
    }
    if (p->packed_projections < MOE_PACK_OFF || p->packed_projections > MOE_PACK_BACKGROUND) {
        snprintf(err, errlen, "engine: packed_projections must be %d, %d or %d", MOE_PACK_OFF, MOE_PACK_AT_CREATE,
                 MOE_PACK_BACKGROUND);
        return -1;
    }
    if (p->packed_projections && !packed_supported()) {
        snprintf(err, errlen, "engine: packed projections need an AVX-512 build");
        return -1;
    }
    if (!(p->capacity_factor == p->capacity_factor) || p->capacity_factor > 1e6f) {
        snprintf(err, errlen, "engine: capacity_factor must be a number <= 1e6 (<= 0: dropless)");
        return -1;
    }
    return 0;
}

/* Lifecycle -------------------------------------------------------------- */

static void packed_free(moe_engine *e)
{
    for (int l = 0; l < e->w.hp.n_layer; l++) {
        if (e->pk_q) packed_w_free(e->pk_q[l]);
        if (e->pk_k) packed_w_free(e->pk_k[l]);
        if (e->pk_v) packed_w_free(e->pk_v[l]);
        if (e->pk_o) packed_w_free(e->pk_o[l]);
    }
    free(e->pk_q);
    free(e->pk_k);
    free(e->pk_v);
    free(e->pk_o);
    packed_w_free(e->pk_out);
    packed_scratch_free(e->pk_scratch);
}

static int packed_one(moe_engine *e, pool *p, const float *w, int n, int k, packed_w **out,
                      char *err, size_t errlen)
{
    if (atomic_load_explicit(&e->pk_stop, memory_order_relaxed)) {
        snprintf(err, errlen, "engine: packing stopped");
        return -1;
    }
    return packed_w_create(p, w, n, k, out, err, errlen);
}

/* Packs every layer's q, k, v and attention output weights and the output
 * projection, on pool p (NULL: on the calling thread). */
static int packed_fill(moe_engine *e, pool *p, char *err, size_t errlen)
{
    const moe_hparams *hp = &e->w.hp;
    int d = hp->n_embd;
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_weights *W = &e->w.layers[l];
        if (packed_one(e, p, W->wq, e->q_dim, d, &e->pk_q[l], err, errlen) ||
            packed_one(e, p, W->wk, e->kv_dim, d, &e->pk_k[l], err, errlen) ||
            packed_one(e, p, W->wv, e->kv_dim, d, &e->pk_v[l], err, errlen) ||
            packed_one(e, p, W->wo, d, e->q_dim, &e->pk_o[l], err, errlen))
            return -1;
    }
    return packed_one(e, p, e->w.output, hp->n_vocab, d, &e->pk_out, err, errlen);
}

/* The background packer: one thread, so the pool stays free for forwards. If it
 * fails (memory) the engine keeps the row kernel, which gives the same bits. */
static void *packer_main(void *arg)
{
    moe_engine *e = arg;
    char err[128];
    if (packed_fill(e, NULL, err, sizeof err) == 0)
        atomic_store_explicit(&e->pk_ready, 1, memory_order_release);
    return NULL;
}

/* The packed copies' holders and scratch, then the copies: on the pool now, or
 * by the background packer. */
static int packed_create(moe_engine *e, char *err, size_t errlen)
{
    const moe_hparams *hp = &e->w.hp;
    size_t L = (size_t)hp->n_layer;
    e->pk_q = calloc(L, sizeof *e->pk_q);
    e->pk_k = calloc(L, sizeof *e->pk_k);
    e->pk_v = calloc(L, sizeof *e->pk_v);
    e->pk_o = calloc(L, sizeof *e->pk_o);
    if (!e->pk_q || !e->pk_k || !e->pk_v || !e->pk_o) {
        snprintf(err, errlen, "engine: out of memory for packed weights");
        return -1;
    }
    int d = hp->n_embd, max_k = d > e->q_dim ? d : e->q_dim;
    if (packed_scratch_create(e->p.max_batch_tokens, max_k, e->p.n_threads, &e->pk_scratch, err, errlen))
        return -1;
    if (e->p.packed_projections == MOE_PACK_BACKGROUND) {
        if (pthread_create(&e->pk_thread, NULL, packer_main, e) != 0) {
            snprintf(err, errlen, "engine: cannot start the packing thread");
            return -1;
        }
        e->pk_thread_started = 1;
        return 0;
    }
    if (packed_fill(e, e->pool, err, errlen)) return -1;
    atomic_store_explicit(&e->pk_ready, 1, memory_order_release);
    return 0;
}

int moe_engine_create(const moe_weights *w, const moe_engine_params *p,
                      moe_engine **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!w || !p) {
        snprintf(err, errlen, "engine: weights and params are required");
        return -1;
    }
    if (moe_weights_validate(w, err, errlen)) return -1;
    const moe_hparams *hp = &w->hp;
    if (params_validate(hp, p, err, errlen)) return -1;

    moe_engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "engine: out of memory");
        return -1;
    }
    e->w = *w;
    atomic_init(&e->pk_ready, 0);
    atomic_init(&e->pk_stop, 0);
    e->arch = moe_arch_get(hp->arch);
    e->p = *p;
    if (e->p.capacity_factor < 0.0f) e->p.capacity_factor = 0.0f;
    e->q_dim = hp->n_head * hp->head_dim;
    e->kv_dim = hp->n_head_kv * hp->head_dim;

    if (pool_create(p->n_threads, &e->pool, err, errlen)) goto fail;
    if (moe_ffn_create(hp, p->max_batch_tokens, p->n_threads, &e->ffn, err, errlen)) goto fail;
    if (kv_cache_create(hp->n_layer, hp->n_head_kv, hp->head_dim, p->kv_block_size, p->kv_n_blocks,
                        p->max_seqs, p->max_seq_len, p->kv_type, &e->kv, err, errlen)) goto fail;

    size_t B = (size_t)p->max_batch_tokens;
    size_t n_le = (size_t)hp->n_layer * (size_t)(hp->n_expert > 0 ? hp->n_expert : 1);
    int half = hp->rope_dim / 2;
    e->n_past = calloc((size_t)p->max_seqs, sizeof *e->n_past);
    e->next_pos = calloc((size_t)p->max_seqs, sizeof *e->next_pos);
    e->routed = calloc(n_le, sizeof *e->routed);
    e->dropped = calloc(n_le, sizeof *e->dropped);
    e->inv_freq = malloc((size_t)(half > 0 ? half : 1) * sizeof *e->inv_freq);
    e->x = malloc(B * (size_t)hp->n_embd * sizeof(float));
    e->xb = malloc(B * (size_t)hp->n_embd * sizeof(float));
    e->q = malloc(B * (size_t)e->q_dim * sizeof(float));
    e->k = malloc(B * (size_t)e->kv_dim * sizeof(float));
    e->v = malloc(B * (size_t)e->kv_dim * sizeof(float));
    e->att = malloc(B * (size_t)e->q_dim * sizeof(float));
    e->out = malloc(B * (size_t)hp->n_embd * sizeof(float));
    e->rope_cs = malloc(B * (size_t)hp->rope_dim * sizeof(float));
    e->att_ld = (p->max_seq_len + ATT_T - 1) / ATT_T * ATT_T;
    e->att_scratch_stride = (size_t)(hp->head_dim + ATT_Q) * (size_t)e->att_ld;
    e->att_scratch = malloc((size_t)p->n_threads * e->att_scratch_stride * sizeof(float));
    e->att_vrow = malloc((size_t)p->n_threads * (size_t)e->att_ld * sizeof *e->att_vrow);
    e->att_kp = malloc((size_t)p->n_threads * (size_t)(e->att_ld / ATT_T) * sizeof *e->att_kp);
    e->run_start = malloc(B * sizeof *e->run_start);
    e->run_len = malloc(B * sizeof *e->run_len);
    e->logit_rows = malloc(B * sizeof *e->logit_rows);
    if (!e->n_past || !e->next_pos || !e->routed || !e->dropped || !e->inv_freq || !e->x ||
        !e->xb || !e->q || !e->k || !e->v || !e->att || !e->out || !e->rope_cs || !e->att_scratch ||
        !e->att_vrow || !e->att_kp || !e->run_start || !e->run_len ||
        !e->logit_rows) {
        snprintf(err, errlen, "engine: out of memory for scratch (%d batch tokens)", p->max_batch_tokens);
        goto fail;
    }
    /* The packed copies are made from the F32 projections. A model that keeps
     * them only in the file's narrower type reads them there at every batch
     * size, with the bits the F32 projections would give: where those would
     * take the packed kernel (AVX-512, packing asked for, OpenBLAS's 256-bit
     * sgemm: use_packed), the few-rows kernels, whose bits the packed kernel
     * has, at every size; else sgemm from the switch up. Both widen a slice
     * into proj_wide where that pays. */
    e->proj_sgemm = 1;
    if (!moe_weights_f32_projections(w)) {
        e->proj_sgemm = !(e->p.packed_projections && packed_supported() && !matmul_blas_512_bit());
        e->p.packed_projections = MOE_PACK_OFF;
        int max_k = hp->n_embd > e->q_dim ? hp->n_embd : e->q_dim;
        e->proj_wide = malloc((size_t)p->n_threads * matmul_multi_scratch_floats(max_k) * sizeof(float));
        if (!e->proj_wide) {
            snprintf(err, errlen, "engine: out of memory for the projections' widening buffers");
            goto fail;
        }
    }
    if (e->p.packed_projections && packed_create(e, err, errlen)) goto fail;
    /* Same angle formula as ops.c rope(): theta = pos * base^(-2i/d), in double. */
    for (int i = 0; i < half; i++)
        e->inv_freq[i] = pow((double)hp->rope_base, -2.0 * (double)i / (double)hp->rope_dim);
    *out = e;
    return 0;
fail:
    moe_engine_free(e);
    return -1;
}

void moe_engine_free(moe_engine *e)
{
    if (!e) return;
    if (e->pk_thread_started) {
        atomic_store_explicit(&e->pk_stop, 1, memory_order_relaxed);
        pthread_join(e->pk_thread, NULL);
    }
    packed_free(e);
    free(e->proj_wide);
    kv_cache_free(e->kv);
    moe_ffn_free(e->ffn);
    pool_free(e->pool);
    free(e->n_past);
    free(e->next_pos);
    free(e->routed);
    free(e->dropped);
    free(e->inv_freq);
    free(e->x);
    free(e->xb);
    free(e->q);
    free(e->k);
    free(e->v);
    free(e->att);
    free(e->out);
    free(e->rope_cs);
    free(e->att_scratch);
    free(e->att_vrow);
    free(e->att_kp);
    free(e->run_start);
    free(e->run_len);
    free(e->logit_rows);
    free(e);
}

/* Sequences -------------------------------------------------------------- */

int moe_engine_seq_reserve(moe_engine *e, int seq, int n_pos, char *err, size_t errlen)
{
    return kv_cache_seq_reserve(e->kv, seq, n_pos, err, errlen);
}

/* Frees the slot's blocks; the next use of the slot starts at position 0. */
void moe_engine_seq_release(moe_engine *e, int seq)
{
    if (seq < 0 || seq >= e->p.max_seqs) return;
    kv_cache_seq_release(e->kv, seq);
    e->n_past[seq] = 0;
}

/* Forgets positions [n_pos, ...) of seq: the next batch continues at n_pos and
 * overwrites them (label scoring tries several continuations of one prompt). */
int moe_engine_seq_truncate(moe_engine *e, int seq, int n_pos, char *err, size_t errlen)
{
    if (seq < 0 || seq >= e->p.max_seqs || n_pos < 0 || n_pos > e->n_past[seq]) {
        snprintf(err, errlen, "engine: cannot truncate sequence %d to %d positions", seq, n_pos);
        return -1;
    }
    e->n_past[seq] = n_pos;
    return 0;
}

/* Batch validation ------------------------------------------------------- */

/* Everything forward will touch is checked here, before any state changes. Returns
 * the number of rows that want logits, or -1. */
static int batch_validate(moe_engine *e, const moe_batch *b, const float *logits,
                          char *err, size_t errlen)
{
    const moe_hparams *hp = &e->w.hp;
    int n = b->n_tokens;
    if (n < 0 || n > e->p.max_batch_tokens) {
        snprintf(err, errlen, "batch of %d tokens: must be in [0, %d] (max_batch_tokens)",
                 n, e->p.max_batch_tokens);
        return -1;
    }
    if (n > 0 && (!b->token || !b->pos || !b->seq)) {
        snprintf(err, errlen, "batch: token, pos and seq arrays are required");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int s = b->seq[i];
        if (b->token[i] < 0 || b->token[i] >= hp->n_vocab) {
            snprintf(err, errlen, "batch row %d: token id %d out of range [0, %d)",
                     i, (int)b->token[i], hp->n_vocab);
            return -1;
        }
        if (s < 0 || s >= e->p.max_seqs) {
            snprintf(err, errlen, "batch row %d: sequence slot %d out of range [0, %d)",
                     i, s, e->p.max_seqs);
            return -1;
        }
        e->next_pos[s] = e->n_past[s];
    }
    int n_logits = 0;
    for (int i = 0; i < n; i++) {
        int s = b->seq[i], pos = b->pos[i];
        if (pos != e->next_pos[s]) {
            snprintf(err, errlen, "batch row %d: sequence %d position %d, expected %d "
                     "(positions must continue the sequence, consecutively)", i, s, pos, e->next_pos[s]);
            return -1;
        }
        int cap = kv_cache_seq_capacity(e->kv, s);
        if (pos >= cap) {
            snprintf(err, errlen, "batch row %d: sequence %d position %d not reserved "
                     "(%d positions reserved)", i, s, pos, cap);
            return -1;
        }
        e->next_pos[s] = pos + 1;
        if (b->want_logits && b->want_logits[i]) n_logits++;
    }
    if (n_logits > 0 && !logits) {
        snprintf(err, errlen, "batch: %d rows want logits but no logits buffer was given", n_logits);
        return -1;
    }
    return n_logits;
}

/* Attention -------------------------------------------------------------- */

/* Rotates one head with the row's cos/sin table (pairs as in ops.c rope()). */
static void rope_apply(float *head, const float *cs, int half, moe_rope_mode mode)
{
    for (int i = 0; i < half; i++) {
        int a = mode == MOE_ROPE_NEOX ? i : 2 * i;
        int b = mode == MOE_ROPE_NEOX ? i + half : 2 * i + 1;
        float c = cs[2 * i], s = cs[2 * i + 1];
        float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

typedef struct {
    moe_engine *e;
    const moe_batch *b;
    int layer;
} layer_job;

/* One row after the Q/K/V matmuls: biases, q/k norm, RoPE, K and V into the cache. */
static void qkv_row(void *ctx, int i, int thread)
{
    (void)thread;
    const layer_job *j = ctx;
    moe_engine *e = j->e;
    const moe_hparams *hp = &e->w.hp;
    const moe_layer_weights *L = &e->w.layers[j->layer];
    const moe_arch_info *a = e->arch;
    int hd = hp->head_dim;
    float *q = e->q + (size_t)i * (size_t)e->q_dim;
    float *k = e->k + (size_t)i * (size_t)e->kv_dim;
    float *v = e->v + (size_t)i * (size_t)e->kv_dim;
    if (a->qkv_bias) {
        for (int t = 0; t < e->q_dim; t++) q[t] += L->bq[t];
        for (int t = 0; t < e->kv_dim; t++) k[t] += L->bk[t];
        for (int t = 0; t < e->kv_dim; t++) v[t] += L->bv[t];
    }
    if (a->qk_norm == MOE_QK_NORM_FULL) {
        rmsnorm(q, q, L->q_norm, e->q_dim, hp->rms_eps);
        rmsnorm(k, k, L->k_norm, e->kv_dim, hp->rms_eps);
    } else if (a->qk_norm == MOE_QK_NORM_HEAD) {
        for (int h = 0; h < hp->n_head; h++) rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, hp->rms_eps);
        for (int h = 0; h < hp->n_head_kv; h++) rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, hp->rms_eps);
    }
    const float *cs = e->rope_cs + (size_t)i * (size_t)hp->rope_dim;
    int half = hp->rope_dim / 2;
    for (int h = 0; h < hp->n_head; h++) rope_apply(q + h * hd, cs, half, a->rope);
    for (int h = 0; h < hp->n_head_kv; h++) rope_apply(k + h * hd, cs, half, a->rope);
    int seq = j->b->seq[i], pos = j->b->pos[i];
    for (int h = 0; h < hp->n_head_kv; h++) {
        kv_cache_k_store(e->kv, j->layer, seq, pos, h, k + h * hd);
        kv_cache_v_store(e->kv, j->layer, seq, pos, h, v + h * hd);
    }
}

/* Causal attention, one task per (run, KV head). A run is up to ATT_RUN
 * consecutive batch rows of one sequence (a prompt chunk, or one decode row). The
 * cache holds the keys transposed (a tile of head_dim rows by block_size
 * positions), so scores for ATT_T positions at once are a chain of multiply-adds
 * over d with no horizontal sums, for up to four query vectors (the group's
 * heads, the run's rows) per pass over the tiles. Every score and output element
 * is one multiply-add chain in a fixed order (over d, then over t <= the row's
 * position) that does not depend on which run, lane or thread computes it, so
 * results do not depend on batch composition or thread count. The kernels take
 * the cache's element type as a constant `h` (0 F32, 1 F16, widened exactly as
 * loaded), so each type gets its own inlined copy and F32 is what it was. */

/* 16 floats as one vector (AVX-512), two (AVX2 + FMA) or a plain array. Each lane
 * is an independent multiply-add chain, so lanes never mix. */
#if defined(__AVX512F__)
typedef struct { __m512 a; } v16;
static inline v16 v16_zero(void) { return (v16){_mm512_setzero_ps()}; }
static inline v16 v16_load(const float *p) { return (v16){_mm512_loadu_ps(p)}; }
static inline void v16_store(float *p, v16 x) { _mm512_storeu_ps(p, x.a); }
static inline v16 v16_madd(float s, v16 x, v16 acc)
{
    return (v16){_mm512_fmadd_ps(_mm512_set1_ps(s), x.a, acc.a)};
}
static inline v16 v16_load_h(const uint16_t *p)
{
    return (v16){_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p))};
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256 a, b; } v16;
static inline v16 v16_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v16_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v16_store(float *p, v16 x) { _mm256_storeu_ps(p, x.a); _mm256_storeu_ps(p + 8, x.b); }
static inline v16 v16_madd(float s, v16 x, v16 acc)
{
    __m256 sv = _mm256_set1_ps(s);
    return (v16){_mm256_fmadd_ps(sv, x.a, acc.a), _mm256_fmadd_ps(sv, x.b, acc.b)};
}
#if defined(__F16C__)
static inline v16 v16_load_h(const uint16_t *p)
{
    return (v16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p)),
                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 8)))};
}
#else
static inline v16 v16_load_h(const uint16_t *p)
{
    float f[16];
    for (int l = 0; l < 16; l++) f[l] = wconv_f16(p[l]);
    return v16_load(f);
}
#endif
#else
typedef struct { float a[16]; } v16;
static inline v16 v16_zero(void) { v16 r = {{0}}; return r; }
static inline v16 v16_load(const float *p) { v16 r; memcpy(r.a, p, sizeof r.a); return r; }
static inline void v16_store(float *p, v16 x) { memcpy(p, x.a, sizeof x.a); }
static inline v16 v16_madd(float s, v16 x, v16 acc)
{
    for (int l = 0; l < 16; l++) acc.a[l] = s * x.a[l] + acc.a[l];
    return acc;
}
static inline v16 v16_load_h(const uint16_t *p)
{
    v16 r;
    for (int l = 0; l < 16; l++) r.a[l] = wconv_f16(p[l]);
    return r;
}
#endif

/* 16 cache elements from element i of p, widened: F32 (h 0) or F16 (h 1). */
static inline v16 kv_load(const void *p, size_t i, const int h)
{
    return h ? v16_load_h((const uint16_t *)p + i) : v16_load((const float *)p + i);
}

/* One cache element, widened. */
static inline float kv_elem(const void *p, size_t i, const int h)
{
    return h ? wconv_f16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Asks for the n bytes at p to be brought into L2. Attention uses it for the
 * values before the scores (keys_locate) and for the next task's keys
 * (key_prefetch). */
static inline void prefetch_l2(const void *p, size_t n)
{
#if HAVE_PREFETCH
    for (size_t i = 0; i < n; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T1);
#else
    (void)p; (void)n;
#endif
}

/* The keys of the attention task after this one, fetched into L2 a line at a
 * time from inside this task's score and value loops, so its first score pass
 * does not wait on memory. (Measured when the keys were still gathered through
 * 16-row transposes that kept only a few misses in flight: decode attention, 16
 * steps, alternated builds, batch 64 at context 64 -16%, batch 16 at context
 * 1024 -11%; fetching the values too, or two lines an iteration, gained nothing
 * more.) The loops ask for a line per iteration. Since the passes take four blocks
 * (ATT_NB), that covers about half of the next task's keys: asking for two lines
 * per four-block iteration measured -7% attention at batch 64 / context 64 but
 * +4-8% at context 1024 (with 512 KB of next keys against a 1 MB L2), so the
 * rate stayed. The pool hands a thread consecutive tasks, so the next task is
 * usually its own. */
typedef struct {
    kv_cache *kv;
    int layer, seq, head, n_pos;    /* n_pos 0: nothing to fetch */
    int block_size, lines_per_tile;
    int pos, line;                  /* the next line: `line` of the tile of the block at `pos` */
    const char *tile;
} key_prefetch;

/* The next line; without a prefetch instruction, nothing (not even the
 * block-table lookup). */
static inline void key_prefetch_step(key_prefetch *p)
{
#if HAVE_PREFETCH
    if (p->pos >= p->n_pos) return;
    if (p->line == 0) p->tile = kv_cache_k_tile(p->kv, p->layer, p->seq, p->pos, p->head);
    prefetch_l2(p->tile + (size_t)p->line * 64, 1);
    if (++p->line == p->lines_per_tile) {
        p->line = 0;
        p->pos += p->block_size;
    }
#else
    (void)p;
#endif
}

/* Scores of nb (1, 2 or ATT_NB, a constant after inlining) groups of ATT_T
 * positions from group g0: sc[a * lds + t] = q[a] . key t, where element d of
 * the keys of group g is the vector at kp[g] + d * ldk. Several groups a pass
 * where they fit: with one, the ATT_Q chains of 4-cycle multiply-adds leave half
 * the FMA issue slots empty, and with four each query element loaded feeds four
 * multiply-adds instead of two (prefill attention -7%). Every score is the same
 * chain over d whichever pass computes it. */
static inline __attribute__((always_inline))
void att_scores_blocks(const float *const *q, const int na, const void *const *kp, int ldk, int hd,
                       int g0, float *sc, int lds, const int nb, key_prefetch *pf, const int h)
{
    v16 acc[ATT_NB][ATT_Q];
    for (int c = 0; c < nb; c++)
        for (int a = 0; a < na; a++) acc[c][a] = v16_zero();
    for (int d = 0; d < hd; d++) {
        key_prefetch_step(pf);
        v16 kv[ATT_NB];
        for (int c = 0; c < nb; c++) kv[c] = kv_load(kp[g0 + c], (size_t)d * (size_t)ldk, h);
        for (int a = 0; a < na; a++)
            for (int c = 0; c < nb; c++) acc[c][a] = v16_madd(q[a][d], kv[c], acc[c][a]);
    }
    for (int c = 0; c < nb; c++)
        for (int a = 0; a < na; a++) v16_store(sc + (size_t)a * (size_t)lds + (g0 + c) * ATT_T, acc[c][a]);
}

/* sc[a * lds + t] = q[a] . key t for the n_groups groups of ATT_T positions. */
static inline __attribute__((always_inline))
void att_scores(const float *const *q, const int na, const void *const *kp, int ldk, int hd,
                int n_groups, float *sc, int lds, key_prefetch *pf, const int h)
{
    int g = 0;
    for (; g + ATT_NB <= n_groups; g += ATT_NB) att_scores_blocks(q, na, kp, ldk, hd, g, sc, lds, ATT_NB, pf, h);
    for (; g + 2 <= n_groups; g += 2) att_scores_blocks(q, na, kp, ldk, hd, g, sc, lds, 2, pf, h);
    if (g < n_groups) att_scores_blocks(q, na, kp, ldk, hd, g, sc, lds, 1, pf, h);
}

/* Positions ahead whose V rows the value loop asks into L1 (see att_values_blocks). */
#define ATT_V_AHEAD 32

/* Outputs of nb (1, 2 or ATT_NB) blocks of ATT_T dims from d0, for the same
 * reasons (and with four, two passes over the V rows at head_dim 128, not four):
 * o[a][d] = sum over t <= last[a] of w[a][t] * vrow[t][d], in order of t.
 * keys_locate asked for the V rows into L2, but one row's few lines per
 * iteration then each waited on L2 (or on memory, where the score loop's keys
 * had pushed them out): at context 2000 the value loop took more of attention
 * than the score loop. Asking for the part of the row ATT_V_AHEAD positions on
 * into L1 took decode attention there (16 sequences) from 69-78 to 48-65 ms a
 * step (F32) and from 29-35 to 25-33 (F16), whole steps 154 -> 168-172 and
 * 190-233 -> 258-265 tok/s on the bench model's Q4_K_M; 16 or 64 ahead did
 * about as well; spreading keys_locate's requests over the score loop instead
 * slowed the scores more than it saved. (Written through a helper function, GCC
 * dropped these prefetches; inline they stay.) */
static inline __attribute__((always_inline))
void att_values_blocks(float *const *o, const int na, const float *w, int ldw, const int *last,
                       const void *const *vrow, int tmax, int d0, const int nb, key_prefetch *pf,
                       const int h)
{
    v16 acc[ATT_NB][ATT_Q];
    for (int c = 0; c < nb; c++)
        for (int a = 0; a < na; a++) acc[c][a] = v16_zero();
    for (int t = 0; t < tmax; t++) {
        key_prefetch_step(pf);
#if HAVE_PREFETCH
        const size_t es = h ? 2 : 4;
        if (t + ATT_V_AHEAD < tmax) {
            const char *pv = (const char *)vrow[t + ATT_V_AHEAD] + (size_t)d0 * es;
            for (size_t c = 0; c < (size_t)nb * ATT_T * es; c += 64) _mm_prefetch(pv + c, _MM_HINT_T0);
        }
#endif
        v16 v[ATT_NB];
        for (int c = 0; c < nb; c++) v[c] = kv_load(vrow[t], (size_t)(d0 + c * ATT_T), h);
        for (int a = 0; a < na; a++) {
            if (t > last[a]) continue;
            float wt = w[(size_t)a * (size_t)ldw + t];
            for (int c = 0; c < nb; c++) acc[c][a] = v16_madd(wt, v[c], acc[c][a]);
        }
    }
    for (int c = 0; c < nb; c++)
        for (int a = 0; a < na; a++) v16_store(o[a] + d0 + c * ATT_T, acc[c][a]);
}

/* o[a][d] = sum over t <= last[a] of w[a][t] * vrow[t][d], in order of t. */
static inline __attribute__((always_inline))
void att_values(float *const *o, const int na, const float *w, int ldw, const int *last,
                const void *const *vrow, int hd, key_prefetch *pf, const int h)
{
    int tmax = 0;
    for (int a = 0; a < na; a++) if (last[a] + 1 > tmax) tmax = last[a] + 1;
    int d0 = 0;
    for (; d0 + ATT_NB * ATT_T <= hd; d0 += ATT_NB * ATT_T)
        att_values_blocks(o, na, w, ldw, last, vrow, tmax, d0, ATT_NB, pf, h);
    for (; d0 + 2 * ATT_T <= hd; d0 += 2 * ATT_T) att_values_blocks(o, na, w, ldw, last, vrow, tmax, d0, 2, pf, h);
    if (d0 + ATT_T <= hd) {
        att_values_blocks(o, na, w, ldw, last, vrow, tmax, d0, 1, pf, h);
        d0 += ATT_T;
    }
    for (; d0 < hd; d0++)   /* head sizes that are not a multiple of ATT_T */
        for (int a = 0; a < na; a++) {
            float acc = 0.0f;
            for (int t = 0; t <= last[a]; t++) acc += w[(size_t)a * (size_t)ldw + t] * kv_elem(vrow[t], (size_t)d0, h);
            o[a][d0] = acc;
        }
}

#if defined(__AVX512F__)
/* The lanes of a 16-wide chunk that hold the `left` remaining elements. */
static inline __mmask16 tail_mask16(int left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
#endif

/* Softmax weights of one query in place over the n = last + 1 scores it sees:
 * w[t] = exp(scale * s[t] - max) / sum. The AVX-512 path (an expf call per
 * score was a sixth of decode attention) sums in 16 lane-wise partial sums; the
 * order depends only on n, never on the batch or the thread. */
static void att_softmax(float *w, int n, float scale)
{
#if defined(__AVX512F__)
    __m512 vmax = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    for (int t = 0; t < n; t += 16) {
        __mmask16 m = tail_mask16(n - t);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + t), vscale);
        _mm512_mask_storeu_ps(w + t, m, x);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
    }
    __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), vsum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        __mmask16 m = tail_mask16(n - t);
        __m512 x = vexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + t), max));
        _mm512_mask_storeu_ps(w + t, m, x);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, x);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int t = 0; t < n; t += 16) {
        __mmask16 m = tail_mask16(n - t);
        _mm512_mask_storeu_ps(w + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + t), inv));
    }
#else
    float max = -INFINITY;
    for (int t = 0; t < n; t++) {
        w[t] *= scale;
        if (w[t] > max) max = w[t];
    }
    float sum = 0.0f;
    for (int t = 0; t < n; t++) {
        w[t] = expf(w[t] - max);
        sum += w[t];
    }
    float inv = 1.0f / sum;
    for (int t = 0; t < n; t++) w[t] *= inv;
#endif
}

/* Up to ATT_Q query vectors against the located keys and values, of element type h. */
static inline __attribute__((always_inline))
void att_pass_typed(const float *const *q, float *const *o, const int *last, int na,
                    const void *const *kp, int ldk, const void *const *vrow, int hd, float scale,
                    float *w, int ldw, key_prefetch *pf, const int h)
{
    int limit = 0;
    for (int a = 0; a < na; a++) if (last[a] + 1 > limit) limit = last[a] + 1;
    int n_groups = (limit + ATT_T - 1) / ATT_T;
    switch (na) {
    case 1: att_scores(q, 1, kp, ldk, hd, n_groups, w, ldw, pf, h); break;
    case 2: att_scores(q, 2, kp, ldk, hd, n_groups, w, ldw, pf, h); break;
    case 3: att_scores(q, 3, kp, ldk, hd, n_groups, w, ldw, pf, h); break;
    default: att_scores(q, ATT_Q, kp, ldk, hd, n_groups, w, ldw, pf, h); break;
    }
    for (int a = 0; a < na; a++) att_softmax(w + (size_t)a * (size_t)ldw, last[a] + 1, scale);
    switch (na) {
    case 1: att_values(o, 1, w, ldw, last, vrow, hd, pf, h); break;
    case 2: att_values(o, 2, w, ldw, last, vrow, hd, pf, h); break;
    case 3: att_values(o, 3, w, ldw, last, vrow, hd, pf, h); break;
    default: att_values(o, ATT_Q, w, ldw, last, vrow, hd, pf, h); break;
    }
}

static void att_pass(const float *const *q, float *const *o, const int *last, int na,
                     const void *const *kp, int ldk, const void *const *vrow, int hd, float scale,
                     float *w, int ldw, key_prefetch *pf, kv_type type)
{
    if (type == KV_F16) att_pass_typed(q, o, last, na, kp, ldk, vrow, hd, scale, w, ldw, pf, 1);
    else att_pass_typed(q, o, last, na, kp, ldk, vrow, hd, scale, w, ldw, pf, 0);
}


/* Where the keys of KV head g of seq for positions [0, n_pos) are, a pointer per
 * ATT_T positions (kp), with element d of those keys at element kp[i] + d * ldk;
 * returns ldk. The cache keeps keys transposed (core/kv_cache.h), so with a block
 * size that is a multiple of ATT_T the groups are read where they are, a line per
 * d (the scores of the positions past n_pos in the last group are never used).
 * Other block sizes are copied into kt, (head_dim, ldkt) elements of the cache's
 * type, zeros past n_pos.
 * Also each position's V row, asked for into L2: the values are read only after
 * all the scores, and their loads were the largest stall of decode attention at
 * batch 64, where the KV cache is 300+ MB a step and none of it in cache. */
static int keys_locate(const moe_engine *e, int layer, int seq, int g, int n_pos, void *kt, int ldkt,
                       const void **kp, const void **vrow)
{
    int hd = e->w.hp.head_dim, bs = kv_cache_block_size(e->kv);
    size_t es = kv_type_size(kv_cache_type(e->kv));
    for (int t = 0; t < n_pos; t++) {
        vrow[t] = kv_cache_v(e->kv, layer, seq, t, g);
        prefetch_l2(vrow[t], (size_t)hd * es);
    }
    if (bs % ATT_T == 0) {
        for (int t = 0; t < n_pos; t += ATT_T)
            kp[t / ATT_T] = (const char *)kv_cache_k_tile(e->kv, layer, seq, t, g) + (size_t)(t % bs) * es;
        return bs;
    }
    char *dst = kt;
    for (int t = 0; t < ldkt; t++) {
        const char *col = t < n_pos ? (const char *)kv_cache_k_tile(e->kv, layer, seq, t, g) + (size_t)(t % bs) * es : NULL;
        for (int d = 0; d < hd; d++) {
            char *at = dst + ((size_t)d * (size_t)ldkt + (size_t)t) * es;
            if (col) memcpy(at, col + (size_t)d * (size_t)bs * es, es);
            else memset(at, 0, es);
        }
    }
    for (int t = 0; t < n_pos; t += ATT_T) kp[t / ATT_T] = dst + (size_t)t * es;
    return ldkt;
}

static void attend(void *ctx, int task, int thread)
{
    const layer_job *j = ctx;
    moe_engine *e = j->e;
    const moe_hparams *hp = &e->w.hp;
    int hd = hp->head_dim, group = hp->n_head / hp->n_head_kv;
    int r = task / hp->n_head_kv, g = task % hp->n_head_kv;
    int row0 = e->run_start[r], nr = e->run_len[r];
    int seq = j->b->seq[row0], pos0 = j->b->pos[row0];
    int n_pos = pos0 + nr;                       /* positions [0, n_pos) are read */
    float *kt = e->att_scratch + (size_t)thread * e->att_scratch_stride;
    float *w = kt + (size_t)hd * (size_t)e->att_ld;
    const void **vrow = e->att_vrow + (size_t)thread * (size_t)e->att_ld;
    const void **kp = e->att_kp + (size_t)thread * (size_t)(e->att_ld / ATT_T);

    int bs = kv_cache_block_size(e->kv);
    kv_type type = kv_cache_type(e->kv);
    int ldk = keys_locate(e, j->layer, seq, g, n_pos, kt, (n_pos + ATT_T - 1) / ATT_T * ATT_T, kp, vrow);
    size_t tile_bytes = (size_t)hd * (size_t)bs * kv_type_size(type);
    key_prefetch pf = {.kv = e->kv, .block_size = bs, .lines_per_tile = (int)((tile_bytes + 63) / 64)};
    if (task + 1 < e->n_runs * hp->n_head_kv) {
        int r1 = (task + 1) / hp->n_head_kv, row1 = e->run_start[r1];
        pf.layer = j->layer;
        pf.seq = j->b->seq[row1];
        pf.head = (task + 1) % hp->n_head_kv;
        pf.n_pos = j->b->pos[row1] + e->run_len[r1];
    }
    float scale = 1.0f / sqrtf((float)hd);
    const float *q[ATT_Q];
    float *o[ATT_Q];
    int last[ATT_Q], na = 0;
    for (int i = 0; i < nr; i++)
        for (int hh = 0; hh < group; hh++) {
            size_t off = (size_t)(row0 + i) * (size_t)e->q_dim + (size_t)(g * group + hh) * (size_t)hd;
            q[na] = e->q + off;
            o[na] = e->att + off;
            last[na] = pos0 + i;
            if (++na == ATT_Q) {
                att_pass(q, o, last, na, kp, ldk, vrow, hd, scale, w, e->att_ld, &pf, type);
                na = 0;
            }
        }
    if (na) att_pass(q, o, last, na, kp, ldk, vrow, hd, scale, w, e->att_ld, &pf, type);
}

/* Splits the batch into runs: consecutive rows of one sequence, at most ATT_RUN. */
static void attention_runs(moe_engine *e, const moe_batch *b)
{
    int n = 0;
    for (int i = 0; i < b->n_tokens; i++) {
        if (n > 0 && b->seq[i] == b->seq[i - 1] && e->run_len[n - 1] < ATT_RUN) {
            e->run_len[n - 1]++;
            continue;
        }
        e->run_start[n] = i;
        e->run_len[n] = 1;
        n++;
    }
    e->n_runs = n;
}

/* Forward ---------------------------------------------------------------- */

static void rows_rmsnorm(float *o, const float *x, const float *w, int n, int d, float eps)
{
    for (int i = 0; i < n; i++)
        rmsnorm(o + (size_t)i * (size_t)d, x + (size_t)i * (size_t)d, w, d, eps);
}

static void rows_add(float *x, const float *y, size_t n)
{
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

/* cos/sin of every rotated pair for every row's position, once per forward. */
static void rope_table(moe_engine *e, const moe_batch *b)
{
    int rd = e->w.hp.rope_dim, half = rd / 2;
    for (int i = 0; i < b->n_tokens; i++) {
        float *cs = e->rope_cs + (size_t)i * (size_t)rd;
        for (int t = 0; t < half; t++) {
            double theta = (double)b->pos[i] * e->inv_freq[t];
            cs[2 * t] = (float)cos(theta);
            cs[2 * t + 1] = (float)sin(theta);
        }
    }
}

/* One projection output: the weights, their packed copy (NULL when the engine
 * has none, or not yet: see pk_at), the width and where the m x n result goes. */
typedef struct {
    const float *w;
    const packed_w *pw;
    int n;
    float *y;
    moe_wraw raw;
} proj_out;

#define PROJ_MAX_OUTS 3   /* q, k and v */

/* Whether a projection of m rows runs on the packed copies: when every output
 * has one (the background packer may finish between two pk_at calls), below the
 * sgemm switch always (the row kernel's bits, faster); from it too, unless
 * OpenBLAS runs its 512-bit kernels, whose sgemm is the faster there (a
 * 512-token prefill with the Cooperlake kernels: 72.9-73.8% of the sgemm peak
 * with the packed kernel, 76.9-79.8% with sgemm; with the 256-bit ones the
 * packed kernel is 1.7x sgemm). */
static int use_packed(int m, const proj_out *outs, int n_outs)
{
    for (int i = 0; i < n_outs; i++)
        if (!outs[i].pw) return 0;
    return m < matmul_sgemm_min_rows() || !matmul_blas_512_bit();
}

/* Whether output o of a projection of m rows reads its weights where the file
 * keeps them narrower: up to MOE_RAW_PROJ_MAX_ROWS rows, where reading the
 * weights is the cost, and at every size when it has no F32 form. */
static int use_raw(int m, const proj_out *o)
{
    return o->raw.raw && (m <= MOE_RAW_PROJ_MAX_ROWS || !o->w);
}

/* y_i = x W_i^T for each of outs, as one parallel run: on the file's narrower
 * weights where use_raw says so, else on the packed copies where use_packed
 * says so, else on the F32 weights (core/matmul.c). The same bits every way. */
static void project(moe_engine *e, const float *x, int m, int k, const proj_out *outs, int n_outs)
{
    assert(n_outs >= 1 && n_outs <= PROJ_MAX_OUTS);
    int any_raw = 0;
    for (int i = 0; i < n_outs; i++) any_raw |= use_raw(m, &outs[i]);
    if (!any_raw && use_packed(m, outs, n_outs)) {
        packed_out po[PROJ_MAX_OUTS];
        for (int i = 0; i < n_outs; i++) po[i] = (packed_out){outs[i].pw, outs[i].y};
        packed_matmul(e->pool, e->pk_scratch, x, m, k, po, n_outs);
        return;
    }
    matmul_out mo[PROJ_MAX_OUTS];
    for (int i = 0; i < n_outs; i++)
        mo[i] = (matmul_out){outs[i].w, outs[i].n, outs[i].y,
                             use_raw(m, &outs[i]) ? outs[i].raw : (moe_wraw){NULL, MOE_WT_F32}};
    matmul_multi(e->pool, x, m, k, mo, n_outs, e->proj_wide, e->proj_sgemm);
}

/* a[l], one of the packed copies, once the copies are complete; NULL before,
 * or without copies. The background packer writes the pointers, so they are
 * read only after the acquire of pk_ready (reading them first, even unused, is
 * a data race). */
static const packed_w *pk_at(const moe_engine *e, packed_w *const *a, int l)
{
    return moe_engine_packed_ready(e) ? a[l] : NULL;
}

static void attention_layer(moe_engine *e, const moe_batch *b, int l)
{
    const moe_hparams *hp = &e->w.hp;
    const moe_layer_weights *L = &e->w.layers[l];
    int n = b->n_tokens;
    layer_job job = {e, b, l};
    rows_rmsnorm(e->xb, e->x, L->attn_norm, n, hp->n_embd, hp->rms_eps);
    proj_out qkv[3] = {{L->wq, pk_at(e, e->pk_q, l), e->q_dim, e->q, L->wq_raw},
                       {L->wk, pk_at(e, e->pk_k, l), e->kv_dim, e->k, L->wk_raw},
                       {L->wv, pk_at(e, e->pk_v, l), e->kv_dim, e->v, L->wv_raw}};
    double t0 = clock_mono_s();
    project(e, e->xb, n, hp->n_embd, qkv, 3);
    double t1 = clock_mono_s();
    pool_run(e->pool, n, qkv_row, &job);
    pool_run(e->pool, e->n_runs * hp->n_head_kv, attend, &job);
    double t2 = clock_mono_s();
    proj_out wo = {L->wo, pk_at(e, e->pk_o, l), hp->n_embd, e->out, L->wo_raw};
    project(e, e->att, n, e->q_dim, &wo, 1);
    double t3 = clock_mono_s();
    e->proj_s += (t1 - t0) + (t3 - t2);
    e->att_s += t2 - t1;
    rows_add(e->x, e->out, (size_t)n * (size_t)hp->n_embd);
}

static void ffn_layer(moe_engine *e, const moe_batch *b, int l)
{
    const moe_hparams *hp = &e->w.hp;
    const moe_layer_weights *L = &e->w.layers[l];
    int n = b->n_tokens;
    rows_rmsnorm(e->xb, e->x, L->ffn_norm, n, hp->n_embd, hp->rms_eps);
    if (hp->n_expert == 0) {
        double t0 = clock_mono_s();
        dense_ffn_forward(e->ffn, e->pool, L, e->xb, n, e->out);
        e->ffn_s.experts += clock_mono_s() - t0;
    } else {
        int k = hp->n_expert_used, stride = hp->n_layer * k;
        moe_ffn_opts o = {
            .capacity_factor = e->p.capacity_factor,
            .trace_expert = b->trace_expert ? b->trace_expert + (size_t)l * (size_t)k : NULL,
            .trace_weight = b->trace_weight ? b->trace_weight + (size_t)l * (size_t)k : NULL,
            .trace_stride = stride,
            .routed = e->routed + (size_t)l * (size_t)hp->n_expert,
            .dropped = e->dropped + (size_t)l * (size_t)hp->n_expert,
            .times = &e->ffn_s,
        };
        moe_ffn_forward(e->ffn, e->pool, e->arch, L, e->xb, n, e->out, &o);
    }
    rows_add(e->x, e->out, (size_t)n * (size_t)hp->n_embd);
}

/* Final norm and output projection for the rows that want logits, gathered into
 * the front of xb so the projection is one matmul straight into the caller's buffer. */
static void output_logits(moe_engine *e, const moe_batch *b, int n_logits, float *logits)
{
    const moe_hparams *hp = &e->w.hp;
    size_t d = (size_t)hp->n_embd;
    int m = 0;
    for (int i = 0; i < b->n_tokens; i++)
        if (b->want_logits && b->want_logits[i]) e->logit_rows[m++] = i;
    for (int r = 0; r < n_logits; r++)
        rmsnorm(e->xb + (size_t)r * d, e->x + (size_t)e->logit_rows[r] * d, e->w.output_norm,
                hp->n_embd, hp->rms_eps);
    proj_out o = {e->w.output, pk_at(e, &e->pk_out, 0), hp->n_vocab, logits, e->w.output_raw};
    project(e, e->xb, n_logits, hp->n_embd, &o, 1);
}

/* The batch's token embeddings into e->x: rows of the F32 table, or of the
 * file's narrower one widened (the values of its F32 conversion). */
static void embed(moe_engine *e, const moe_batch *b)
{
    size_t d = (size_t)e->w.hp.n_embd;
    const moe_wraw *r = &e->w.tok_embd_raw;
    for (int i = 0; i < b->n_tokens; i++) {
        float *x = e->x + (size_t)i * d;
        size_t t = (size_t)b->token[i];
        if (e->w.tok_embd) memcpy(x, e->w.tok_embd + t * d, d * sizeof(float));
        else wconv_rows(x, r->raw + t * moe_wtype_row_bytes(r->type, d), d, r->type);
    }
}

int moe_engine_forward(moe_engine *e, const moe_batch *b, float *logits, char *err, size_t errlen)
{
    if (!b) {
        snprintf(err, errlen, "batch is required");
        return -1;
    }
    int n_logits = batch_validate(e, b, logits, err, errlen);
    if (n_logits < 0) return -1;
    int n = b->n_tokens;
    if (n == 0) return 0;
    const moe_hparams *hp = &e->w.hp;

    double t0 = clock_mono_s();
    embed(e, b);
    rope_table(e, b);
    attention_runs(e, b);
    for (int l = 0; l < hp->n_layer; l++) {
        attention_layer(e, b, l);
        ffn_layer(e, b, l);
    }
    double t1 = clock_mono_s();
    if (n_logits > 0) output_logits(e, b, n_logits, logits);
    for (int i = 0; i < n; i++) e->n_past[b->seq[i]] = b->pos[i] + 1;
    double t2 = clock_mono_s();
    e->logits_s += t2 - t1;
    e->total_s += t2 - t0;
    return 0;
}

/* Accessors -------------------------------------------------------------- */

const char *moe_phase_name(moe_phase ph)
{
    static const char *const names[MOE_PHASE_COUNT] = {
        "projections", "attention", "routing", "experts", "combine", "logits", "other"};
    return (unsigned)ph < MOE_PHASE_COUNT ? names[ph] : "?";
}

/* OTHER is what the timed phases leave of the total. */
void moe_engine_phase_seconds(const moe_engine *e, double *out)
{
    out[MOE_PHASE_PROJECTIONS] = e->proj_s;
    out[MOE_PHASE_ATTENTION] = e->att_s;
    out[MOE_PHASE_ROUTING] = e->ffn_s.routing;
    out[MOE_PHASE_EXPERTS] = e->ffn_s.experts;
    out[MOE_PHASE_COMBINE] = e->ffn_s.combine;
    out[MOE_PHASE_LOGITS] = e->logits_s;
    double rest = e->total_s;
    for (int i = 0; i < MOE_PHASE_OTHER; i++) rest -= out[i];
    out[MOE_PHASE_OTHER] = rest > 0 ? rest : 0;
}

const moe_hparams *moe_engine_hparams(const moe_engine *e) { return &e->w.hp; }
const uint64_t *moe_engine_expert_routed(const moe_engine *e) { return e->routed; }
const uint64_t *moe_engine_expert_dropped(const moe_engine *e) { return e->dropped; }
int moe_engine_kv_blocks_free(const moe_engine *e) { return kv_cache_blocks_free(e->kv); }
int moe_engine_kv_blocks_total(const moe_engine *e) { return kv_cache_blocks_total(e->kv); }
int moe_engine_kv_block_size(const moe_engine *e) { return kv_cache_block_size(e->kv); }
size_t moe_engine_kv_bytes(const moe_engine *e) { return kv_cache_bytes(e->kv); }
size_t moe_engine_packed_bytes(const moe_engine *e)
{
    return e->p.packed_projections ? moe_engine_packed_bytes_for(&e->w.hp) : 0;
}
int moe_engine_packed_ready(const moe_engine *e) { return atomic_load_explicit(&e->pk_ready, memory_order_acquire); }

size_t moe_engine_packed_bytes_for(const moe_hparams *hp)
{
    if (!packed_supported()) return 0;
    int q = hp->n_head * hp->head_dim, kv = hp->n_head_kv * hp->head_dim, d = hp->n_embd;
    size_t layer = packed_w_bytes_for(q, d) + 2 * packed_w_bytes_for(kv, d) + packed_w_bytes_for(d, q);
    return (size_t)hp->n_layer * layer + packed_w_bytes_for(hp->n_vocab, d);
}
