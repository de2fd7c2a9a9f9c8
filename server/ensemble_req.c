/* ensemble_req.c -- ensembles and label scoring in the server (see ensemble_req.h). */
#include "server/ensemble_req.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/tokenizer.h"

/* Parsing ------------------------------------------------------------------------ */

static int failf(char *err, size_t errlen, int status, const char *fmt, const char *a)
{
    snprintf(err, errlen, fmt, a);
    return status;
}

void ens_spec_free(ens_spec *s)
{
    if (!s) return;
    for (int l = 0; l < s->n_labels; l++) {
        if (s->labels) free(s->labels[l]);
        if (s->label_tok) free(s->label_tok[l]);
    }
    free(s->labels);
    free(s->label_tok);
    free(s->label_n);
    free(s);
}

static int find_model(const api_model *models, int n_models, const char *name)
{
    for (int i = 0; i < n_models; i++)
        if (!strcmp(models[i].name, name)) return i;
    return -1;
}

void ens_first_member(json_t *o, const api_model *models, int n_models, int *model)
{
    json_t *m0 = json_array_get(json_object_get(json_object_get(o, "ensemble"), "members"), 0);
    json_t *name = json_object_get(m0, "model");
    int k = json_is_string(name) ? find_model(models, n_models, json_string_value(name)) : -1;
    if (k >= 0 && models[k].model) *model = k;
}

/* Members must share one vocabulary: same size, same tokenizer fingerprint. */
static int same_vocab(const moe_model *a, const moe_model *b)
{
    if (a->weights.hp.n_vocab != b->weights.hp.n_vocab) return 0;
    if (!a->tokenizer != !b->tokenizer) return 0;
    return !a->tokenizer || tokenizer_fingerprint(a->tokenizer) == tokenizer_fingerprint(b->tokenizer);
}

static int parse_members(json_t *ens, const api_model *models, int n_models, ens_spec *s,
                         char *err, size_t errlen)
{
    json_t *mem = json_object_get(ens, "members"), *meth = json_object_get(ens, "method");
    const char *key;
    json_t *v;
    json_object_foreach(ens, key, v) {
        if (strcmp(key, "members") && strcmp(key, "method"))
            return failf(err, errlen, 400, "unknown field in 'ensemble': give 'members' and 'method'%s", "");
    }
    if (!json_is_array(mem) || json_array_size(mem) == 0 || json_array_size(mem) > ENSEMBLE_MAX_MEMBERS) {
        snprintf(err, errlen, "'ensemble.members' must be an array of 1 to %d {\"model\": name, \"weight\": w}",
                 ENSEMBLE_MAX_MEMBERS);
        return 400;
    }
    if (meth) {
        char merr[160];
        if (!json_is_string(meth) || ensemble_method_parse(json_string_value(meth), &s->method, merr, sizeof merr))
            return failf(err, errlen, 400, "'ensemble.method' must be \"mean_prob\", \"mean_logprob\" or \"vote\"%s", "");
    } else {
        s->method = ENSEMBLE_MEAN_PROB;
    }
    s->n = (int)json_array_size(mem);
    for (int i = 0; i < s->n; i++) {
        json_t *m = json_array_get(mem, (size_t)i), *name = json_object_get(m, "model"), *w = json_object_get(m, "weight");
        if (!json_is_object(m) || !json_is_string(name) || json_object_size(m) > 2 || (json_object_size(m) == 2 && !w)) {
            snprintf(err, errlen, "'ensemble.members'[%d] must be {\"model\": name, \"weight\": w} (weight optional, default 1)", i);
            return 400;
        }
        int k = find_model(models, n_models, json_string_value(name));
        if (k < 0) {
            char nm[72];
            size_t n;
            char *c = api_utf8_clean(json_string_value(name), json_string_length(name) > 64 ? 64 : json_string_length(name), &n);
            snprintf(nm, sizeof nm, "%s", c ? c : "?");
            free(c);
            snprintf(err, errlen, "'ensemble.members'[%d]: unknown model '%s' (GET /models lists them)", i, nm);
            return 400;
        }
        if (!models[k].model) return failf(err, errlen, 503, "model '%s' is still loading; retry shortly", models[k].name);
        double wt = 1.0;
        if (w) {
            if (!json_is_number(w) || !isfinite(json_number_value(w)) || json_number_value(w) < 0) {
                snprintf(err, errlen, "'ensemble.members'[%d].weight must be a finite number >= 0", i);
                return 400;
            }
            wt = json_number_value(w);
        }
        s->model[i] = k;
        s->weight[i] = wt;
        if (!same_vocab(models[s->model[0]].model, models[k].model)) {
            snprintf(err, errlen, "models '%s' and '%s' do not share a vocabulary (size or tokenizer fingerprint "
                     "differ, see GET /models): an ensemble needs the same tokens in the same order",
                     models[s->model[0]].name, models[k].name);
            return 400;
        }
    }
    double sum = 0;
    for (int i = 0; i < s->n; i++) sum += s->weight[i];
    if (!(sum > 0)) return failf(err, errlen, 400, "'ensemble.members' weights are all zero: give at least one a positive weight%s", "");
    s->explicit_ensemble = 1;
    return 0;
}

static int parse_labels(json_t *o, const api_model *am, ens_spec *s, char *err, size_t errlen)
{
    json_t *labels = json_object_get(o, "labels"), *prefix = json_object_get(o, "label_prefix");
    if (prefix && !labels) return failf(err, errlen, 400, "'label_prefix' needs 'labels'%s", "");
    if (!labels) return 0;
    if (!json_is_array(labels))
        return failf(err, errlen, 400, "'labels' must be an array of strings (the classes to score)%s", "");
    size_t L = json_array_size(labels);
    if (L == 0) return failf(err, errlen, 400, "'labels' is empty: give at least one label to score%s", "");
    if (L > ENSEMBLE_MAX_LABELS) {
        snprintf(err, errlen, "'labels' has %zu entries, at most %d", L, ENSEMBLE_MAX_LABELS);
        return 400;
    }
    if (prefix && (!json_is_string(prefix) || json_string_length(prefix) > ENS_MAX_LABEL_BYTES ||
                   strlen(json_string_value(prefix)) != json_string_length(prefix))) {
        snprintf(err, errlen, "'label_prefix' must be a string of at most %d bytes", ENS_MAX_LABEL_BYTES);
        return 400;
    }
    const moe_tokenizer *tok = am->model->tokenizer;
    if (!tok) return failf(err, errlen, 400, "model '%s' has no tokenizer: labels need one", am->name);
    s->labels = calloc(L, sizeof *s->labels);
    s->label_tok = calloc(L, sizeof *s->label_tok);
    s->label_n = calloc(L, sizeof *s->label_n);
    if (!s->labels || !s->label_tok || !s->label_n) return failf(err, errlen, 500, "out of memory%s", "");
    s->n_labels = (int)L;
    const char *pre = prefix ? json_string_value(prefix) : "";
    size_t pl = strlen(pre);
    for (size_t l = 0; l < L; l++) {
        json_t *v = json_array_get(labels, l);
        if (!json_is_string(v) || json_string_length(v) > ENS_MAX_LABEL_BYTES ||
            strlen(json_string_value(v)) != json_string_length(v)) {
            snprintf(err, errlen, "'labels'[%zu] must be a string of at most %d bytes", l, ENS_MAX_LABEL_BYTES);
            return 400;
        }
        if (!(s->labels[l] = strdup(json_string_value(v)))) return failf(err, errlen, 500, "out of memory%s", "");
    }
    char cerr[300];
    if (ensemble_labels_check((const char *const *)s->labels, L, cerr, sizeof cerr))
        return failf(err, errlen, 400, "'labels': %s", cerr);
    char text[2 * ENS_MAX_LABEL_BYTES + 1];
    for (size_t l = 0; l < L; l++) {
        size_t ll = strlen(s->labels[l]), n = 0;
        memcpy(text, pre, pl);
        memcpy(text + pl, s->labels[l], ll);
        int32_t *ids = NULL;
        if (tokenizer_encode(tok, text, pl + ll, 0, &ids, &n, cerr, sizeof cerr)) {
            snprintf(err, errlen, "'labels'[%zu] cannot be tokenized: %s", l, cerr);
            return 400;
        }
        s->label_tok[l] = ids;
        if (n > ENS_MAX_LABEL_TOKENS) {
            snprintf(err, errlen, "'labels'[%zu] is %zu tokens (with the prefix); at most %d", l, n, ENS_MAX_LABEL_TOKENS);
            return 400;
        }
        s->label_n[l] = (int)n;
        if ((int)n > s->max_label_n) s->max_label_n = (int)n;
    }
    size_t nt[ENSEMBLE_MAX_LABELS];
    for (size_t l = 0; l < L; l++) nt[l] = (size_t)s->label_n[l];
    if (ensemble_label_tokens_check((const int32_t *const *)s->label_tok, nt, L, (const char *const *)s->labels,
                                    cerr, sizeof cerr))
        return failf(err, errlen, 400, "'labels': %s", cerr);
    return 0;
}

int ens_parse(json_t *o, const api_model *models, int n_models, api_infer *q, ens_spec **out,
              char *err, size_t errlen)
{
    *out = NULL;
    json_t *ens = json_object_get(o, "ensemble");
    if (!ens && !json_object_get(o, "labels") && !json_object_get(o, "label_prefix")) return 0;
    ens_spec *s = calloc(1, sizeof *s);
    if (!s) return failf(err, errlen, 500, "out of memory%s", "");
    int rc = 0;
    if (ens) {
        if (json_object_get(o, "model"))
            rc = failf(err, errlen, 400, "give either 'model' or 'ensemble' (its members name the models)%s", "");
        else if (!json_is_object(ens))
            rc = failf(err, errlen, 400, "'ensemble' must be {\"members\": [...], \"method\": ...}%s", "");
        else
            rc = parse_members(ens, models, n_models, s, err, errlen);
    } else {
        s->n = 1;
        s->model[0] = q->model;
        s->weight[0] = 1.0;
        s->method = ENSEMBLE_MEAN_PROB;
    }
    if (!rc) {
        q->model = s->model[0];
        rc = parse_labels(o, &models[q->model], s, err, errlen);
    }
    if (!rc && q->multi) rc = failf(err, errlen, 400, "'ensemble' and 'labels' take one 'prompt' (or 'tokens'), not 'prompts'%s", "");
    if (!rc && (q->spec.logits == LOGITS_ALL || q->spec.full_logits || q->spec.routing))
        rc = failf(err, errlen, 400, "with 'ensemble' or 'labels', 'logits' may be \"last\" (no \"all\", 'full_logits' "
                   "or 'routing': ask each model alone for those)%s", "");
    if (!rc && s->n_labels && q->spec.logits != LOGITS_NONE)
        rc = failf(err, errlen, 400, "'labels' returns label probabilities: leave 'logits' out%s", "");
    if (rc) {
        ens_spec_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* The group -------------------------------------------------------------------------- */

struct ens_group {
    pthread_mutex_t mu;
    ens_spec *spec;
    ensemble *e;
    int n;
    sched *sc[ENSEMBLE_MAX_MEMBERS];
    /* Guarded by mu. */
    int n_arrived;
    int parked[ENSEMBLE_MAX_MEMBERS], pending[ENSEMBLE_MAX_MEMBERS], done[ENSEMBLE_MAX_MEMBERS];
    int32_t token;
    int closed, close_status;
    finish_kind close_fin;
    char close_msg[320];
    /* Votes per generated position (written by the last member to arrive). */
    int max_steps, n_steps;
    int32_t *chosen;
    float *prob, *agreement;
    ensemble_member_vote *votes;  /* (max_steps, n) */
    /* "logits": "last": the last step's top entries, combined (row 0) and per member. */
    int top_n, n_top[ENSEMBLE_MAX_MEMBERS + 1];
    int32_t *top_ids;             /* (n + 1, top_n) */
    float *top_lp;
    /* Labels. */
    double *label_lp;             /* (n, n_labels) */
    int n_label_arrived, labels_done;
    int label;
    float label_agreement;
    double *label_probs;          /* (n_labels) */
    double *member_probs;         /* (n, n_labels) */
    ensemble_member_vote label_votes[ENSEMBLE_MAX_MEMBERS];
};

int ens_group_n_members(const ens_group *g) { return g->n; }
int ens_group_n_labels(const ens_group *g) { return g->spec->n_labels; }
const int32_t *ens_group_label(const ens_group *g, int l, int *n)
{
    *n = g->spec->label_n[l];
    return g->spec->label_tok[l];
}
double *ens_group_label_lp(ens_group *g, int member)
{
    return g->label_lp + (size_t)member * (size_t)g->spec->n_labels;
}

void ens_group_free(ens_group *g)
{
    if (!g) return;
    pthread_mutex_destroy(&g->mu);
    if (g->e) ensemble_free(g->e);
    ens_spec_free(g->spec);
    free(g->chosen); free(g->prob); free(g->agreement); free(g->votes);
    free(g->top_ids); free(g->top_lp);
    free(g->label_lp); free(g->label_probs); free(g->member_probs);
    free(g);
}

/* A model named k times runs k sequences that wait for each other: all of them
 * must fit its slots and KV pool at once, or they would wait forever. Each needs
 * `need` positions, rounded up to whole KV blocks as admission counts them.
 * Returns 0, or 400/413 with the message in err. */
static int member_fits(const ens_spec *spec, int i, const api_model *am, const sched *sc, long need, char *err,
                       size_t errlen)
{
    int k = 0;
    for (int j = 0; j < spec->n; j++) k += spec->model[j] == spec->model[i];
    if (k > sched_max_seqs(sc)) {
        snprintf(err, errlen, "model '%s' appears %d times in the ensemble but has %d sequence slots (--max-seqs): "
                 "name it fewer times", am->name, k, sched_max_seqs(sc));
        return 400;
    }
    long bs = moe_engine_kv_block_size(sched_engine(sc));
    long positions = (need + bs - 1) / bs * bs * k;
    if (positions <= am->kv_positions) return 0;
    if (k == 1)
        snprintf(err, errlen, "the request needs %ld KV cache positions but model '%s' holds %d", positions, am->name,
                 am->kv_positions);
    else
        snprintf(err, errlen, "model '%s' appears %d times in the ensemble: its %d sequences need %ld KV cache "
                 "positions at once, the model holds %d (fewer copies or tokens, or a larger pool)", am->name, k, k,
                 positions, am->kv_positions);
    return 413;
}

int ens_group_create(ens_spec **specp, const api_model *models, sched *const *scheds,
                     const sched_spec *base, ens_group **out, sched_req **reqs, char *err, size_t errlen)
{
    ens_spec *spec = *specp;
    *out = NULL;
    ens_group *g = calloc(1, sizeof *g);
    if (!g) return failf(err, errlen, 500, "out of memory%s", "");
    pthread_mutex_init(&g->mu, NULL);
    g->spec = spec;
    *specp = NULL;
    g->n = spec->n;
    const char *names[ENSEMBLE_MAX_MEMBERS];
    int max_seq_len = 1 << 30;
    for (int i = 0; i < g->n; i++) {
        const api_model *am = &models[spec->model[i]];
        names[i] = am->name;
        g->sc[i] = scheds[spec->model[i]];
        if (am->max_seq_len < max_seq_len) max_seq_len = am->max_seq_len;
    }
    int V = models[spec->model[0]].model->weights.hp.n_vocab;
    char eerr[256];
    if (ensemble_create(g->n, V, names, spec->weight, spec->method, &base->sp, &g->e, eerr, sizeof eerr)) {
        ens_group_free(g);
        return failf(err, errlen, 400, "ensemble: %s", eerr);
    }
    sched_spec sp = *base;
    int L = spec->n_labels;
    if (L) {
        sp.max_tokens = spec->max_label_n;   /* KV for the prompt and the longest label */
        sp.n_stops = 0;
        sp.logits = LOGITS_NONE;
    } else {
        g->max_steps = base->max_tokens;
        if (base->logits == LOGITS_LAST) g->top_n = base->top_n;
        sp.logits = LOGITS_NONE;              /* the group records the combined entries */
    }
    if (L && (long)sp.n_prompt + spec->max_label_n - 1 > max_seq_len) {
        ens_group_free(g);
        return failf(err, errlen, 413, "the prompt and the longest label do not fit the context%s", "");
    }
    size_t ms = (size_t)(g->max_steps > 0 ? g->max_steps : 1);
    g->chosen = calloc(ms, sizeof *g->chosen);
    g->prob = calloc(ms, sizeof *g->prob);
    g->agreement = calloc(ms, sizeof *g->agreement);
    g->votes = calloc(ms * (size_t)g->n, sizeof *g->votes);
    size_t tn = (size_t)(g->n + 1) * (size_t)(g->top_n > 0 ? g->top_n : 1);
    g->top_ids = calloc(tn, sizeof *g->top_ids);
    g->top_lp = calloc(tn, sizeof *g->top_lp);
    size_t ln = (size_t)(L > 0 ? L : 1);
    g->label_lp = calloc(ln * (size_t)g->n, sizeof *g->label_lp);
    g->label_probs = calloc(ln, sizeof *g->label_probs);
    g->member_probs = calloc(ln * (size_t)g->n, sizeof *g->member_probs);
    if (!g->chosen || !g->prob || !g->agreement || !g->votes || !g->top_ids || !g->top_lp || !g->label_lp ||
        !g->label_probs || !g->member_probs) {
        ens_group_free(g);
        return failf(err, errlen, 500, "out of memory%s", "");
    }
    long need = (long)sp.n_prompt + (sp.max_tokens > 0 ? sp.max_tokens - 1 : 0);
    if (need > max_seq_len) need = max_seq_len;
    for (int i = 0; i < g->n; i++) {
        const api_model *am = &models[spec->model[i]];
        int status = member_fits(spec, i, am, g->sc[i], need, err, errlen);
        if (status) {
            for (int j = 0; j < i; j++) sched_req_free(reqs[j]);
            ens_group_free(g);
            return status;
        }
        reqs[i] = sched_req_create(&am->model->weights.hp, max_seq_len, &sp, err, errlen);
        if (!reqs[i]) {
            for (int j = 0; j < i; j++) sched_req_free(reqs[j]);
            ens_group_free(g);
            return 400;
        }
        reqs[i]->ens = g;
        reqs[i]->ens_member = i;
        reqs[i]->index = i;
    }
    *out = g;
    return 0;
}

static void close_locked(ens_group *g, int status, finish_kind fin, const char *msg)
{
    if (g->closed) return;
    g->closed = 1;
    g->close_status = status;
    g->close_fin = fin;
    snprintf(g->close_msg, sizeof g->close_msg, "%s", msg ? msg : "");
}

/* Wakes the schedulers of the members in mask (each scheduler once). */
static void wake(ens_group *g, const int *mask)
{
    for (int i = 0; i < g->n; i++) {
        if (!mask[i]) continue;
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= mask[j] && g->sc[j] == g->sc[i];
        if (!seen) sched_wake(g->sc[i]);
    }
}

int ens_group_submit(ens_group *g, sched_req **reqs, int n, int *full)
{
    *full = -1;
    for (int i = 0; i < n; i++) {
        int rc = sched_submit(g->sc[i], &reqs[i], 1);
        if (rc) {
            *full = rc == -1 ? g->spec->model[i] : -2;
            pthread_mutex_lock(&g->mu);
            close_locked(g, 503, FIN_DRAINED, rc == -1 ? "queue full for an ensemble member; retry shortly"
                                                          : "the server is shutting down; retry on another replica");
            int mask[ENSEMBLE_MAX_MEMBERS] = {0};
            for (int j = 0; j < i; j++) mask[j] = 1;
            pthread_mutex_unlock(&g->mu);
            wake(g, mask);
            return i;
        }
    }
    return n;
}

int ens_group_arrive(ens_group *g, int member, const float *row, const int32_t *history,
                     size_t n_history, int32_t *token, char *err, size_t errlen)
{
    int mask[ENSEMBLE_MAX_MEMBERS] = {0};
    pthread_mutex_lock(&g->mu);
    if (g->closed) {
        snprintf(err, errlen, "%s", g->close_msg[0] ? g->close_msg : "the ensemble ended");
        pthread_mutex_unlock(&g->mu);
        return -1;
    }
    if (ensemble_set_row(g->e, member, row, err, errlen)) goto fail;
    g->parked[member] = 1;
    if (++g->n_arrived < g->n) {
        pthread_mutex_unlock(&g->mu);
        return ENS_PARKED;
    }
    g->n_arrived = 0;
    ensemble_result res;
    if (ensemble_step(g->e, history, n_history, &res, err, errlen)) goto fail;
    if (g->n_steps < g->max_steps) {
        int s = g->n_steps++;
        g->chosen[s] = res.token;
        g->prob[s] = res.prob;
        g->agreement[s] = res.agreement;
        memcpy(g->votes + (size_t)s * (size_t)g->n, res.members, (size_t)g->n * sizeof *res.members);
    }
    for (int i = 0; g->top_n > 0 && i <= g->n; i++)
        g->n_top[i] = ensemble_top(g->e, i - 1, g->top_n, g->top_ids + (size_t)i * (size_t)g->top_n,
                                   g->top_lp + (size_t)i * (size_t)g->top_n);
    g->token = res.token;
    for (int i = 0; i < g->n; i++) {
        g->parked[i] = 0;
        g->pending[i] = i != member;
        mask[i] = i != member;
    }
    pthread_mutex_unlock(&g->mu);
    wake(g, mask);
    *token = res.token;
    return ENS_TOKEN;
fail:
    close_locked(g, 500, FIN_ERROR, err);
    for (int i = 0; i < g->n; i++) mask[i] = !g->done[i] && i != member;
    pthread_mutex_unlock(&g->mu);
    wake(g, mask);
    return -1;
}

int ens_group_arrive_labels(ens_group *g, int member, char *err, size_t errlen)
{
    pthread_mutex_lock(&g->mu);
    int rc = 0;
    g->parked[member] = 0;  /* labels never park: a member leaves once its scores are in */
    if (++g->n_label_arrived == g->n) {
        ensemble_label_result lr;
        int L = g->spec->n_labels;
        if (ensemble_labels(g->e, L, g->label_lp, &lr, err, errlen)) {
            rc = -1;
        } else {
            g->labels_done = 1;
            g->label = lr.label;
            g->label_agreement = lr.agreement;
            memcpy(g->label_probs, lr.label_probs, (size_t)L * sizeof *g->label_probs);
            memcpy(g->member_probs, lr.member_probs, (size_t)L * (size_t)g->n * sizeof *g->member_probs);
            memcpy(g->label_votes, lr.members, (size_t)g->n * sizeof *lr.members);
        }
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

int ens_group_poll(ens_group *g, int member, int32_t *token)
{
    pthread_mutex_lock(&g->mu);
    int rc = ENS_IDLE;
    if (g->pending[member]) {
        g->pending[member] = 0;
        *token = g->token;
        rc = ENS_TOKEN;
    } else if (g->parked[member]) {
        rc = ENS_PARKED;
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

const char *ens_group_closed(ens_group *g, int *status, finish_kind *fin)
{
    pthread_mutex_lock(&g->mu);
    const char *msg = NULL;
    if (g->closed) {
        *status = g->close_status;
        *fin = g->close_fin;
        msg = g->close_msg;
    }
    pthread_mutex_unlock(&g->mu);
    return msg;
}

void ens_group_member_done(ens_group *g, int member, int status, finish_kind fin, const char *msg)
{
    int mask[ENSEMBLE_MAX_MEMBERS] = {0};
    pthread_mutex_lock(&g->mu);
    g->done[member] = 1;
    g->parked[member] = g->pending[member] = 0;
    /* A label member that finished its scores leaves alone; anything else ends
     * the group (generation: every member finishes on the same token anyway). */
    if (status != 200 || !g->spec->n_labels) {
        close_locked(g, status, fin, status != 200 ? (msg ? msg : "an ensemble member failed") : "");
    }
    for (int i = 0; i < g->n; i++) mask[i] = !g->done[i];
    pthread_mutex_unlock(&g->mu);
    wake(g, mask);
}

/* Responses ----------------------------------------------------------------------------- */

static json_t *jnum(double x) { return isfinite(x) ? json_real(x) : json_null(); }

static json_t *piece_json(const moe_model *m, int32_t id)
{
    if (!m->tokenizer) return json_null();
    char buf[256];
    int n = tokenizer_token_to_piece(m->tokenizer, id, 1, buf, sizeof buf);
    if (n < 0 || n > (int)sizeof buf) return json_null();
    size_t cl;
    char *c = api_utf8_clean(buf, (size_t)n, &cl);
    json_t *j = c ? json_stringn(c, cl) : json_null();
    free(c);
    return j;
}

static json_t *top_json(const moe_model *m, const int32_t *ids, const float *lp, int n)
{
    json_t *a = json_array();
    for (int j = 0; j < n; j++)
        json_array_append_new(a, json_pack("{s:i,s:o,s:o}", "id", ids[j], "token", piece_json(m, ids[j]),
                                           "logprob", jnum(lp[j])));
    return a;
}

static const char *member_name(const ens_group *g, const api_model *models, int i)
{
    return models[g->spec->model[i]].name;
}

/* {"method", "members": [{"model", "weight", "overruled"}], "mean_agreement", "positions"} */
static json_t *summary_json(const ens_group *g, const api_model *models)
{
    ensemble_summary sum;
    ensemble_summary_get(g->e, &sum);
    json_t *mem = json_array();
    for (int i = 0; i < g->n; i++)
        json_array_append_new(mem, json_pack("{s:s,s:o,s:I}", "model", member_name(g, models, i), "weight",
                                             jnum(ensemble_weight(g->e, i)), "overruled", (json_int_t)sum.overruled[i]));
    return json_pack("{s:s,s:o,s:o,s:I}", "method", ensemble_method_name(g->spec->method), "members", mem,
                     "mean_agreement", jnum(sum.mean_agreement), "positions", (json_int_t)sum.steps);
}

static json_t *votes_json(const ens_group *g, const api_model *models)
{
    json_t *a = json_array();
    for (int s = 0; s < g->n_steps; s++) {
        json_t *mem = json_array();
        for (int i = 0; i < g->n; i++) {
            const ensemble_member_vote *v = &g->votes[(size_t)s * (size_t)g->n + (size_t)i];
            json_array_append_new(mem, json_pack("{s:s,s:i,s:o,s:o,s:o}", "model", member_name(g, models, i),
                                                 "token", v->token, "prob", jnum(v->prob), "own_prob",
                                                 jnum(v->own_prob), "weight", jnum(v->weight)));
        }
        json_array_append_new(a, json_pack("{s:i,s:o,s:o,s:o}", "chosen", g->chosen[s], "prob", jnum(g->prob[s]),
                                           "members", mem, "agreement", jnum(g->agreement[s])));
    }
    return a;
}

static char *labels_response(const ens_group *g, const api_model *models, const char *id,
                             const sched_req *r0, size_t *len)
{
    const ens_spec *sp = g->spec;
    const moe_model *m0 = models[sp->model[0]].model;
    int L = sp->n_labels;
    json_t *probs = json_array(), *labels = json_array(), *mem = json_array();
    for (int l = 0; l < L; l++) {
        json_array_append_new(probs, jnum(g->label_probs[l]));
        json_t *toks = json_array(), *lps = json_array();
        for (int k = 0; k < sp->label_n[l]; k++) json_array_append_new(toks, json_integer(sp->label_tok[l][k]));
        for (int i = 0; i < g->n; i++) json_array_append_new(lps, jnum(g->label_lp[(size_t)i * (size_t)L + (size_t)l]));
        json_array_append_new(labels, json_pack("{s:s,s:o,s:o}", "label", sp->labels[l], "tokens", toks,
                                                "logprobs", lps));
    }
    for (int i = 0; i < g->n; i++) {
        json_t *mp = json_array();
        for (int l = 0; l < L; l++) json_array_append_new(mp, jnum(g->member_probs[(size_t)i * (size_t)L + (size_t)l]));
        const ensemble_member_vote *v = &g->label_votes[i];
        json_array_append_new(mem, json_pack("{s:s,s:s,s:i,s:o,s:o}", "model", member_name(g, models, i), "label",
                                             sp->labels[v->token], "label_index", v->token, "probs", mp,
                                             "weight", jnum(v->weight)));
    }
    json_t *prompt = json_array();
    for (int k = 0; k < r0->n_prompt; k++) json_array_append_new(prompt, json_integer(r0->seq_tokens[k]));
    json_t *o = json_pack("{s:s,s:s,s:s,s:i,s:o,s:o,s:{s:o,s:o},s:o,s:{s:i,s:i}}", "id", id, "model",
                          member_name(g, models, 0), "label", sp->labels[g->label], "label_index", g->label,
                          "label_probs", probs, "labels", labels, "votes", "members", mem, "agreement",
                          jnum(g->label_agreement), "prompt_tokens", prompt, "usage", "prompt_tokens", r0->n_prompt,
                          "completion_tokens", 0);
    (void)m0;
    if (sp->explicit_ensemble) json_object_set_new(o, "ensemble", summary_json(g, models));
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(o);
    if (s) *len = strlen(s);
    return s;
}

char *ens_infer_response(const ens_group *g, const api_model *models, const char *id,
                         sched_req *const *reqs, size_t *len)
{
    if (g->spec->n_labels) {
        if (!g->labels_done) return NULL;
        return labels_response(g, models, id, reqs[0], len);
    }
    const api_model *am = &models[g->spec->model[0]];
    size_t n;
    char *base = api_infer_response(am, id, reqs, 1, 0, &n);
    if (!base) return NULL;
    json_error_t je;
    json_t *o = json_loadb(base, n, 0, &je);
    free(base);
    if (!o) return NULL;
    json_object_set_new(o, "votes", votes_json(g, models));
    json_object_set_new(o, "ensemble", summary_json(g, models));
    if (g->top_n > 0 && g->n_steps > 0) {
        const sched_req *r = reqs[0];
        int pos = r->n_prompt - 1 + g->n_steps - 1;
        json_t *lg = json_array(), *ml = json_array();
        json_array_append_new(lg, json_pack("{s:i,s:o}", "pos", pos, "top",
                                            top_json(am->model, g->top_ids, g->top_lp, g->n_top[0])));
        for (int i = 0; i < g->n; i++) {
            size_t off = (size_t)(i + 1) * (size_t)g->top_n;
            json_array_append_new(ml, json_pack("{s:s,s:i,s:o}", "model", member_name(g, models, i), "pos", pos, "top",
                                                top_json(models[g->spec->model[i]].model, g->top_ids + off,
                                                         g->top_lp + off, g->n_top[i + 1])));
        }
        json_object_set_new(o, "logits", lg);
        json_object_set_new(o, "member_logits", ml);
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(o);
    if (s) *len = strlen(s);
    return s;
}

void ens_group_record_metrics(const ens_group *g, metrics *m)
{
    ensemble_summary sum;
    ensemble_summary_get(g->e, &sum);
    int model[ENSEMBLE_MAX_MEMBERS];
    float agree[1];
    for (int i = 0; i < g->n; i++) model[i] = g->spec->model[i];
    const float *a = g->agreement;
    int na = g->n_steps;
    if (g->spec->n_labels) {
        agree[0] = g->label_agreement;
        a = agree;
        na = g->labels_done;
    }
    metrics_ensemble(m, (int)g->spec->method, g->spec->n_labels > 0, model, sum.overruled, g->n, a, na);
}
