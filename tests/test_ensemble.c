/* test_ensemble.c -- each combination method against a direct double-precision
 * calculation, one member and two copies equal the single model (same sampler,
 * same seed), vote tie rules, weight validation, label scoring and label checks,
 * -inf/NaN logits, the summary and top-n. */
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "core/ensemble.h"
#include "core/sampler.h"
#include "tests/testutil.h"

static char err[256];

/* Helpers ------------------------------------------------------------------ */

static uint64_t rng_state = 0x1234567887654321ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

static void random_row(float *row, int n, double scale)
{
    for (int j = 0; j < n; j++) row[j] = (float)((urand() * 2.0 - 1.0) * scale);
}

static ensemble *make(int m, int v, const double *w, ensemble_method method, sampler_params sp)
{
    ensemble *e = NULL;
    ck_assert_msg(ensemble_create(m, v, NULL, w, method, &sp, &e, err, sizeof err) == 0, "%s", err);
    return e;
}

/* log softmax(row / T) in double (T = 0 is taken as 1). */
static void direct_log_softmax(const float *row, int n, double T, double *out)
{
    if (T == 0.0) T = 1.0;
    double m = -INFINITY;
    for (int j = 0; j < n; j++) if (row[j] / T > m) m = row[j] / T;
    double s = 0;
    for (int j = 0; j < n; j++) s += exp(row[j] / T - m);
    for (int j = 0; j < n; j++) out[j] = row[j] / T - m - log(s);
}

/* The combined distribution (probabilities) computed directly. */
static void direct_combined(int M, int V, float *const *rows, const double *w, ensemble_method method,
                            double T, double *p)
{
    double sw = 0;
    for (int i = 0; i < M; i++) sw += w[i];
    double *lp = malloc((size_t)V * sizeof *lp);
    for (int j = 0; j < V; j++) p[j] = 0;
    for (int i = 0; i < M; i++) {
        direct_log_softmax(rows[i], V, T, lp);
        for (int j = 0; j < V; j++)
            p[j] += method == ENSEMBLE_MEAN_LOGPROB ? w[i] / sw * lp[j] : w[i] / sw * exp(lp[j]);
    }
    if (method == ENSEMBLE_MEAN_LOGPROB) {
        double m = -INFINITY, s = 0;
        for (int j = 0; j < V; j++) if (p[j] > m) m = p[j];
        for (int j = 0; j < V; j++) s += exp(p[j] - m);
        for (int j = 0; j < V; j++) p[j] = exp(p[j] - m) / s;
    }
    free(lp);
}

static int argmax_double(const double *x, int n)
{
    int b = 0;
    for (int j = 1; j < n; j++) if (x[j] > x[b]) b = j;
    return b;
}

static int argmax_float(const float *x, int n)
{
    int b = 0;
    for (int j = 1; j < n; j++) if (x[j] > x[b]) b = j;
    return b;
}

/* The last step's combined log-probability row (vocabularies here are small). */
static const float *combined_row(const ensemble *e)
{
    static float row[1024];
    ck_assert_int_le(ensemble_n_vocab(e), 1024);
    ck_assert_int_eq(ensemble_logprobs(e, -1, row), 0);
    return row;
}

/* Methods and validation --------------------------------------------------- */

START_TEST(method_names_parse)
{
    ensemble_method m;
    const char *names[3] = {"mean_prob", "mean_logprob", "vote"};
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(ensemble_method_parse(names[i], &m, err, sizeof err), 0);
        ck_assert_int_eq((int)m, i);
        ck_assert_str_eq(ensemble_method_name(m), names[i]);
    }
    ck_assert_int_eq(ensemble_method_parse("average", &m, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "mean_logprob"));
    ck_assert_int_eq(ensemble_method_parse(NULL, &m, err, sizeof err), -1);
}
END_TEST

START_TEST(weights_are_validated_and_normalised)
{
    const char *names[3] = {"a", "b", "c"};
    sampler_params sp = tu_sampler_plain(0.0f, 1);
    ensemble *e = (ensemble *)1;
    struct { double w[3]; const char *msg; } bad[] = {
        {{0.5, -0.5, 1.0}, "members[1] (\"b\") has negative weight -0.5"},
        {{NAN, 1.0, 1.0}, "members[0] (\"a\") has weight nan"},
        {{1.0, 1.0, INFINITY}, "members[2] (\"c\") has weight inf"},
        {{0.0, 0.0, 0.0}, "all member weights are zero"},
        {{0.0, -0.0, 0.0}, "all member weights are zero"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        err[0] = '\0';
        ck_assert_int_eq(ensemble_create(3, 10, names, bad[k].w, ENSEMBLE_VOTE, &sp, &e, err, sizeof err), -1);
        ck_assert_msg(strstr(err, bad[k].msg) != NULL, "case %zu: '%s'", k, err);
        ck_assert_ptr_null(e);
    }
    double ok[3] = {2.0, 6.0, 0.0};
    ck_assert_int_eq(ensemble_create(0, 10, names, ok, ENSEMBLE_VOTE, &sp, &e, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "at least one member"));
    double many[ENSEMBLE_MAX_MEMBERS + 1];
    for (int i = 0; i <= ENSEMBLE_MAX_MEMBERS; i++) many[i] = 1;
    ck_assert_int_eq(ensemble_create(ENSEMBLE_MAX_MEMBERS + 1, 10, NULL, many, ENSEMBLE_VOTE, &sp, &e, err,
                                     sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "at most"));
    ck_assert_int_eq(ensemble_create(3, 0, names, ok, ENSEMBLE_VOTE, &sp, &e, err, sizeof err), -1);
    sampler_params badsp = sp;
    badsp.top_p = 0.0f;
    ck_assert_int_eq(ensemble_create(3, 10, names, ok, ENSEMBLE_VOTE, &badsp, &e, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "top_p"));
    ck_assert_int_eq(ensemble_create(3, 10, names, ok, (ensemble_method)7, &sp, &e, err, sizeof err), -1);

    /* Huge weights do not overflow the sum. */
    double huge[2] = {DBL_MAX, DBL_MAX};
    ck_assert_int_eq(ensemble_create(2, 10, NULL, huge, ENSEMBLE_VOTE, &sp, &e, err, sizeof err), 0);
    ck_assert_double_eq_tol(ensemble_weight(e, 0), 0.5, 1e-15);
    ensemble_free(e);

    ck_assert_int_eq(ensemble_create(3, 10, names, ok, ENSEMBLE_MEAN_PROB, &sp, &e, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_n_members(e), 3);
    ck_assert_int_eq(ensemble_n_vocab(e), 10);
    ck_assert_int_eq((int)ensemble_get_method(e), ENSEMBLE_MEAN_PROB);
    ck_assert_double_eq_tol(ensemble_weight(e, 0), 0.25, 1e-15);
    ck_assert_double_eq_tol(ensemble_weight(e, 1), 0.75, 1e-15);
    ck_assert_double_eq(ensemble_weight(e, 2), 0.0);

    /* A step with a member's row missing names that member. */
    float row[10] = {0};
    ensemble_result r;
    ck_assert_int_eq(ensemble_set_row(e, 0, row, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_set_row(e, 2, row, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_step(e, NULL, 0, &r, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "members[1] (\"b\")"));
    ck_assert_int_eq(ensemble_set_row(e, 3, row, err, sizeof err), -1);
    ck_assert_int_eq(ensemble_set_row(e, -1, row, err, sizeof err), -1);
    ck_assert_int_eq(ensemble_set_row(e, 1, NULL, err, sizeof err), -1);
    ck_assert_int_eq(ensemble_set_row(e, 1, row, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_step(e, NULL, 0, &r, err, sizeof err), 0);
    /* Rows are consumed by the step. */
    ck_assert_int_eq(ensemble_step(e, NULL, 0, &r, err, sizeof err), -1);
    ensemble_free(e);
    ensemble_free(NULL);
}
END_TEST

/* Mean methods against the direct calculation ------------------------------ */

/* 3 members, random weights and logits, temperatures 0, 0.7 and 1.3: the
 * combined log-probability row, the chosen token's probability, each member's
 * probability of it and own top token, the agreement; greedy picks the argmax. */
static void check_mean_method(ensemble_method method)
{
    enum { M = 3, V = 97 };
    static float buf[M][V];
    float *rows[M];
    const float temps[3] = {0.0f, 0.7f, 1.3f};
    static double p[V], lpm[V];
    for (int trial = 0; trial < 12; trial++) {
        double w[M];
        for (int i = 0; i < M; i++) {
            rows[i] = buf[i];
            random_row(buf[i], V, 1.0 + 3.0 * urand());
            w[i] = 0.1 + urand();
        }
        if (trial == 5) w[1] = 0.0;   /* a member that counts for nothing */
        float T = temps[trial % 3];
        ensemble *e = make(M, V, w, method, tu_sampler_plain(T, (uint64_t)trial));
        ensemble_result r;
        ck_assert_msg(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err) == 0,
                      "%s", err);
        direct_combined(M, V, rows, w, method, T, p);
        const float *lp = combined_row(e);
        for (int j = 0; j < V; j++) ck_assert_double_eq_tol(lp[j], log(p[j]), 1e-5);
        ck_assert(r.token >= 0 && r.token < V);
        ck_assert_double_eq_tol(r.prob, p[r.token], 1e-6);
        if (T == 0.0f) ck_assert_int_eq(r.token, argmax_double(p, V));
        double sw = w[0] + w[1] + w[2], agree = 0;
        for (int i = 0; i < M; i++) {
            direct_log_softmax(rows[i], V, T, lpm);
            int top = argmax_float(rows[i], V);
            ck_assert_int_eq(r.members[i].token, top);
            ck_assert_double_eq_tol(r.members[i].prob, exp(lpm[r.token]), 1e-6);
            ck_assert_double_eq_tol(r.members[i].own_prob, exp(lpm[top]), 1e-6);
            ck_assert_double_eq_tol(r.members[i].weight, w[i] / sw, 1e-7);
            ck_assert_int_eq(r.members[i].agrees, top == r.token);
            for (int j = 0; j < V; j += 5) ck_assert_double_eq_tol(ensemble_logprob(e, i, j), lpm[j], 1e-5);
            if (top == r.token) agree += w[i] / sw;
        }
        ck_assert_double_eq_tol(r.agreement, agree, 1e-6);
        ensemble_free(e);
    }
}

START_TEST(mean_prob_matches_direct_calculation) { check_mean_method(ENSEMBLE_MEAN_PROB); }
END_TEST

START_TEST(mean_logprob_matches_direct_calculation) { check_mean_method(ENSEMBLE_MEAN_LOGPROB); }
END_TEST

/* Sampled tokens follow the combined distribution: 5 tokens, 20000 draws, each
 * frequency within 0.02 of its combined probability (about 6 sigma); top_k 2
 * keeps only the combined distribution's two best. */
static void check_draws(ensemble_method method)
{
    enum { M = 2, V = 5, N = 20000 };
    float a[V] = {1.0f, 0.2f, -0.5f, 0.7f, 0.0f}, b[V] = {-0.3f, 1.1f, 0.4f, 0.0f, 0.6f};
    float *rows[M] = {a, b};
    double w[M] = {0.35, 0.65}, p[V];
    const float T = 0.9f;
    direct_combined(M, V, rows, w, method, T, p);
    ensemble *e = make(M, V, w, method, tu_sampler_plain(T, 77));
    int count[V] = {0};
    ensemble_result r;
    for (int n = 0; n < N; n++) {
        ck_assert_int_eq(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err), 0);
        count[r.token]++;
    }
    for (int j = 0; j < V; j++) ck_assert_double_eq_tol((double)count[j] / N, p[j], 0.02);
    ensemble_free(e);

    sampler_params sp = tu_sampler_plain(T, 78);
    sp.top_k = 2;
    e = make(M, V, w, method, sp);
    int order[V], seen[V] = {0};
    for (int j = 0; j < V; j++) order[j] = j;
    for (int x = 0; x < V; x++)
        for (int y = x + 1; y < V; y++)
            if (p[order[y]] > p[order[x]]) { int t = order[x]; order[x] = order[y]; order[y] = t; }
    for (int n = 0; n < 2000; n++) {
        ck_assert_int_eq(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err), 0);
        seen[r.token]++;
    }
    ck_assert(seen[order[0]] > 0 && seen[order[1]] > 0);
    for (int k = 2; k < V; k++) ck_assert_int_eq(seen[order[k]], 0);
    ensemble_free(e);
}

START_TEST(mean_prob_draws_follow_the_combined_distribution) { check_draws(ENSEMBLE_MEAN_PROB); }
END_TEST

START_TEST(mean_logprob_draws_follow_the_combined_distribution) { check_draws(ENSEMBLE_MEAN_LOGPROB); }
END_TEST

/* Vote ---------------------------------------------------------------------- */

/* The winner computed in the test: most weight, then summed probability, then id. */
static int direct_vote(int M, const int *pick, const double *w, const double *sum_prob)
{
    int win = -1;
    double ww = 0;
    for (int i = 0; i < M; i++) {
        double t = 0;
        for (int k = 0; k < M; k++) if (pick[k] == pick[i]) t += w[k];
        if (win < 0 || t > ww + 1e-9 ||
            (fabs(t - ww) <= 1e-9 && (sum_prob[pick[i]] > sum_prob[win] ||
                                      (sum_prob[pick[i]] == sum_prob[win] && pick[i] < win)))) {
            win = pick[i];
            ww = t;
        }
    }
    return win;
}

/* Greedy vote: members' argmaxes tallied by weight, checked against the test's
 * own tally; sampled vote: the members' choices are exactly what one sampler
 * with the request's seed draws from their rows in member order. */
START_TEST(vote_matches_direct_calculation)
{
    enum { M = 4, V = 6 };
    static float buf[M][V];
    float *rows[M];
    double p[V], lpm[V];
    int decided_by_weight = 0;
    for (int trial = 0; trial < 40; trial++) {
        double w[M];
        for (int i = 0; i < M; i++) {
            rows[i] = buf[i];
            random_row(buf[i], V, 2.0);
            w[i] = 0.05 + urand();
        }
        ensemble *e = make(M, V, w, ENSEMBLE_VOTE, tu_sampler_plain(0.0f, 1));
        ensemble_result r;
        ck_assert_int_eq(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err), 0);
        int pick[M];
        for (int i = 0; i < M; i++) pick[i] = argmax_float(rows[i], V);
        direct_combined(M, V, rows, w, ENSEMBLE_MEAN_PROB, 1.0, p);
        int want = direct_vote(M, pick, w, p);
        ck_assert_int_eq(r.token, want);
        decided_by_weight += want != argmax_double(p, V);
        ck_assert_double_eq_tol(r.prob, p[want], 1e-6);
        double sw = 0, agree = 0;
        for (int i = 0; i < M; i++) sw += w[i];
        for (int i = 0; i < M; i++) {
            ck_assert_int_eq(r.members[i].token, pick[i]);
            direct_log_softmax(rows[i], V, 1.0, lpm);
            ck_assert_double_eq_tol(r.members[i].prob, exp(lpm[want]), 1e-6);
            if (pick[i] == want) agree += w[i] / sw;
        }
        ck_assert_double_eq_tol(r.agreement, agree, 1e-6);
        ensemble_free(e);
    }
    ck_assert_int_gt(decided_by_weight, 0);   /* the vote is not just mean_prob's argmax */

    /* Sampled: the members draw from the request's RNG in member order. */
    sampler_params sp = tu_sampler_plain(0.8f, 4242);
    sp.top_k = 4;
    sp.top_p = 0.9f;
    sp.min_p = 0.05f;
    double w[M] = {0.4, 0.3, 0.2, 0.1};
    ensemble *e = make(M, V, w, ENSEMBLE_VOTE, sp);
    sampler *s = NULL;
    ck_assert_int_eq(sampler_create(V, &sp, &s, err, sizeof err), 0);
    for (int step = 0; step < 200; step++) {
        for (int i = 0; i < M; i++) { rows[i] = buf[i]; random_row(buf[i], V, 2.0); }
        ensemble_result r;
        ck_assert_int_eq(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err), 0);
        int pick[M];
        for (int i = 0; i < M; i++) {
            pick[i] = sampler_sample(s, rows[i], NULL, 0);
            ck_assert_int_eq(r.members[i].token, pick[i]);
        }
        direct_combined(M, V, rows, w, ENSEMBLE_MEAN_PROB, 0.8, p);
        ck_assert_int_eq(r.token, direct_vote(M, pick, w, p));
    }
    sampler_free(s);
    ensemble_free(e);
}
END_TEST

START_TEST(vote_ties_follow_the_rules)
{
    enum { V = 8 };
    double half[2] = {0.5, 0.5};
    ensemble_result r;

    /* 0.5/0.5, different choices: the summed probability decides, even for the
     * higher id. a: 2 best, 5 nearly as good; b: 5 best. S(5) > S(2). */
    float a[V] = {0, 0, 3.0f, 0, 0, 2.9f, 0, 0}, b[V] = {0, 0, 0, 0, 0, 1.0f, 0, 0};
    const float *rows[2] = {a, b};
    ensemble *e = make(2, V, half, ENSEMBLE_VOTE, tu_sampler_plain(0.0f, 1));
    ck_assert_int_eq(ensemble_step_rows(e, rows, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.members[0].token, 2);
    ck_assert_int_eq(r.members[1].token, 5);
    ck_assert_int_eq(r.token, 5);
    ck_assert_double_eq_tol(r.agreement, 0.5, 1e-12);
    /* ... and the other way round when 2 carries more summed probability. */
    b[2] = 0.9f;
    ck_assert_int_eq(ensemble_step_rows(e, rows, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.members[1].token, 5);
    ck_assert_int_eq(r.token, 2);

    /* Fully symmetric (b is a with 1 and 6 swapped): the lower id, in either order. */
    float c[V] = {0.1f, 3.0f, 0.2f, -1.0f, 0.5f, 0.3f, 1.0f, -2.0f}, d[V];
    memcpy(d, c, sizeof c);
    d[1] = c[6];
    d[6] = c[1];
    const float *sym[2] = {c, d}, *rev[2] = {d, c};
    ck_assert_int_eq(ensemble_step_rows(e, sym, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.token, 1);
    ck_assert_int_eq(ensemble_step_rows(e, rev, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.token, 1);
    ensemble_free(e);

    /* Weights that tie only up to rounding (0.1 + 0.2 vs 0.3) are a tie. */
    double w3[3] = {0.1, 0.2, 0.3};
    float f[V] = {0, 0, 0, 2.0f, 0, 0, 0, 2.5f}, g[V] = {0, 0, 0, 1.9f, 0, 0, 0, 2.0f};
    float h[V] = {0, 0, 0, 0.3f, 0, 0, 0, 0};
    const float *three[3] = {f, g, h};   /* 7, 7 vs 3 */
    e = make(3, V, w3, ENSEMBLE_VOTE, tu_sampler_plain(0.0f, 1));
    ck_assert_int_eq(ensemble_step_rows(e, three, NULL, 0, &r, err, sizeof err), 0);
    double p[V];
    float *tr[3] = {f, g, h};
    direct_combined(3, V, tr, w3, ENSEMBLE_MEAN_PROB, 1.0, p);
    ck_assert(p[7] > p[3]);
    ck_assert_int_eq(r.token, 7);
    h[3] = 6.0f;   /* now 3 carries more summed probability */
    direct_combined(3, V, tr, w3, ENSEMBLE_MEAN_PROB, 1.0, p);
    ck_assert(p[3] > p[7]);
    ck_assert_int_eq(ensemble_step_rows(e, three, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.token, 3);
    ensemble_free(e);

    /* Exact ties in the combined distribution (greedy mean methods) and in a
     * member's own argmax go to the lower id. */
    float tie[V] = {0, 3.0f, 0, 0, 0, 0, 3.0f, 0};
    const float *tt[2] = {tie, tie};
    for (int m = 0; m < 3; m++) {
        e = make(2, V, half, (ensemble_method)m, tu_sampler_plain(0.0f, 1));
        ck_assert_int_eq(ensemble_step_rows(e, tt, NULL, 0, &r, err, sizeof err), 0);
        ck_assert_int_eq(r.token, 1);
        ck_assert_int_eq(r.members[0].token, 1);
        ensemble_free(e);
    }

    /* More weight wins over more probability. */
    double w64[2] = {0.6, 0.4};
    float x[V] = {0, 1.0f, 0, 0, 0, 0, 0, 0}, y[V] = {0, 0, 0, 0, 0, 0, 9.0f, 0};
    const float *xy[2] = {x, y};
    e = make(2, V, w64, ENSEMBLE_VOTE, tu_sampler_plain(0.0f, 1));
    ck_assert_int_eq(ensemble_step_rows(e, xy, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.token, 1);
    ck_assert_double_eq_tol(r.agreement, 0.6, 1e-7);
    ck_assert_int_eq(r.members[1].agrees, 0);
    ensemble_free(e);
}
END_TEST

/* Equal to the single model ------------------------------------------------- */

/* The test's own penalty (llama.cpp semantics) so the probabilities can be
 * computed directly. */
static void penalise(float *row, int V, const int32_t *hist, int n, float pen, int last_n)
{
    int from = last_n < 0 || last_n > n ? 0 : n - last_n;
    uint8_t *seen = calloc((size_t)V, 1);
    for (int k = from; k < n; k++) {
        int t = hist[k];
        if (seen[t]) continue;
        seen[t] = 1;
        row[t] = row[t] > 0 ? row[t] / pen : row[t] * pen;
    }
    free(seen);
}

/* One member (any weight) and two copies of one model (any weights): the same
 * tokens as the sampler alone with the same seed over 150 steps with a growing
 * history, and the chosen token's probability equal to the single model's. */
static void check_equals_single(int copies, ensemble_method method, sampler_params sp)
{
    enum { V = 300, STEPS = 150 };
    static float row[V], pen[V];
    static int32_t hist[STEPS + 8];
    static double lp[V];
    double w[2] = {copies == 1 ? 3.7 : 0.3, 0.7};
    ensemble *e = make(copies, V, w, method, sp);
    sampler *s = NULL;
    ck_assert_int_eq(sampler_create(V, &sp, &s, err, sizeof err), 0);
    int n_hist = 8;
    for (int k = 0; k < n_hist; k++) hist[k] = (int32_t)(urand() * V);
    for (int step = 0; step < STEPS; step++) {
        random_row(row, V, 4.0);
        const float *rows[2] = {row, row};
        ensemble_result r;
        ck_assert_int_eq(ensemble_step_rows(e, rows, hist, (size_t)n_hist, &r, err, sizeof err), 0);
        int32_t want = sampler_sample(s, row, hist, (size_t)n_hist);
        ck_assert_msg(r.token == want, "copies %d method %s T %g step %d: %d vs %d", copies,
                      ensemble_method_name(method), sp.temperature, step, r.token, want);
        memcpy(pen, row, sizeof row);
        penalise(pen, V, hist, n_hist, sp.repeat_penalty, sp.repeat_last_n);
        direct_log_softmax(pen, V, sp.temperature, lp);
        ck_assert_double_eq_tol(r.prob, exp(lp[want]), 1e-6);
        if (sp.temperature == 0.0f) ck_assert_double_eq_tol(r.prob, sampler_last_prob(s), 1e-6);
        const float *clp = combined_row(e);
        for (int j = 0; j < V; j += 7) ck_assert_double_eq_tol(clp[j], lp[j], 1e-4);
        ck_assert_double_eq_tol(r.agreement, r.members[0].token == want ? 1.0 : 0.0, 1e-6);
        hist[n_hist++] = want;
    }
    sampler_free(s);
    ensemble_free(e);
}

START_TEST(one_member_equals_the_model)
{
    sampler_params greedy = tu_sampler_plain(0.0f, 5), plain = tu_sampler_plain(0.8f, 6), filtered = tu_sampler_plain(1.1f, 7);
    filtered.top_k = 40;
    filtered.top_p = 0.9f;
    filtered.min_p = 0.02f;
    filtered.repeat_penalty = 1.3f;
    filtered.repeat_last_n = 16;
    greedy.repeat_penalty = 1.5f;
    greedy.repeat_last_n = -1;
    for (int m = 0; m < 3; m++) {
        check_equals_single(1, (ensemble_method)m, greedy);
        check_equals_single(1, (ensemble_method)m, plain);
        check_equals_single(1, (ensemble_method)m, filtered);
    }
}
END_TEST

/* Vote with two sampling copies draws twice per step, so it equals the model in
 * distribution, not draw for draw; greedy it is exact. */
START_TEST(two_copies_equal_the_model)
{
    sampler_params greedy = tu_sampler_plain(0.0f, 8), filtered = tu_sampler_plain(0.9f, 9);
    filtered.top_k = 20;
    filtered.top_p = 0.95f;
    filtered.repeat_penalty = 1.2f;
    filtered.repeat_last_n = 32;
    check_equals_single(2, ENSEMBLE_MEAN_PROB, greedy);
    check_equals_single(2, ENSEMBLE_MEAN_PROB, filtered);
    check_equals_single(2, ENSEMBLE_MEAN_LOGPROB, greedy);
    check_equals_single(2, ENSEMBLE_MEAN_LOGPROB, filtered);
    check_equals_single(2, ENSEMBLE_VOTE, greedy);
}
END_TEST

/* A member of weight 0 is reported but moves nothing: the ensemble chooses what
 * the other member alone would (mean methods sampled with filters, vote greedy). */
START_TEST(zero_weight_member_changes_nothing)
{
    enum { V = 200, STEPS = 100 };
    static float a[V], b[V];
    double w[2] = {0.0, 2.5};
    sampler_params sp = tu_sampler_plain(0.9f, 31);
    sp.top_k = 30;
    sp.top_p = 0.9f;
    for (int m = 0; m < 3; m++) {
        sampler_params use = sp;
        if (m == ENSEMBLE_VOTE) use.temperature = 0.0f;
        ensemble *e = make(2, V, w, (ensemble_method)m, use);
        sampler *s = NULL;
        ck_assert_int_eq(sampler_create(V, &use, &s, err, sizeof err), 0);
        uint64_t over = 0;
        for (int step = 0; step < STEPS; step++) {
            random_row(a, V, 4.0);
            random_row(b, V, 4.0);
            const float *rows[2] = {a, b};
            ensemble_result r;
            ck_assert_int_eq(ensemble_step_rows(e, rows, NULL, 0, &r, err, sizeof err), 0);
            ck_assert_int_eq(r.token, sampler_sample(s, b, NULL, 0));
            ck_assert_double_eq(r.members[0].weight, 0.0);
            ck_assert_int_eq(r.members[0].token, argmax_float(a, V));
            over += r.members[0].token != r.token;
        }
        ensemble_summary sum;
        ensemble_summary_get(e, &sum);
        ck_assert_uint_eq(sum.overruled[0], over);
        ck_assert_uint_gt(over, STEPS / 2);
        sampler_free(s);
        ensemble_free(e);
    }
}
END_TEST

/* -inf, NaN and degenerate rows ---------------------------------------------- */

static void assert_no_nan(const ensemble *e, const ensemble_result *r, int M, int V)
{
    const float *lp = combined_row(e);
    for (int j = 0; j < V; j++) ck_assert(lp[j] == lp[j] && lp[j] <= 1e-6f);
    ck_assert(r->token >= 0 && r->token < V);
    ck_assert(r->prob == r->prob && r->prob > 0.0f && r->prob <= 1.0f + 1e-6f);
    ck_assert(r->agreement >= 0.0f && r->agreement <= 1.0f);
    for (int i = 0; i < M; i++) {
        ck_assert(r->members[i].prob == r->members[i].prob);
        ck_assert(r->members[i].own_prob == r->members[i].own_prob);
    }
}

START_TEST(infinite_and_nan_logits_give_no_nan)
{
    enum { V = 6 };
    const float NI = -INFINITY;
    float masked[V] = {NI, 1.0f, NI, 0.5f, NI, NI};
    float other[V] = {2.0f, NI, NI, NI, 0.3f, NI};      /* disjoint support */
    float allneg[V] = {NI, NI, NI, NI, NI, NI};
    float nans[V] = {NAN, 0.2f, NAN, 1.0f, NAN, NAN};
    float allnan[V] = {NAN, NAN, NAN, NAN, NAN, NAN};
    float posinf[V] = {0.0f, INFINITY, 1.0f, INFINITY, 0.0f, 0.0f};
    const float *cases[][2] = {{masked, other}, {masked, allneg}, {allneg, allneg}, {nans, masked},
                               {allnan, other}, {posinf, masked}, {posinf, posinf}};
    double w[2] = {0.5, 0.5};
    const float temps[2] = {0.0f, 0.7f};
    for (int m = 0; m < 3; m++) {
        for (int t = 0; t < 2; t++) {
            for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
                ensemble *e = make(2, V, w, (ensemble_method)m, tu_sampler_plain(temps[t], 3));
                ensemble_result r;
                ck_assert_int_eq(ensemble_step_rows(e, cases[c], NULL, 0, &r, err, sizeof err), 0);
                assert_no_nan(e, &r, 2, V);
                ensemble_free(e);
            }
        }
    }
    /* Disjoint supports under mean_logprob: the product is empty, so the mean of
     * probabilities decides (0 with 2.0 beats the rest). */
    const float *dis[2] = {masked, other};
    ensemble *e = make(2, V, w, ENSEMBLE_MEAN_LOGPROB, tu_sampler_plain(0.0f, 1));
    ensemble_result r;
    ck_assert_int_eq(ensemble_step_rows(e, dis, NULL, 0, &r, err, sizeof err), 0);
    float *dr[2] = {masked, other};
    double p[V];
    direct_combined(2, V, dr, w, ENSEMBLE_MEAN_PROB, 1.0, p);
    ck_assert_int_eq(r.token, argmax_double(p, V));
    ck_assert_double_eq_tol(r.prob, p[r.token], 1e-6);
    ensemble_free(e);
    /* The same with sampling: temperature applied once, also in the fallback. */
    e = make(2, V, w, ENSEMBLE_MEAN_LOGPROB, tu_sampler_plain(0.5f, 2));
    direct_combined(2, V, dr, w, ENSEMBLE_MEAN_PROB, 0.5, p);
    for (int k = 0; k < 20; k++) {
        ck_assert_int_eq(ensemble_step_rows(e, dis, NULL, 0, &r, err, sizeof err), 0);
        ck_assert_double_eq_tol(r.prob, p[r.token], 1e-6);
    }
    /* A masked token is never chosen and has probability 0 in the combination. */
    const float *mm[2] = {masked, masked};
    for (int k = 0; k < 50; k++) {
        ck_assert_int_eq(ensemble_step_rows(e, mm, NULL, 0, &r, err, sizeof err), 0);
        ck_assert(r.token == 1 || r.token == 3);
        ck_assert(isinf(combined_row(e)[0]));
    }
    ensemble_free(e);
    /* An all -inf row is one-hot on its first token, as the sampler falls back. */
    const float *one[1] = {allneg};
    e = make(1, V, w, ENSEMBLE_MEAN_PROB, tu_sampler_plain(0.9f, 1));
    ck_assert_int_eq(ensemble_step_rows(e, one, NULL, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.token, 0);
    ck_assert_double_eq_tol(r.prob, 1.0, 1e-7);
    ensemble_free(e);
}
END_TEST

/* Summary and top-n ---------------------------------------------------------- */

START_TEST(summary_counts_agreement_and_overrules)
{
    enum { M = 3, V = 10, STEPS = 60 };
    static float buf[M][V];
    float *rows[M];
    double w[M] = {0.5, 0.3, 0.2}, agree = 0;
    uint64_t over[M] = {0};
    ensemble *e = make(M, V, w, ENSEMBLE_VOTE, tu_sampler_plain(1.0f, 11));
    ensemble_summary sum;
    ensemble_summary_get(e, &sum);
    ck_assert_uint_eq(sum.steps, 0);
    ck_assert_double_eq(sum.mean_agreement, 0.0);
    for (int step = 0; step < STEPS; step++) {
        for (int i = 0; i < M; i++) { rows[i] = buf[i]; random_row(buf[i], V, 1.5); }
        ensemble_result r;
        ck_assert_int_eq(ensemble_step_rows(e, (const float *const *)rows, NULL, 0, &r, err, sizeof err), 0);
        agree += r.agreement;
        for (int i = 0; i < M; i++) over[i] += r.members[i].token != r.token;
    }
    ensemble_summary_get(e, &sum);
    ck_assert_uint_eq(sum.steps, STEPS);
    ck_assert_double_eq_tol(sum.mean_agreement, agree / STEPS, 1e-9);
    for (int i = 0; i < M; i++) ck_assert_uint_eq(sum.overruled[i], over[i]);
    ck_assert(over[0] + over[1] + over[2] > 0);
    ensemble_free(e);
}
END_TEST

START_TEST(top_entries_are_sorted_best_first)
{
    enum { M = 2, V = 500, N = 10 };
    static float a[V], b[V];
    random_row(a, V, 3.0);
    random_row(b, V, 3.0);
    b[17] = b[18] = 9.0f;   /* a tie at the top of member 1: lower id first */
    const float *rows[M] = {a, b};
    double w[M] = {0.5, 0.5};
    ensemble *e = make(M, V, w, ENSEMBLE_MEAN_LOGPROB, tu_sampler_plain(0.0f, 1));
    int32_t ids[N];
    float lps[N];
    ck_assert_int_eq(ensemble_top(e, -1, N, ids, lps), 0);   /* nothing before a step */
    static float full[V];
    ck_assert_int_eq(ensemble_logprobs(e, -1, full), -1);
    ck_assert(isinf(ensemble_logprob(e, -1, 0)));
    ensemble_result r;
    ck_assert_int_eq(ensemble_step_rows(e, rows, NULL, 0, &r, err, sizeof err), 0);
    const float *lp = combined_row(e);
    ck_assert_int_eq(ensemble_top(e, -1, N, ids, lps), N);
    ck_assert_int_eq(ids[0], r.token);
    for (int k = 0; k < N; k++) {
        ck_assert_float_eq(lps[k], lp[ids[k]]);
        if (k) ck_assert(lps[k] <= lps[k - 1]);
        int better = 0;   /* exactly k entries beat the k-th */
        for (int j = 0; j < V; j++) better += lp[j] > lps[k] || (lp[j] == lps[k] && j < ids[k]);
        ck_assert_int_eq(better, k);
    }
    static double lpm[V];
    direct_log_softmax(b, V, 1.0, lpm);
    ck_assert_int_eq(ensemble_top(e, 1, N, ids, lps), N);
    ck_assert_int_eq(ids[0], 17);
    ck_assert_int_eq(ids[1], 18);
    for (int k = 0; k < N; k++) ck_assert_double_eq_tol(lps[k], lpm[ids[k]], 1e-5);
    ck_assert_int_eq(ensemble_logprobs(e, 1, full), 0);
    for (int j = 0; j < V; j++) ck_assert_double_eq_tol(full[j], lpm[j], 1e-5);
    ck_assert_int_eq(ensemble_logprobs(e, 2, full), -1);
    ck_assert(isinf(ensemble_logprob(e, 0, V)));
    ck_assert(isinf(ensemble_logprob(e, 0, -1)));
    ck_assert_int_eq(ensemble_top(e, 2, N, ids, lps), 0);
    ck_assert_int_eq(ensemble_top(e, -2, N, ids, lps), 0);
    int32_t all[V];
    static float alllp[V];
    ck_assert_int_eq(ensemble_top(e, 0, V + 5, all, alllp), V);
    ensemble_free(e);
}
END_TEST

/* Labels -------------------------------------------------------------------- */

/* Two members, three labels, hand-made log-probabilities: each method's pick,
 * label_probs, members' probabilities and agreement against the direct sums. */
START_TEST(labels_combine_as_computed_by_hand)
{
    enum { M = 2, L = 3 };
    /* member 0 prefers label 0, member 1 label 2. */
    double lp[M * L] = {-1.0, -2.5, -1.2,
                        -4.0, -3.0, -0.6};
    double w[M] = {0.45, 0.55};
    double q[M][L], logq[M][L];
    for (int i = 0; i < M; i++) {
        double s = 0;
        for (int l = 0; l < L; l++) s += exp(lp[i * L + l]);
        for (int l = 0; l < L; l++) { q[i][l] = exp(lp[i * L + l]) / s; logq[i][l] = log(q[i][l]); }
    }
    double mp[L], ml[L], z = 0;
    for (int l = 0; l < L; l++) {
        mp[l] = w[0] * q[0][l] + w[1] * q[1][l];
        ml[l] = exp(w[0] * logq[0][l] + w[1] * logq[1][l]);
        z += ml[l];
    }
    for (int l = 0; l < L; l++) ml[l] /= z;
    for (int m = 0; m < 3; m++) {
        ensemble *e = make(M, 10, w, (ensemble_method)m, tu_sampler_plain(0.7f, 1));
        ensemble_label_result r;
        ck_assert_int_eq(ensemble_labels(e, L, lp, &r, err, sizeof err), 0);
        const double *want = m == ENSEMBLE_MEAN_LOGPROB ? ml : mp;
        for (int l = 0; l < L; l++) ck_assert_double_eq_tol(r.label_probs[l], want[l], 1e-12);
        int chosen = m == ENSEMBLE_VOTE ? 2 : argmax_double(want, L);   /* vote: 0.55 > 0.45 */
        ck_assert_int_eq(r.label, chosen);
        for (int i = 0; i < M; i++) {
            for (int l = 0; l < L; l++) ck_assert_double_eq_tol(r.member_probs[i * L + l], q[i][l], 1e-12);
            ck_assert_int_eq(r.members[i].token, i == 0 ? 0 : 2);
            ck_assert_double_eq_tol(r.members[i].prob, q[i][chosen], 1e-7);
        }
        ck_assert_double_eq_tol(r.agreement, (r.label == 0 ? w[0] : 0) + (r.label == 2 ? w[1] : 0), 1e-7);
        ensemble_summary sum;
        ensemble_summary_get(e, &sum);
        ck_assert_uint_eq(sum.steps, 1);
        ensemble_free(e);
    }
    /* The hand values: mean_prob picks 2 (0.45*0.47 + 0.55*0.78 ...), as does the vote. */
    ck_assert_int_eq(argmax_double(mp, L), 2);

    /* Vote ties: 0.5/0.5 split between labels 0 and 2 -> the summed probability;
     * a symmetric split -> the lower label. */
    double half[2] = {0.5, 0.5};
    ensemble *e = make(2, 10, half, ENSEMBLE_VOTE, tu_sampler_plain(0.0f, 1));
    ensemble_label_result r;
    double split[6] = {-0.1, -5.0, -0.2, -9.0, -9.0, -0.1};   /* S(2) > S(0) */
    ck_assert_int_eq(ensemble_labels(e, 3, split, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.label, 2);
    ck_assert_double_eq_tol(r.agreement, 0.5, 1e-12);
    double sym[6] = {-0.5, -3.0, -2.0, -2.0, -3.0, -0.5};
    ck_assert_int_eq(ensemble_labels(e, 3, sym, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.label, 0);
    double flat[6] = {-2.0, -1.0, -1.0, -2.0, -1.0, -1.0};   /* labels 1 and 2 tie everywhere */
    for (int m = 0; m < 3; m++) {
        ensemble *f = make(2, 10, half, (ensemble_method)m, tu_sampler_plain(0.0f, 1));
        ck_assert_int_eq(ensemble_labels(f, 3, flat, &r, err, sizeof err), 0);
        ck_assert_int_eq(r.label, 1);
        ck_assert_int_eq(r.members[0].token, 1);
        ensemble_free(f);
    }
    /* One label; -inf and NaN scores stay finite. */
    double one[2] = {-3.0, -7.0};
    ck_assert_int_eq(ensemble_labels(e, 1, one, &r, err, sizeof err), 0);
    ck_assert_int_eq(r.label, 0);
    ck_assert_double_eq_tol(r.label_probs[0], 1.0, 1e-12);
    double bad[6] = {-INFINITY, NAN, -1.0, -INFINITY, -INFINITY, -INFINITY};
    ck_assert_int_eq(ensemble_labels(e, 3, bad, &r, err, sizeof err), 0);
    for (int l = 0; l < 3; l++) ck_assert(r.label_probs[l] == r.label_probs[l]);
    ck_assert_int_eq(r.label, 2);
    ck_assert_int_eq(ensemble_labels(e, 0, one, &r, err, sizeof err), -1);
    ck_assert_int_eq(ensemble_labels(e, ENSEMBLE_MAX_LABELS + 1, one, &r, err, sizeof err), -1);
    ensemble_free(e);
}
END_TEST

/* A one-member ensemble's label probabilities are the model's softmax over labels. */
START_TEST(labels_with_one_model)
{
    double w[1] = {1.0}, lp[4] = {-7.0, -2.0, -2.5, -30.0}, s = 0;
    for (int l = 0; l < 4; l++) s += exp(lp[l]);
    for (int m = 0; m < 3; m++) {
        ensemble *e = make(1, 10, w, (ensemble_method)m, tu_sampler_plain(0.0f, 1));
        ensemble_label_result r;
        ck_assert_int_eq(ensemble_labels(e, 4, lp, &r, err, sizeof err), 0);
        ck_assert_int_eq(r.label, 1);
        for (int l = 0; l < 4; l++) ck_assert_double_eq_tol(r.label_probs[l], exp(lp[l]) / s, 1e-12);
        ck_assert_double_eq_tol(r.agreement, 1.0, 1e-12);
        ensemble_free(e);
    }
}
END_TEST

START_TEST(label_lists_are_checked)
{
    const char *ok[3] = {"positive", "negative", "neutral"};
    ck_assert_int_eq(ensemble_labels_check(ok, 3, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_labels_check(ok, 0, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "empty"));
    const char *dup[4] = {"a", "positive", "b", "positive"};
    ck_assert_int_eq(ensemble_labels_check(dup, 4, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "labels[1] and labels[3] are both \"positive\""));
    const char *empty[2] = {"a", ""};
    ck_assert_int_eq(ensemble_labels_check(empty, 2, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "labels[1] is empty"));
    static const char *many[ENSEMBLE_MAX_LABELS + 1];
    static char text[ENSEMBLE_MAX_LABELS + 1][16];
    for (int i = 0; i <= ENSEMBLE_MAX_LABELS; i++) {
        snprintf(text[i], sizeof text[i], "l%d", i);
        many[i] = text[i];
    }
    ck_assert_int_eq(ensemble_labels_check(many, ENSEMBLE_MAX_LABELS, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_labels_check(many, ENSEMBLE_MAX_LABELS + 1, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "at most"));

    int32_t t0[2] = {5, 9}, t1[1] = {5}, t2[2] = {5, 9}, t3[2] = {9, 5};
    const int32_t *toks[4] = {t0, t1, t2, t3};
    size_t n[4] = {2, 1, 2, 2};
    ck_assert_int_eq(ensemble_label_tokens_check(toks, n, 2, NULL, err, sizeof err), 0);
    ck_assert_int_eq(ensemble_label_tokens_check(toks, n, 4, ok, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "labels[0] and labels[2]"));
    const int32_t *distinct[3] = {t0, t1, t3};
    size_t nd[3] = {2, 1, 2};
    ck_assert_int_eq(ensemble_label_tokens_check(distinct, nd, 3, ok, err, sizeof err), 0);
    nd[1] = 0;
    ck_assert_int_eq(ensemble_label_tokens_check(distinct, nd, 3, ok, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "labels[1] (\"negative\") has no tokens"));
    ck_assert_int_eq(ensemble_label_tokens_check(distinct, nd, 0, ok, err, sizeof err), -1);
}
END_TEST

START_TEST(row_logprob_is_log_softmax)
{
    enum { V = 200 };
    static float row[V];
    static double lp[V];
    random_row(row, V, 5.0);
    direct_log_softmax(row, V, 1.0, lp);
    for (int j = 0; j < V; j++) ck_assert_double_eq_tol(ensemble_row_logprob(row, V, j), lp[j], 1e-9);
    ck_assert(isinf(ensemble_row_logprob(row, V, -1)));
    ck_assert(isinf(ensemble_row_logprob(row, V, V)));
    row[3] = -INFINITY;
    row[4] = NAN;
    ck_assert(isinf(ensemble_row_logprob(row, V, 3)));
    ck_assert(isinf(ensemble_row_logprob(row, V, 4)));
    ck_assert(isfinite(ensemble_row_logprob(row, V, 5)));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("ensemble");
    TCase *tc = tcase_create("ensemble");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, method_names_parse);
    tcase_add_test(tc, weights_are_validated_and_normalised);
    tcase_add_test(tc, mean_prob_matches_direct_calculation);
    tcase_add_test(tc, mean_logprob_matches_direct_calculation);
    tcase_add_test(tc, mean_prob_draws_follow_the_combined_distribution);
    tcase_add_test(tc, mean_logprob_draws_follow_the_combined_distribution);
    tcase_add_test(tc, vote_matches_direct_calculation);
    tcase_add_test(tc, vote_ties_follow_the_rules);
    tcase_add_test(tc, one_member_equals_the_model);
    tcase_add_test(tc, two_copies_equal_the_model);
    tcase_add_test(tc, zero_weight_member_changes_nothing);
    tcase_add_test(tc, infinite_and_nan_logits_give_no_nan);
    tcase_add_test(tc, summary_counts_agreement_and_overrules);
    tcase_add_test(tc, top_entries_are_sorted_best_first);
    tcase_add_test(tc, labels_combine_as_computed_by_hand);
    tcase_add_test(tc, labels_with_one_model);
    tcase_add_test(tc, label_lists_are_checked);
    tcase_add_test(tc, row_logprob_is_log_softmax);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
