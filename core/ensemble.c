/* ensemble.c -- combine several models' next-token distributions or label scores.
 *
 * Each member's row becomes z_i = (penalised logits - max) / T, so its top token
 * sits at 0 and every other at a finite or -inf value <= 0; its distribution is
 * p_i = exp(z_i - lse_i). The combination is computed in double and handed to one
 * internal sampler (temperature 1, no penalty) as a row whose top is 0, so top-k,
 * top-p, min-p and the seeded RNG behave exactly as for a single model: with one
 * member the sampler sees the very floats a single-model sampler would. Formulas
 * and tie rules: docs/ENSEMBLES.md.
 */
#include "core/ensemble.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ops.h"

/* Vote weights (normalised to sum 1) closer than this count as tied, so weights
 * like 0.1 + 0.2 against 0.3 tie as a reader expects. */
#define WEIGHT_TIE_EPS 1e-9
/* Summed probabilities within this relative distance count as tied (a symmetric
 * pair of members sums its rows in different orders). */
#define PROB_TIE_REL 1e-9

struct ensemble {
    int n_members, n_vocab;
    ensemble_method method;
    int greedy;                          /* temperature 0: argmax, combined at T = 1 */
    float inv_t;                         /* 1 / temperature (1 when greedy) */
    float repeat_penalty;
    int repeat_last_n;
    double w[ENSEMBLE_MAX_MEMBERS];      /* normalised weights */
    char name[ENSEMBLE_MAX_MEMBERS][ENSEMBLE_NAME_MAX];
    sampler *smp;                        /* temperature 1, penalty off: draws from scaled rows */

    float *z;                            /* (n_members, n_vocab) row set, then (l - max) / T */
    unsigned char have_row[ENSEMBLE_MAX_MEMBERS];
    double lse[ENSEMBLE_MAX_MEMBERS];    /* log sum_j exp(z_ij) */
    int32_t best[ENSEMBLE_MAX_MEMBERS];  /* argmax of the member's penalised logits */
    uint8_t *seen;                       /* (n_vocab) penalty applied to this id (cleared after) */

    double *ex;                          /* (n_vocab) exp(z_ij) of the member being summed */
    double *acc;                         /* (n_vocab) combined, unnormalised: prob or log domain */
    int acc_is_log;                      /* mean_logprob: acc holds sum_i w_i z_ij */
    double acc_norm;                     /* log of acc's normaliser (log total or lse) */
    int32_t acc_top;                     /* argmax of acc, lowest id on ties */
    float *draw;                         /* (n_vocab) combined log-probs shifted so the top is 0:
                                          * the sampler's input (filled only to sample) */
    int stepped;                         /* a step has filled z, lse, acc */
    ensemble_member_vote vote[ENSEMBLE_MAX_MEMBERS];

    uint64_t steps;
    double agree_sum;
    uint64_t overruled[ENSEMBLE_MAX_MEMBERS];

    double *lab_q;                       /* (n_members, ENSEMBLE_MAX_LABELS) member label probs */
    double *lab_logq;                    /* (n_members, ENSEMBLE_MAX_LABELS) their logs */
    double lab_p[ENSEMBLE_MAX_LABELS];   /* combined label distribution */
    double lab_s[ENSEMBLE_MAX_LABELS];   /* mean_logprob's unnormalised log domain */
};

/* Methods ------------------------------------------------------------------ */

static const char *const method_names[] = {"mean_prob", "mean_logprob", "vote"};

int ensemble_method_parse(const char *name, ensemble_method *out, char *err, size_t errlen)
{
    for (int m = 0; m < 3; m++) {
        if (name && !strcmp(name, method_names[m])) {
            *out = (ensemble_method)m;
            return 0;
        }
    }
    snprintf(err, errlen, "ensemble method must be \"mean_prob\", \"mean_logprob\" or \"vote\"");
    return -1;
}

const char *ensemble_method_name(ensemble_method m)
{
    return (unsigned)m < 3 ? method_names[m] : "?";
}

/* Lifecycle ---------------------------------------------------------------- */

/* "members[1] (\"b\")" or "members[1]" for messages. */
static void member_label(char *buf, size_t len, const char *const *names, int i)
{
    if (names && names[i]) snprintf(buf, len, "members[%d] (\"%.*s\")", i, ENSEMBLE_NAME_MAX - 1, names[i]);
    else snprintf(buf, len, "members[%d]", i);
}

/* Finite, >= 0, not all zero; normalised to sum 1 (scaled by the largest first so
 * huge weights cannot overflow the sum). */
static int weights_normalise(int n, const char *const *names, const double *in, double *out,
                             char *err, size_t errlen)
{
    char who[ENSEMBLE_NAME_MAX + 32];
    double max = 0.0;
    for (int i = 0; i < n; i++) {
        member_label(who, sizeof who, names, i);
        if (!isfinite(in[i])) {
            snprintf(err, errlen, "%s has weight %g; weights must be finite numbers >= 0", who, in[i]);
            return -1;
        }
        if (in[i] < 0.0) {
            snprintf(err, errlen, "%s has negative weight %g", who, in[i]);
            return -1;
        }
        if (in[i] > max) max = in[i];
    }
    if (max == 0.0) {
        snprintf(err, errlen, "ensemble: all member weights are zero (at least one must be > 0)");
        return -1;
    }
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += in[i] / max;
    for (int i = 0; i < n; i++) out[i] = (in[i] / max) / sum;
    return 0;
}

int ensemble_create(int n_members, int n_vocab, const char *const *names, const double *weights,
                    ensemble_method method, const sampler_params *sp, ensemble **out,
                    char *err, size_t errlen)
{
    *out = NULL;
    if (n_members < 1) {
        snprintf(err, errlen, "ensemble: needs at least one member");
        return -1;
    }
    if (n_members > ENSEMBLE_MAX_MEMBERS) {
        snprintf(err, errlen, "ensemble: %d members, at most %d", n_members, ENSEMBLE_MAX_MEMBERS);
        return -1;
    }
    if (n_vocab <= 0) {
        snprintf(err, errlen, "ensemble: vocabulary size must be positive");
        return -1;
    }
    if ((unsigned)method > ENSEMBLE_VOTE) {
        snprintf(err, errlen, "ensemble: unknown method %d", (int)method);
        return -1;
    }
    if (!weights || !sp) {
        snprintf(err, errlen, "ensemble: weights and sampling settings are required");
        return -1;
    }
    if (sampler_params_validate(sp, err, errlen)) return -1;
    double w[ENSEMBLE_MAX_MEMBERS];
    if (weights_normalise(n_members, names, weights, w, err, errlen)) return -1;

    ensemble *e = calloc(1, sizeof *e);
    if (!e) goto oom;
    e->n_members = n_members;
    e->n_vocab = n_vocab;
    e->method = method;
    e->greedy = sp->temperature == 0.0f;
    e->inv_t = e->greedy ? 1.0f : 1.0f / sp->temperature;   /* as the sampler computes it */
    e->repeat_penalty = sp->repeat_penalty;
    e->repeat_last_n = sp->repeat_last_n;
    for (int i = 0; i < n_members; i++) {
        e->w[i] = w[i];
        if (names && names[i]) snprintf(e->name[i], ENSEMBLE_NAME_MAX, "%s", names[i]);
    }
    sampler_params inner = *sp;
    inner.temperature = 1.0f;      /* rows arrive already divided by T */
    inner.repeat_penalty = 1.0f;   /* applied per member before combining */
    inner.repeat_last_n = 0;
    if (sampler_create(n_vocab, &inner, &e->smp, err, errlen)) {
        ensemble_free(e);
        return -1;
    }
    size_t nv = (size_t)n_vocab, nm = (size_t)n_members;
    e->z = malloc(nm * nv * sizeof *e->z);
    e->seen = calloc(nv, 1);
    e->acc = malloc(nv * sizeof *e->acc);
    e->ex = malloc(nv * sizeof *e->ex);
    e->draw = malloc(nv * sizeof *e->draw);
    e->lab_q = malloc(nm * ENSEMBLE_MAX_LABELS * sizeof *e->lab_q);
    e->lab_logq = malloc(nm * ENSEMBLE_MAX_LABELS * sizeof *e->lab_logq);
    if (!e->z || !e->seen || !e->acc || !e->ex || !e->draw || !e->lab_q || !e->lab_logq) goto oom;
    *out = e;
    return 0;
oom:
    ensemble_free(e);
    snprintf(err, errlen, "ensemble: out of memory");
    return -1;
}

void ensemble_free(ensemble *e)
{
    if (!e) return;
    sampler_free(e->smp);
    free(e->z);
    free(e->seen);
    free(e->acc);
    free(e->ex);
    free(e->draw);
    free(e->lab_q);
    free(e->lab_logq);
    free(e);
}

int ensemble_n_members(const ensemble *e) { return e->n_members; }
int ensemble_n_vocab(const ensemble *e) { return e->n_vocab; }
ensemble_method ensemble_get_method(const ensemble *e) { return e->method; }

double ensemble_weight(const ensemble *e, int member)
{
    return member >= 0 && member < e->n_members ? e->w[member] : 0.0;
}

/* Per-member rows ---------------------------------------------------------- */

int ensemble_set_row(ensemble *e, int member, const float *logits, char *err, size_t errlen)
{
    if (member < 0 || member >= e->n_members || !logits) {
        snprintf(err, errlen, "ensemble: no member %d (of %d) or no logits", member, e->n_members);
        return -1;
    }
    memcpy(e->z + (size_t)member * (size_t)e->n_vocab, logits, (size_t)e->n_vocab * sizeof(float));
    e->have_row[member] = 1;
    return 0;
}

/* The sampler's repetition penalty (llama.cpp semantics), on one member's row:
 * each distinct in-range id among the last n tokens once, positive logits divided
 * by the penalty, negative ones multiplied. */
static void penalise(ensemble *e, float *row, const int32_t *history, size_t n_history)
{
    float pen = e->repeat_penalty;
    if (pen == 1.0f || e->repeat_last_n == 0 || !history) return;
    size_t n = n_history;
    if (e->repeat_last_n > 0 && (size_t)e->repeat_last_n < n) n = (size_t)e->repeat_last_n;
    const int32_t *h = history + (n_history - n);
    for (size_t i = 0; i < n; i++) {
        int32_t t = h[i];
        if (t < 0 || t >= e->n_vocab || e->seen[t]) continue;
        e->seen[t] = 1;
        row[t] = row[t] > 0.0f ? row[t] / pen : row[t] * pen;
    }
    for (size_t i = 0; i < n; i++)
        if (h[i] >= 0 && h[i] < e->n_vocab) e->seen[h[i]] = 0;
}

/* Turns member i's raw row into z = (l - max) / T (NaN -> -inf) and its lse.
 * The float expression is the sampler's, so one member reproduces it bit for bit.
 * A row with no finite value is one-hot on its argmax; +inf logits share the mass. */
static void member_prepare(ensemble *e, int i, const int32_t *history, size_t n_history)
{
    int V = e->n_vocab;
    float *z = e->z + (size_t)i * (size_t)V;
    penalise(e, z, history, n_history);
    int b = argmax(z, V);
    float m = z[b], inv_t = e->inv_t;
    e->best[i] = b;
    /* exp(z) is kept in ex for mean_prob's sum, so each entry costs one exp. */
    double s = 0.0, *ex = e->ex;
    if (!(m > -INFINITY)) {                       /* all -inf or NaN */
        for (int j = 0; j < V; j++) { z[j] = -INFINITY; ex[j] = 0.0; }
        z[b] = 0.0f;
        ex[b] = s = 1.0;
    } else if (m == INFINITY) {
        for (int j = 0; j < V; j++) {
            z[j] = z[j] == INFINITY ? 0.0f : -INFINITY;
            s += ex[j] = exp((double)z[j]);
        }
    } else {
        for (int j = 0; j < V; j++) {
            z[j] = z[j] == z[j] ? (z[j] - m) * inv_t : -INFINITY;
            s += ex[j] = exp((double)z[j]);
        }
    }
    e->lse[i] = log(s);
}

/* Member i's probability of token t. */
static double member_prob(const ensemble *e, int i, int32_t t)
{
    return exp((double)e->z[(size_t)i * (size_t)e->n_vocab + (size_t)t] - e->lse[i]);
}

/* Index of the largest value, lowest index on ties (no NaN in acc). */
static int argmax_d(const double *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Combination -------------------------------------------------------------- */

/* Prepares every member (z, lse) and adds each into acc_j = sum_i w_i p_i(j)
 * while its exp(z) is still in ex. prepared: the members' z and lse are done
 * already (mean_logprob's fallback), only exp(z) is recomputed. */
static void combine_mean_prob(ensemble *e, const int32_t *history, size_t n_history, int prepared)
{
    int V = e->n_vocab;
    memset(e->acc, 0, (size_t)V * sizeof *e->acc);
    for (int i = 0; i < e->n_members; i++) {
        if (!prepared) member_prepare(e, i, history, n_history);
        if (e->w[i] == 0.0) continue;
        if (prepared) {
            const float *z = e->z + (size_t)i * (size_t)V;
            for (int j = 0; j < V; j++) e->ex[j] = exp((double)z[j]);
        }
        double c = e->w[i] * exp(-e->lse[i]);
        for (int j = 0; j < V; j++) e->acc[j] += c * e->ex[j];
    }
    double total = 0.0;
    int top = 0;
    for (int j = 0; j < V; j++) {
        total += e->acc[j];
        if (e->acc[j] > e->acc[top]) top = j;
    }
    e->acc_is_log = 0;
    e->acc_norm = log(total);
    e->acc_top = top;
}

/* acc_j = sum_i w_i z_ij (a product of experts; each member's lse is a constant
 * shift that renormalising removes). Members of weight 0 are left out, so their
 * -inf entries cannot make 0 * -inf. With no token possible under every weighted
 * member the product is empty: fall back to mean_prob (members already prepared). */
static void combine_mean_logprob(ensemble *e, const int32_t *history, size_t n_history)
{
    int V = e->n_vocab;
    memset(e->acc, 0, (size_t)V * sizeof *e->acc);
    for (int i = 0; i < e->n_members; i++) {
        member_prepare(e, i, history, n_history);
        if (e->w[i] == 0.0) continue;
        const float *z = e->z + (size_t)i * (size_t)V;
        double w = e->w[i];
        for (int j = 0; j < V; j++) e->acc[j] += w * (double)z[j];
    }
    int top = argmax_d(e->acc, V);
    double smax = e->acc[top];
    if (!(smax > -INFINITY)) {
        combine_mean_prob(e, NULL, 0, 1);
        return;
    }
    double s = 0.0;
    for (int j = 0; j < V; j++) s += exp(e->acc[j] - smax);
    e->acc_is_log = 1;
    e->acc_norm = smax + log(s);
    e->acc_top = top;
}

/* The combined distribution's log-probability of t. */
static double combined_logprob(const ensemble *e, int32_t t)
{
    double a = e->acc[t];
    return e->acc_is_log ? a - e->acc_norm : log(a) - e->acc_norm;
}

/* The row the sampler draws the combined token from: log-probabilities shifted so
 * the top is 0. With a single weighted member that is its own z row, handed over
 * as is, so the draw is bit for bit the single model's. */
static const float *draw_row(ensemble *e)
{
    int V = e->n_vocab, only = -1, n_weighted = 0;
    for (int i = 0; i < e->n_members; i++)
        if (e->w[i] > 0.0) { only = i; n_weighted++; }
    if (n_weighted == 1 && !e->acc_is_log) return e->z + (size_t)only * (size_t)V;
    double top = combined_logprob(e, e->acc_top);
    for (int j = 0; j < V; j++) e->draw[j] = (float)(combined_logprob(e, j) - top);
    return e->draw;
}

/* Vote --------------------------------------------------------------------- */

/* 1 when candidate a (vote weight wa, summed probability sa) beats b. */
static int vote_beats(int32_t a, double wa, double sa, int32_t b, double wb, double sb)
{
    if (fabs(wa - wb) > WEIGHT_TIE_EPS) return wa > wb;
    double m = sa > sb ? sa : sb;
    if (fabs(sa - sb) > PROB_TIE_REL * m) return sa > sb;
    return a < b;
}

/* The most-weighted choice among pick[0..n) (weights w, summed probabilities
 * from sum_prob), ties by summed probability, then the lower id. */
static int32_t vote_tally(int n, const int32_t *pick, const double *w, const double *sum_prob)
{
    int32_t win = -1;
    double win_w = 0.0, win_s = 0.0;
    for (int i = 0; i < n; i++) {
        int counted = 0;
        for (int k = 0; k < i; k++) counted |= pick[k] == pick[i];
        if (counted) continue;
        double wt = 0.0;
        for (int k = 0; k < n; k++)
            if (pick[k] == pick[i]) wt += w[k];
        double s = sum_prob[pick[i]];
        if (win < 0 || vote_beats(pick[i], wt, s, win, win_w, win_s)) {
            win = pick[i];
            win_w = wt;
            win_s = s;
        }
    }
    return win;
}

/* Records the members' part and the agreement; updates the summary. */
static float record_votes(ensemble *e, const int32_t *pick, const double *own_prob, const double *prob,
                          int32_t chosen)
{
    double agree = 0.0;
    for (int i = 0; i < e->n_members; i++) {
        ensemble_member_vote *v = &e->vote[i];
        v->token = pick[i];
        v->own_prob = (float)own_prob[i];
        v->prob = (float)prob[i];
        v->weight = (float)e->w[i];
        v->agrees = pick[i] == chosen;
        if (v->agrees) agree += e->w[i];
        else e->overruled[i]++;
    }
    if (agree > 1.0) agree = 1.0;
    e->steps++;
    e->agree_sum += agree;
    return (float)agree;
}

/* Steps -------------------------------------------------------------------- */

int ensemble_step(ensemble *e, const int32_t *history, size_t n_history, ensemble_result *out,
                  char *err, size_t errlen)
{
    int M = e->n_members, V = e->n_vocab;
    for (int i = 0; i < M; i++) {
        if (!e->have_row[i]) {
            if (e->name[i][0])
                snprintf(err, errlen, "ensemble: no logits from members[%d] (\"%s\") for this step", i, e->name[i]);
            else snprintf(err, errlen, "ensemble: no logits from members[%d] for this step", i);
            return -1;
        }
    }
    for (int i = 0; i < M; i++) e->have_row[i] = 0;
    /* The penalty is applied once per member, inside the combination's pass. */
    if (e->method == ENSEMBLE_MEAN_LOGPROB) combine_mean_logprob(e, history, n_history);
    else combine_mean_prob(e, history, n_history, 0);
    e->stepped = 1;

    int32_t pick[ENSEMBLE_MAX_MEMBERS], chosen;
    double own[ENSEMBLE_MAX_MEMBERS], prob[ENSEMBLE_MAX_MEMBERS];
    if (e->method == ENSEMBLE_VOTE) {
        /* Each member's own choice, drawn from the request's RNG in member order. */
        for (int i = 0; i < M; i++)
            pick[i] = e->greedy ? e->best[i] : sampler_sample(e->smp, e->z + (size_t)i * (size_t)V, NULL, 0);
        chosen = vote_tally(M, pick, e->w, e->acc);   /* acc: sum_i w_i p_i (mean_prob) */
    } else {
        for (int i = 0; i < M; i++) pick[i] = e->best[i];
        chosen = e->greedy ? e->acc_top : sampler_sample(e->smp, draw_row(e), NULL, 0);
    }
    for (int i = 0; i < M; i++) {
        own[i] = member_prob(e, i, pick[i]);
        prob[i] = member_prob(e, i, chosen);
    }
    out->token = chosen;
    out->prob = (float)exp(combined_logprob(e, chosen));
    out->agreement = record_votes(e, pick, own, prob, chosen);
    out->members = e->vote;
    return 0;
}

int ensemble_step_rows(ensemble *e, const float *const *rows, const int32_t *history,
                       size_t n_history, ensemble_result *out, char *err, size_t errlen)
{
    if (!rows) {
        snprintf(err, errlen, "ensemble: no logits rows");
        return -1;
    }
    for (int i = 0; i < e->n_members; i++)
        if (ensemble_set_row(e, i, rows[i], err, errlen)) return -1;
    return ensemble_step(e, history, n_history, out, err, errlen);
}

double ensemble_logprob(const ensemble *e, int member, int32_t token)
{
    if (!e->stepped || member < -1 || member >= e->n_members || token < 0 || token >= e->n_vocab)
        return -INFINITY;
    if (member < 0) return combined_logprob(e, token);
    return (double)e->z[(size_t)member * (size_t)e->n_vocab + (size_t)token] - e->lse[member];
}

int ensemble_logprobs(const ensemble *e, int member, float *out)
{
    if (!e->stepped || member < -1 || member >= e->n_members || !out) return -1;
    for (int j = 0; j < e->n_vocab; j++) out[j] = (float)ensemble_logprob(e, member, j);
    return 0;
}

/* Top-n selection over a key that orders like the log-probability (acc for the
 * combination, z for a member): a min-heap of ids, root = worst kept. */
static double top_key(const ensemble *e, int member, int32_t j)
{
    return member < 0 ? e->acc[j] : (double)e->z[(size_t)member * (size_t)e->n_vocab + (size_t)j];
}

static int top_better(const ensemble *e, int member, int32_t a, int32_t b)
{
    double ka = top_key(e, member, a), kb = top_key(e, member, b);
    return ka > kb || (ka == kb && a < b);
}

static void top_sift(const ensemble *e, int member, int32_t *ids, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && top_better(e, member, ids[w], ids[l])) w = l;
        if (r < n && top_better(e, member, ids[w], ids[r])) w = r;
        if (w == i) return;
        int32_t t = ids[i]; ids[i] = ids[w]; ids[w] = t;
        i = w;
    }
}

int ensemble_top(const ensemble *e, int member, int n, int32_t *ids, float *logprobs)
{
    if (!e->stepped || n <= 0 || member < -1 || member >= e->n_members || !ids || !logprobs) return 0;
    int V = e->n_vocab;
    if (n > V) n = V;
    for (int j = 0; j < n; j++) ids[j] = j;
    for (int j = n / 2 - 1; j >= 0; j--) top_sift(e, member, ids, n, j);
    for (int j = n; j < V; j++) {
        if (top_better(e, member, j, ids[0])) {
            ids[0] = j;
            top_sift(e, member, ids, n, 0);
        }
    }
    for (int end = n - 1; end > 0; end--) {   /* heap sort: worst to the back */
        int32_t t = ids[0]; ids[0] = ids[end]; ids[end] = t;
        top_sift(e, member, ids, end, 0);
    }
    for (int j = 0; j < n; j++) logprobs[j] = (float)ensemble_logprob(e, member, ids[j]);
    return n;
}

void ensemble_summary_get(const ensemble *e, ensemble_summary *out)
{
    out->steps = e->steps;
    out->mean_agreement = e->steps ? e->agree_sum / (double)e->steps : 0.0;
    out->overruled = e->overruled;
}

/* Label scoring ------------------------------------------------------------ */

/* Softmax over one member's label log-probabilities x (NaN -> -inf): q and log q.
 * +inf entries share the mass; with no finite entry every label is equally
 * likely (the member has no opinion). */
static void label_softmax(const double *x, int n, double *q, double *logq)
{
    double m = -INFINITY;
    int n_inf = 0;
    for (int l = 0; l < n; l++) {
        if (x[l] > m) m = x[l];
        n_inf += x[l] == INFINITY;
    }
    if (m == INFINITY || !(m > -INFINITY)) {
        int k = n_inf ? n_inf : n;
        for (int l = 0; l < n; l++) {
            int in = n_inf ? x[l] == INFINITY : 1;
            q[l] = in ? 1.0 / k : 0.0;
            logq[l] = in ? -log((double)k) : -INFINITY;
        }
        return;
    }
    double s = 0.0;
    for (int l = 0; l < n; l++)
        if (x[l] == x[l]) s += exp(x[l] - m);
    double lse = m + log(s);
    for (int l = 0; l < n; l++) {
        logq[l] = x[l] == x[l] ? x[l] - lse : -INFINITY;
        q[l] = exp(logq[l]);
    }
}

int ensemble_labels(ensemble *e, int n_labels, const double *logprob, ensemble_label_result *out,
                    char *err, size_t errlen)
{
    int M = e->n_members, L = n_labels;
    if (L < 1 || L > ENSEMBLE_MAX_LABELS || !logprob) {
        snprintf(err, errlen, "ensemble: %d labels; need 1 to %d", L, ENSEMBLE_MAX_LABELS);
        return -1;
    }
    int32_t pick[ENSEMBLE_MAX_MEMBERS];
    double own[ENSEMBLE_MAX_MEMBERS], prob[ENSEMBLE_MAX_MEMBERS];
    for (int i = 0; i < M; i++) {
        double *q = e->lab_q + (size_t)i * (size_t)L, *lq = e->lab_logq + (size_t)i * (size_t)L;
        label_softmax(logprob + (size_t)i * (size_t)L, L, q, lq);
        pick[i] = argmax_d(q, L);
    }
    /* mean_prob; also the vote's tie-break and the fallback of an empty product. */
    for (int l = 0; l < L; l++) {
        double p = 0.0;
        for (int i = 0; i < M; i++) p += e->w[i] * e->lab_q[(size_t)i * (size_t)L + (size_t)l];
        e->lab_p[l] = p;
    }
    int32_t chosen;
    if (e->method == ENSEMBLE_MEAN_LOGPROB) {
        double smax = -INFINITY;
        for (int l = 0; l < L; l++) {
            double s = 0.0;
            for (int i = 0; i < M; i++)
                if (e->w[i] > 0.0) s += e->w[i] * e->lab_logq[(size_t)i * (size_t)L + (size_t)l];
            e->lab_s[l] = s;
            if (s > smax) smax = s;
        }
        if (smax > -INFINITY) {
            double sum = 0.0;
            for (int l = 0; l < L; l++) sum += exp(e->lab_s[l] - smax);
            for (int l = 0; l < L; l++) e->lab_p[l] = exp(e->lab_s[l] - smax) / sum;
        }
    }
    if (e->method == ENSEMBLE_VOTE) chosen = vote_tally(M, pick, e->w, e->lab_p);
    else chosen = argmax_d(e->lab_p, L);
    for (int i = 0; i < M; i++) {
        own[i] = e->lab_q[(size_t)i * (size_t)L + (size_t)pick[i]];
        prob[i] = e->lab_q[(size_t)i * (size_t)L + (size_t)chosen];
    }
    out->label = chosen;
    out->agreement = record_votes(e, pick, own, prob, chosen);
    out->label_probs = e->lab_p;
    out->member_probs = e->lab_q;
    out->members = e->vote;
    return 0;
}

/* Label checks ------------------------------------------------------------- */

typedef struct {
    const char *s;
    const int32_t *t;
    size_t n;
    size_t idx;
} label_key;

static int cmp_label_str(const void *a, const void *b)
{
    const label_key *x = a, *y = b;
    int c = strcmp(x->s, y->s);
    return c ? c : (x->idx > y->idx) - (x->idx < y->idx);
}

static int cmp_label_tokens(const void *a, const void *b)
{
    const label_key *x = a, *y = b;
    if (x->n != y->n) return x->n < y->n ? -1 : 1;
    for (size_t k = 0; k < x->n; k++)
        if (x->t[k] != y->t[k]) return x->t[k] < y->t[k] ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static int label_count_check(size_t n, char *err, size_t errlen)
{
    if (n == 0) {
        snprintf(err, errlen, "labels: the list is empty");
        return -1;
    }
    if (n > ENSEMBLE_MAX_LABELS) {
        snprintf(err, errlen, "labels: %zu labels, at most %d", n, ENSEMBLE_MAX_LABELS);
        return -1;
    }
    return 0;
}

/* Sorting then comparing neighbours keeps long near-identical labels from costing
 * n^2 comparisons. */
int ensemble_labels_check(const char *const *labels, size_t n_labels, char *err, size_t errlen)
{
    if (label_count_check(n_labels, err, errlen)) return -1;
    if (!labels) {
        snprintf(err, errlen, "labels: list missing");
        return -1;
    }
    label_key key[ENSEMBLE_MAX_LABELS];
    for (size_t i = 0; i < n_labels; i++) {
        if (!labels[i] || !labels[i][0]) {
            snprintf(err, errlen, "labels[%zu] is empty", i);
            return -1;
        }
        key[i] = (label_key){.s = labels[i], .idx = i};
    }
    qsort(key, n_labels, sizeof *key, cmp_label_str);
    for (size_t i = 1; i < n_labels; i++) {
        if (!strcmp(key[i - 1].s, key[i].s)) {
            snprintf(err, errlen, "labels[%zu] and labels[%zu] are both \"%.64s\"", key[i - 1].idx,
                     key[i].idx, key[i].s);
            return -1;
        }
    }
    return 0;
}

int ensemble_label_tokens_check(const int32_t *const *tokens, const size_t *n_tokens, size_t n_labels,
                                const char *const *labels, char *err, size_t errlen)
{
    if (label_count_check(n_labels, err, errlen)) return -1;
    if (!tokens || !n_tokens) {
        snprintf(err, errlen, "labels: token lists missing");
        return -1;
    }
    label_key key[ENSEMBLE_MAX_LABELS];
    for (size_t i = 0; i < n_labels; i++) {
        if (n_tokens[i] == 0 || !tokens[i]) {
            if (labels && labels[i]) snprintf(err, errlen, "labels[%zu] (\"%.64s\") has no tokens", i, labels[i]);
            else snprintf(err, errlen, "labels[%zu] has no tokens", i);
            return -1;
        }
        key[i] = (label_key){.t = tokens[i], .n = n_tokens[i], .idx = i};
    }
    qsort(key, n_labels, sizeof *key, cmp_label_tokens);
    for (size_t i = 1; i < n_labels; i++) {
        const label_key *a = &key[i - 1], *b = &key[i];
        if (a->n == b->n && !memcmp(a->t, b->t, a->n * sizeof *a->t)) {
            snprintf(err, errlen, "labels[%zu] and labels[%zu] are the same tokens", a->idx, b->idx);
            return -1;
        }
    }
    return 0;
}

double ensemble_row_logprob(const float *logits, int n_vocab, int32_t token)
{
    if (!logits || n_vocab <= 0 || token < 0 || token >= n_vocab) return -INFINITY;
    double m = -INFINITY;
    int n_inf = 0;
    for (int j = 0; j < n_vocab; j++) {
        if (logits[j] > m) m = logits[j];
        n_inf += logits[j] == INFINITY;
    }
    double x = logits[token];
    if (x != x || !(m > -INFINITY)) return -INFINITY;
    if (n_inf) return x == INFINITY ? -log((double)n_inf) : -INFINITY;
    double s = 0.0;
    for (int j = 0; j < n_vocab; j++)
        if (logits[j] == logits[j]) s += exp((double)logits[j] - m);
    return x - m - log(s);
}
