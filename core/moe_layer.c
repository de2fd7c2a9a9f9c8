/* moe_layer.c -- the Mixture-of-Experts FFN over a whole batch.
 *
 * One forward: router logits for all rows (one matmul) -> router_topk per row ->
 * expert_queue_build (counting sort by expert) -> every non-empty expert runs once
 * over its whole queue (gather, gate/up, silu(gate)*up, down) into one output row
 * per routed pair -> combine each row's k pair outputs in slot order.
 *
 * Parallelism: the work is a list of (expert, column slice) tasks, first for the
 * gate/up projections, then for the down projection. In decode the queues hold a
 * row or two, the cost is reading expert weights, and the tasks let every thread
 * stream different weight rows of the same or different experts. In prefill the
 * same tasks run sgemm (matmul_range decides by queue length). Slices have a fixed
 * width and every pair output is summed by one task, so the result does not depend
 * on the number of threads. */
#include "core/moe_layer.h"

#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core/clock.h"
#include "core/matmul.h"
#include "core/ops.h"
#include "core/vexp.h"

/* Output columns per task: the few-rows kernel streams 64 weight rows (256 KB at
 * n_embd 1024) per task, fine enough to balance two threads over a few experts;
 * sgemm slices are wider, fewer calls (its speed does not depend on the width
 * from 64 columns up, measured). */
#ifndef SLICE_FEW
#define SLICE_FEW 64
#endif
#define SLICE_MANY 256
/* Rows per combine task. */
#define COMBINE_ROWS 16

/* Routing ---------------------------------------------------------------- */

/* Selection key of a logit: NaN never wins. */
static inline float logit_key(float v)
{
    return v != v ? -INFINITY : v;
}

/* Top-k of the router scores. Softmax is monotone, so the top-k of p is the top-k
 * of the logits; selecting on logits also avoids ties that exp() rounding would
 * create between different logits. Insertion keeps ids sorted by descending
 * logit; a strictly greater test keeps the lower id first on ties. */
static void topk_ids(const float *logits, int n_expert, int k, int32_t *ids)
{
    int n = 0;
    for (int e = 0; e < n_expert; e++) {
        float v = logit_key(logits[e]);
        if (n == k && !(v > logit_key(logits[ids[k - 1]]))) continue;
        int pos = n < k ? n++ : k - 1;
        while (pos > 0 && v > logit_key(logits[ids[pos - 1]])) {
            ids[pos] = ids[pos - 1];
            pos--;
        }
        ids[pos] = e;
    }
}

void router_topk(const moe_arch_info *a, const float *logits, int n_expert, int k,
                 int32_t *ids, float *weights)
{
    assert(k > 0 && k <= n_expert);
    topk_ids(logits, n_expert, k, ids);

    /* MOE_SCORE_SOFTMAX (the only score function so far): p = softmax(all
     * logits), in double so the denominator over many experts loses nothing. */
    float max = logit_key(logits[ids[0]]);
    if (!isfinite(max)) {   /* no usable logit: spread the weight evenly */
        for (int j = 0; j < k; j++) weights[j] = a->expert_weight_scale / (float)k;
        return;
    }
    double all = 0.0, top = 0.0;
    for (int e = 0; e < n_expert; e++) all += exp((double)logit_key(logits[e]) - max);
    for (int j = 0; j < k; j++) top += exp((double)logits[ids[j]] - max);
    double denom = a->renorm_topk ? top : all;
    for (int j = 0; j < k; j++)
        weights[j] = (float)(exp((double)logits[ids[j]] - max) / denom * a->expert_weight_scale);
}

/* Per-expert queues ------------------------------------------------------ */

/* offset holds 2 * (n_expert + 1) entries: the public n_expert + 1 offsets and,
 * behind them, per-expert counts/cursors the build uses as scratch, so the
 * build allocates nothing. */
int expert_queue_init(expert_queue *q, int n_expert, int max_pairs, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    if (n_expert <= 0 || max_pairs < 0) {
        snprintf(err, errlen, "expert queue: bad sizes (%d experts, %d pairs)", n_expert, max_pairs);
        return -1;
    }
    size_t np = max_pairs > 0 ? (size_t)max_pairs : 1;
    q->offset = calloc(2 * ((size_t)n_expert + 1), sizeof *q->offset);
    q->row = malloc(np * sizeof *q->row);
    q->weight = malloc(np * sizeof *q->weight);
    q->slot = malloc(np * sizeof *q->slot);
    if (!q->offset || !q->row || !q->weight || !q->slot) {
        expert_queue_free(q);
        snprintf(err, errlen, "expert queue: out of memory for %d pairs", max_pairs);
        return -1;
    }
    q->n_expert = n_expert;
    q->cap_pairs = max_pairs;
    return 0;
}

void expert_queue_free(expert_queue *q)
{
    free(q->offset);
    free(q->row);
    free(q->weight);
    free(q->slot);
    memset(q, 0, sizeof *q);
}

/* Counting sort: count per expert, cap, prefix-sum into offsets, then place the
 * pairs walking rows in ascending order, so each queue is sorted by row and a
 * capped queue keeps its first rows. Ids outside [0, n_expert) are skipped. */
void expert_queue_build(expert_queue *q, const int32_t *ids, const float *weights,
                        int n, int k, int capacity, uint64_t *dropped)
{
    int E = q->n_expert;
    int32_t *cursor = q->offset + E + 1;
    assert(n >= 0 && k >= 0 && (int64_t)n * k <= q->cap_pairs);
    memset(cursor, 0, (size_t)E * sizeof *cursor);
    for (int i = 0; i < n * k; i++)
        if (ids[i] >= 0 && ids[i] < E) cursor[ids[i]]++;
    q->offset[0] = 0;
    for (int e = 0; e < E; e++) {
        int kept = capacity >= 0 && cursor[e] > capacity ? capacity : cursor[e];
        if (dropped) dropped[e] += (uint64_t)(cursor[e] - kept);
        q->offset[e + 1] = q->offset[e] + kept;
        cursor[e] = q->offset[e];
    }
    for (int r = 0; r < n; r++)
        for (int s = 0; s < k; s++) {
            int32_t e = ids[(size_t)r * k + s];
            if (e < 0 || e >= E || cursor[e] == q->offset[e + 1]) continue;
            int32_t pos = cursor[e]++;
            q->row[pos] = r;
            q->weight[pos] = weights[(size_t)r * k + s];
            q->slot[pos] = s;
        }
}

/* ceil(cf * n * k / E). cf arrives as a float (1.1f is 1.10000002), so a
 * relative 1e-6 is taken off before rounding up: that rounding must not add a
 * slot the user did not ask for. */
int expert_capacity(float capacity_factor, int n_tokens, int k, int n_expert)
{
    if (!(capacity_factor > 0.0f) || n_expert <= 0) return -1;
    double c = (double)capacity_factor * (double)n_tokens * (double)k / (double)n_expert;
    c = ceil(c - 1e-6 * c);
    if (c < 0.0) return 0;
    if (c > (double)INT32_MAX) return INT32_MAX;
    return (int)c;
}

/* The layer -------------------------------------------------------------- */

/* One SwiGLU FFN applied to a block of rows: a routed expert over its queue, the
 * shared expert or the dense FFN over the whole batch. */
typedef struct {
    const float *x;              /* (rows, n_embd) input rows */
    int rows, n_ff;
    const float *wg, *wu, *wd;   /* (n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff) */
    moe_wtype wtg, wtu, wtd;     /* not F32: the same matrices as the three below */
    const unsigned char *wgq, *wuq, *wdq;
    float *g, *u;                /* (rows, n_ff) gate and up; g ends as silu(g) * u */
    float *y;                    /* (rows, n_embd) output, stride n_embd */
} ffn_unit;

typedef struct {
    int32_t unit;
    int32_t c0, c1;              /* output columns [c0, c1) */
} ffn_task;

struct moe_ffn {
    moe_hparams hp;
    int max_rows;
    int max_pairs;               /* max_rows * k */
    int has_shexp;

    float *logits;               /* (max_rows, n_expert) router logits */
    int32_t *ids;                /* (max_rows, k) chosen experts */
    float *wts;                  /* (max_rows, k) their gate weights */
    int32_t *pair_of;            /* (max_rows, k) queue index of (row, slot), -1 dropped */
    expert_queue q;

    float *xg;                   /* (max_pairs, n_embd) rows gathered in queue order */
    float *g, *u;                /* (max(max_pairs, max_rows), n_ff) */
    float *yp;                   /* (max_pairs, n_embd) one output row per routed pair */

    float *sh_g, *sh_u;          /* (max_rows, n_ff_shexp) shared expert */
    float *sh_y;                 /* (max_rows, n_embd) */
    float *sh_gate;              /* (max_rows) sigmoid(gate_shexp . x) */

    float *wide;                 /* (n_threads, SLICE_MANY * max(n_embd, n_ff, n_ff_shexp)) a task's
                                  * slice of narrow weights widened to F32 */
    size_t wide_floats;          /* per thread */
    int n_threads;

    ffn_unit *units;             /* (n_expert + 1) */
    ffn_task *tasks;             /* (max_tasks) */
    int max_tasks;
    int n_units;

    /* the current combine job */
    int n_rows;
    float *out;
};

/* calloc of a * b floats-sized items with an overflow check; at least one item. */
static void *alloc_items(size_t a, size_t b, size_t item)
{
    if (a == 0 || b == 0) a = b = 1;
    if (a > SIZE_MAX / b || a * b > SIZE_MAX / item) return NULL;
    return calloc(a * b, item);
}

void moe_ffn_free(moe_ffn *f)
{
    if (!f) return;
    free(f->logits);
    free(f->ids);
    free(f->wts);
    free(f->pair_of);
    if (f->q.offset) expert_queue_free(&f->q);
    free(f->xg);
    free(f->g);
    free(f->u);
    free(f->yp);
    free(f->sh_g);
    free(f->sh_u);
    free(f->sh_y);
    free(f->sh_gate);
    free(f->units);
    free(f->tasks);
    free(f->wide);
    free(f);
}

static int hparams_check(const moe_hparams *hp, int max_rows, int n_threads, char *err, size_t errlen)
{
    const moe_arch_info *a = moe_arch_get(hp->arch);
    if (!a) {
        snprintf(err, errlen, "moe ffn: unknown architecture");
        return -1;
    }
    if (max_rows <= 0 || n_threads <= 0 || hp->n_embd <= 0 || hp->n_ff <= 0 ||
        hp->n_expert < 0 || hp->n_ff_shexp < 0) {
        snprintf(err, errlen, "moe ffn: sizes must be positive (rows %d, threads %d, embd %d, ff %d)",
                 max_rows, n_threads, hp->n_embd, hp->n_ff);
        return -1;
    }
    if (hp->n_expert > 0 && (hp->n_expert_used <= 0 || hp->n_expert_used > hp->n_expert)) {
        snprintf(err, errlen, "moe ffn: experts used %d must be in 1..%d", hp->n_expert_used, hp->n_expert);
        return -1;
    }
    if (a->shared_expert && hp->n_expert > 0 && hp->n_ff_shexp <= 0) {
        snprintf(err, errlen, "moe ffn: shared expert width must be positive");
        return -1;
    }
    if ((int64_t)max_rows * (hp->n_expert_used > 0 ? hp->n_expert_used : 1) > INT32_MAX / 2) {
        snprintf(err, errlen, "moe ffn: %d rows is too many", max_rows);
        return -1;
    }
    return 0;
}

int moe_ffn_create(const moe_hparams *hp, int max_rows, int n_threads,
                   moe_ffn **out, char *err, size_t errlen)
{
    *out = NULL;
    if (hparams_check(hp, max_rows, n_threads, err, errlen)) return -1;
    moe_ffn *f = calloc(1, sizeof *f);
    if (!f) goto oom;
    f->hp = *hp;
    f->max_rows = max_rows;
    int E = hp->n_expert, k = hp->n_expert_used, d = hp->n_embd;
    size_t rows = (size_t)max_rows;
    f->max_pairs = E > 0 ? max_rows * k : 0;
    f->has_shexp = E > 0 && moe_arch_get(hp->arch)->shared_expert;
    size_t ffn_rows = (size_t)(f->max_pairs > max_rows ? f->max_pairs : max_rows);
    f->g = alloc_items(ffn_rows, (size_t)hp->n_ff, sizeof(float));
    f->u = alloc_items(ffn_rows, (size_t)hp->n_ff, sizeof(float));
    if (!f->g || !f->u) goto oom;
    if (E > 0) {
        f->logits = alloc_items(rows, (size_t)E, sizeof(float));
        f->ids = alloc_items(rows, (size_t)k, sizeof(int32_t));
        f->wts = alloc_items(rows, (size_t)k, sizeof(float));
        f->pair_of = alloc_items(rows, (size_t)k, sizeof(int32_t));
        f->xg = alloc_items((size_t)f->max_pairs, (size_t)d, sizeof(float));
        f->yp = alloc_items((size_t)f->max_pairs, (size_t)d, sizeof(float));
        if (!f->logits || !f->ids || !f->wts || !f->pair_of || !f->xg || !f->yp) goto oom;
        if (expert_queue_init(&f->q, E, f->max_pairs, err, errlen)) goto fail;
    }
    if (f->has_shexp) {
        f->sh_g = alloc_items(rows, (size_t)hp->n_ff_shexp, sizeof(float));
        f->sh_u = alloc_items(rows, (size_t)hp->n_ff_shexp, sizeof(float));
        f->sh_y = alloc_items(rows, (size_t)d, sizeof(float));
        f->sh_gate = alloc_items(rows, 1, sizeof(float));
        if (!f->sh_g || !f->sh_u || !f->sh_y || !f->sh_gate) goto oom;
    }
    int width = d > hp->n_ff ? d : hp->n_ff;
    if (hp->n_ff_shexp > width) width = hp->n_ff_shexp;
    f->max_tasks = (E + 1) * ((width + SLICE_FEW - 1) / SLICE_FEW);
    f->units = alloc_items((size_t)E + 1, 1, sizeof *f->units);
    f->tasks = alloc_items((size_t)f->max_tasks, 1, sizeof *f->tasks);
    if (!f->units || !f->tasks) goto oom;
    /* Untouched (and so not resident) unless an FFN is kept narrower than F32. */
    f->n_threads = n_threads;
    f->wide_floats = (size_t)SLICE_MANY * (size_t)width;
    f->wide = alloc_items((size_t)n_threads, f->wide_floats, sizeof(float));
    if (!f->wide) goto oom;
    *out = f;
    return 0;

oom:
    snprintf(err, errlen, "moe ffn: out of memory for %d rows", max_rows);
fail:
    moe_ffn_free(f);
    return -1;
}

/* Expert work ------------------------------------------------------------ */

static int slice_width(int rows)
{
    return rows >= matmul_sgemm_min_rows() ? SLICE_MANY : SLICE_FEW;
}

/* Cuts every unit's output width (n_ff for gate/up, n_embd for down) into fixed
 * slices; returns the task count. */
static int tasks_build(moe_ffn *f, int down)
{
    int nt = 0;
    for (int i = 0; i < f->n_units; i++) {
        const ffn_unit *u = &f->units[i];
        int width = down ? f->hp.n_embd : u->n_ff, s = slice_width(u->rows);
        for (int c0 = 0; c0 < width; c0 += s) {
            assert(nt < f->max_tasks);
            f->tasks[nt++] = (ffn_task){i, c0, c0 + s < width ? c0 + s : width};
        }
    }
    return nt;
}

/* g[c] = silu(g[c]) * up[c] for c < n. The scalar silu costs an expf call per
 * element (4% of a batch-64 decode step); the AVX-512 path computes
 * silu(g) = g / (1 + exp(-g)) sixteen at a time (core/vexp.h). Every element, the
 * tail included (masked), goes through the same arithmetic, so a value does not
 * depend on where it sits in the slice. */
#if defined(__AVX512F__)
static inline __m512 swiglu_ps(__m512 g, __m512 up)
{
    __m512 e = vexp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), up);
}
#endif

static void swiglu(float *g, const float *up, int n)
{
#if defined(__AVX512F__)
    int c = 0;
    for (; c + 16 <= n; c += 16)
        _mm512_storeu_ps(g + c, swiglu_ps(_mm512_loadu_ps(g + c), _mm512_loadu_ps(up + c)));
    if (c < n) {
        __mmask16 m = (__mmask16)((1u << (n - c)) - 1u);
        __m512 v = swiglu_ps(_mm512_maskz_loadu_ps(m, g + c), _mm512_maskz_loadu_ps(m, up + c));
        _mm512_mask_storeu_ps(g + c, m, v);
    }
#else
    for (int c = 0; c < n; c++) g[c] = silu(g[c]) * up[c];
#endif
}

/* y[:, c0:c1) = x W[c0:c1)^T for W of k columns, F32 (w) or the file's narrower
 * type (wq, widened as read: the bits of weights converted at load from fewer
 * bytes; the thread's scratch takes the widened slice on the sgemm path). */
static void slice_matmul(moe_ffn *f, int thread, const ffn_unit *u, const float *x, int k,
                         const float *w, const unsigned char *wq, moe_wtype wt, int c0, int c1, float *y, int ldy)
{
    if (wt == MOE_WT_F32) {
        matmul_range(x, u->rows, k, w, c0, c1, y, ldy);
        return;
    }
    assert(thread >= 0 && thread < f->n_threads);
    assert((size_t)(c1 - c0) * (size_t)k <= f->wide_floats);
    matmul_range_wq(x, u->rows, k, wq, wt, c0, c1, y, ldy, f->wide + (size_t)thread * f->wide_floats);
}

/* Gate and up projections of one slice, then silu(gate) * up on that slice. */
static void gate_up_task(void *ctx, int task, int thread)
{
    moe_ffn *f = ctx;
    const ffn_task *t = &f->tasks[task];
    const ffn_unit *u = &f->units[t->unit];
    int d = f->hp.n_embd;
    slice_matmul(f, thread, u, u->x, d, u->wg, u->wgq, u->wtg, t->c0, t->c1, u->g, u->n_ff);
    slice_matmul(f, thread, u, u->x, d, u->wu, u->wuq, u->wtu, t->c0, t->c1, u->u, u->n_ff);
    for (int r = 0; r < u->rows; r++) {
        float *g = u->g + (size_t)r * u->n_ff, *up = u->u + (size_t)r * u->n_ff;
        swiglu(g + t->c0, up + t->c0, t->c1 - t->c0);
    }
}

static void down_task(void *ctx, int task, int thread)
{
    moe_ffn *f = ctx;
    const ffn_task *t = &f->tasks[task];
    const ffn_unit *u = &f->units[t->unit];
    slice_matmul(f, thread, u, u->g, u->n_ff, u->wd, u->wdq, u->wtd, t->c0, t->c1, u->y, f->hp.n_embd);
}

/* The hot path: every unit once over its rows, gate/up for all units, then down. */
static void units_run(moe_ffn *f, pool *p)
{
    pool_run(p, tasks_build(f, 0), gate_up_task, f);
    pool_run(p, tasks_build(f, 1), down_task, f);
}

/* A unit over rows of x for an FFN of width n_ff whose matrices are the F32
 * ones (wg, wu, wd), or raw's when it keeps them (from bytes at[0], at[1],
 * at[2] of the three: an expert within the experts' tensors). */
static ffn_unit unit_make(const float *x, int rows, int n_ff, const float *wg, const float *wu,
                          const float *wd, const moe_ffn_raw *raw, const size_t at[3], float *g, float *u, float *y)
{
    ffn_unit un = {.x = x, .rows = rows, .n_ff = n_ff, .wg = wg, .wu = wu, .wd = wd,
                   .wtg = MOE_WT_F32, .wtu = MOE_WT_F32, .wtd = MOE_WT_F32, .g = g, .u = u, .y = y};
    if (raw->type != MOE_WT_F32) {
        un.wg = un.wu = un.wd = NULL;
        un.wtg = raw->type;
        un.wtu = raw->up_type;
        un.wtd = raw->down_type;
        un.wgq = raw->gate + at[0];
        un.wuq = raw->up + at[1];
        un.wdq = raw->down + at[2];
    }
    return un;
}

static const size_t zero_at[3] = {0, 0, 0};

/* One unit per non-empty expert queue, over its gathered rows. */
static void units_from_queues(moe_ffn *f, const moe_layer_weights *L)
{
    const expert_queue *q = &f->q;
    size_t d = (size_t)f->hp.n_embd, ff = (size_t)f->hp.n_ff;
    for (int e = 0; e < f->hp.n_expert; e++) {
        int o = q->offset[e], rows = q->offset[e + 1] - o;
        if (rows == 0) continue;
        /* expert e of each (n_expert, ., .) tensor: the same F32 offset, bytes by type */
        size_t at = (size_t)e * ff * d;
        const moe_ffn_raw *r = &L->exp_raw;
        size_t atq[3] = {(size_t)e * ff * moe_wtype_row_bytes(r->type, d),
                         (size_t)e * ff * moe_wtype_row_bytes(r->up_type, d),
                         (size_t)e * d * moe_wtype_row_bytes(r->down_type, ff)};
        int f32 = r->type == MOE_WT_F32;
        f->units[f->n_units++] =
            unit_make(f->xg + (size_t)o * d, rows, (int)ff, f32 ? L->exp_gate + at : NULL,
                      f32 ? L->exp_up + at : NULL, f32 ? L->exp_down + at : NULL, r, atq,
                      f->g + (size_t)o * ff, f->u + (size_t)o * ff, f->yp + (size_t)o * d);
    }
}

/* Combine ---------------------------------------------------------------- */

/* out[r] = sum over the row's k slots, in slot order, of weight * pair output
 * (+ sigmoid gate * shared expert), so the sum order is fixed. */
static void combine_task(void *ctx, int task, int thread)
{
    (void)thread;
    moe_ffn *f = ctx;
    int d = f->hp.n_embd, k = f->hp.n_expert_used;
    int r1 = (task + 1) * COMBINE_ROWS < f->n_rows ? (task + 1) * COMBINE_ROWS : f->n_rows;
    for (int r = task * COMBINE_ROWS; r < r1; r++) {
        float *o = f->out + (size_t)r * d;
        memset(o, 0, (size_t)d * sizeof *o);
        for (int s = 0; s < k; s++) {
            int32_t pair = f->pair_of[(size_t)r * k + s];
            if (pair < 0) continue;
            float w = f->q.weight[pair];
            const float *y = f->yp + (size_t)pair * d;
            for (int c = 0; c < d; c++) o[c] += w * y[c];
        }
        if (f->has_shexp) {
            float sg = f->sh_gate[r];
            const float *y = f->sh_y + (size_t)r * d;
            for (int c = 0; c < d; c++) o[c] += sg * y[c];
        }
    }
}

/* Forward ---------------------------------------------------------------- */

/* Router, top-k, trace, queues and the pair index of each (row, slot). */
static void route(moe_ffn *f, pool *p, const moe_arch_info *a, const moe_layer_weights *L,
                  const float *x, int n, const moe_ffn_opts *opts)
{
    int E = f->hp.n_expert, k = f->hp.n_expert_used, d = f->hp.n_embd;
    matmul(p, x, n, d, L->router, E, f->logits);
    for (int r = 0; r < n; r++)
        router_topk(a, f->logits + (size_t)r * E, E, k, f->ids + (size_t)r * k, f->wts + (size_t)r * k);
    if (opts && (opts->trace_expert || opts->trace_weight)) {
        assert(opts->trace_stride >= k);
        for (int r = 0; r < n; r++)
            for (int s = 0; s < k; s++) {
                size_t at = (size_t)r * opts->trace_stride + s;
                if (opts->trace_expert) opts->trace_expert[at] = f->ids[(size_t)r * k + s];
                if (opts->trace_weight) opts->trace_weight[at] = f->wts[(size_t)r * k + s];
            }
    }
    int cap = expert_capacity(opts ? opts->capacity_factor : 0.0f, n, k, E);
    expert_queue_build(&f->q, f->ids, f->wts, n, k, cap, opts ? opts->dropped : NULL);
    if (opts && opts->routed)
        for (int e = 0; e < E; e++) opts->routed[e] += (uint64_t)(f->q.offset[e + 1] - f->q.offset[e]);
    for (int i = 0; i < n * k; i++) f->pair_of[i] = -1;
    for (int i = 0; i < f->q.offset[E]; i++) {
        f->pair_of[(size_t)f->q.row[i] * k + f->q.slot[i]] = i;
        memcpy(f->xg + (size_t)i * d, x + (size_t)f->q.row[i] * d, (size_t)d * sizeof(float));
    }
}

void moe_ffn_forward(moe_ffn *f, pool *p, const moe_arch_info *a, const moe_layer_weights *L,
                     const float *x, int n, float *out, const moe_ffn_opts *opts)
{
    assert(f->hp.n_expert > 0 && n >= 0 && n <= f->max_rows);
    assert(!a->shared_expert || f->has_shexp);
    if (n == 0) return;
    double t0 = clock_mono_s();
    route(f, p, a, L, x, n, opts);
    double t1 = clock_mono_s();

    f->n_units = 0;
    units_from_queues(f, L);
    if (f->has_shexp) {
        int d = f->hp.n_embd;
        matmul_range(x, n, d, L->shexp_gate_inp, 0, 1, f->sh_gate, 1);
        for (int r = 0; r < n; r++) f->sh_gate[r] = sigmoid(f->sh_gate[r]);
        f->units[f->n_units++] = unit_make(x, n, f->hp.n_ff_shexp, L->shexp_gate, L->shexp_up,
                                           L->shexp_down, &L->shexp_raw, zero_at, f->sh_g, f->sh_u, f->sh_y);
    }
    units_run(f, p);
    double t2 = clock_mono_s();

    f->n_rows = n;
    f->out = out;
    pool_run(p, (n + COMBINE_ROWS - 1) / COMBINE_ROWS, combine_task, f);
    f->out = NULL;
    if (opts && opts->times) {
        opts->times->routing += t1 - t0;
        opts->times->experts += t2 - t1;
        opts->times->combine += clock_mono_s() - t2;
    }
}

void dense_ffn_forward(moe_ffn *f, pool *p, const moe_layer_weights *L,
                       const float *x, int n, float *out)
{
    assert(n >= 0 && n <= f->max_rows);
    if (n == 0) return;
    f->units[0] = unit_make(x, n, f->hp.n_ff, L->ffn_gate, L->ffn_up, L->ffn_down, &L->ffn_raw, zero_at, f->g,
                            f->u, out);
    f->n_units = 1;
    units_run(f, p);
}
