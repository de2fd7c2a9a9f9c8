/* metrics.h -- Prometheus counters, gauges and histograms (text format 0.0.4).
 *
 * One mutex guards everything: the loop thread counts requests, the scheduler
 * threads record their step once per step, and GET /metrics renders a snapshot.
 * Names follow OPERATIONS.md: moeserve_ prefix, base units, counters end _total,
 * bounded labels (model, endpoint, code, layer, expert, reason).
 */
#ifndef MOE_SERVER_METRICS_H
#define MOE_SERVER_METRICS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "core/engine.h"

typedef enum {
    EP_INFER = 0, EP_MODELS, EP_HEALTH, EP_READY, EP_METRICS, EP_OTHER, EP_COUNT
} metrics_endpoint;

typedef enum { FIN_LENGTH = 0, FIN_STOP, FIN_EOS, FIN_CANCELLED, FIN_TIMEOUT, FIN_DRAINED, FIN_ERROR, FIN_COUNT } finish_kind;

#define METRICS_N_CODES 12  /* status codes we answer with, see metrics.c */
#define METRICS_MAX_BUCKETS 24

typedef struct {
    int n_bounds;
    const double *bounds;                        /* upper bounds, ascending */
    uint64_t counts[METRICS_MAX_BUCKETS + 1];    /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
} histogram;

typedef struct {
    char name[72];
    histogram queue_wait, ttft, tpot, forward, batch_tokens, request_tokens;
    uint64_t prompt_tokens, generated_tokens, steps;
    uint64_t finished[FIN_COUNT];
    int queue_depth, running;
    int kv_blocks_used, kv_blocks_total;
    size_t kv_bytes;
    int n_layer, n_expert;       /* 0 until the model is loaded */
    uint64_t *expert_routed;     /* (n_layer, n_expert) snapshot, owned */
    uint64_t *expert_dropped;    /* (n_layer, n_expert) snapshot, owned */
    double phase_seconds[MOE_PHASE_COUNT];   /* forwards' time by phase, snapshot */
    int loaded;
    double load_seconds;
    uint64_t ens_overruled;      /* ensemble positions where this member's choice lost */
} model_metrics;

typedef struct {
    pthread_mutex_t mu;
    uint64_t requests[EP_COUNT][METRICS_N_CODES];
    histogram duration[EP_COUNT];
    model_metrics *models;       /* (n_models) */
    int n_models;
    int ready, draining;
    double start_time;           /* unix seconds */
    uint64_t ens_requests[3][2]; /* ensemble requests by method (core ensemble_method) x (generate, labels) */
    histogram ens_agreement;     /* per combined position or label decision */
} metrics;

int metrics_create(metrics **out, const char *const *model_names, int n_models);
void metrics_free(metrics *m);

void histogram_observe(histogram *h, double v);

/* Loop thread: one answered request. */
void metrics_request(metrics *m, metrics_endpoint ep, int status, double seconds);
/* After a model loaded: sizes the expert snapshot. */
int metrics_model_loaded(metrics *m, int model, int n_layer, int n_expert, int kv_blocks_total,
                         size_t kv_bytes, double load_seconds);
void metrics_set_state(metrics *m, int ready, int draining);

/* Loop thread: one finished ensemble (or labels) request: its members' model
 * indices and overrule counts, and the agreement of each position (n_agree). */
void metrics_ensemble(metrics *m, int method, int labels, const int *models, const uint64_t *overruled,
                      int n_members, const float *agreement, int n_agree);

/* Renders the text format into a malloc'd buffer (*len bytes). 0 or -1. */
int metrics_render(metrics *m, char **out, size_t *len);

#endif
