/* engine.c -- the batched forward pass over a ragged batch.
 *
 * Per layer, for the n rows of a batch (docs/ARCHITECTURE.md):
 *   RMSNorm -> Q, K, V (one matmul each for all rows) -> per row: biases, q/k norm,
 *   RoPE, K/V into the sequence's cache blocks -> attention per (row, head) over its
 *   own sequence up to its position -> output projection + residual -> RMSNorm ->
 *   MoE (or dense) FFN + residual.
 * Then final norm and output projection for the rows that want logits only.
 *
 * Every row is computed on its own (no reduction mixes rows), and every parallel
 * task writes a fixed part of the output in a fixed order, so a row's logits do not
 * depend on the thread count or, outside the matmul/expert kernels, on what else
 * shares the batch. All scratch is sized at create; forward allocates nothing.
 */
#include "core/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/kv_cache.h"
#include "core/matmul.h"
#include "core/moe_layer.h"
#include "core/ops.h"
#include "core/pool.h"

struct moe_engine {
    moe_weights w;              /* pointers borrowed: the model must outlive the engine */
    const moe_arch_info *arch;
    moe_engine_params p;
    int q_dim;                  /* n_head * head_dim */
    int kv_dim;                 /* n_head_kv * head_dim */

    pool *pool;
    moe_ffn *ffn;
    kv_cache *kv;
    int32_t *n_past;            /* (max_seqs) positions the cache holds per sequence */
    int32_t *next_pos;          /* (max_seqs) validation scratch */
    uint64_t *routed;           /* (n_layer, n_expert) cumulative */
    uint64_t *dropped;          /* (n_layer, n_expert) cumulative */
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
    float *scores;              /* (n_threads, max_seq_len) attention weights per thread */
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
        .max_seq_len = len,
        .capacity_factor = 0.0f,
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
    if (!(p->capacity_factor == p->capacity_factor) || p->capacity_factor > 1e6f) {
        snprintf(err, errlen, "engine: capacity_factor must be a number <= 1e6 (<= 0: dropless)");
        return -1;
    }
    return 0;
}

/* Lifecycle -------------------------------------------------------------- */

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
    e->arch = moe_arch_get(hp->arch);
    e->p = *p;
    if (e->p.capacity_factor < 0.0f) e->p.capacity_factor = 0.0f;
    e->q_dim = hp->n_head * hp->head_dim;
    e->kv_dim = hp->n_head_kv * hp->head_dim;

    if (pool_create(p->n_threads, &e->pool, err, errlen)) goto fail;
    if (moe_ffn_create(hp, p->max_batch_tokens, p->n_threads, &e->ffn, err, errlen)) goto fail;
    if (kv_cache_create(hp->n_layer, hp->n_head_kv, hp->head_dim, p->kv_block_size, p->kv_n_blocks,
                        p->max_seqs, p->max_seq_len, &e->kv, err, errlen)) goto fail;

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
    e->scores = malloc((size_t)p->n_threads * (size_t)p->max_seq_len * sizeof(float));
    e->logit_rows = malloc(B * sizeof *e->logit_rows);
    if (!e->n_past || !e->next_pos || !e->routed || !e->dropped || !e->inv_freq || !e->x ||
        !e->xb || !e->q || !e->k || !e->v || !e->att || !e->out || !e->rope_cs || !e->scores ||
        !e->logit_rows) {
        snprintf(err, errlen, "engine: out of memory for scratch (%d batch tokens)", p->max_batch_tokens);
        goto fail;
    }
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
    free(e->scores);
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

/* Dot product in a fixed order: 8 running partial sums (which the compiler keeps
 * in one vector register), combined pairwise at the end. */
static float dot(const float *a, const float *b, int n)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

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
    memcpy(kv_cache_k(e->kv, j->layer, seq, pos), k, (size_t)e->kv_dim * sizeof(float));
    memcpy(kv_cache_v(e->kv, j->layer, seq, pos), v, (size_t)e->kv_dim * sizeof(float));
}

/* Causal attention of one (row, head): softmax(q . K[0..pos] / sqrt(d)) . V[0..pos]
 * over the row's own sequence; grouped-query heads share their KV head. */
static void attend(void *ctx, int task, int thread)
{
    const layer_job *j = ctx;
    moe_engine *e = j->e;
    const moe_hparams *hp = &e->w.hp;
    int hd = hp->head_dim;
    int i = task / hp->n_head, h = task % hp->n_head;
    int kvh = h / (hp->n_head / hp->n_head_kv);
    int seq = j->b->seq[i], pos = j->b->pos[i];
    const float *q = e->q + (size_t)i * (size_t)e->q_dim + (size_t)h * (size_t)hd;
    float *o = e->att + (size_t)i * (size_t)e->q_dim + (size_t)h * (size_t)hd;
    float *sc = e->scores + (size_t)thread * (size_t)e->p.max_seq_len;
    float scale = 1.0f / sqrtf((float)hd);

    float max = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        sc[t] = dot(q, kv_cache_k(e->kv, j->layer, seq, t) + (size_t)kvh * (size_t)hd, hd) * scale;
        if (sc[t] > max) max = sc[t];
    }
    float sum = 0.0f;
    for (int t = 0; t <= pos; t++) {
        sc[t] = expf(sc[t] - max);
        sum += sc[t];
    }
    float inv = 1.0f / sum;
    memset(o, 0, (size_t)hd * sizeof *o);
    for (int t = 0; t <= pos; t++) {
        const float *vt = kv_cache_v(e->kv, j->layer, seq, t) + (size_t)kvh * (size_t)hd;
        float wt = sc[t] * inv;
        for (int d = 0; d < hd; d++) o[d] += wt * vt[d];
    }
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

static void attention_layer(moe_engine *e, const moe_batch *b, int l)
{
    const moe_hparams *hp = &e->w.hp;
    const moe_layer_weights *L = &e->w.layers[l];
    int n = b->n_tokens;
    layer_job job = {e, b, l};
    rows_rmsnorm(e->xb, e->x, L->attn_norm, n, hp->n_embd, hp->rms_eps);
    matmul(e->pool, e->xb, n, hp->n_embd, L->wq, e->q_dim, e->q);
    matmul(e->pool, e->xb, n, hp->n_embd, L->wk, e->kv_dim, e->k);
    matmul(e->pool, e->xb, n, hp->n_embd, L->wv, e->kv_dim, e->v);
    pool_run(e->pool, n, qkv_row, &job);
    pool_run(e->pool, n * hp->n_head, attend, &job);
    matmul(e->pool, e->att, n, e->q_dim, L->wo, hp->n_embd, e->out);
    rows_add(e->x, e->out, (size_t)n * (size_t)hp->n_embd);
}

static void ffn_layer(moe_engine *e, const moe_batch *b, int l)
{
    const moe_hparams *hp = &e->w.hp;
    const moe_layer_weights *L = &e->w.layers[l];
    int n = b->n_tokens;
    rows_rmsnorm(e->xb, e->x, L->ffn_norm, n, hp->n_embd, hp->rms_eps);
    if (hp->n_expert == 0) {
        dense_ffn_forward(e->ffn, e->pool, L, e->xb, n, e->out);
    } else {
        int k = hp->n_expert_used, stride = hp->n_layer * k;
        moe_ffn_opts o = {
            .capacity_factor = e->p.capacity_factor,
            .trace_expert = b->trace_expert ? b->trace_expert + (size_t)l * (size_t)k : NULL,
            .trace_weight = b->trace_weight ? b->trace_weight + (size_t)l * (size_t)k : NULL,
            .trace_stride = stride,
            .routed = e->routed + (size_t)l * (size_t)hp->n_expert,
            .dropped = e->dropped + (size_t)l * (size_t)hp->n_expert,
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
    matmul(e->pool, e->xb, n_logits, hp->n_embd, e->w.output, hp->n_vocab, logits);
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
    size_t d = (size_t)hp->n_embd;

    for (int i = 0; i < n; i++)
        memcpy(e->x + (size_t)i * d, e->w.tok_embd + (size_t)b->token[i] * d, d * sizeof(float));
    rope_table(e, b);
    for (int l = 0; l < hp->n_layer; l++) {
        attention_layer(e, b, l);
        ffn_layer(e, b, l);
    }
    if (n_logits > 0) output_logits(e, b, n_logits, logits);
    for (int i = 0; i < n; i++) e->n_past[b->seq[i]] = b->pos[i] + 1;
    return 0;
}

/* Accessors -------------------------------------------------------------- */

const moe_hparams *moe_engine_hparams(const moe_engine *e) { return &e->w.hp; }
const uint64_t *moe_engine_expert_routed(const moe_engine *e) { return e->routed; }
const uint64_t *moe_engine_expert_dropped(const moe_engine *e) { return e->dropped; }
int moe_engine_kv_blocks_free(const moe_engine *e) { return kv_cache_blocks_free(e->kv); }
int moe_engine_kv_blocks_total(const moe_engine *e) { return kv_cache_blocks_total(e->kv); }
int moe_engine_kv_block_size(const moe_engine *e) { return kv_cache_block_size(e->kv); }
size_t moe_engine_kv_bytes(const moe_engine *e) { return kv_cache_bytes(e->kv); }
