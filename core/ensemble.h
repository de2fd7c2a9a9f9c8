/* ensemble.h -- combine several models' next-token distributions (or label scores)
 * into one choice, and say how much the members agreed.
 *
 *   ensemble *e;
 *   ensemble_create(2, n_vocab, names, weights, ENSEMBLE_VOTE, &sp, &e, err, sizeof err);
 *   per generated position:
 *       ensemble_set_row(e, 0, logits_of_a); ensemble_set_row(e, 1, logits_of_b);
 *       ensemble_step(e, history, n_history, &res, err, sizeof err);
 *       append res.token to every member's sequence
 *   ensemble_summary_get(e, &sum);   // mean agreement, overrules per member
 *   ensemble_free(e);
 *
 * One ensemble per request: it owns the request's RNG (the sampler's, same seed ->
 * same tokens) and scratch sized at create, so a step allocates nothing. Members
 * must share one vocabulary; checking that is the caller's job. Pure math: no
 * I/O, no JSON. The exact formulas are in docs/ENSEMBLES.md.
 *
 * Not thread-safe: when members run on different scheduler threads, the caller
 * serialises set_row/step on one ensemble (a mutex per request is enough).
 */
#ifndef MOE_CORE_ENSEMBLE_H
#define MOE_CORE_ENSEMBLE_H

#include <stddef.h>
#include <stdint.h>

#include "core/sampler.h"

#define ENSEMBLE_MAX_MEMBERS 16
#define ENSEMBLE_MAX_LABELS 256
#define ENSEMBLE_NAME_MAX 64          /* member names are kept (truncated) for messages */

typedef enum {
    ENSEMBLE_MEAN_PROB,     /* p = sum_i w_i softmax(z_i) */
    ENSEMBLE_MEAN_LOGPROB,  /* log q = sum_i w_i log_softmax(z_i), renormalised */
    ENSEMBLE_VOTE,          /* each member's own choice is a vote with its weight */
} ensemble_method;

/* "mean_prob", "mean_logprob", "vote". */
int ensemble_method_parse(const char *name, ensemble_method *out, char *err, size_t errlen);
const char *ensemble_method_name(ensemble_method m);

/* One member's part in a step (or in a label decision). */
typedef struct {
    int32_t token;     /* its own choice: argmax (mean methods, greedy vote) or its draw (vote) */
    float own_prob;    /* its probability of its own choice */
    float prob;        /* its probability of the chosen token */
    float weight;      /* normalised weight (the weights sum to 1) */
    int agrees;        /* token == chosen */
} ensemble_member_vote;

typedef struct {
    int32_t token;     /* the chosen token */
    float prob;        /* the combined distribution's probability of it (before top-k/p/min-p) */
    float agreement;   /* share of weight whose own choice is the chosen token, in [0, 1] */
    const ensemble_member_vote *members;  /* (n_members), owned by the ensemble, valid until the next step */
} ensemble_result;

typedef struct {
    uint64_t steps;             /* positions (and label decisions) combined so far */
    double mean_agreement;      /* mean of the steps' agreement (0 before any step) */
    const uint64_t *overruled;  /* (n_members) steps where the member's own choice lost */
} ensemble_summary;

typedef struct ensemble ensemble;

/* Lifecycle ---------------------------------------------------------------- */

/* names: (n_members) member names for messages, NULL or NULL entries allowed.
 * weights: (n_members) finite, >= 0, not all zero; normalised to sum 1.
 * sp: the request's sampling settings (validated; temperature 0 = greedy). */
int ensemble_create(int n_members, int n_vocab, const char *const *names, const double *weights,
                    ensemble_method method, const sampler_params *sp, ensemble **out,
                    char *err, size_t errlen);
void ensemble_free(ensemble *e);
int ensemble_n_members(const ensemble *e);
int ensemble_n_vocab(const ensemble *e);
ensemble_method ensemble_get_method(const ensemble *e);
/* Normalised weight of member i. */
double ensemble_weight(const ensemble *e, int member);

/* Token steps -------------------------------------------------------------- */

/* Copies member i's logits row (n_vocab floats) for the coming step; rows may
 * arrive in any order (members run in different batches). */
int ensemble_set_row(ensemble *e, int member, const float *logits, char *err, size_t errlen);
/* Combines the rows set since the last step and chooses the token. history: the
 * sequence so far (prompt + generated) for the repetition penalty, applied to
 * each member's logits as the sampler does. Fails when a member's row is missing. */
int ensemble_step(ensemble *e, const int32_t *history, size_t n_history, ensemble_result *out,
                  char *err, size_t errlen);
/* ensemble_set_row for every member (rows: (n_members) pointers), then ensemble_step. */
int ensemble_step_rows(ensemble *e, const float *const *rows, const int32_t *history,
                       size_t n_history, ensemble_result *out, char *err, size_t errlen);

/* The last step's distributions as log-probabilities (-inf for impossible
 * tokens): member -1 is the combination, 0..n_members-1 a member's own. After
 * penalty and temperature (temperature 0 uses 1), before top-k/top-p/min-p; for
 * vote the combination is the mean_prob distribution (its tie-break). Computed on
 * request from the step's state, so a step that nobody asks about pays no logs. */
double ensemble_logprob(const ensemble *e, int member, int32_t token);
/* The whole row into out (n_vocab floats); -1 before the first step or for a bad member. */
int ensemble_logprobs(const ensemble *e, int member, float *out);
/* The n most probable tokens (member as above), best first, lower id on ties.
 * Returns how many were written (min(n, n_vocab); 0 before the first step or for
 * a bad member). */
int ensemble_top(const ensemble *e, int member, int n, int32_t *ids, float *logprobs);

void ensemble_summary_get(const ensemble *e, ensemble_summary *out);

/* Label scoring (classification) ------------------------------------------- */

typedef struct {
    int label;                    /* chosen label index */
    float agreement;              /* share of weight whose own pick is the chosen label */
    const double *label_probs;    /* (n_labels) combined distribution over the labels */
    const double *member_probs;   /* (n_members, n_labels) each member's softmax over labels */
    const ensemble_member_vote *members;  /* (n_members) token = the member's pick (a label index) */
} ensemble_label_result;

/* logprob: (n_members, n_labels), member i's total log-probability of label l's
 * tokens as a continuation of the prompt. Combines with the ensemble's method and
 * weights (no temperature); counts as one step in the summary. Results point into
 * the ensemble and stay valid until the next call. */
int ensemble_labels(ensemble *e, int n_labels, const double *logprob, ensemble_label_result *out,
                    char *err, size_t errlen);

/* Checks a label list: not empty, at most ENSEMBLE_MAX_LABELS, no empty or
 * duplicate label (message names both indices). */
int ensemble_labels_check(const char *const *labels, size_t n_labels, char *err, size_t errlen);
/* Checks the labels' token sequences: none empty, no two equal (labels, for the
 * message, may be NULL). */
int ensemble_label_tokens_check(const int32_t *const *tokens, const size_t *n_tokens, size_t n_labels,
                                const char *const *labels, char *err, size_t errlen);
/* log softmax(logits)[token] of one raw logits row (temperature 1), computed
 * stably in double; -inf for a token out of range. Summed over a label's tokens it
 * gives the label's log-probability. */
double ensemble_row_logprob(const float *logits, int n_vocab, int32_t token);

#endif
