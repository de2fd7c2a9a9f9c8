/* scheduler.h -- continuous batching for one model on its own thread.
 *
 *   sched *s; sched_create(&params, model, metrics, index, notify, ctx, &s, err, sizeof err);
 *   sched_req *r = sched_req_create(hp, &spec, err, sizeof err);   (loop thread)
 *   sched_submit(s, &r, 1, err, sizeof err);   r now belongs to the scheduler
 *   ... notify(ctx) fires (any thread) ...
 *   n = sched_take_done(s, &list);             r is back, outputs filled
 *   sched_req_free(r); sched_free(s);
 *
 * Each step the thread takes every running sequence's next token plus prompt
 * chunks of admitted requests up to max_batch_tokens, runs one moe_engine_forward,
 * samples, and hands finished requests back through a mutex-protected list and the
 * notify callback (uv_async_send: calls coalesce, so the list is what counts).
 * A request is admitted (FIFO) only when a sequence slot and all the KV blocks it
 * can ever need are free, so nothing is allocated per token and nothing is evicted.
 */
#ifndef MOE_SERVER_SCHEDULER_H
#define MOE_SERVER_SCHEDULER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/engine.h"
#include "core/sampler.h"
#include "models/model_file.h"
#include "models/tokenizer.h"
#include "server/metrics.h"

typedef enum { LOGITS_NONE = 0, LOGITS_LAST, LOGITS_ALL } logits_mode;

/* What a request asks for (validated by the API layer). */
typedef struct {
    const int32_t *prompt;      /* (n_prompt) ids, copied */
    int n_prompt;
    int max_tokens;             /* 0: score the prompt only */
    sampler_params sp;
    const char *const *stops;   /* (n_stops), copied */
    int n_stops;
    logits_mode logits;
    int top_n;                  /* 0-20 entries per logits position */
    int full_logits;            /* copy the whole last row */
    int routing;                /* record experts and weights per position */
    double t_arrival;           /* monotonic seconds */
    double deadline;            /* monotonic seconds */
} sched_spec;

#define SCHED_CANCEL_CLIENT 1   /* client went away */

typedef struct sched_req sched_req;
struct sched_req {
    /* Input: fixed before submit. */
    int32_t *seq_tokens;        /* (n_prompt + max_tokens) prompt, then generated */
    int n_prompt, max_tokens, n_reserve;  /* n_reserve: KV positions it may use */
    logits_mode logits;
    int top_n, full_logits, routing;
    double t_arrival, deadline;
    void *owner;                /* the loop's, untouched by the scheduler */
    int index;

    atomic_int cancel;          /* the loop sets SCHED_CANCEL_CLIENT any time */

    /* Output: valid once taken back with sched_take_done. */
    int status;                 /* 200, 499 cancelled, 500 engine error, 503 drained, 504 timeout */
    finish_kind finish;
    char errmsg[320];
    int n_gen;                  /* generated ids in seq_tokens[n_prompt ..] */
    char *text;                 /* (text_len) UTF-8, NUL-terminated, owned */
    size_t text_len, text_cap;
    int n_entries, cap_entries; /* logits positions recorded */
    int32_t *entry_pos;         /* (cap_entries) */
    int32_t *top_ids;           /* (cap_entries, top_n) best first */
    float *top_logits;          /* (cap_entries, top_n) */
    float *top_logprobs;        /* (cap_entries, top_n) log softmax */
    float *full_row;            /* (n_vocab) logits of full_pos, when full_logits */
    int full_pos;
    int n_routed;               /* positions with routing recorded (0 .. n_reserve) */
    int n_layer, n_used;        /* shape of the routing arrays */
    int32_t *route_expert;      /* (n_reserve, n_layer, n_used) */
    float *route_weight;        /* (n_reserve, n_layer, n_used) */
    double t_admit, t_first, t_done;  /* monotonic seconds, 0 = never */

    /* Ensemble member (server/ensemble_req.h): NULL for a single-model request. */
    struct ens_group *ens;
    int ens_member;
    int ens_wait;               /* scheduler's: parked until the other members' rows arrive */
    int ens_label;              /* scheduler's: label being scored (labels requests) */

    /* Scheduler's. */
    int slot, n_past, n_vocab;
    sampler *smp;
    stop_matcher *stopm;
    tokenizer_stream ts;
    sched_req *next;
};

/* Allocates a request and all its outputs for model hp (loop thread). NULL with
 * a message on bad parameters or out of memory. */
sched_req *sched_req_create(const moe_hparams *hp, int max_seq_len, const sched_spec *spec,
                            char *err, size_t errlen);
void sched_req_free(sched_req *r);

typedef struct {
    int n_threads;
    int max_seqs;
    int max_batch_tokens;
    int batch_wait_us;
    int max_seq_len;            /* 0: the model's context */
    long kv_cache_mb;           /* 0: use kv_cache_tokens */
    long kv_cache_tokens;       /* 0 (with mb 0): max_seqs full contexts, at most 1 GiB */
    int max_queue;
    int no_packed;              /* no packed projection copies (--no-packed-projections) */
    kv_type kv_type;            /* the KV cache's elements (--kv-type) */
} sched_params;

typedef void (*sched_notify_fn)(void *ctx);
typedef struct sched sched;

/* Creates the engine for model (borrowed: must outlive s) and starts the thread. */
int sched_create(const sched_params *p, const moe_model *model, metrics *m, int model_index,
                 sched_notify_fn notify, void *notify_ctx, sched **out, char *err, size_t errlen);
/* Stops the thread; requests still inside come back as 503 in the done list:
 * take them before freeing (sched_stop), or they are freed here. */
void sched_stop(sched *s);
void sched_free(sched *s);

/* Hands n requests over, all or none. 0; -1 queue full (--max-queue); -2 stopping. */
int sched_submit(sched *s, sched_req **reqs, int n);
/* Wakes the thread after setting a request's cancel flag. */
void sched_wake(sched *s);
/* Drain deadline: everything still inside comes back with status 503. */
void sched_abort_all(sched *s);
/* Pops the finished requests (a linked list through ->next); returns how many. */
int sched_take_done(sched *s, sched_req **list);

int sched_max_seq_len(const sched *s);
int sched_max_seqs(const sched *s);         /* sequence slots */
int sched_kv_positions(const sched *s);     /* blocks * block size */
const moe_engine *sched_engine(const sched *s);

#endif
