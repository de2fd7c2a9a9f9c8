/* ensemble_req.h -- "ensemble" and "labels" requests: parsing, the group that
 * keeps the members of one request in step across schedulers, and the response.
 *
 *   loop thread:  ens_parse (from api_parse_infer) -> ens_group_create -> ens_group_submit
 *   schedulers:   ens_group_arrive / ens_group_poll / ens_group_member_done
 *   loop thread:  ens_infer_response, ens_group_record_metrics, ens_group_free
 *
 * One sequence per member runs in its model's scheduler with its own KV cache.
 * When a member's sampling row is ready it arrives (the row is copied into the
 * core ensemble) and parks; the last member to arrive combines the rows
 * (ensemble_step), records the votes and hands the chosen token to every member,
 * which each apply in their own scheduler thread. Every member applies the same
 * token with the same stop strings and limits, so they finish together.
 * The formulas are core/ensemble.c's (docs/ENSEMBLES.md).
 */
#ifndef MOE_SERVER_ENSEMBLE_REQ_H
#define MOE_SERVER_ENSEMBLE_REQ_H

#include <jansson.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "core/ensemble.h"
#include "server/api.h"
#include "server/metrics.h"
#include "server/scheduler.h"

#define ENS_MAX_LABEL_BYTES 256
#define ENS_MAX_LABEL_TOKENS 64

/* A validated "ensemble"/"labels" part of a request. */
typedef struct ens_spec {
    int n;                              /* members */
    int model[ENSEMBLE_MAX_MEMBERS];    /* indices into the api_model array */
    double weight[ENSEMBLE_MAX_MEMBERS];
    ensemble_method method;
    int explicit_ensemble;              /* "ensemble" was given (else labels on one model) */
    int n_labels;                       /* 0: generation */
    char **labels;                      /* (n_labels) owned */
    int32_t **label_tok;                /* (n_labels) ids of label_prefix + label, owned */
    int *label_n;                       /* (n_labels) */
    int max_label_n;
} ens_spec;

/* Reads "ensemble", "labels" and "label_prefix" from a request object. *out stays
 * NULL when the request has neither; q->model is the member 0's model after it.
 * Returns 0 or an HTTP status with a message. Needs q's prompt, model and spec
 * already parsed (labels are tokenised with the prompt's tokenizer). */
int ens_parse(json_t *o, const api_model *models, int n_models, api_infer *q, ens_spec **out,
              char *err, size_t errlen);
void ens_spec_free(ens_spec *s);
/* Before the prompt is parsed: the first member's model (its tokenizer reads the
 * prompt), when "ensemble" names a known one; *model unchanged otherwise. */
void ens_first_member(json_t *o, const api_model *models, int n_models, int *model);

typedef struct ens_group ens_group;

/* Creates the group (taking *spec over) and one request per member into reqs
 * (base: the request's prompt and settings). Returns 0 or an HTTP status with a
 * message. */
int ens_group_create(ens_spec **spec, const api_model *models, sched *const *scheds,
                     const sched_spec *base, ens_group **out, sched_req **reqs, char *err, size_t errlen);
int ens_group_n_members(const ens_group *g);
/* Submits the members to their schedulers; returns how many were taken (all or,
 * after a full queue, the first ones: the group is then closed with 503 so they
 * come back at once). *full: the model whose queue was full, else -1. */
int ens_group_submit(ens_group *g, sched_req **reqs, int n, int *full);
void ens_group_free(ens_group *g);

/* Scheduler side (any scheduler thread). -------------------------------------- */

enum { ENS_PARKED = 0, ENS_TOKEN = 1, ENS_IDLE = 2, ENS_LABELS_DONE = 3 };

/* Member's sampling row is ready: copies it. Returns ENS_PARKED, or ENS_TOKEN
 * with *token (this call was the last to arrive and combined the rows), or -1
 * with a message (the group is closed). */
int ens_group_arrive(ens_group *g, int member, const float *row, const int32_t *history,
                     size_t n_history, int32_t *token, char *err, size_t errlen);
/* Label scoring: member's ens_group_label_lp row is complete; the last member
 * to arrive combines them. 0 or -1 with a message. */
int ens_group_arrive_labels(ens_group *g, int member, char *err, size_t errlen);
/* ENS_PARKED (still waiting), ENS_TOKEN (a combined token for this member, now
 * running again) or ENS_IDLE (running, nothing pending). */
int ens_group_poll(ens_group *g, int member, int32_t *token);
/* The group's message when it was closed (a member failed, was cancelled, or
 * finished): the member should finish with *status and *fin. NULL while open. */
const char *ens_group_closed(ens_group *g, int *status, finish_kind *fin);
/* A member left its scheduler (any outcome): closes the group and wakes the
 * members still inside so they leave too. */
void ens_group_member_done(ens_group *g, int member, int status, finish_kind fin, const char *msg);

/* Label scoring for the scheduler: the labels' token ids and each member's
 * accumulator of their log-probabilities (n_labels, written by its own thread). */
int ens_group_n_labels(const ens_group *g);
const int32_t *ens_group_label(const ens_group *g, int l, int *n);
double *ens_group_label_lp(ens_group *g, int member);

/* Loop thread, after every member came back. ----------------------------------- */

/* The answer of a successful ensemble request (reqs: the members, in order). */
char *ens_infer_response(const ens_group *g, const api_model *models, const char *id,
                         sched_req *const *reqs, size_t *len);
void ens_group_record_metrics(const ens_group *g, metrics *m);

#endif
