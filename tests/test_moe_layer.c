/* test_moe_layer.c -- routing, expert queues, capacity, and the MoE FFN against a
 * naive per-token reference for every architecture row. */
#include "core/moe_layer.h"
#include "core/matmul.h"
#include "tests/testutil.h"

#include <math.h>

/* Routing ---------------------------------------------------------------- */

static double p_softmax(const float *l, int n, int i)
{
    double max = l[0], s = 0.0;
    for (int j = 1; j < n; j++) max = l[j] > max ? l[j] : max;
    for (int j = 0; j < n; j++) s += exp((double)l[j] - max);
    return exp((double)l[i] - max) / s;
}

START_TEST(topk_renormalised_rows)
{
    const float l[5] = {1.0f, 3.0f, 2.0f, 0.5f, -1.0f};
    moe_arch rows[] = {MOE_ARCH_LLAMA, MOE_ARCH_QWEN3MOE};
    for (int a = 0; a < 2; a++) {
        int32_t ids[2];
        float w[2];
        router_topk(moe_arch_get(rows[a]), l, 5, 2, ids, w);
        ck_assert_int_eq(ids[0], 1);
        ck_assert_int_eq(ids[1], 2);
        double p1 = p_softmax(l, 5, 1), p2 = p_softmax(l, 5, 2);
        ck_assert_double_eq_tol(w[0], p1 / (p1 + p2), 1e-6);
        ck_assert_double_eq_tol(w[1], p2 / (p1 + p2), 1e-6);
        /* equal to a softmax over the two chosen logits */
        ck_assert_double_eq_tol(w[0], 1.0 / (1.0 + exp(-1.0)), 1e-6);
    }
}
END_TEST

START_TEST(topk_plain_softmax_rows)
{
    const float l[5] = {1.0f, 3.0f, 2.0f, 0.5f, -1.0f};
    moe_arch rows[] = {MOE_ARCH_QWEN2MOE, MOE_ARCH_OLMOE};
    for (int a = 0; a < 2; a++) {
        int32_t ids[3];
        float w[3];
        router_topk(moe_arch_get(rows[a]), l, 5, 3, ids, w);
        ck_assert_int_eq(ids[0], 1);
        ck_assert_int_eq(ids[1], 2);
        ck_assert_int_eq(ids[2], 0);
        for (int j = 0; j < 3; j++) ck_assert_double_eq_tol(w[j], p_softmax(l, 5, ids[j]), 1e-6);
        ck_assert(w[0] + w[1] + w[2] < 0.99f);   /* not renormalised */
    }
}
END_TEST

START_TEST(topk_scale_multiplies_weights)
{
    const float l[4] = {0.1f, -0.2f, 0.7f, 0.3f};
    for (int renorm = 0; renorm <= 1; renorm++) {
        moe_arch_info a = *moe_arch_get(MOE_ARCH_OLMOE);
        a.renorm_topk = renorm;
        int32_t ids1[2], ids2[2];
        float w1[2], w2[2];
        router_topk(&a, l, 4, 2, ids1, w1);
        a.expert_weight_scale = 2.5f;
        router_topk(&a, l, 4, 2, ids2, w2);
        ck_assert(ids1[0] == 2 && ids1[1] == 3 && ids2[0] == 2 && ids2[1] == 3);
        for (int j = 0; j < 2; j++) ck_assert_double_eq_tol(w2[j], 2.5 * w1[j], 1e-6);
        double p2 = p_softmax(l, 4, 2), p3 = p_softmax(l, 4, 3);
        ck_assert_double_eq_tol(w2[0], 2.5 * (renorm ? p2 / (p2 + p3) : p2), 1e-6);
    }
}
END_TEST

START_TEST(topk_ties_prefer_lower_id)
{
    const float l[6] = {2.0f, 5.0f, 5.0f, 1.0f, 5.0f, 5.0f};
    const moe_arch_info *a = moe_arch_get(MOE_ARCH_LLAMA);
    int32_t ids[4];
    float w[4];
    router_topk(a, l, 6, 2, ids, w);
    ck_assert(ids[0] == 1 && ids[1] == 2);
    ck_assert_float_eq(w[0], w[1]);
    router_topk(a, l, 6, 3, ids, w);
    ck_assert(ids[0] == 1 && ids[1] == 2 && ids[2] == 4);
    router_topk(a, l, 6, 4, ids, w);
    ck_assert(ids[3] == 5);
    const float z[4] = {0, 0, 0, 0};
    router_topk(a, z, 4, 4, ids, w);
    for (int j = 0; j < 4; j++) {
        ck_assert_int_eq(ids[j], j);
        ck_assert_double_eq_tol(w[j], 0.25, 1e-7);
    }
}
END_TEST

START_TEST(topk_nan_never_wins)
{
    const float l[4] = {NAN, 0.5f, NAN, 0.25f};
    int32_t ids[3];
    float w[3];
    router_topk(moe_arch_get(MOE_ARCH_LLAMA), l, 4, 3, ids, w);
    ck_assert(ids[0] == 1 && ids[1] == 3);
    ck_assert(ids[2] == 0 || ids[2] == 2);
    ck_assert_int_ne(ids[0], ids[2]);
}
END_TEST

/* Queues ----------------------------------------------------------------- */

static uint32_t rng;

static uint32_t rnd(void)
{
    rng = rng * 1664525u + 1013904223u;
    return rng >> 8;
}

static float frand(void)
{
    return (float)(rnd() & 0xffff) / 32768.0f - 1.0f;
}

/* n rows of k distinct experts with random weights. */
static void random_routing(int n, int k, int E, int32_t *ids, float *w)
{
    for (int r = 0; r < n; r++)
        for (int s = 0; s < k; s++) {
            int e, dup;
            do {
                e = (int)(rnd() % (uint32_t)E);
                dup = 0;
                for (int t = 0; t < s; t++) dup |= ids[r * k + t] == e;
            } while (dup);
            ids[r * k + s] = e;
            w[r * k + s] = (float)(r * k + s) + 0.5f;
        }
}

START_TEST(queue_holds_every_pair_once_rows_ascending)
{
    rng = 5;
    enum { N = 37, K = 3, E = 8 };
    int32_t ids[N * K];
    float w[N * K];
    random_routing(N, K, E, ids, w);
    expert_queue q;
    char err[128];
    ck_assert_int_eq(expert_queue_init(&q, E, N * K, err, sizeof err), 0);
    uint64_t dropped[E] = {0};
    expert_queue_build(&q, ids, w, N, K, -1, dropped);
    ck_assert_int_eq(q.offset[0], 0);
    ck_assert_int_eq(q.offset[E], N * K);
    int seen[N * K] = {0};
    for (int e = 0; e < E; e++) {
        ck_assert_int_le(q.offset[e], q.offset[e + 1]);
        ck_assert_uint_eq(dropped[e], 0);
        for (int i = q.offset[e]; i < q.offset[e + 1]; i++) {
            int r = q.row[i], s = q.slot[i];
            ck_assert(r >= 0 && r < N && s >= 0 && s < K);
            ck_assert_int_eq(ids[r * K + s], e);
            ck_assert_float_eq(q.weight[i], w[r * K + s]);
            seen[r * K + s]++;
            if (i > q.offset[e]) ck_assert_int_lt(q.row[i - 1], r);
        }
    }
    for (int i = 0; i < N * K; i++) ck_assert_int_eq(seen[i], 1);
    /* rebuilding with fewer rows reuses the arrays */
    expert_queue_build(&q, ids, w, 5, K, -1, NULL);
    ck_assert_int_eq(q.offset[E], 5 * K);
    expert_queue_free(&q);
}
END_TEST

START_TEST(capacity_keeps_first_rows_and_counts_the_rest)
{
    rng = 9;
    enum { N = 50, K = 2, E = 4, CAP = 9 };
    int32_t ids[N * K];
    float w[N * K];
    random_routing(N, K, E, ids, w);
    expert_queue q;
    char err[128];
    ck_assert_int_eq(expert_queue_init(&q, E, N * K, err, sizeof err), 0);
    uint64_t dropped[E] = {1, 1, 1, 1};   /* counters accumulate */
    expert_queue_build(&q, ids, w, N, K, CAP, dropped);
    for (int e = 0; e < E; e++) {
        /* the rows that chose e, in order */
        int chose[N], n = 0;
        for (int r = 0; r < N; r++)
            for (int s = 0; s < K; s++)
                if (ids[r * K + s] == e) chose[n++] = r;
        int kept = n < CAP ? n : CAP;
        ck_assert_int_eq(q.offset[e + 1] - q.offset[e], kept);
        ck_assert_uint_eq(dropped[e], 1 + (uint64_t)(n - kept));
        for (int i = 0; i < kept; i++) ck_assert_int_eq(q.row[q.offset[e] + i], chose[i]);
    }
    ck_assert_int_lt(q.offset[E], N * K);   /* 100 pairs cannot fit 4 * 9 */
    expert_queue_build(&q, ids, w, N, K, 0, NULL);
    ck_assert_int_eq(q.offset[E], 0);
    expert_queue_free(&q);
    ck_assert_int_eq(expert_queue_init(&q, 0, 4, err, sizeof err), -1);
    ck_assert_int_eq(expert_queue_init(&q, 4, -1, err, sizeof err), -1);
}
END_TEST

START_TEST(capacity_formula)
{
    ck_assert_int_eq(expert_capacity(1.0f, 10, 2, 4), 5);
    ck_assert_int_eq(expert_capacity(1.25f, 10, 2, 4), 7);   /* ceil(6.25) */
    ck_assert_int_eq(expert_capacity(1.1f, 10, 1, 11), 1);   /* 1.1f is not 1.1 */
    ck_assert_int_eq(expert_capacity(2.0f, 3, 2, 64), 1);
    ck_assert_int_eq(expert_capacity(1.0f, 0, 2, 4), 0);
    ck_assert_int_eq(expert_capacity(0.0f, 10, 2, 4), -1);
    ck_assert_int_eq(expert_capacity(-1.0f, 10, 2, 4), -1);
    ck_assert_int_eq(expert_capacity(NAN, 10, 2, 4), -1);
}
END_TEST

/* The layer against a naive reference ------------------------------------ */

typedef struct {
    moe_hparams hp;
    moe_layer_weights L;
    float *buf[12];
    int nbuf;
} test_layer;

static float *tl_array(test_layer *t, size_t n, float scale)
{
    float *a = malloc(n * sizeof *a);
    ck_assert_ptr_nonnull(a);
    for (size_t i = 0; i < n; i++) a[i] = frand() * scale;
    t->buf[t->nbuf++] = a;
    return a;
}

static void tl_make(test_layer *t, moe_arch arch, int d, int ff, int E, int k, int ff_sh)
{
    memset(t, 0, sizeof *t);
    t->hp = (moe_hparams){.arch = arch, .n_embd = d, .n_ff = ff, .n_expert = E,
                          .n_expert_used = k, .n_ff_shexp = ff_sh};
    float sd = 1.0f / sqrtf((float)d), sf = 1.0f / sqrtf((float)ff);
    if (E == 0) {
        t->L.ffn_gate = tl_array(t, (size_t)ff * d, sd);
        t->L.ffn_up = tl_array(t, (size_t)ff * d, sd);
        t->L.ffn_down = tl_array(t, (size_t)d * ff, sf);
        return;
    }
    t->L.router = tl_array(t, (size_t)E * d, 2.0f * sd);
    t->L.exp_gate = tl_array(t, (size_t)E * ff * d, sd);
    t->L.exp_up = tl_array(t, (size_t)E * ff * d, sd);
    t->L.exp_down = tl_array(t, (size_t)E * d * ff, sf);
    if (ff_sh > 0) {
        t->L.shexp_gate_inp = tl_array(t, (size_t)d, sd);
        t->L.shexp_gate = tl_array(t, (size_t)ff_sh * d, sd);
        t->L.shexp_up = tl_array(t, (size_t)ff_sh * d, sd);
        t->L.shexp_down = tl_array(t, (size_t)d * ff_sh, 1.0f / sqrtf((float)ff_sh));
    }
}

static void tl_free(test_layer *t)
{
    for (int i = 0; i < t->nbuf; i++) free(t->buf[i]);
}

static double dot(const float *a, const float *b, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* y += scale * down(silu(gate x) * up x), all in double. */
static void ref_swiglu(const float *x, int d, int ff, const float *wg, const float *wu,
                       const float *wd, double scale, double *y)
{
    double *h = malloc((size_t)ff * sizeof *h);
    ck_assert_ptr_nonnull(h);
    for (int j = 0; j < ff; j++) {
        double g = dot(x, wg + (size_t)j * d, d), u = dot(x, wu + (size_t)j * d, d);
        h[j] = g / (1.0 + exp(-g)) * u;
    }
    for (int c = 0; c < d; c++) {
        double s = 0.0;
        for (int j = 0; j < ff; j++) s += (double)wd[(size_t)c * ff + j] * h[j];
        y[c] += scale * s;
    }
    free(h);
}

/* Per token: softmax over all experts, top-k (lowest id on ties), weights per the
 * arch row, sum of weighted expert outputs; capacity >= 0 skips a token once its
 * expert has taken `capacity` earlier tokens. Writes the chosen ids. */
static void ref_moe(const test_layer *t, const moe_arch_info *a, const float *x, int n,
                    int capacity, float *out, int32_t *ids_out)
{
    int d = t->hp.n_embd, ff = t->hp.n_ff, E = t->hp.n_expert, k = t->hp.n_expert_used;
    double p[64], y[256];
    int taken[64] = {0};
    ck_assert(E <= 64 && d <= 256);
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * d;
        double max = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++) {
            p[e] = dot(xr, t->L.router + (size_t)e * d, d);
            max = p[e] > max ? p[e] : max;
        }
        for (int e = 0; e < E; e++) sum += (p[e] = exp(p[e] - max));
        for (int e = 0; e < E; e++) p[e] /= sum;
        int chosen[64] = {0}, ids[8];
        double top = 0.0;
        for (int s = 0; s < k; s++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!chosen[e] && (best < 0 || p[e] > p[best])) best = e;
            chosen[best] = 1;
            ids[s] = best;
            top += p[best];
            ids_out[r * k + s] = best;
        }
        memset(y, 0, sizeof y);
        for (int s = 0; s < k; s++) {
            int e = ids[s];
            if (capacity >= 0 && taken[e]++ >= capacity) continue;
            double w = (a->renorm_topk ? p[e] / top : p[e]) * a->expert_weight_scale;
            size_t off = (size_t)e * ff * d;
            ref_swiglu(xr, d, ff, t->L.exp_gate + off, t->L.exp_up + off, t->L.exp_down + off, w, y);
        }
        if (a->shared_expert) {
            double g = dot(xr, t->L.shexp_gate_inp, d);
            ref_swiglu(xr, d, t->hp.n_ff_shexp, t->L.shexp_gate, t->L.shexp_up, t->L.shexp_down,
                       1.0 / (1.0 + exp(-g)), y);
        }
        for (int c = 0; c < d; c++) out[(size_t)r * d + c] = (float)y[c];
    }
}

/* max |a - b| / max |b| */
static double rel_err(const float *a, const float *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double dd = fabs((double)a[i] - (double)b[i]);
        num = dd > num ? dd : num;
        den = fabs((double)b[i]) > den ? fabs((double)b[i]) : den;
    }
    return num / (den > 0 ? den : 1.0);
}

/* Runs one architecture at several batch sizes (600 rows puts some queues on the
 * sgemm path, checked below), with 1, 2 and 3 threads. */
static void check_arch(moe_arch arch, int k)
{
    const moe_arch_info *a = moe_arch_get(arch);
    test_layer t;
    int d = 24, ff = 20, E = 6, ffs = a->shared_expert ? 28 : 0;
    tl_make(&t, arch, d, ff, E, k, ffs);
    char err[160];
    pool *pools[3];
    for (int i = 0; i < 3; i++) ck_assert_int_eq(pool_create(i + 1, &pools[i], err, sizeof err), 0);
    moe_ffn *f = NULL;
    int max_rows = 600;
    ck_assert_msg(moe_ffn_create(&t.hp, max_rows, 3, &f, err, sizeof err) == 0, "%s", err);
    float *x = tl_array(&t, (size_t)max_rows * d, 1.0f);
    float *ref = malloc((size_t)max_rows * d * sizeof *ref);
    float *out[3];
    for (int i = 0; i < 3; i++) out[i] = malloc((size_t)max_rows * d * sizeof(float));
    static int32_t ref_ids[600 * 8], trace[600 * 8];
    ck_assert(ref && out[0] && out[1] && out[2]);
    int sizes[] = {1, 7, 40, 600};
    for (size_t si = 0; si < 4; si++) {
        int n = sizes[si];
        ref_moe(&t, a, x, n, -1, ref, ref_ids);
        uint64_t routed[6] = {0}, dropped[6] = {0};
        for (int i = 0; i < 3; i++) {
            moe_ffn_opts o = {.trace_expert = trace, .trace_stride = k, .routed = routed, .dropped = dropped};
            moe_ffn_forward(f, pools[i], a, &t.L, x, n, out[i], &o);
        }
        double re = rel_err(out[0], ref, (size_t)n * d);
        ck_assert_msg(re < 1e-5, "%s n=%d: relative error %g", a->name, n, re);
        ck_assert(memcmp(out[0], out[1], (size_t)n * d * sizeof(float)) == 0);
        ck_assert(memcmp(out[0], out[2], (size_t)n * d * sizeof(float)) == 0);
        ck_assert(memcmp(trace, ref_ids, (size_t)n * k * sizeof(int32_t)) == 0);
        uint64_t sum = 0, longest = 0;
        for (int e = 0; e < E; e++) {
            sum += routed[e];
            longest = routed[e] > longest ? routed[e] : longest;
            ck_assert_uint_eq(dropped[e], 0);
        }
        ck_assert_uint_eq(sum, 3ull * n * k);   /* three forwards */
        if (n == 600) ck_assert_uint_ge(longest / 3, (uint64_t)tu_many_rows());
    }
    for (int i = 0; i < 3; i++) free(out[i]);
    free(ref);
    moe_ffn_free(f);
    for (int i = 0; i < 3; i++) pool_free(pools[i]);
    tl_free(&t);
}

START_TEST(llama_matches_reference) { check_arch(MOE_ARCH_LLAMA, 2); }
END_TEST
START_TEST(qwen2moe_matches_reference) { check_arch(MOE_ARCH_QWEN2MOE, 2); }
END_TEST
START_TEST(olmoe_matches_reference) { check_arch(MOE_ARCH_OLMOE, 3); }
END_TEST
START_TEST(qwen3moe_matches_reference) { check_arch(MOE_ARCH_QWEN3MOE, 3); }
END_TEST

START_TEST(capacity_drops_match_reference)
{
    rng = 21;
    const moe_arch_info *a = moe_arch_get(MOE_ARCH_OLMOE);
    test_layer t;
    int d = 16, E = 4, k = 2, n = 30;
    tl_make(&t, MOE_ARCH_OLMOE, d, 12, E, k, 0);
    char err[160];
    moe_ffn *f = NULL;
    ck_assert_int_eq(moe_ffn_create(&t.hp, n, 1, &f, err, sizeof err), 0);
    float *x = tl_array(&t, (size_t)n * d, 1.0f);
    float out[30 * 16], ref[30 * 16], w[30 * 2];
    int32_t ids[30 * 2];
    uint64_t routed[4] = {0}, dropped[4] = {0};
    moe_ffn_opts o = {.capacity_factor = 0.75f, .routed = routed, .dropped = dropped,
                      .trace_weight = w, .trace_stride = k};
    int cap = expert_capacity(0.75f, n, k, E);
    ck_assert_int_eq(cap, 12);
    moe_ffn_forward(f, NULL, a, &t.L, x, n, out, &o);
    ref_moe(&t, a, x, n, cap, ref, ids);
    ck_assert_msg(rel_err(out, ref, (size_t)n * d) < 1e-5, "error %g", rel_err(out, ref, (size_t)n * d));
    uint64_t r = 0, dr = 0;
    for (int e = 0; e < E; e++) {
        ck_assert_uint_le(routed[e], (uint64_t)cap);
        r += routed[e];
        dr += dropped[e];
    }
    ck_assert_uint_eq(r + dr, (uint64_t)n * k);
    ck_assert_uint_gt(dr, 0);
    for (int i = 0; i < n * k; i++) ck_assert(w[i] > 0.0f && w[i] < 1.0f);
    moe_ffn_free(f);
    tl_free(&t);
}
END_TEST

START_TEST(dense_ffn_matches_reference)
{
    rng = 33;
    test_layer t;
    int d = 20, ff = 70, n = 19;
    tl_make(&t, MOE_ARCH_LLAMA, d, ff, 0, 0, 0);
    char err[160];
    moe_ffn *f = NULL;
    pool *p = NULL;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    ck_assert_int_eq(moe_ffn_create(&t.hp, n, 2, &f, err, sizeof err), 0);
    float *x = tl_array(&t, (size_t)n * d, 1.0f);
    float out[19 * 20], out1[19 * 20], ref[19 * 20];
    double y[20];
    for (int r = 0; r < n; r++) {
        memset(y, 0, sizeof y);
        ref_swiglu(x + r * d, d, ff, t.L.ffn_gate, t.L.ffn_up, t.L.ffn_down, 1.0, y);
        for (int c = 0; c < d; c++) ref[r * d + c] = (float)y[c];
    }
    dense_ffn_forward(f, p, &t.L, x, n, out);
    dense_ffn_forward(f, NULL, &t.L, x, n, out1);
    ck_assert(rel_err(out, ref, (size_t)n * d) < 1e-5);
    ck_assert(memcmp(out, out1, sizeof out) == 0);
    moe_ffn_free(f);
    pool_free(p);
    tl_free(&t);
}
END_TEST

START_TEST(create_rejects_bad_sizes)
{
    char err[160];
    moe_ffn *f = (moe_ffn *)&err;
    moe_hparams hp = {.arch = MOE_ARCH_LLAMA, .n_embd = 8, .n_ff = 8, .n_expert = 4, .n_expert_used = 5};
    ck_assert_int_eq(moe_ffn_create(&hp, 4, 1, &f, err, sizeof err), -1);
    ck_assert_ptr_null(f);
    hp.n_expert_used = 2;
    ck_assert_int_eq(moe_ffn_create(&hp, 0, 1, &f, err, sizeof err), -1);
    hp.arch = MOE_ARCH_QWEN2MOE;   /* shared expert without a width */
    ck_assert_int_eq(moe_ffn_create(&hp, 4, 1, &f, err, sizeof err), -1);
    hp.arch = MOE_ARCH_COUNT;
    ck_assert_int_eq(moe_ffn_create(&hp, 4, 1, &f, err, sizeof err), -1);
    hp.arch = MOE_ARCH_LLAMA;
    hp.n_embd = -1;
    ck_assert_int_eq(moe_ffn_create(&hp, 4, 1, &f, err, sizeof err), -1);
    hp.n_embd = 8;
    ck_assert_int_eq(moe_ffn_create(&hp, 4, 1, &f, err, sizeof err), 0);
    moe_ffn_free(f);
    moe_ffn_free(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("moe_layer");
    TCase *r = tcase_create("routing");
    tcase_add_test(r, topk_renormalised_rows);
    tcase_add_test(r, topk_plain_softmax_rows);
    tcase_add_test(r, topk_scale_multiplies_weights);
    tcase_add_test(r, topk_ties_prefer_lower_id);
    tcase_add_test(r, topk_nan_never_wins);
    tcase_add_test(r, queue_holds_every_pair_once_rows_ascending);
    tcase_add_test(r, capacity_keeps_first_rows_and_counts_the_rest);
    tcase_add_test(r, capacity_formula);
    suite_add_tcase(s, r);
    TCase *l = tcase_create("layer");
    tcase_set_timeout(l, 60);
    tcase_add_test(l, llama_matches_reference);
    tcase_add_test(l, qwen2moe_matches_reference);
    tcase_add_test(l, olmoe_matches_reference);
    tcase_add_test(l, qwen3moe_matches_reference);
    tcase_add_test(l, capacity_drops_match_reference);
    tcase_add_test(l, dense_ffn_matches_reference);
    tcase_add_test(l, create_rejects_bad_sizes);
    suite_add_tcase(s, l);
    return tu_run_suite(s);
}
