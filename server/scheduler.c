/* scheduler.c -- continuous batching: one thread per model drives its engine. */
#include "server/scheduler.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/ensemble.h"
#include "server/ensemble_req.h"

#define KV_BLOCK_SIZE 16

struct sched {
    const moe_model *model;
    const moe_tokenizer *tok;    /* NULL: the model has no tokenizer */
    moe_engine *engine;
    moe_hparams hp;
    sched_params p;
    metrics *m;
    int model_index;
    sched_notify_fn notify;
    void *notify_ctx;

    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;           /* CLOCK_MONOTONIC */
    /* Guarded by mu. */
    sched_req *inbox, *inbox_tail;
    int n_queued;                /* inbox + waiting: what --max-queue bounds */
    sched_req *done, *done_tail;
    int stop, abort_all;
    unsigned wakes;              /* sched_wake calls (an idle step sleeps only if none came) */

    /* Scheduler thread only. */
    sched_req *waiting, *waiting_tail;
    sched_req **running;         /* (max_seqs) admitted, in admission order */
    int n_running;
    int *free_slots;             /* (max_seqs) stack of free sequence slots */
    int n_free_slots;
    int32_t *b_token, *b_pos, *b_seq;  /* (max_batch_tokens) the step's ragged batch */
    uint8_t *b_want;
    sched_req **b_req;           /* (max_batch_tokens) owner of each row */
    float *logits;               /* (max_batch_tokens, n_vocab) */
    int32_t *trace_expert;       /* (max_batch_tokens, n_layer, n_used) */
    float *trace_weight;
    size_t n_expert_cells;       /* n_layer * n_expert */
    char piece[512];             /* detokenizer output of one token */
};

/* Requests --------------------------------------------------------------- */

sched_req *sched_req_create(const moe_hparams *hp, int max_seq_len, const sched_spec *sp,
                            char *err, size_t errlen)
{
    sched_req *r = calloc(1, sizeof *r);
    if (!r) goto oom;
    r->n_prompt = sp->n_prompt;
    r->max_tokens = sp->max_tokens;
    r->logits = sp->logits;
    r->top_n = sp->logits == LOGITS_NONE ? 0 : sp->top_n;
    r->full_logits = sp->full_logits;
    r->routing = sp->routing && hp->n_expert > 0;
    r->t_arrival = sp->t_arrival;
    r->deadline = sp->deadline;
    r->slot = -1;
    r->n_vocab = hp->n_vocab;
    r->status = 200;
    atomic_init(&r->cancel, 0);
    /* Positions fed to the model: the prompt and every generated token but the last. */
    long need = (long)sp->n_prompt + (sp->max_tokens > 0 ? sp->max_tokens - 1 : 0);
    r->n_reserve = (int)(need < max_seq_len ? need : max_seq_len);

    r->seq_tokens = malloc(((size_t)sp->n_prompt + (size_t)sp->max_tokens + 1) * sizeof *r->seq_tokens);
    if (!r->seq_tokens) goto oom;
    memcpy(r->seq_tokens, sp->prompt, (size_t)sp->n_prompt * sizeof *r->seq_tokens);
    r->text_cap = 256;
    if (!(r->text = malloc(r->text_cap))) goto oom;
    r->text[0] = 0;
    if (r->logits != LOGITS_NONE) {
        r->cap_entries = r->logits == LOGITS_ALL ? r->n_reserve + 1 : 1;
        size_t cells = (size_t)r->cap_entries * (size_t)(r->top_n > 0 ? r->top_n : 1);
        r->entry_pos = calloc((size_t)r->cap_entries, sizeof *r->entry_pos);
        r->top_ids = calloc(cells, sizeof *r->top_ids);
        r->top_logits = calloc(cells, sizeof *r->top_logits);
        r->top_logprobs = calloc(cells, sizeof *r->top_logprobs);
        if (!r->entry_pos || !r->top_ids || !r->top_logits || !r->top_logprobs) goto oom;
    }
    if (r->full_logits && !(r->full_row = calloc((size_t)hp->n_vocab, sizeof *r->full_row))) goto oom;
    if (r->routing) {
        r->n_layer = hp->n_layer;
        r->n_used = hp->n_expert_used;
        size_t cells = (size_t)r->n_reserve * (size_t)hp->n_layer * (size_t)hp->n_expert_used;
        r->route_expert = malloc(cells * sizeof *r->route_expert + 1);
        r->route_weight = malloc(cells * sizeof *r->route_weight + 1);
        if (!r->route_expert || !r->route_weight) goto oom;
    }
    if (sampler_create(hp->n_vocab, &sp->sp, &r->smp, err, errlen)) goto fail;
    if (sp->n_stops > 0 && stop_matcher_create(sp->stops, (size_t)sp->n_stops, &r->stopm, err, errlen))
        goto fail;
    return r;
oom:
    snprintf(err, errlen, "out of memory for the request");
fail:
    sched_req_free(r);
    return NULL;
}

void sched_req_free(sched_req *r)
{
    if (!r) return;
    free(r->seq_tokens);
    free(r->text);
    free(r->entry_pos);
    free(r->top_ids);
    free(r->top_logits);
    free(r->top_logprobs);
    free(r->full_row);
    free(r->route_expert);
    free(r->route_weight);
    if (r->smp) sampler_free(r->smp);
    if (r->stopm) stop_matcher_free(r->stopm);
    free(r);
}

static void text_append(sched_req *r, const char *s, size_t n)
{
    if (r->text_len + n + 1 > r->text_cap) {
        size_t nc = (r->text_len + n + 1) * 2;
        char *t = realloc(r->text, nc);
        if (!t) return;  /* text stays shorter; tokens are still exact */
        r->text = t;
        r->text_cap = nc;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
}

/* Engine sizing ------------------------------------------------------------ */

static int kv_blocks_for(const moe_hparams *hp, const sched_params *p, int max_seq_len)
{
    double pos_bytes = (double)kv_position_bytes(hp->n_layer, hp->n_head_kv, hp->head_dim, p->kv_type);
    double positions;
    if (p->kv_cache_mb > 0) positions = (double)p->kv_cache_mb * 1048576.0 / pos_bytes;
    else if (p->kv_cache_tokens > 0) positions = (double)p->kv_cache_tokens;
    else {
        positions = (double)p->max_seqs * max_seq_len;
        double cap = 1024.0 * 1048576.0 / pos_bytes;
        if (positions > cap) positions = cap;
    }
    double blocks = ceil(positions / KV_BLOCK_SIZE);
    if (blocks < 1) blocks = 1;
    if (blocks > 1 << 24) blocks = 1 << 24;
    return (int)blocks;
}

static void *sched_main(void *arg);

int sched_create(const sched_params *p, const moe_model *model, metrics *m, int model_index,
                 sched_notify_fn notify, void *notify_ctx, sched **out, char *err, size_t errlen)
{
    sched *s = calloc(1, sizeof *s);
    if (!s) { snprintf(err, errlen, "out of memory"); return -1; }
    s->model = model;
    s->tok = model->tokenizer;
    s->hp = model->weights.hp;
    s->p = *p;
    s->m = m;
    s->model_index = model_index;
    s->notify = notify;
    s->notify_ctx = notify_ctx;
    /* Default: the model's context, at most 4096 (longer ones ask with --ctx). */
    if (s->p.max_seq_len <= 0) s->p.max_seq_len = s->hp.n_ctx_train < 4096 ? s->hp.n_ctx_train : 4096;
    if (s->p.max_seq_len > s->hp.n_ctx_train) s->p.max_seq_len = s->hp.n_ctx_train;
    if (s->p.max_seqs > s->p.max_batch_tokens) s->p.max_seqs = s->p.max_batch_tokens;

    moe_engine_params ep = moe_engine_default_params(&s->hp);
    ep.n_threads = s->p.n_threads > 0 ? s->p.n_threads : 1;
    ep.max_seqs = s->p.max_seqs;
    ep.max_batch_tokens = s->p.max_batch_tokens;
    ep.kv_block_size = KV_BLOCK_SIZE;
    ep.kv_n_blocks = kv_blocks_for(&s->hp, &s->p, s->p.max_seq_len);
    ep.kv_type = s->p.kv_type;
    ep.max_seq_len = s->p.max_seq_len;
    /* packed copies made while the server already answers: /ready does not wait
     * for them, and a step before they are done gives the same bits without them */
    if (ep.packed_projections) ep.packed_projections = s->p.no_packed ? MOE_PACK_OFF : MOE_PACK_BACKGROUND;
    if (moe_engine_create(&model->weights, &ep, &s->engine, err, errlen)) goto fail;

    size_t nb = (size_t)s->p.max_batch_tokens, nv = (size_t)s->hp.n_vocab;
    size_t nt = nb * (size_t)s->hp.n_layer * (size_t)(s->hp.n_expert_used > 0 ? s->hp.n_expert_used : 1);
    s->running = calloc((size_t)s->p.max_seqs, sizeof *s->running);
    s->free_slots = calloc((size_t)s->p.max_seqs, sizeof *s->free_slots);
    s->b_token = calloc(nb, sizeof *s->b_token);
    s->b_pos = calloc(nb, sizeof *s->b_pos);
    s->b_seq = calloc(nb, sizeof *s->b_seq);
    s->b_want = calloc(nb, sizeof *s->b_want);
    s->b_req = calloc(nb, sizeof *s->b_req);
    s->logits = malloc(nb * nv * sizeof *s->logits);
    s->trace_expert = malloc(nt * sizeof *s->trace_expert);
    s->trace_weight = malloc(nt * sizeof *s->trace_weight);
    if (!s->running || !s->free_slots || !s->b_token || !s->b_pos || !s->b_seq || !s->b_want ||
        !s->b_req || !s->logits || !s->trace_expert || !s->trace_weight) {
        snprintf(err, errlen, "out of memory for the scheduler (max-batch-tokens %d x vocabulary %d)",
                 s->p.max_batch_tokens, s->hp.n_vocab);
        goto fail;
    }
    for (int i = 0; i < s->p.max_seqs; i++) s->free_slots[s->n_free_slots++] = s->p.max_seqs - 1 - i;
    s->n_expert_cells = (size_t)s->hp.n_layer * (size_t)(s->hp.n_expert > 0 ? s->hp.n_expert : 0);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->mu, NULL);
    if (pthread_create(&s->thread, NULL, sched_main, s)) {
        snprintf(err, errlen, "cannot start the scheduler thread");
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    s->thread_started = 1;
    *out = s;
    return 0;
fail:
    if (s->engine) moe_engine_free(s->engine);
    free(s->running); free(s->free_slots); free(s->b_token); free(s->b_pos); free(s->b_seq);
    free(s->b_want); free(s->b_req); free(s->logits); free(s->trace_expert); free(s->trace_weight);
    free(s);
    return -1;
}

void sched_stop(sched *s)
{
    if (!s || !s->thread_started) return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->thread_started = 0;
}

void sched_free(sched *s)
{
    if (!s) return;
    sched_stop(s);
    sched_req *list;
    sched_take_done(s, &list);
    while (list) {
        sched_req *n = list->next;
        sched_req_free(list);
        list = n;
    }
    moe_engine_free(s->engine);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s->running); free(s->free_slots); free(s->b_token); free(s->b_pos); free(s->b_seq);
    free(s->b_want); free(s->b_req); free(s->logits); free(s->trace_expert); free(s->trace_weight);
    free(s);
}

int sched_max_seq_len(const sched *s) { return s->p.max_seq_len; }
int sched_max_seqs(const sched *s) { return s->p.max_seqs; }
int sched_kv_positions(const sched *s)
{
    return moe_engine_kv_blocks_total(s->engine) * moe_engine_kv_block_size(s->engine);
}
const moe_engine *sched_engine(const sched *s) { return s->engine; }

/* Loop-thread side --------------------------------------------------------- */

int sched_submit(sched *s, sched_req **reqs, int n)
{
    pthread_mutex_lock(&s->mu);
    if (s->stop || s->abort_all) { pthread_mutex_unlock(&s->mu); return -2; }
    if (s->n_queued + n > s->p.max_queue) { pthread_mutex_unlock(&s->mu); return -1; }
    for (int i = 0; i < n; i++) {
        reqs[i]->next = NULL;
        if (s->inbox_tail) s->inbox_tail->next = reqs[i];
        else s->inbox = reqs[i];
        s->inbox_tail = reqs[i];
    }
    s->n_queued += n;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void sched_wake(sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->wakes++;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void sched_abort_all(sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->abort_all = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

int sched_take_done(sched *s, sched_req **list)
{
    pthread_mutex_lock(&s->mu);
    *list = s->done;
    s->done = s->done_tail = NULL;
    pthread_mutex_unlock(&s->mu);
    int n = 0;
    for (sched_req *r = *list; r; r = r->next) n++;
    return n;
}

/* Scheduler thread ---------------------------------------------------------- */

typedef struct {
    sched_req *head, *tail;
    int n;
} req_list;

static void list_push(req_list *l, sched_req *r)
{
    r->next = NULL;
    if (l->tail) l->tail->next = r;
    else l->head = r;
    l->tail = r;
    l->n++;
}

/* Ends a request: frees its slot and KV blocks, stamps the outcome. */
static void req_finish(sched *s, req_list *done, sched_req *r, int status, finish_kind fin,
                       const char *msg)
{
    if (r->slot >= 0) {
        moe_engine_seq_release(s->engine, r->slot);
        s->free_slots[s->n_free_slots++] = r->slot;
        r->slot = -1;
    }
    r->status = status;
    r->finish = fin;
    if (msg) snprintf(r->errmsg, sizeof r->errmsg, "%s", msg);
    r->t_done = clock_mono_s();
    if (r->ens) ens_group_member_done(r->ens, r->ens_member, status, fin, msg);
    list_push(done, r);
}

/* Removes running[i] keeping admission order. */
static void running_remove(sched *s, int i)
{
    memmove(&s->running[i], &s->running[i + 1], (size_t)(s->n_running - i - 1) * sizeof *s->running);
    s->n_running--;
}

static int cancel_reason(const sched_req *r, int abort_all, double now, int *status,
                         finish_kind *fin, const char **msg)
{
    if (abort_all) {
        *status = 503; *fin = FIN_DRAINED;
        *msg = "the server is shutting down; retry on another replica";
    } else if (atomic_load(&r->cancel)) {
        *status = 499; *fin = FIN_CANCELLED; *msg = "client closed the connection";
    } else if (now > r->deadline) {
        *status = 504; *fin = FIN_TIMEOUT;
        *msg = "the request passed its deadline (--request-timeout); shorten it or retry later";
    } else if (r->ens && (*msg = ens_group_closed(r->ens, status, fin))) {
        /* another member of its ensemble failed or finished */
    } else {
        return 0;
    }
    return 1;
}

static int ens_take(sched *s, req_list *done, int i, double now, int *n_gen);

/* Drops cancelled, timed-out and (when draining is over) all requests. An
 * ensemble member whose group closed may hold the group's last token: another
 * member can combine it and finish between this thread's ens_poll and here, so
 * the token is taken first (the group closes only after it is handed out). */
static void sweep(sched *s, req_list *done, int abort_all, int *n_dequeued, int *n_gen)
{
    double now = clock_mono_s();
    int status; finish_kind fin; const char *msg;
    for (int i = 0; i < s->n_running;) {
        sched_req *r = s->running[i];
        if (cancel_reason(r, abort_all, now, &status, &fin, &msg)) {
            if (status == 200 && ens_take(s, done, i, now, n_gen)) continue;
            running_remove(s, i);
            req_finish(s, done, r, status, fin, msg);
        } else {
            i++;
        }
    }
    sched_req *prev = NULL, *r = s->waiting;
    while (r) {
        sched_req *next = r->next;
        if (cancel_reason(r, abort_all, now, &status, &fin, &msg)) {
            if (prev) prev->next = next;
            else s->waiting = next;
            if (s->waiting_tail == r) s->waiting_tail = prev;
            (*n_dequeued)++;
            req_finish(s, done, r, status, fin, msg);
        } else {
            prev = r;
        }
        r = next;
    }
}

/* FIFO admission: the head waits until a slot and its KV blocks are free. */
static void admit(sched *s, req_list *done, int *n_dequeued)
{
    int bs = moe_engine_kv_block_size(s->engine);
    while (s->waiting && s->n_free_slots > 0) {
        sched_req *r = s->waiting;
        int blocks = (r->n_reserve + bs - 1) / bs;
        if (blocks > moe_engine_kv_blocks_free(s->engine)) {
            if (s->n_running > 0) break;  /* wait for others to return their blocks */
            s->waiting = r->next;         /* can never fit (the API checks this first) */
            if (!s->waiting) s->waiting_tail = NULL;
            (*n_dequeued)++;
            req_finish(s, done, r, 500, FIN_ERROR, "the request needs more KV cache than the pool holds");
            continue;
        }
        int slot = s->free_slots[s->n_free_slots - 1];
        char err[200];
        if (moe_engine_seq_reserve(s->engine, slot, r->n_reserve > 0 ? r->n_reserve : 1, err, sizeof err)) {
            if (s->n_running > 0) break;  /* try again when others finish */
            s->waiting = r->next;
            if (!s->waiting) s->waiting_tail = NULL;
            (*n_dequeued)++;
            req_finish(s, done, r, 500, FIN_ERROR, err);
            continue;
        }
        s->n_free_slots--;
        s->waiting = r->next;
        if (!s->waiting) s->waiting_tail = NULL;
        (*n_dequeued)++;
        r->slot = slot;
        r->n_past = 0;
        r->t_admit = clock_mono_s();
        tokenizer_stream_init(&r->ts);
        r->ts.n_fed = 1;  /* output continues the prompt: its first space is real */
        s->running[s->n_running++] = r;
    }
}

/* Label scoring: the current label's tokens after the prompt (all but its
 * last: each row gives the log-probability of the label's next token). */
static int label_chunk(sched *s, sched_req *r, int n, int *nw)
{
    int len;
    const int32_t *t = ens_group_label(r->ens, r->ens_label, &len);
    for (int j = r->n_past - r->n_prompt; j < len - 1 && n < s->p.max_batch_tokens; j++) {
        s->b_token[n] = t[j];
        s->b_pos[n] = r->n_prompt + j;
        s->b_seq[n] = r->slot;
        s->b_want[n] = 1;
        s->b_req[n] = r;
        n++;
        (*nw)++;
    }
    return n;
}

/* Rows of the step: every decoding sequence's next token first (a long prompt
 * never stalls decodes), then prompt chunks in admission order. */
static int build_batch(sched *s, int *want_rows, int *any_routing)
{
    int n = 0, cap = s->p.max_batch_tokens, nw = 0;
    *any_routing = 0;
    for (int i = 0; i < s->n_running && n < cap; i++) {
        sched_req *r = s->running[i];
        if (r->n_past < r->n_prompt || r->ens_wait) continue;
        if (r->ens && ens_group_n_labels(r->ens)) {
            n = label_chunk(s, r, n, &nw);
            continue;
        }
        s->b_token[n] = r->seq_tokens[r->n_prompt + r->n_gen - 1];
        s->b_pos[n] = r->n_past;
        s->b_seq[n] = r->slot;
        s->b_want[n] = 1;
        s->b_req[n] = r;
        *any_routing |= r->routing;
        n++; nw++;
    }
    for (int i = 0; i < s->n_running && n < cap; i++) {
        sched_req *r = s->running[i];
        if (r->n_past >= r->n_prompt) continue;
        int chunk = r->n_prompt - r->n_past;
        if (chunk > cap - n) chunk = cap - n;
        for (int j = 0; j < chunk; j++) {
            int pos = r->n_past + j;
            s->b_token[n] = r->seq_tokens[pos];
            s->b_pos[n] = pos;
            s->b_seq[n] = r->slot;
            s->b_want[n] = r->logits == LOGITS_ALL || pos == r->n_prompt - 1;
            s->b_req[n] = r;
            nw += s->b_want[n];
            n++;
        }
        *any_routing |= r->routing;
    }
    *want_rows = nw;
    return n;
}

/* Top-n of a row by logit (ties: lower id first) plus log-softmax values. */
static void record_logits(sched_req *r, const float *row, int pos)
{
    int e = r->logits == LOGITS_ALL ? r->n_entries : 0;
    if (e >= r->cap_entries) return;
    int V = r->n_vocab, k = r->top_n;
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) if (row[i] > mx) mx = row[i];
    for (int i = 0; i < V; i++) z += exp((double)row[i] - mx);
    double lse = mx + log(z);
    int32_t *ids = r->top_ids + (size_t)e * (size_t)k;
    float *lg = r->top_logits + (size_t)e * (size_t)k;
    float *lp = r->top_logprobs + (size_t)e * (size_t)k;
    int n = 0;
    for (int i = 0; i < V && k > 0; i++) {
        float v = row[i];
        if (n == k && !(v > lg[k - 1])) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && v > lg[j - 1]) { lg[j] = lg[j - 1]; ids[j] = ids[j - 1]; j--; }
        lg[j] = v;
        ids[j] = i;
    }
    for (int j = 0; j < n; j++) lp[j] = (float)((double)lg[j] - lse);
    r->entry_pos[e] = pos;
    if (r->logits == LOGITS_ALL) r->n_entries++;
    else r->n_entries = 1;
}

/* Appends a sampled token's text; returns 1 when a stop string completed. */
static int feed_text(sched *s, sched_req *r, int32_t id)
{
    if (!s->tok) return 0;
    int n = tokenizer_stream_push(s->tok, &r->ts, id, s->piece, sizeof s->piece);
    if (n <= 0) return 0;
    text_append(r, s->piece, (size_t)n);
    if (r->stopm && stop_matcher_feed(r->stopm, s->piece, (size_t)n)) {
        size_t safe = stop_matcher_safe_len(r->stopm);
        if (safe < r->text_len) {
            r->text_len = safe;
            r->text[safe] = 0;
        }
        return 1;
    }
    return 0;
}

static void finish_text(sched *s, sched_req *r)
{
    if (!s->tok || r->finish == FIN_STOP) return;
    int n = tokenizer_stream_flush(s->tok, &r->ts, s->piece, sizeof s->piece);
    if (n > 0) text_append(r, s->piece, (size_t)n);
}

static int accept_token(sched *s, sched_req *r, int32_t id, int pos, double now, finish_kind *fin);

/* After a row that ends the known sequence: sample the next token, or finish.
 * Returns 1 when the request is finished. */
static int sample_next(sched *s, sched_req *r, const float *row, int pos, double now, finish_kind *fin)
{
    if (r->full_row) {
        memcpy(r->full_row, row, (size_t)r->n_vocab * sizeof *row);
        r->full_pos = pos;
    }
    if (r->n_gen >= r->max_tokens) { *fin = FIN_LENGTH; return 1; }
    int32_t id = sampler_sample(r->smp, row, r->seq_tokens, (size_t)(r->n_prompt + r->n_gen));
    return accept_token(s, r, id, pos, now, fin);
}

/* Appends a chosen token (sampled, or an ensemble's) and checks every way to
 * finish. Returns 1 when the request is finished. */
static int accept_token(sched *s, sched_req *r, int32_t id, int pos, double now, finish_kind *fin)
{
    r->seq_tokens[r->n_prompt + r->n_gen++] = id;
    if (r->t_first == 0) r->t_first = now;
    if (s->tok && tokenizer_is_eog(s->tok, id)) { *fin = FIN_EOS; return 1; }
    if (feed_text(s, r, id)) { *fin = FIN_STOP; return 1; }
    if (r->n_gen >= r->max_tokens) { *fin = FIN_LENGTH; return 1; }
    if (pos + 1 >= r->n_reserve) { *fin = FIN_LENGTH; return 1; }  /* context full */
    return 0;
}

/* Ensemble members ------------------------------------------------------------ */

/* Next label (after l) with more than one token: single-token labels are scored
 * by the prompt's last row alone. */
static int next_label(sched_req *r, int l)
{
    int L = ens_group_n_labels(r->ens), len;
    for (l++; l < L; l++) {
        ens_group_label(r->ens, l, &len);
        if (len > 1) break;
    }
    return l;
}

/* A row of a labels request: adds the log-probability of the token it predicts.
 * After a label's last token the sequence goes back to the prompt's end (its KV
 * is kept) for the next label. Returns 1 when every label is scored, -1 on error. */
static int label_row(sched *s, sched_req *r, const float *row, int pos, char *err, size_t errlen)
{
    double *lp = ens_group_label_lp(r->ens, r->ens_member);
    int L = ens_group_n_labels(r->ens), len;
    if (pos == r->n_prompt - 1) {
        for (int l = 0; l < L; l++) lp[l] = ensemble_row_logprob(row, r->n_vocab, ens_group_label(r->ens, l, &len)[0]);
        r->ens_label = next_label(r, -1);
    } else {
        const int32_t *t = ens_group_label(r->ens, r->ens_label, &len);
        int k = pos - (r->n_prompt - 1);
        lp[r->ens_label] += ensemble_row_logprob(row, r->n_vocab, t[k]);
        if (k < len - 1) return 0;
        if (moe_engine_seq_truncate(s->engine, r->slot, r->n_prompt, err, errlen)) return -1;
        r->n_past = r->n_prompt;
        r->ens_label = next_label(r, r->ens_label);
    }
    if (r->ens_label < L) return 0;
    return ens_group_arrive_labels(r->ens, r->ens_member, err, errlen) ? -1 : 1;
}

/* A member's sampling row: hand it to the group; the last member to arrive gets
 * the combined token at once, the others park until ens_poll hands it over.
 * Returns 1 finished, 0 running or parked, -1 failed (message in err). */
static int ens_next(sched *s, sched_req *r, const float *row, int pos, double now, finish_kind *fin,
                    char *err, size_t errlen)
{
    if (ens_group_n_labels(r->ens)) {
        *fin = FIN_LENGTH;
        return label_row(s, r, row, pos, err, errlen);
    }
    if (r->n_gen >= r->max_tokens) { *fin = FIN_LENGTH; return 1; }
    int32_t id;
    int rc = ens_group_arrive(r->ens, r->ens_member, row, r->seq_tokens, (size_t)(r->n_prompt + r->n_gen), &id,
                              err, errlen);
    if (rc < 0) return -1;
    if (rc == ENS_PARKED) {
        r->ens_wait = 1;
        return 0;
    }
    return accept_token(s, r, id, pos, now, fin);
}

/* A parked member's combined token, if its group has one for it: applies it.
 * Returns 1 when that finished the request (then removed from running[i]). */
static int ens_take(sched *s, req_list *done, int i, double now, int *n_gen)
{
    sched_req *r = s->running[i];
    int32_t id;
    finish_kind fin;
    if (!r->ens || !r->ens_wait || ens_group_poll(r->ens, r->ens_member, &id) != ENS_TOKEN) return 0;
    r->ens_wait = 0;
    (*n_gen)++;
    if (!accept_token(s, r, id, r->n_past - 1, now, &fin)) return 0;
    finish_text(s, r);
    running_remove(s, i);
    req_finish(s, done, r, 200, fin, NULL);
    return 1;
}

/* Parked members whose group combined a token: apply it. */
static void ens_poll(sched *s, req_list *done, int *n_gen)
{
    double now = clock_mono_s();
    for (int i = 0; i < s->n_running;)
        if (!ens_take(s, done, i, now, n_gen)) i++;
}

static void publish(sched *s, req_list *done, int n_dequeued, double fwd_s, int n_rows,
                    int n_prompt_rows, int n_gen_tokens)
{
    model_metrics *mm = &s->m->models[s->model_index];
    int used = moe_engine_kv_blocks_total(s->engine) - moe_engine_kv_blocks_free(s->engine);
    pthread_mutex_lock(&s->mu);
    s->n_queued -= n_dequeued;
    int queued = s->n_queued;
    pthread_mutex_unlock(&s->mu);

    pthread_mutex_lock(&s->m->mu);
    if (n_rows > 0) {
        histogram_observe(&mm->forward, fwd_s);
        histogram_observe(&mm->batch_tokens, n_rows);
        mm->steps++;
        if (s->n_expert_cells && mm->expert_routed) {
            memcpy(mm->expert_routed, moe_engine_expert_routed(s->engine), s->n_expert_cells * sizeof(uint64_t));
            memcpy(mm->expert_dropped, moe_engine_expert_dropped(s->engine), s->n_expert_cells * sizeof(uint64_t));
        }
        moe_engine_phase_seconds(s->engine, mm->phase_seconds);
    }
    mm->prompt_tokens += (uint64_t)n_prompt_rows;
    mm->generated_tokens += (uint64_t)n_gen_tokens;
    mm->queue_depth = queued;
    mm->running = s->n_running;
    mm->kv_blocks_used = used;
    for (sched_req *r = done->head; r; r = r->next) {
        mm->finished[r->finish]++;
        if (r->t_admit > 0) histogram_observe(&mm->queue_wait, r->t_admit - r->t_arrival);
        if (r->t_first > 0) histogram_observe(&mm->ttft, r->t_first - r->t_arrival);
        if (r->n_gen > 1 && r->status == 200)
            histogram_observe(&mm->tpot, (r->t_done - r->t_first) / (r->n_gen - 1));
    }
    pthread_mutex_unlock(&s->m->mu);

    if (!done->head) return;
    pthread_mutex_lock(&s->mu);
    if (s->done_tail) s->done_tail->next = done->head;
    else s->done = done->head;
    s->done_tail = done->tail;
    pthread_mutex_unlock(&s->mu);
    s->notify(s->notify_ctx);
}

/* Returns 0 when the step did nothing (every running sequence is parked). */
static int step(sched *s, int abort_all)
{
    req_list done = {0};
    int n_dequeued = 0, n_gen = 0;
    ens_poll(s, &done, &n_gen);
    sweep(s, &done, abort_all, &n_dequeued, &n_gen);
    admit(s, &done, &n_dequeued);

    int n_want, any_routing;
    int n = s->n_running ? build_batch(s, &n_want, &any_routing) : 0;
    double fwd_s = 0;
    int n_prompt_rows = 0;
    if (n > 0) {
        moe_batch b = {n, s->b_token, s->b_pos, s->b_seq, s->b_want,
                       any_routing ? s->trace_expert : NULL, any_routing ? s->trace_weight : NULL};
        char err[256];
        double t0 = clock_mono_s();
        int rc = moe_engine_forward(s->engine, &b, s->logits, err, sizeof err);
        double now = clock_mono_s();
        fwd_s = now - t0;
        if (rc) {
            char msg[300];
            snprintf(msg, sizeof msg, "forward pass failed: %s", err);
            for (int i = 0; i < s->n_running;) {
                sched_req *r = s->running[i];
                running_remove(s, i);
                req_finish(s, &done, r, 500, FIN_ERROR, msg);
            }
        } else {
            size_t per_tok = (size_t)s->hp.n_layer * (size_t)(s->hp.n_expert_used > 0 ? s->hp.n_expert_used : 1);
            int li = 0;
            for (int i = 0; i < n; i++) {
                sched_req *r = s->b_req[i];
                int pos = s->b_pos[i];
                if (pos < r->n_prompt) n_prompt_rows++;
                if (r->routing && pos < r->n_reserve) {
                    memcpy(r->route_expert + (size_t)pos * per_tok, s->trace_expert + (size_t)i * per_tok, per_tok * sizeof(int32_t));
                    memcpy(r->route_weight + (size_t)pos * per_tok, s->trace_weight + (size_t)i * per_tok, per_tok * sizeof(float));
                    if (pos + 1 > r->n_routed) r->n_routed = pos + 1;
                }
                r->n_past = pos + 1;
                if (!s->b_want[i]) continue;
                const float *row = s->logits + (size_t)li++ * (size_t)s->hp.n_vocab;
                if (r->logits != LOGITS_NONE && r->top_n > 0) record_logits(r, row, pos);
                else if (r->logits != LOGITS_NONE) {
                    r->entry_pos[r->logits == LOGITS_ALL ? r->n_entries : 0] = pos;
                    r->n_entries = r->logits == LOGITS_ALL ? r->n_entries + 1 : 1;
                }
                if (pos < r->n_prompt - 1) continue;  /* a prompt row of logits=all */
                int before = r->n_gen;
                finish_kind fin;
                char eerr[256];
                int finished = r->ens ? ens_next(s, r, row, pos, now, &fin, eerr, sizeof eerr)
                                      : sample_next(s, r, row, pos, now, &fin);
                n_gen += r->n_gen - before;
                if (finished) {
                    if (finished > 0) finish_text(s, r);
                    for (int j = 0; j < s->n_running; j++)
                        if (s->running[j] == r) { running_remove(s, j); break; }
                    int status; const char *msg;
                    if (finished > 0) req_finish(s, &done, r, 200, fin, NULL);
                    /* A group another member closed (its client left, its deadline
                     * passed) ends this member for the same reason, not as an error. */
                    else if (cancel_reason(r, 0, now, &status, &fin, &msg)) req_finish(s, &done, r, status, fin, msg);
                    else req_finish(s, &done, r, 500, FIN_ERROR, eerr);
                }
            }
        }
    }
    int worked = n > 0 || done.head != NULL || n_dequeued > 0;
    publish(s, &done, n_dequeued, fwd_s, n, n_prompt_rows, n_gen);
    return worked;
}

static void splice_inbox(sched *s)
{
    if (!s->inbox) return;
    if (s->waiting_tail) s->waiting_tail->next = s->inbox;
    else s->waiting = s->inbox;
    s->waiting_tail = s->inbox_tail;
    s->inbox = s->inbox_tail = NULL;
}

static void cond_wait_until(sched *s, double deadline)
{
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    pthread_cond_timedwait(&s->cv, &s->mu, &ts);
}

static void *sched_main(void *arg)
{
    sched *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && !s->inbox && !s->n_running && !s->waiting && !s->abort_all)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop) break;
        /* Batching window: an idle scheduler waits a little for company. */
        if (!s->n_running && !s->waiting && s->inbox && s->p.batch_wait_us > 0) {
            double until = clock_mono_s() + s->p.batch_wait_us * 1e-6;
            while (!s->stop && !s->abort_all && s->n_queued < s->p.max_seqs && clock_mono_s() < until)
                cond_wait_until(s, until);
        }
        splice_inbox(s);
        int abort_all = s->abort_all;
        unsigned wakes = s->wakes;
        pthread_mutex_unlock(&s->mu);
        int worked = step(s, abort_all);
        pthread_mutex_lock(&s->mu);
        /* Every running sequence waits for its ensemble's other members: sleep
         * until one wakes us (or a tick, for deadlines) instead of spinning. */
        if (!worked && s->wakes == wakes && !s->inbox && !s->stop && !s->abort_all)
            cond_wait_until(s, clock_mono_s() + 0.05);
    }
    /* Stopping: everything still inside goes back as 503. */
    splice_inbox(s);
    pthread_mutex_unlock(&s->mu);
    step(s, 1);
    return NULL;
}
