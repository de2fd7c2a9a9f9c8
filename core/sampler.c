/* sampler.c -- from a row of logits to the next token; stop strings.
 *
 * The sampler owns its RNG state (xorshift64*, seeded through splitmix64 so seed 0
 * works) and scratch sized for the vocabulary at create, so sampling allocates
 * nothing and two samplers with the same seed draw the same tokens.
 */
#include "core/sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ops.h"

/* Parameters ------------------------------------------------------------- */

/* llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05); no penalty. */
sampler_params sampler_default_params(void)
{
    sampler_params p = {
        .temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
        .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0,
    };
    return p;
}

int sampler_params_validate(const sampler_params *p, char *err, size_t errlen)
{
    if (!(p->temperature >= 0.0f && p->temperature <= 100.0f)) {
        snprintf(err, errlen, "temperature must be between 0 and 100 (0 = greedy)");
        return -1;
    }
    if (p->top_k < 0) {
        snprintf(err, errlen, "top_k must be >= 0 (0 = off)");
        return -1;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        snprintf(err, errlen, "top_p must be in (0, 1] (1 = off)");
        return -1;
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        snprintf(err, errlen, "min_p must be in [0, 1] (0 = off)");
        return -1;
    }
    if (!(p->repeat_penalty > 0.0f && p->repeat_penalty <= 100.0f)) {
        snprintf(err, errlen, "repeat_penalty must be in (0, 100] (1 = off)");
        return -1;
    }
    if (p->repeat_last_n < -1) {
        snprintf(err, errlen, "repeat_last_n must be >= -1 (-1 = whole history, 0 = none)");
        return -1;
    }
    return 0;
}

/* The sampler ------------------------------------------------------------ */

struct sampler {
    int n_vocab;
    sampler_params p;
    uint64_t rng;       /* xorshift64* state, never 0 */
    float last_prob;
    float *logit;       /* (n_vocab) working copy of the logits */
    int32_t *cand;      /* (n_vocab) candidate token ids */
    float *prob;        /* (n_vocab) unnormalised probability per token id */
    uint8_t *seen;      /* (n_vocab) penalty applied to this id already (cleared after use) */
};

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Uniform double in [0, 1) from the top 53 bits of xorshift64*. */
static double rng_uniform(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}

int sampler_create(int n_vocab, const sampler_params *p, sampler **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n_vocab <= 0) {
        snprintf(err, errlen, "sampler: vocabulary size must be positive");
        return -1;
    }
    if (sampler_params_validate(p, err, errlen)) return -1;
    sampler *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->n_vocab = n_vocab;
    s->p = *p;
    s->rng = splitmix64(p->seed);
    if (s->rng == 0) s->rng = 0x9E3779B97F4A7C15ull;
    s->logit = malloc((size_t)n_vocab * sizeof *s->logit);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->prob = malloc((size_t)n_vocab * sizeof *s->prob);
    s->seen = calloc((size_t)n_vocab, 1);
    if (!s->logit || !s->cand || !s->prob || !s->seen) goto oom;
    *out = s;
    return 0;
oom:
    sampler_free(s);
    snprintf(err, errlen, "sampler: out of memory");
    return -1;
}

void sampler_free(sampler *s)
{
    if (!s) return;
    free(s->logit);
    free(s->cand);
    free(s->prob);
    free(s->seen);
    free(s);
}

float sampler_last_prob(const sampler *s)
{
    return s->last_prob;
}

/* llama.cpp semantics: each distinct id among the last n tokens once, positive
 * logits divided by the penalty, negative ones multiplied. Ids out of range are
 * ignored (history can come from outside). */
static void repeat_penalty(sampler *s, const int32_t *history, size_t n_history)
{
    float pen = s->p.repeat_penalty;
    if (pen == 1.0f || s->p.repeat_last_n == 0 || !history) return;
    size_t n = n_history;
    if (s->p.repeat_last_n > 0 && (size_t)s->p.repeat_last_n < n) n = (size_t)s->p.repeat_last_n;
    const int32_t *h = history + (n_history - n);
    for (size_t i = 0; i < n; i++) {
        int32_t t = h[i];
        if (t < 0 || t >= s->n_vocab || s->seen[t]) continue;
        s->seen[t] = 1;
        s->logit[t] = s->logit[t] > 0.0f ? s->logit[t] / pen : s->logit[t] * pen;
    }
    for (size_t i = 0; i < n; i++)
        if (h[i] >= 0 && h[i] < s->n_vocab) s->seen[h[i]] = 0;
}

/* Candidate order: higher probability first, lower id on ties (so it is total and
 * the draw does not depend on the sort algorithm). */
static int cand_before(const sampler *s, int32_t a, int32_t b)
{
    return s->prob[a] > s->prob[b] || (s->prob[a] == s->prob[b] && a < b);
}

/* Sift-down in a min-heap (by cand_before reversed: the root is the worst kept). */
static void heap_sift(const sampler *s, int32_t *h, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_before(s, h[w], h[l])) w = l;
        if (r < n && cand_before(s, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i]; h[i] = h[w]; h[w] = t;
        i = w;
    }
}

/* Keeps the k best of cand[0..n) in cand[0..k) (unordered); O(n log k). */
static int select_top_k(const sampler *s, int32_t *cand, int n, int k)
{
    if (k >= n) return n;
    for (int i = k / 2 - 1; i >= 0; i--) heap_sift(s, cand, k, i);
    for (int i = k; i < n; i++) {
        if (cand_before(s, cand[i], cand[0])) {
            cand[0] = cand[i];
            heap_sift(s, cand, k, 0);
        }
    }
    return k;
}

/* In-place heap sort of cand[0..n) into candidate order (best first). */
static void sort_candidates(const sampler *s, int32_t *cand, int n)
{
    for (int i = n / 2 - 1; i >= 0; i--) heap_sift(s, cand, n, i);
    for (int end = n - 1; end > 0; end--) {
        int32_t t = cand[0]; cand[0] = cand[end]; cand[end] = t;
        heap_sift(s, cand, end, 0);
    }
}

/* Narrows cand[0..n) to the top-p nucleus (the best candidates whose mass first
 * reaches target), unordered, in expected O(n): partition around a pivot, keep
 * the better side whole when its mass falls short, else recurse into it. Sorting
 * the whole vocabulary instead costs milliseconds per token at 150k entries. */
static int select_nucleus(const sampler *s, int32_t *cand, int n, double target)
{
    int lo = 0, hi = n;       /* cand[0..lo) is in; the boundary lies in [lo, hi) */
    double need = target;
    while (hi - lo > 64) {
        int mid = lo + (hi - lo) / 2;
        int32_t a = cand[lo], b = cand[mid], c = cand[hi - 1], piv;
        if (cand_before(s, a, b)) piv = cand_before(s, b, c) ? b : cand_before(s, a, c) ? c : a;
        else piv = cand_before(s, a, c) ? a : cand_before(s, b, c) ? c : b;
        int m = lo;
        double mass = 0.0;
        for (int i = lo; i < hi; i++) {
            if (cand_before(s, cand[i], piv)) {
                int32_t t = cand[m]; cand[m] = cand[i]; cand[i] = t;
                mass += s->prob[cand[m++]];
            }
        }
        if (mass >= need) { hi = m; continue; }
        for (int i = m; i < hi; i++)         /* the pivot right after the better side */
            if (cand[i] == piv) { cand[i] = cand[m]; cand[m] = piv; break; }
        need -= mass + s->prob[piv];
        lo = m + 1;
        if (need <= 0.0) return lo;
    }
    return hi;
}

/* Greedy: the argmax of the penalised logits; last_prob its softmax probability. */
static int32_t sample_greedy(sampler *s)
{
    int best = argmax(s->logit, s->n_vocab);
    float max = s->logit[best];
    double sum = 0.0;
    for (int i = 0; i < s->n_vocab; i++)
        if (s->logit[i] == s->logit[i]) sum += exp((double)s->logit[i] - (double)max);
    s->last_prob = (float)(1.0 / sum);
    return best;
}

int32_t sampler_sample(sampler *s, const float *logits, const int32_t *history, size_t n_history)
{
    int n = s->n_vocab;
    memcpy(s->logit, logits, (size_t)n * sizeof *s->logit);
    repeat_penalty(s, history, n_history);
    if (s->p.temperature == 0.0f) return sample_greedy(s);

    /* Temperature: p_i = exp((l_i - max) / T), unnormalised; ratios are what the
     * filters below need. */
    int best = argmax(s->logit, n);
    float max = s->logit[best], inv_t = 1.0f / s->p.temperature;
    int nc = 0;
    for (int i = 0; i < n; i++) {
        float l = s->logit[i];
        s->prob[i] = l == l ? expf((l - max) * inv_t) : 0.0f;   /* NaN never drawn */
        if (s->prob[i] > 0.0f) s->cand[nc++] = i;
    }
    if (nc == 0) { s->cand[0] = best; s->prob[best] = 1.0f; nc = 1; }

    /* min-p compares to the top probability, which top-k and top-p always keep, so
     * filtering it first gives the same set and shrinks what the sort sees. */
    if (s->p.min_p > 0.0f) {
        float floor = s->p.min_p * s->prob[best];
        int m = 0;
        for (int i = 0; i < nc; i++)
            if (s->prob[s->cand[i]] >= floor) s->cand[m++] = s->cand[i];
        nc = m;
    }
    if (s->p.top_k > 0) nc = select_top_k(s, s->cand, nc, s->p.top_k);

    double total = 0.0;
    for (int i = 0; i < nc; i++) total += s->prob[s->cand[i]];
    if (s->p.top_p < 1.0f) {
        double target = (double)s->p.top_p * total;
        nc = select_nucleus(s, s->cand, nc, target);
        sort_candidates(s, s->cand, nc);
        double acc = 0.0;
        int m = 0;
        while (m < nc) {
            acc += s->prob[s->cand[m++]];
            if (acc >= target) break;
        }
        nc = m;
        total = acc;
    } else {
        sort_candidates(s, s->cand, nc);
    }

    double u = rng_uniform(&s->rng) * total, acc = 0.0;
    int pick = nc - 1;
    for (int i = 0; i < nc; i++) {
        acc += s->prob[s->cand[i]];
        if (u < acc) { pick = i; break; }
    }
    int32_t tok = s->cand[pick];
    s->last_prob = (float)(s->prob[tok] / total);
    return tok;
}

/* Stop strings ----------------------------------------------------------- */

struct stop_matcher {
    char **stops;      /* (n_stops) owned copies */
    size_t *stop_len;  /* (n_stops) */
    size_t n_stops;
    size_t max_len;    /* longest stop string */
    char *text;        /* everything fed so far, NUL-terminated */
    size_t len, cap;
    int matched;
    size_t match_at;   /* start of the earliest stop string once matched */
};

int stop_matcher_create(const char *const *stops, size_t n_stops, stop_matcher **out,
                        char *err, size_t errlen)
{
    *out = NULL;
    if (n_stops > 0 && !stops) {
        snprintf(err, errlen, "stop strings: list missing");
        return -1;
    }
    for (size_t i = 0; i < n_stops; i++) {
        if (!stops[i] || !stops[i][0]) {
            snprintf(err, errlen, "stop string %zu is empty", i);
            return -1;
        }
    }
    stop_matcher *m = calloc(1, sizeof *m);
    if (!m) goto oom;
    m->cap = 64;
    m->text = malloc(m->cap);
    if (n_stops) {
        m->stops = calloc(n_stops, sizeof *m->stops);
        m->stop_len = calloc(n_stops, sizeof *m->stop_len);
        if (!m->stops || !m->stop_len) goto oom;
    }
    if (!m->text) goto oom;
    m->text[0] = '\0';
    for (size_t i = 0; i < n_stops; i++) {
        m->stop_len[i] = strlen(stops[i]);
        m->stops[i] = malloc(m->stop_len[i] + 1);
        if (!m->stops[i]) { m->n_stops = i; goto oom; }
        memcpy(m->stops[i], stops[i], m->stop_len[i] + 1);
        if (m->stop_len[i] > m->max_len) m->max_len = m->stop_len[i];
    }
    m->n_stops = n_stops;
    *out = m;
    return 0;
oom:
    stop_matcher_free(m);
    snprintf(err, errlen, "stop strings: out of memory");
    return -1;
}

void stop_matcher_free(stop_matcher *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->n_stops; i++) free(m->stops[i]);
    free(m->stops);
    free(m->stop_len);
    free(m->text);
    free(m);
}

/* First occurrence of needle in hay[from..len) as a start index, or (size_t)-1. */
static size_t find_from(const char *hay, size_t len, size_t from, const char *needle, size_t nlen)
{
    for (size_t i = from; i + nlen <= len; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, nlen) == 0) return i;
    return (size_t)-1;
}

int stop_matcher_feed(stop_matcher *m, const char *text, size_t len)
{
    if (m->matched) return 1;
    if (len == 0) return 0;
    if (len > SIZE_MAX - m->len - 1) return 0;   /* cannot happen for real text */
    if (m->len + len + 1 > m->cap) {
        size_t cap = m->cap;
        while (cap < m->len + len + 1) cap = cap > SIZE_MAX / 2 ? m->len + len + 1 : cap * 2;
        char *t = realloc(m->text, cap);
        if (!t) return 0;   /* keep the old text; the caller sees no new bytes as safe */
        m->text = t;
        m->cap = cap;
    }
    size_t old = m->len;
    memcpy(m->text + m->len, text, len);
    m->len += len;
    m->text[m->len] = '\0';
    /* No stop string was complete before, so a new match must end in the new bytes. */
    size_t from = old >= m->max_len ? old - m->max_len + 1 : 0;
    for (size_t i = 0; i < m->n_stops; i++) {
        size_t at = find_from(m->text, m->len, from, m->stops[i], m->stop_len[i]);
        if (at != (size_t)-1 && (!m->matched || at < m->match_at)) {
            m->matched = 1;
            m->match_at = at;
        }
    }
    return m->matched;
}

size_t stop_matcher_safe_len(const stop_matcher *m)
{
    if (m->matched) return m->match_at;
    /* Hold back the longest tail of the text that is a proper prefix of a stop string. */
    size_t hold = 0;
    for (size_t i = 0; i < m->n_stops; i++) {
        size_t sl = m->stop_len[i];
        size_t maxk = sl - 1 < m->len ? sl - 1 : m->len;
        for (size_t k = maxk; k > hold; k--) {
            if (memcmp(m->text + m->len - k, m->stops[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return m->len - hold;
}

const char *stop_matcher_text(const stop_matcher *m)
{
    return m->text;
}
