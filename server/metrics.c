/* metrics.c -- counters and histograms, rendered in the Prometheus text format. */
#include "server/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const int status_codes[METRICS_N_CODES] = {200, 400, 401, 404, 405, 413, 499, 500, 503, 504, 0, 0};
static const char *endpoint_names[EP_COUNT] = {"/infer", "/models", "/health", "/ready", "/metrics", "other"};
static const char *finish_names[FIN_COUNT] = {"length", "stop", "eos", "cancelled", "timeout", "drained", "error"};

/* Latency buckets in seconds: 1 ms .. 120 s. */
static const double sec_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1, 2.5, 5, 10, 30, 60, 120};
/* Per-token and per-step times are shorter. */
static const double step_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                     0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
/* Share of ensemble weight that chose the winning token. */
static const double agree_bounds[] = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999};
static const char *method_names[3] = {"mean_prob", "mean_logprob", "vote"};
static const double token_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};

#define NB(a) ((int)(sizeof a / sizeof a[0]))

static void histogram_init(histogram *h, const double *bounds, int n)
{
    memset(h, 0, sizeof *h);
    h->bounds = bounds;
    h->n_bounds = n;
}

void histogram_observe(histogram *h, double v)
{
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

int metrics_create(metrics **out, const char *const *model_names, int n_models)
{
    metrics *m = calloc(1, sizeof *m);
    if (!m) return -1;
    m->models = calloc((size_t)(n_models > 0 ? n_models : 1), sizeof *m->models);
    if (!m->models) { free(m); return -1; }
    pthread_mutex_init(&m->mu, NULL);
    m->n_models = n_models;
    for (int e = 0; e < EP_COUNT; e++) histogram_init(&m->duration[e], sec_bounds, NB(sec_bounds));
    histogram_init(&m->ens_agreement, agree_bounds, NB(agree_bounds));
    for (int i = 0; i < n_models; i++) {
        model_metrics *mm = &m->models[i];
        snprintf(mm->name, sizeof mm->name, "%s", model_names[i]);
        histogram_init(&mm->queue_wait, sec_bounds, NB(sec_bounds));
        histogram_init(&mm->ttft, sec_bounds, NB(sec_bounds));
        histogram_init(&mm->tpot, step_bounds, NB(step_bounds));
        histogram_init(&mm->forward, step_bounds, NB(step_bounds));
        histogram_init(&mm->batch_tokens, token_bounds, NB(token_bounds));
        histogram_init(&mm->request_tokens, token_bounds, NB(token_bounds));
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->start_time = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    *out = m;
    return 0;
}

void metrics_free(metrics *m)
{
    if (!m) return;
    for (int i = 0; i < m->n_models; i++) {
        free(m->models[i].expert_routed);
        free(m->models[i].expert_dropped);
    }
    free(m->models);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void metrics_request(metrics *m, metrics_endpoint ep, int status, double seconds)
{
    int c = 0;
    while (c < METRICS_N_CODES && status_codes[c] && status_codes[c] != status) c++;
    pthread_mutex_lock(&m->mu);
    if (c < METRICS_N_CODES && status_codes[c] == status) m->requests[ep][c]++;
    histogram_observe(&m->duration[ep], seconds);
    pthread_mutex_unlock(&m->mu);
}

int metrics_model_loaded(metrics *m, int model, int n_layer, int n_expert, int kv_blocks_total,
                         size_t kv_bytes, double load_seconds)
{
    size_t n = (size_t)n_layer * (size_t)(n_expert > 0 ? n_expert : 0);
    uint64_t *r = n ? calloc(n, sizeof *r) : NULL, *d = n ? calloc(n, sizeof *d) : NULL;
    if (n && (!r || !d)) { free(r); free(d); return -1; }
    pthread_mutex_lock(&m->mu);
    model_metrics *mm = &m->models[model];
    free(mm->expert_routed);
    free(mm->expert_dropped);
    mm->expert_routed = r;
    mm->expert_dropped = d;
    mm->n_layer = n ? n_layer : 0;
    mm->n_expert = n ? n_expert : 0;
    mm->kv_blocks_total = kv_blocks_total;
    mm->kv_bytes = kv_bytes;
    mm->loaded = 1;
    mm->load_seconds = load_seconds;
    pthread_mutex_unlock(&m->mu);
    return 0;
}

void metrics_set_state(metrics *m, int ready, int draining)
{
    pthread_mutex_lock(&m->mu);
    m->ready = ready;
    m->draining = draining;
    pthread_mutex_unlock(&m->mu);
}

/* Rendering ----------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) { b->oom = 1; return; }
        if ((size_t)n < b->cap - b->len) { b->len += (size_t)n; return; }
        size_t nc = b->cap * 2 + (size_t)n + 1;
        char *np = realloc(b->p, nc);
        if (!np) { b->oom = 1; return; }
        b->p = np;
        b->cap = nc;
    }
}

static void family(sbuf *b, const char *name, const char *type, const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* labels: "" or `model="x"` (without braces). */
static void histogram_render(sbuf *b, const char *name, const char *labels, const histogram *h)
{
    uint64_t cum = 0;
    const char *sep = *labels ? "," : "";
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        sb_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, h->bounds[i],
                  (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    sb_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)cum);
    if (*labels) {
        sb_printf(b, "%s_sum{%s} %.9g\n", name, labels, h->sum);
        sb_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
    } else {
        sb_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->count);
    }
}

typedef const histogram *(*hist_of)(const model_metrics *);
static const histogram *h_queue(const model_metrics *mm) { return &mm->queue_wait; }
static const histogram *h_ttft(const model_metrics *mm) { return &mm->ttft; }
static const histogram *h_tpot(const model_metrics *mm) { return &mm->tpot; }
static const histogram *h_fwd(const model_metrics *mm) { return &mm->forward; }
static const histogram *h_batch(const model_metrics *mm) { return &mm->batch_tokens; }

static void model_histograms(sbuf *b, const metrics *m, const char *name, const char *help, hist_of f)
{
    family(b, name, "histogram", help);
    for (int i = 0; i < m->n_models; i++) {
        char lab[96];
        snprintf(lab, sizeof lab, "model=\"%s\"", m->models[i].name);
        histogram_render(b, name, lab, f(&m->models[i]));
    }
}

static void render_requests(sbuf *b, const metrics *m)
{
    family(b, "moeserve_requests_total", "counter", "HTTP requests answered, by endpoint and status code.");
    for (int e = 0; e < EP_COUNT; e++)
        for (int c = 0; c < METRICS_N_CODES && status_codes[c]; c++)
            if (m->requests[e][c] || (c == 0 && e != EP_OTHER))
                sb_printf(b, "moeserve_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n",
                          endpoint_names[e], status_codes[c], (unsigned long long)m->requests[e][c]);
    family(b, "moeserve_request_duration_seconds", "histogram", "Time from request arrival to response, by endpoint.");
    for (int e = 0; e < EP_COUNT; e++) {
        char lab[64];
        snprintf(lab, sizeof lab, "endpoint=\"%s\"", endpoint_names[e]);
        histogram_render(b, "moeserve_request_duration_seconds", lab, &m->duration[e]);
    }
}

#define PER_MODEL(b, m, fam, type, help, fmt, expr)                               \
    do {                                                                           \
        family(b, fam, type, help);                                                \
        for (int i_ = 0; i_ < (m)->n_models; i_++) {                              \
            const model_metrics *mm = &(m)->models[i_];                           \
            sb_printf(b, "%s{model=\"%s\"} " fmt "\n", fam, mm->name, expr);       \
        }                                                                          \
    } while (0)

static void render_models(sbuf *b, const metrics *m)
{
    model_histograms(b, m, "moeserve_queue_wait_seconds", "Time a sequence waited before its prefill started.", h_queue);
    model_histograms(b, m, "moeserve_time_to_first_token_seconds", "Time from arrival to the first generated token.", h_ttft);
    model_histograms(b, m, "moeserve_time_per_output_token_seconds", "Mean time between generated tokens of a request.", h_tpot);
    model_histograms(b, m, "moeserve_forward_seconds", "Time of one forward pass (one scheduler step).", h_fwd);
    model_histograms(b, m, "moeserve_batch_tokens", "Tokens in one forward pass (decode tokens plus prompt chunks).", h_batch);
    PER_MODEL(b, m, "moeserve_queue_depth", "gauge", "Requests waiting for a sequence slot or KV blocks.", "%d", mm->queue_depth);
    PER_MODEL(b, m, "moeserve_running_sequences", "gauge", "Sequences in the batch (prefilling or decoding).", "%d", mm->running);
    PER_MODEL(b, m, "moeserve_kv_cache_blocks_used", "gauge", "KV cache blocks held by sequences.", "%d", mm->kv_blocks_used);
    PER_MODEL(b, m, "moeserve_kv_cache_blocks_capacity", "gauge", "KV cache blocks in the pool.", "%d", mm->kv_blocks_total);
    PER_MODEL(b, m, "moeserve_kv_cache_usage_ratio", "gauge", "Fraction of the KV cache pool in use (0-1).", "%.6g",
              mm->kv_blocks_total ? (double)mm->kv_blocks_used / mm->kv_blocks_total : 0.0);
    PER_MODEL(b, m, "moeserve_kv_cache_size_bytes", "gauge", "Bytes of the KV cache pool.", "%zu", mm->kv_bytes);
    PER_MODEL(b, m, "moeserve_prompt_tokens_total", "counter", "Prompt tokens processed.", "%llu", (unsigned long long)mm->prompt_tokens);
    PER_MODEL(b, m, "moeserve_generated_tokens_total", "counter", "Tokens generated.", "%llu", (unsigned long long)mm->generated_tokens);
    PER_MODEL(b, m, "moeserve_steps_total", "counter", "Forward passes run by the scheduler.", "%llu", (unsigned long long)mm->steps);
    PER_MODEL(b, m, "moeserve_model_loaded", "gauge", "1 once the model is loaded and its scheduler runs.", "%d", mm->loaded);
    PER_MODEL(b, m, "moeserve_model_load_seconds", "gauge", "Time the model took to load.", "%.6g", mm->load_seconds);

    family(b, "moeserve_forward_phase_seconds_total", "counter",
           "Time of the forward passes by phase (projections, attention, routing, experts, combine, logits, other).");
    for (int i = 0; i < m->n_models; i++)
        for (int p = 0; p < MOE_PHASE_COUNT; p++)
            sb_printf(b, "moeserve_forward_phase_seconds_total{model=\"%s\",phase=\"%s\"} %.9g\n",
                      m->models[i].name, moe_phase_name((moe_phase)p), m->models[i].phase_seconds[p]);

    family(b, "moeserve_sequences_finished_total", "counter", "Sequences finished, by reason.");
    for (int i = 0; i < m->n_models; i++)
        for (int f = 0; f < FIN_COUNT; f++)
            sb_printf(b, "moeserve_sequences_finished_total{model=\"%s\",reason=\"%s\"} %llu\n",
                      m->models[i].name, finish_names[f], (unsigned long long)m->models[i].finished[f]);

    family(b, "moeserve_expert_tokens_total", "counter", "Tokens routed to each expert, by model, layer and expert.");
    for (int i = 0; i < m->n_models; i++) {
        const model_metrics *mm = &m->models[i];
        for (int l = 0; l < mm->n_layer; l++)
            for (int e = 0; e < mm->n_expert; e++)
                sb_printf(b, "moeserve_expert_tokens_total{model=\"%s\",layer=\"%d\",expert=\"%d\"} %llu\n",
                          mm->name, l, e, (unsigned long long)mm->expert_routed[(size_t)l * mm->n_expert + e]);
    }
    family(b, "moeserve_expert_dropped_tokens_total", "counter", "Tokens dropped by an expert's capacity limit, by model, layer and expert.");
    for (int i = 0; i < m->n_models; i++) {
        const model_metrics *mm = &m->models[i];
        for (int l = 0; l < mm->n_layer; l++)
            for (int e = 0; e < mm->n_expert; e++)
                sb_printf(b, "moeserve_expert_dropped_tokens_total{model=\"%s\",layer=\"%d\",expert=\"%d\"} %llu\n",
                          mm->name, l, e, (unsigned long long)mm->expert_dropped[(size_t)l * mm->n_expert + e]);
    }
}

void metrics_ensemble(metrics *m, int method, int labels, const int *models, const uint64_t *overruled,
                      int n_members, const float *agreement, int n_agree)
{
    if (method < 0 || method > 2) return;
    pthread_mutex_lock(&m->mu);
    m->ens_requests[method][labels ? 1 : 0]++;
    for (int i = 0; i < n_members; i++)
        if (models[i] >= 0 && models[i] < m->n_models) m->models[models[i]].ens_overruled += overruled[i];
    for (int k = 0; k < n_agree; k++) histogram_observe(&m->ens_agreement, agreement[k]);
    pthread_mutex_unlock(&m->mu);
}

static void render_ensembles(sbuf *b, const metrics *m)
{
    family(b, "moeserve_ensemble_requests_total", "counter", "Ensemble and label-scoring requests answered, by method and kind.");
    for (int k = 0; k < 3; k++)
        for (int l = 0; l < 2; l++)
            sb_printf(b, "moeserve_ensemble_requests_total{method=\"%s\",kind=\"%s\"} %llu\n", method_names[k],
                      l ? "labels" : "generate", (unsigned long long)m->ens_requests[k][l]);
    family(b, "moeserve_ensemble_agreement_ratio", "histogram",
           "Share of ensemble weight whose own choice won, per generated position or label decision.");
    histogram_render(b, "moeserve_ensemble_agreement_ratio", "", &m->ens_agreement);
    PER_MODEL(b, m, "moeserve_ensemble_overrules_total", "counter",
              "Ensemble positions (or label decisions) where this member's own choice lost.", "%llu",
              (unsigned long long)mm->ens_overruled);
}

int metrics_render(metrics *m, char **out, size_t *len)
{
    sbuf b = {malloc(16384), 0, 16384, 0};
    if (!b.p) return -1;
    pthread_mutex_lock(&m->mu);
    render_requests(&b, m);
    render_models(&b, m);
    render_ensembles(&b, m);
    family(&b, "moeserve_ready", "gauge", "1 when every model is loaded and the server is not draining.");
    sb_printf(&b, "moeserve_ready %d\n", m->ready);
    family(&b, "moeserve_draining", "gauge", "1 after SIGTERM/SIGINT.");
    sb_printf(&b, "moeserve_draining %d\n", m->draining);
    family(&b, "moeserve_start_time_seconds", "gauge", "Unix time the process started.");
    sb_printf(&b, "moeserve_start_time_seconds %.3f\n", m->start_time);
    pthread_mutex_unlock(&m->mu);
    if (b.oom) { free(b.p); return -1; }
    *out = b.p;
    *len = b.len;
    return 0;
}
