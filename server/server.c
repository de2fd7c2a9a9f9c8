/* server.c -- the loop thread: libmicrohttpd driven by libuv, routing, auth,
 * limits, drain; models load on a thread of their own; results come back from the
 * schedulers through uv_async. */
#include "server/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "core/clock.h"
#include "core/matmul.h"
#include "models/pages.h"
#include "server/api.h"
#include "server/ensemble_req.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/scheduler.h"

typedef struct conn_ctx conn_ctx;

struct moe_server {
    const server_config *cfg;
    uv_loop_t loop;
    uv_poll_t mhd_poll;          /* MHD's epoll fd */
    uv_timer_t mhd_timer;        /* MHD's timeouts */
    uv_async_t async;            /* results and loaded models */
    uv_signal_t sig_term, sig_int;
    uv_timer_t drain_delay_timer, drain_deadline_timer, drain_grace_timer;
    int handles_open;
    struct MHD_Daemon *mhd;
    int port;
    metrics *metrics;

    int n_models;
    api_model api[SERVER_MAX_MODELS];        /* loop thread's view */
    moe_model *models[SERVER_MAX_MODELS];    /* written by the loader */
    sched *scheds[SERVER_MAX_MODELS];
    pthread_t loader;
    int loader_started;
    atomic_int n_loaded;         /* models[0..n) are ready (release/acquire) */
    atomic_int load_failed;
    atomic_int loader_cancel;
    char load_err[512];
    int ready;                   /* every model loaded */

    int draining, quiesced, deadline_passed, grace_passed, shutting_down;
    int exit_code;
    int n_active;                /* requests MHD has not completed */
    conn_ctx *inflight;          /* requests inside schedulers */
    unsigned long long next_id;
    unsigned id_salt;
};

struct conn_ctx {
    moe_server *srv;
    struct MHD_Connection *conn;
    metrics_endpoint ep;
    char method[8];
    char path[48];
    double t_start;
    char *body;
    size_t body_len, body_cap;
    int too_big;
    char id[40];

    /* In flight. */
    int model, multi, n_reqs, n_pending;
    sched_req *reqs[API_MAX_PROMPTS];
    ens_group *ens;              /* an ensemble/labels request: reqs are its members */
    uv_poll_t *watch;            /* disconnect watch while suspended */
    int client_gone;
    conn_ctx *prev, *next;

    /* Ready to queue once resumed. */
    int resp_ready, resp_status;
    char *resp_body;
    size_t resp_len;
    const char *resp_type;
    int retry_after;
    char *resp_error;            /* for the log line */
    int orphan;                  /* MHD dropped the connection while we worked */
};

static void mhd_pump(moe_server *s);
static void drain_check(moe_server *s);

/* Responses: the only place that turns a status into HTTP -------------------- */

static enum MHD_Result send_body(conn_ctx *x, int status, const char *type, char *body, size_t len,
                                 int retry_after, const char *allow)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    if (x->id[0]) MHD_add_response_header(r, "X-Request-Id", x->id);
    if (retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_after);
        MHD_add_response_header(r, "Retry-After", ra);
    }
    if (allow) MHD_add_response_header(r, "Allow", allow);
    enum MHD_Result rc = MHD_queue_response(x->conn, (unsigned)status, r);
    MHD_destroy_response(r);
    x->resp_status = status;
    return rc;
}

static enum MHD_Result send_json(conn_ctx *x, int status, char *body, size_t len)
{
    return send_body(x, status, "application/json", body, len, 0, NULL);
}

static enum MHD_Result send_error(conn_ctx *x, int status, const char *msg, int retry_after, const char *allow)
{
    size_t len;
    char *body = api_error_body(status, msg, &len);
    if (!body) return MHD_NO;
    free(x->resp_error);
    x->resp_error = strdup(msg);
    return send_body(x, status, "application/json", body, len, retry_after, allow);
}

static enum MHD_Result send_static(conn_ctx *x, int status, const char *json)
{
    char *b = strdup(json);
    return b ? send_json(x, status, b, strlen(b)) : MHD_NO;
}

/* Endpoints -------------------------------------------------------------------- */

static metrics_endpoint endpoint_of(const char *url)
{
    if (!strcmp(url, "/infer")) return EP_INFER;
    if (!strcmp(url, "/models") || !strcmp(url, "/v1/models")) return EP_MODELS;
    if (!strcmp(url, "/health") || !strcmp(url, "/livez")) return EP_HEALTH;
    if (!strcmp(url, "/ready") || !strcmp(url, "/readyz")) return EP_READY;
    if (!strcmp(url, "/metrics")) return EP_METRICS;
    return EP_OTHER;
}

static int is_ready(const moe_server *s) { return s->ready && !s->draining; }

static enum MHD_Result handle_ready(conn_ctx *x)
{
    moe_server *s = x->srv;
    if (is_ready(s)) return send_static(x, 200, "{\"status\":\"ready\"}");
    char msg[256];
    if (s->draining) snprintf(msg, sizeof msg, "not ready: draining (shutting down)");
    else snprintf(msg, sizeof msg, "not ready: loading models (%d of %d loaded)",
                  atomic_load(&s->n_loaded), s->n_models);
    return send_error(x, 503, msg, 1, NULL);
}

static enum MHD_Result handle_metrics(conn_ctx *x)
{
    char *body;
    size_t len;
    if (metrics_render(x->srv->metrics, &body, &len)) return send_error(x, 500, "out of memory", 0, NULL);
    return send_body(x, 200, "text/plain; version=0.0.4; charset=utf-8", body, len, 0, NULL);
}

static enum MHD_Result handle_models(conn_ctx *x)
{
    size_t len;
    char *body = strcmp(x->path, "/v1/models") ? api_models_response(x->srv->api, x->srv->n_models, &len)
                                              : api_models_v1_response(x->srv->api, x->srv->n_models, &len);
    return body ? send_json(x, 200, body, len) : send_error(x, 500, "out of memory", 0, NULL);
}

/* Constant-time comparison of the Authorization header with "Bearer <key>". */
static int auth_ok(conn_ctx *x)
{
    const char *key = x->srv->cfg->api_key;
    if (!key) return 1;
    const char *h = MHD_lookup_connection_value(x->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7)) return 0;
    h += 7;
    size_t hl = strlen(h), kl = strlen(key);
    unsigned char diff = hl != kl;
    for (size_t i = 0; i < kl; i++) diff |= (unsigned char)(key[i] ^ (i < hl ? h[i] : 0));
    return diff == 0;
}

/* Disconnect watch: a suspended connection is invisible to MHD, so the loop
 * watches its socket for the peer's hang-up and cancels the sequences. */
static void on_watch_closed(uv_handle_t *h) { free(h); }

static void watch_stop(conn_ctx *x)
{
    if (!x->watch) return;
    uv_close((uv_handle_t *)x->watch, on_watch_closed);
    x->watch = NULL;
}

static void on_client_event(uv_poll_t *h, int status, int events)
{
    conn_ctx *x = h->data;
    if (status >= 0 && !(events & UV_DISCONNECT)) return;
    x->client_gone = 1;
    for (int i = 0; i < x->n_reqs; i++) atomic_store(&x->reqs[i]->cancel, SCHED_CANCEL_CLIENT);
    sched_wake(x->srv->scheds[x->model]);
    watch_stop(x);
}

static void watch_start(conn_ctx *x)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(x->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return;
    uv_poll_t *w = malloc(sizeof *w);
    if (!w) return;
    if (uv_poll_init(&x->srv->loop, w, ci->connect_fd)) { free(w); return; }
    w->data = x;
    if (uv_poll_start(w, UV_DISCONNECT, on_client_event)) {
        uv_close((uv_handle_t *)w, on_watch_closed);
        return;
    }
    x->watch = w;
}

static void new_request_id(moe_server *s, conn_ctx *x)
{
    snprintf(x->id, sizeof x->id, "req-%08x-%llu", s->id_salt, ++s->next_id);
}

static void inflight_add(conn_ctx *x)
{
    moe_server *s = x->srv;
    x->n_pending = x->n_reqs;
    x->next = s->inflight;
    if (s->inflight) s->inflight->prev = x;
    s->inflight = x;
    watch_start(x);
    MHD_suspend_connection(x->conn);
}

/* One sequence per member, each in its model's scheduler (server/ensemble_req.c). */
static enum MHD_Result start_ensemble(conn_ctx *x, api_infer *q)
{
    moe_server *s = x->srv;
    char err[512];
    sched_spec sp = q->spec;
    sp.prompt = q->prompt[0];
    sp.n_prompt = q->n_prompt[0];
    sp.t_arrival = x->t_start;
    sp.deadline = x->t_start + (s->cfg->request_timeout > 0 ? s->cfg->request_timeout : 1e9);
    int rc = ens_group_create(&q->ens, s->api, s->scheds, &sp, &x->ens, x->reqs, err, sizeof err);
    x->model = q->model;
    api_infer_free(q);
    if (rc) return send_error(x, rc, err, rc == 503 ? 1 : 0, NULL);
    int n = ens_group_n_members(x->ens), full;
    for (int i = 0; i < n; i++) x->reqs[i]->owner = x;
    x->n_reqs = ens_group_submit(x->ens, x->reqs, n, &full);
    for (int i = x->n_reqs; i < n; i++) sched_req_free(x->reqs[i]);
    if (x->n_reqs == 0) {
        ens_group_free(x->ens);
        x->ens = NULL;
        if (full >= 0) {
            snprintf(err, sizeof err, "queue full (%d waiting for model '%s', --max-queue); retry shortly",
                     s->cfg->max_queue, s->api[full].name);
            return send_error(x, 503, err, 1, NULL);
        }
        return send_error(x, 503, "the server is shutting down; retry on another replica", 5, NULL);
    }
    inflight_add(x);  /* a partial submit comes back as 503 (the group is closed) */
    return MHD_YES;
}

static enum MHD_Result handle_infer(conn_ctx *x)
{
    moe_server *s = x->srv;
    if (s->quiesced || s->deadline_passed || s->shutting_down)
        return send_error(x, 503, "the server is shutting down; retry on another replica", 5, NULL);
    if (x->too_big) {
        char msg[160];
        snprintf(msg, sizeof msg, "request body over %ld bytes (--max-body-bytes); send a smaller body",
                 s->cfg->max_body_bytes);
        return send_error(x, 413, msg, 0, NULL);
    }
    api_infer q;
    char err[768];
    int rc = api_parse_infer(x->body ? x->body : "", x->body_len, s->api, s->n_models, &q, err, sizeof err);
    if (rc) return send_error(x, rc, err, rc == 503 ? 1 : 0, NULL);
    if (q.ens) return start_ensemble(x, &q);

    const api_model *am = &s->api[q.model];
    x->model = q.model;
    x->multi = q.multi;
    for (int i = 0; i < q.n_prompts; i++) {
        sched_spec sp = q.spec;
        sp.prompt = q.prompt[i];
        sp.n_prompt = q.n_prompt[i];
        sp.t_arrival = x->t_start;
        sp.deadline = x->t_start + (s->cfg->request_timeout > 0 ? s->cfg->request_timeout : 1e9);
        sched_req *r = sched_req_create(&am->model->weights.hp, am->max_seq_len, &sp, err, sizeof err);
        if (!r) {
            api_infer_free(&q);
            for (int j = 0; j < x->n_reqs; j++) sched_req_free(x->reqs[j]);
            x->n_reqs = 0;
            return send_error(x, 400, err, 0, NULL);
        }
        r->owner = x;
        r->index = i;
        x->reqs[x->n_reqs++] = r;
    }
    api_infer_free(&q);
    rc = sched_submit(s->scheds[x->model], x->reqs, x->n_reqs);
    if (rc) {
        for (int j = 0; j < x->n_reqs; j++) sched_req_free(x->reqs[j]);
        x->n_reqs = 0;
        if (rc == -1) {
            snprintf(err, sizeof err, "queue full (%d waiting for model '%s', --max-queue); retry shortly",
                     s->cfg->max_queue, am->name);
            return send_error(x, 503, err, 1, NULL);
        }
        return send_error(x, 503, "the server is shutting down; retry on another replica", 5, NULL);
    }
    inflight_add(x);
    return MHD_YES;
}

/* A request's sequences all came back: build its answer and resume it. */
static void infer_finished(moe_server *s, conn_ctx *x)
{
    if (x->prev) x->prev->next = x->next;
    else s->inflight = x->next;
    if (x->next) x->next->prev = x->prev;
    x->prev = x->next = NULL;
    watch_stop(x);

    int status = 200;
    const char *msg = NULL;
    for (int i = 0; i < x->n_reqs; i++)
        if (x->reqs[i]->status != 200 && status == 200) {
            status = x->reqs[i]->status;
            msg = x->reqs[i]->errmsg;
        }
    if (status == 200) {
        if (x->ens) {
            x->resp_body = ens_infer_response(x->ens, s->api, x->id, x->reqs, &x->resp_len);
            ens_group_record_metrics(x->ens, s->metrics);
        } else {
            x->resp_body = api_infer_response(&s->api[x->model], x->id, x->reqs, x->n_reqs, x->multi, &x->resp_len);
        }
        if (!x->resp_body) { status = 500; msg = "out of memory building the response"; }
    }
    if (status != 200) {
        x->resp_body = api_error_body(status, msg, &x->resp_len);
        x->retry_after = status == 503 ? 5 : 0;
        free(x->resp_error);
        x->resp_error = strdup(msg);
    }
    x->resp_type = "application/json";
    x->resp_status = status;
    x->resp_ready = 1;
    if (x->orphan) return;  /* freed by the caller */
    MHD_resume_connection(x->conn);
}

/* MHD callbacks ------------------------------------------------------------------ */

static void log_and_count(moe_server *s, conn_ctx *x)
{
    double dur = clock_mono_s() - x->t_start;
    metrics_request(s->metrics, x->ep, x->resp_status, dur);
    if (s->cfg->quiet || (x->ep != EP_INFER && x->resp_status < 400)) return;
    log_request_fields f = {x->id[0] ? x->id : "-", x->method, x->path, NULL, x->resp_status, 0, 0, 0, 0, 0,
                            dur * 1e3, x->resp_error};
    if (x->ep == EP_INFER && x->n_reqs > 0) {
        f.model = s->api[x->model].name;
        double qm = 0, pm = 0, dm = 0;
        for (int i = 0; i < x->n_reqs; i++) {
            sched_req *r = x->reqs[i];
            f.prompt_tokens += r->n_prompt;
            f.completion_tokens += r->n_gen;
            if (r->t_admit > 0) {
                double tf = r->t_first > 0 ? r->t_first : r->t_done;
                if ((r->t_admit - r->t_arrival) * 1e3 > qm) qm = (r->t_admit - r->t_arrival) * 1e3;
                if ((tf - r->t_admit) * 1e3 > pm) pm = (tf - r->t_admit) * 1e3;
                if ((r->t_done - tf) * 1e3 > dm) dm = (r->t_done - tf) * 1e3;
            }
        }
        f.queue_ms = qm; f.prefill_ms = pm; f.decode_ms = dm;
    }
    log_request(s->cfg->log_fmt, &f);
}

static void ctx_free(conn_ctx *x)
{
    for (int i = 0; i < x->n_reqs; i++) sched_req_free(x->reqs[i]);
    ens_group_free(x->ens);
    free(x->body);
    free(x->resp_body);
    free(x->resp_error);
    free(x);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)c; (void)toe;
    moe_server *s = cls;
    conn_ctx *x = *con_cls;
    if (!x) return;
    *con_cls = NULL;
    s->n_active--;
    if (!x->resp_status) x->resp_status = 499;  /* connection ended before an answer */
    log_and_count(s, x);
    if (x->n_pending > 0) {
        watch_stop(x);
        x->orphan = 1;  /* the scheduler still holds its sequences */
        x->client_gone = 1;
        for (int i = 0; i < x->n_reqs; i++) atomic_store(&x->reqs[i]->cancel, SCHED_CANCEL_CLIENT);
        sched_wake(s->scheds[x->model]);
        return;
    }
    ctx_free(x);  /* the drain check runs after MHD_run returns: never stop MHD from its callback */
}

static enum MHD_Result route(conn_ctx *x)
{
    int get = !strcmp(x->method, "GET") || !strcmp(x->method, "HEAD");
    int post = !strcmp(x->method, "POST");
    switch (x->ep) {
    case EP_HEALTH:
        return get ? send_static(x, 200, "{\"status\":\"ok\"}")
                   : send_error(x, 405, "use GET for /health", 0, "GET, HEAD");
    case EP_READY:
        return get ? handle_ready(x) : send_error(x, 405, "use GET for /ready", 0, "GET, HEAD");
    case EP_METRICS:
    case EP_MODELS:
        if (!get) return send_error(x, 405, x->ep == EP_METRICS ? "use GET for /metrics" : "use GET for /models", 0, "GET, HEAD");
        if (!auth_ok(x)) return send_error(x, 401, "missing or wrong 'Authorization: Bearer <key>' header", 0, NULL);
        return x->ep == EP_METRICS ? handle_metrics(x) : handle_models(x);
    case EP_INFER:
        if (!post) return send_error(x, 405, "use POST for /infer with a JSON body", 0, "POST");
        if (!auth_ok(x)) return send_error(x, 401, "missing or wrong 'Authorization: Bearer <key>' header", 0, NULL);
        return handle_infer(x);
    default: {
        char msg[128];
        snprintf(msg, sizeof msg, "no such path '%s'; try POST /infer, GET /models, /health, /ready, /metrics", x->path);
        return send_error(x, 404, msg, 0, NULL);
    }
    }
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    moe_server *s = cls;
    conn_ctx *x = *con_cls;
    if (!x) {
        if (!(x = calloc(1, sizeof *x))) return MHD_NO;
        x->srv = s;
        x->conn = c;
        x->t_start = clock_mono_s();
        x->ep = endpoint_of(url);
        snprintf(x->method, sizeof x->method, "%s", method);
        size_t n;
        char *p = api_utf8_clean(url, strnlen(url, 40), &n);
        snprintf(x->path, sizeof x->path, "%s", p ? p : "?");
        free(p);
        if (x->ep == EP_INFER) new_request_id(s, x);
        *con_cls = x;
        s->n_active++;
        /* A declared body over the limit is refused before it is read. */
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoll(cl, NULL, 10) > s->cfg->max_body_bytes) {
            x->too_big = 1;
            char msg[160];
            snprintf(msg, sizeof msg, "request body over %ld bytes (--max-body-bytes); send a smaller body",
                     s->cfg->max_body_bytes);
            return send_error(x, 413, msg, 0, NULL);
        }
        return MHD_YES;
    }
    if (x->resp_ready) {  /* resumed: the scheduler's answer */
        char *b = x->resp_body;
        x->resp_body = NULL;
        return send_body(x, x->resp_status, x->resp_type, b, x->resp_len, x->retry_after, NULL);
    }
    if (x->resp_status) {  /* answered early (413): discard the rest */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (x->too_big || x->body_len + n > (size_t)s->cfg->max_body_bytes) {
            x->too_big = 1;
            return MHD_YES;
        }
        if (x->body_len + n + 1 > x->body_cap) {
            size_t cap = (x->body_len + n + 1) * 2;
            if (cap > (size_t)s->cfg->max_body_bytes + 1) cap = (size_t)s->cfg->max_body_bytes + 1;
            char *b = realloc(x->body, cap);
            if (!b) return MHD_NO;
            x->body = b;
            x->body_cap = cap;
        }
        memcpy(x->body + x->body_len, upload, n);
        x->body_len += n;
        x->body[x->body_len] = 0;
        return MHD_YES;
    }
    return route(x);
}

/* libuv <-> MHD ----------------------------------------------------------------------- */

static void on_mhd_timer(uv_timer_t *t) { mhd_pump(t->data); }

static void on_mhd_poll(uv_poll_t *h, int status, int events)
{
    (void)status; (void)events;
    mhd_pump(h->data);
}

/* Lets MHD do all it can now, then re-arms the timer with MHD's next timeout. */
static void mhd_pump(moe_server *s)
{
    if (!s->mhd) return;
    MHD_run(s->mhd);
    if (s->draining) drain_check(s);
    if (!s->mhd) return;
    MHD_UNSIGNED_LONG_LONG to;
    if (MHD_get_timeout(s->mhd, &to) == MHD_YES)
        uv_timer_start(&s->mhd_timer, on_mhd_timer, to > 3600000 ? 3600000 : (uint64_t)to, 0);
    else
        uv_timer_stop(&s->mhd_timer);
}

/* Results and loaded models arrive here (uv_async_send calls coalesce). */
static void on_async(uv_async_t *a)
{
    moe_server *s = a->data;
    int n = atomic_load_explicit(&s->n_loaded, memory_order_acquire);
    for (int i = 0; i < n; i++)
        if (!s->api[i].model && s->models[i]) {
            s->api[i].model = s->models[i];
            s->api[i].max_seq_len = sched_max_seq_len(s->scheds[i]);
            s->api[i].kv_positions = sched_kv_positions(s->scheds[i]);
        }
    if (n == s->n_models && !s->ready) {
        s->ready = 1;
        metrics_set_state(s->metrics, is_ready(s), s->draining);
        log_event(s->cfg->log_fmt, "info", "ready: %d model(s) loaded (matmul: OpenBLAS %s kernels%s)", n,
                  matmul_blas_corename(),
                  matmul_blas_used() ? "" : ", not used: the engine's own are faster");
    }
    if (atomic_load(&s->load_failed) && !s->shutting_down) {
        log_event(s->cfg->log_fmt, "error", "%s", s->load_err);
        s->exit_code = 1;
        s->draining = s->quiesced = s->deadline_passed = s->grace_passed = 1;
        for (int i = 0; i < n; i++) if (s->scheds[i]) sched_abort_all(s->scheds[i]);
    }
    for (int i = 0; i < n; i++) {
        sched_req *list;
        if (!s->scheds[i] || !sched_take_done(s->scheds[i], &list)) continue;
        while (list) {
            sched_req *r = list;
            list = r->next;
            r->next = NULL;
            conn_ctx *x = r->owner;
            if (--x->n_pending == 0) {
                infer_finished(s, x);
                if (x->orphan) ctx_free(x);
            }
        }
    }
    mhd_pump(s);
    if (s->draining) drain_check(s);
}

/* Model loading (its own thread) --------------------------------------------------------- */

static void notify_loop(void *ctx) { uv_async_send(ctx); }

/* The default step budget: core/matmul switches to OpenBLAS sgemm at
 * matmul_sgemm_min_rows() rows and the two paths round differently, so a step that
 * stays below the switch computes every row exactly as it would alone (the issue's
 * "results do not depend on batching"); where sgemm is never used, 127 as with
 * 256-bit kernels, which keeps a long prompt's chunks from stalling the decodes
 * that share its steps. Larger budgets are allowed by flag. */
static int auto_batch_tokens(void)
{
    int n = matmul_sgemm_min_rows() - 1;
    if (n > 127) n = 127;
    if (n < 8) n = 8;
    return n;
}

/* The type the first layer's FFN (routed experts, else the dense FFN) is read in. */
/* The routed experts' types (a dense model: its FFN's), for the load line. */
static const char *ffn_types(const moe_weights *w, char *buf, size_t cap)
{
    const moe_layer_weights *L = &w->layers[0];
    return moe_ffn_raw_types(w->hp.n_expert ? &L->exp_raw : &L->ffn_raw, buf, cap);
}

/* Reads a mapped model file in before /ready says 200: otherwise the first
 * requests read it from disk (the 3.8 GB bench model with a cold page cache:
 * 3.2 s for the first 8 tokens, 0.1 s for the next request). In chunks, so that
 * a SIGTERM during a long read stops it: returns -1 then. A file larger than
 * the free memory is not read (it would only evict itself). */
#define PRELOAD_CHUNK ((size_t)256 << 20)
static int preload(moe_server *s, int i, const moe_model *m)
{
    const server_config *c = s->cfg;
    size_t size = m->mapped_bytes;
    if (c->no_preload || m->copied) return 0;
    if (size > pages_mem_available()) {
        log_event(c->log_fmt, "warn", "model '%s': %.1f MiB of weights not read in before ready: more than the "
                  "free memory; the first requests read them from disk", c->models[i].name, size / 1048576.0);
        return 0;
    }
    double t0 = clock_mono_s();
    for (int p = 0; p < m->n_parts; p++)
        for (size_t off = 0; off < gguf_file_size(m->parts[p]); off += PRELOAD_CHUNK) {
            if (atomic_load(&s->loader_cancel)) return -1;
            gguf_page_in(m->parts[p], off, PRELOAD_CHUNK);
        }
    log_event(c->log_fmt, "info", "model '%s': %.1f MiB of weights read in before ready in %.0f ms",
              c->models[i].name, size / 1048576.0, (clock_mono_s() - t0) * 1e3);
    return 0;
}

static void *loader_main(void *arg)
{
    moe_server *s = arg;
    const server_config *c = s->cfg;
    /* Linux nice values are per thread and inherited: the scheduler and the engine's
     * pool threads created below run at this priority, the loop thread keeps its own. */
    if (c->compute_nice > 0) {
        id_t tid = (id_t)syscall(SYS_gettid);
        errno = 0;
        int cur = getpriority(PRIO_PROCESS, tid);
        if (errno == 0 && setpriority(PRIO_PROCESS, tid, cur + c->compute_nice))
            log_event(c->log_fmt, "warn", "--compute-nice %d: %s", c->compute_nice, strerror(errno));
    }
    for (int i = 0; i < s->n_models && !atomic_load(&s->loader_cancel); i++) {
        char err[400];
        double t0 = clock_mono_s();
        moe_model *m;
        if (moe_model_load_opts(c->models[i].path, &(moe_load_opts){c->weights, c->projections}, &m, err,
                                sizeof err)) {
            snprintf(s->load_err, sizeof s->load_err, "model '%s' (%s): %s", c->models[i].name, c->models[i].path, err);
            atomic_store(&s->load_failed, 1);
            uv_async_send(&s->async);
            return NULL;
        }
        if (preload(s, i, m)) {
            moe_model_free(m);
            return NULL;
        }
        sched_params sp = {c->threads > 0 ? c->threads : (int)sysconf(_SC_NPROCESSORS_ONLN), c->max_seqs,
                           c->max_batch_tokens > 0 ? c->max_batch_tokens : auto_batch_tokens(), c->batch_wait_us, c->ctx, c->kv_cache_mb, c->kv_cache_tokens,
                           c->max_queue, c->no_packed_projections, c->kv_type};
        if (sp.n_threads < 1) sp.n_threads = 1;
        sched *sc;
        if (sched_create(&sp, m, s->metrics, i, notify_loop, &s->async, &sc, err, sizeof err)) {
            snprintf(s->load_err, sizeof s->load_err, "model '%s': %s", c->models[i].name, err);
            moe_model_free(m);
            atomic_store(&s->load_failed, 1);
            uv_async_send(&s->async);
            return NULL;
        }
        double secs = clock_mono_s() - t0;
        const moe_hparams *hp = &m->weights.hp;
        const moe_engine *e = sched_engine(sc);
        metrics_model_loaded(s->metrics, i, hp->n_layer, hp->n_expert, moe_engine_kv_blocks_total(e),
                             moe_engine_kv_bytes(e), secs);
        char packed[64] = "packed projections off", ftypes[64];
        if (moe_engine_packed_bytes(e))
            snprintf(packed, sizeof packed, "packed projections %.1f MiB (made in the background)",
                     moe_engine_packed_bytes(e) / 1048576.0);
        log_event(c->log_fmt, "info",
                  "model '%s' loaded from %s: %s, %.1fM parameters (%.1fM active), %d experts (top-%d), "
                  "%d layers, vocabulary %d, context %d, KV cache %.1f MiB (%d positions, %s), %s, "
                  "steps of up to %d tokens / %d sequences, weights %s (FFNs read as %s, %.1f MiB converted "
                  "to F32%s), %.0f ms",
                  c->models[i].name, c->models[i].path, moe_arch_get(hp->arch)->name,
                  moe_hparams_n_params(hp, m->tied_output) / 1e6, moe_hparams_n_params_active(hp, m->tied_output) / 1e6,
                  hp->n_expert, hp->n_expert_used, hp->n_layer, hp->n_vocab, sched_max_seq_len(sc),
                  moe_engine_kv_bytes(e) / 1048576.0, sched_kv_positions(sc), kv_type_name(sp.kv_type), packed,
                  sp.max_batch_tokens,
                  sp.max_seqs < sp.max_batch_tokens ? sp.max_seqs : sp.max_batch_tokens,
                  gguf_placement(m->gguf), ffn_types(&m->weights, ftypes, sizeof ftypes), m->converted_bytes / 1048576.0,
                  moe_weights_f32_projections(&m->weights) || !m->weights.layers[0].wq_raw.raw
                      ? "" : "; projections read in the file's type",
                  secs * 1e3);
        s->models[i] = m;
        s->scheds[i] = sc;
        atomic_store_explicit(&s->n_loaded, i + 1, memory_order_release);
        uv_async_send(&s->async);
    }
    return NULL;
}

/* Drain ------------------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    moe_server *s = h->data;
    s->handles_open--;
}

static void close_handle(moe_server *s, uv_handle_t *h)
{
    if (uv_is_closing(h)) return;
    h->data = s;
    uv_close(h, on_handle_closed);
}

static void shutdown_now(moe_server *s)
{
    if (s->shutting_down) return;
    s->shutting_down = 1;
    /* The loader posts to the async handle: wait for it before closing that. */
    atomic_store(&s->loader_cancel, 1);
    if (s->loader_started) {
        pthread_join(s->loader, NULL);
        s->loader_started = 0;
    }
    close_handle(s, (uv_handle_t *)&s->mhd_poll);
    if (s->mhd) {
        MHD_stop_daemon(s->mhd);
        s->mhd = NULL;
    }
    close_handle(s, (uv_handle_t *)&s->mhd_timer);
    close_handle(s, (uv_handle_t *)&s->sig_term);
    close_handle(s, (uv_handle_t *)&s->sig_int);
    close_handle(s, (uv_handle_t *)&s->drain_delay_timer);
    close_handle(s, (uv_handle_t *)&s->drain_deadline_timer);
    close_handle(s, (uv_handle_t *)&s->drain_grace_timer);
    close_handle(s, (uv_handle_t *)&s->async);
    log_event(s->cfg->log_fmt, "info", "drained; exiting");
}

/* Exits once nothing is inside a scheduler and every answer went out (or the
 * grace period after the deadline ended for connections that never finish). */
static void drain_check(moe_server *s)
{
    if (!s->quiesced || s->inflight || s->shutting_down) return;
    if (s->n_active > 0 && !s->grace_passed) return;
    shutdown_now(s);
}

static void on_drain_grace(uv_timer_t *t)
{
    moe_server *s = t->data;
    s->grace_passed = 1;
    drain_check(s);
}

static void on_drain_deadline(uv_timer_t *t)
{
    moe_server *s = t->data;
    s->deadline_passed = 1;
    if (s->inflight) log_event(s->cfg->log_fmt, "warn", "drain timeout: answering the rest with 503");
    for (int i = 0; i < atomic_load_explicit(&s->n_loaded, memory_order_acquire); i++)
        if (s->scheds[i]) sched_abort_all(s->scheds[i]);
    uv_timer_start(&s->drain_grace_timer, on_drain_grace, 2000, 0);
    drain_check(s);
}

static void on_drain_delay(uv_timer_t *t)
{
    moe_server *s = t->data;
    if (s->mhd && !s->quiesced) {
        MHD_socket fd = MHD_quiesce_daemon(s->mhd);
        if (fd != MHD_INVALID_SOCKET) close(fd);
    }
    s->quiesced = 1;
    log_event(s->cfg->log_fmt, "info", "drain: no longer accepting connections");
    mhd_pump(s);
    drain_check(s);
}

static void on_signal(uv_signal_t *h, int signum)
{
    moe_server *s = h->data;
    if (s->draining) {
        log_event(s->cfg->log_fmt, "warn", "second signal (%s): exiting at once", signum == SIGINT ? "SIGINT" : "SIGTERM");
        _exit(1);
    }
    s->draining = 1;
    metrics_set_state(s->metrics, 0, 1);
    log_event(s->cfg->log_fmt, "info", "%s: draining (ready=503 now; accepting for %.3gs, finishing work for %.3gs)",
              signum == SIGINT ? "SIGINT" : "SIGTERM", s->cfg->drain_delay, s->cfg->drain_timeout);
    uv_timer_start(&s->drain_delay_timer, on_drain_delay, (uint64_t)(s->cfg->drain_delay * 1e3), 0);
    uv_timer_start(&s->drain_deadline_timer, on_drain_deadline, (uint64_t)(s->cfg->drain_timeout * 1e3), 0);
}

/* Create / run / free ------------------------------------------------------------------------- */

static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc || !res) {
        snprintf(err, errlen, "--host %s: %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* libmicrohttpd's own messages go through our log (so --log-format json holds). */
static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    const server_config *c = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    log_event(c->log_fmt, "warn", "libmicrohttpd: %s", msg);
}

static void init_timer(moe_server *s, uv_timer_t *t)
{
    uv_timer_init(&s->loop, t);
    t->data = s;
    s->handles_open++;
}

int server_create(const server_config *cfg, moe_server **out, char *err, size_t errlen)
{
    moe_server *s = calloc(1, sizeof *s);
    if (!s) { snprintf(err, errlen, "out of memory"); return -1; }
    s->cfg = cfg;
    s->n_models = cfg->n_models;
    s->id_salt = (unsigned)time(NULL) ^ ((unsigned)getpid() << 16);
    const char *names[SERVER_MAX_MODELS];
    for (int i = 0; i < cfg->n_models; i++) {
        names[i] = cfg->models[i].name;
        s->api[i].name = cfg->models[i].name;
        s->api[i].path = cfg->models[i].path;
    }
    if (metrics_create(&s->metrics, names, cfg->n_models)) { free(s); snprintf(err, errlen, "out of memory"); return -1; }
    if (uv_loop_init(&s->loop)) { metrics_free(s->metrics); free(s); snprintf(err, errlen, "uv_loop_init failed"); return -1; }

    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(cfg->host, cfg->port, &ss, &sl, err, errlen)) goto fail;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    s->mhd = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_request, s,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, (void *)cfg,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)4096,
                              MHD_OPTION_END);
    if (!s->mhd) {
        snprintf(err, errlen, "cannot listen on %s:%d (%s)", cfg->host, cfg->port, strerror(errno));
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!di || uv_poll_init(&s->loop, &s->mhd_poll, di->epoll_fd)) {
        snprintf(err, errlen, "cannot watch libmicrohttpd's epoll descriptor");
        goto fail_mhd;
    }
    s->mhd_poll.data = s;
    s->handles_open++;
    uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
    init_timer(s, &s->mhd_timer);
    init_timer(s, &s->drain_delay_timer);
    init_timer(s, &s->drain_deadline_timer);
    init_timer(s, &s->drain_grace_timer);
    uv_async_init(&s->loop, &s->async, on_async);
    s->async.data = s;
    s->handles_open++;
    uv_signal_init(&s->loop, &s->sig_term);
    uv_signal_init(&s->loop, &s->sig_int);
    s->sig_term.data = s->sig_int.data = s;
    s->handles_open += 2;
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_signal, SIGINT);

    log_event(cfg->log_fmt, "info", "listening on http://%s%s%s:%d (%d model(s) loading)",
              ss.ss_family == AF_INET6 ? "[" : "", cfg->host, ss.ss_family == AF_INET6 ? "]" : "", s->port,
              cfg->n_models);
    if (pthread_create(&s->loader, NULL, loader_main, s)) {
        snprintf(err, errlen, "cannot start the loader thread");
        s->exit_code = 1;
        shutdown_now(s);
        uv_run(&s->loop, UV_RUN_DEFAULT);
        uv_loop_close(&s->loop);
        metrics_free(s->metrics);
        free(s);
        return -1;
    }
    s->loader_started = 1;
    *out = s;
    return 0;
fail_mhd:
    MHD_stop_daemon(s->mhd);
fail:
    uv_loop_close(&s->loop);
    metrics_free(s->metrics);
    free(s);
    return -1;
}

int server_run(moe_server *s)
{
    mhd_pump(s);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return s->exit_code;
}

int server_port(const moe_server *s) { return s->port; }

void server_free(moe_server *s)
{
    if (!s) return;
    if (!s->shutting_down) {
        shutdown_now(s);
        uv_run(&s->loop, UV_RUN_DEFAULT);
    }
    for (int i = 0; i < s->n_models; i++) {
        sched_free(s->scheds[i]);  /* nothing is inside: the drain waited for it */
        if (s->models[i]) moe_model_free(s->models[i]);
    }
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    metrics_free(s->metrics);
    free(s);
}
