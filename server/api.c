/* api.c -- request validation and response bodies (jansson). */
#include "server/api.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/model.h"
#include "models/tokenizer.h"
#include "server/ensemble_req.h"

static const char *const known_fields[] = {
    "prompt", "tokens", "prompts", "max_tokens", "temperature", "top_k", "top_p", "min_p",
    "repeat_penalty", "repeat_last_n", "seed", "stop", "model", "logits", "top_logprobs",
    "full_logits", "routing", "ensemble", "labels", "label_prefix", NULL};

#define DEFAULT_MAX_TOKENS 16
#define DEFAULT_TOP_LOGPROBS 5

/* Errors ---------------------------------------------------------------------- */

const char *api_error_type(int status)
{
    switch (status) {
    case 400: return "invalid_request";
    case 401: return "authentication_error";
    case 404: return "not_found";
    case 405: return "method_not_allowed";
    case 413: return "too_large";
    case 499: return "cancelled";
    case 503: return "unavailable";
    case 504: return "timeout";
    default: return "server_error";
    }
}

char *api_utf8_clean(const char *s, size_t n, size_t *out_len)
{
    char *o = malloc(n * 3 + 1), *w = o;
    if (!o) return NULL;
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        unsigned c = *p;
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        int ok = len > 0 && p + len <= end;
        for (int i = 1; ok && i < len; i++) ok = (p[i] & 0xC0) == 0x80;
        if (ok && len > 1) {
            unsigned cp = c & (0x7F >> len);
            for (int i = 1; i < len; i++) cp = (cp << 6) | (p[i] & 0x3F);
            ok = cp >= (len == 2 ? 0x80u : len == 3 ? 0x800u : 0x10000u) && cp <= 0x10FFFF &&
                 !(cp >= 0xD800 && cp <= 0xDFFF);
        }
        if (ok && c == 0) ok = 0;  /* keep NUL out of JSON strings */
        if (ok) {
            memcpy(w, p, (size_t)len);
            w += len;
            p += len;
        } else {
            memcpy(w, "\xEF\xBF\xBD", 3);
            w += 3;
            p++;
        }
    }
    *w = 0;
    if (out_len) *out_len = (size_t)(w - o);
    return o;
}

static char *dump(json_t *j, size_t *len)
{
    char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(j);
    if (s && len) *len = strlen(s);
    return s;
}

char *api_error_body(int status, const char *message, size_t *len)
{
    size_t n;
    char *msg = api_utf8_clean(message, strlen(message), &n);
    json_t *e = json_pack("{s:{s:i,s:s,s:s}}", "error", "code", status, "type", api_error_type(status),
                          "message", msg ? msg : "error");
    free(msg);
    return dump(e, len);
}

/* Validation ------------------------------------------------------------------- */

static int fail(char *err, size_t errlen, int status, const char *fmt, const char *a)
{
    snprintf(err, errlen, fmt, a);
    return status;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi, long long *out,
                   char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v) return 0;
    if (!json_is_integer(v)) {
        snprintf(err, errlen, "'%s' must be an integer in [%lld, %lld]", key, lo, hi);
        return 400;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        snprintf(err, errlen, "'%s' is %lld; it must be in [%lld, %lld]", key, x, lo, hi);
        return 400;
    }
    *out = x;
    return 0;
}

static int get_num(json_t *o, const char *key, double lo, double hi, int lo_open, double *out,
                   char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v) return 0;
    if (!json_is_number(v)) {
        snprintf(err, errlen, "'%s' must be a number in %s%g, %g]", key, lo_open ? "(" : "[", lo, hi);
        return 400;
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
        snprintf(err, errlen, "'%s' is %g; it must be in %s%g, %g]", key, x, lo_open ? "(" : "[", lo, hi);
        return 400;
    }
    *out = x;
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return fail(err, errlen, 400, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

/* One prompt: a string (tokenized) or an array of ids. */
static int parse_prompt(json_t *v, const char *what, const api_model *am, int32_t **ids_out,
                        int *n_out, char *err, size_t errlen)
{
    const moe_model *m = am->model;
    int n_vocab = m->weights.hp.n_vocab;
    if (json_is_string(v)) {
        if (!m->tokenizer) {
            snprintf(err, errlen, "model '%s' has no tokenizer: send '%s' as an array of token ids",
                     am->name, what);
            return 400;
        }
        int32_t *ids = NULL;
        size_t n = 0;
        char terr[200];
        if (tokenizer_encode(m->tokenizer, json_string_value(v), json_string_length(v),
                             TOKENIZE_ADD_SPECIAL, &ids, &n, terr, sizeof terr)) {
            snprintf(err, errlen, "'%s' cannot be tokenized: %s", what, terr);
            return 400;
        }
        if (n == 0) {
            free(ids);
            return fail(err, errlen, 400, "'%s' is empty: give at least one token of text", what);
        }
        if (n > (size_t)am->max_seq_len) {
            snprintf(err, errlen, "'%s' is %zu tokens, over the context of %d tokens: shorten it",
                     what, n, am->max_seq_len);
            free(ids);
            return 413;
        }
        *ids_out = ids;
        *n_out = (int)n;
        return 0;
    }
    if (!json_is_array(v))
        return fail(err, errlen, 400, "'%s' must be a string or an array of token ids", what);
    size_t n = json_array_size(v);
    if (n == 0) return fail(err, errlen, 400, "'%s' is empty: give at least one token id", what);
    if (n > (size_t)am->max_seq_len) {
        snprintf(err, errlen, "'%s' is %zu tokens, over the context of %d tokens: shorten it", what, n,
                 am->max_seq_len);
        return 413;
    }
    int32_t *ids = malloc(n * sizeof *ids);
    if (!ids) return fail(err, errlen, 500, "out of memory%s", "");
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(v, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= n_vocab) {
            snprintf(err, errlen, "'%s'[%zu] must be a token id in [0, %d) (the vocabulary of '%s')",
                     what, i, n_vocab, am->name);
            free(ids);
            return 400;
        }
        ids[i] = (int32_t)json_integer_value(t);
    }
    *ids_out = ids;
    *n_out = (int)n;
    return 0;
}

static int check_fields(json_t *o, char *err, size_t errlen)
{
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        int known = 0;
        for (int i = 0; known_fields[i]; i++) known |= !strcmp(key, known_fields[i]);
        if (!known) {
            size_t n;
            char *k = api_utf8_clean(key, strlen(key) > 64 ? 64 : strlen(key), &n);
            snprintf(err, errlen, "unknown field '%s'; known fields: prompt, tokens, prompts, max_tokens, "
                     "temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop, model, "
                     "logits, top_logprobs, full_logits, routing, ensemble, labels, label_prefix", k ? k : "?");
            free(k);
            return 400;
        }
    }
    return 0;
}

static int pick_model(json_t *o, const api_model *models, int n_models, int *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, "model");
    *out = 0;
    if (v) {
        if (!json_is_string(v)) return fail(err, errlen, 400, "'model' must be a string%s", "");
        int found = -1;
        for (int i = 0; i < n_models; i++)
            if (!strcmp(models[i].name, json_string_value(v))) found = i;
        if (found < 0) {
            size_t n;
            char *name = api_utf8_clean(json_string_value(v), json_string_length(v) > 64 ? 64 : json_string_length(v), &n);
            char list[512] = "";
            for (int i = 0; i < n_models; i++) {
                size_t l = strlen(list);
                snprintf(list + l, sizeof list - l, "%s'%s'", i ? ", " : "", models[i].name);
            }
            snprintf(err, errlen, "unknown model '%s'; this server has %s (GET /models)", name ? name : "?", list);
            free(name);
            return 404;
        }
        *out = found;
    }
    if (!models[*out].model) {
        snprintf(err, errlen, "model '%s' is still loading; retry shortly (GET /ready)", models[*out].name);
        return 503;
    }
    return 0;
}

static int parse_sampling(json_t *o, const api_model *am, api_infer *q, char *err, size_t errlen)
{
    int rc;
    long long x;
    double d;
    sampler_params sp = sampler_default_params();
    sp.temperature = 0;  /* the API's default is greedy */
    int n_vocab = am->model->weights.hp.n_vocab;
    x = DEFAULT_MAX_TOKENS;
    if ((rc = get_int(o, "max_tokens", 0, am->max_seq_len, &x, err, errlen))) return rc;
    q->spec.max_tokens = (int)x;
    d = sp.temperature;
    if ((rc = get_num(o, "temperature", 0, 100, 0, &d, err, errlen))) return rc;
    sp.temperature = (float)d;
    x = sp.top_k;
    if ((rc = get_int(o, "top_k", 0, n_vocab, &x, err, errlen))) return rc;
    sp.top_k = (int)x;
    d = sp.top_p;
    if ((rc = get_num(o, "top_p", 0, 1, 1, &d, err, errlen))) return rc;
    sp.top_p = (float)d;
    d = sp.min_p;
    if ((rc = get_num(o, "min_p", 0, 1, 0, &d, err, errlen))) return rc;
    sp.min_p = (float)d;
    d = sp.repeat_penalty;
    if ((rc = get_num(o, "repeat_penalty", 0, 10, 1, &d, err, errlen))) return rc;
    sp.repeat_penalty = (float)d;
    x = sp.repeat_last_n;
    if ((rc = get_int(o, "repeat_last_n", -1, 1 << 24, &x, err, errlen))) return rc;
    sp.repeat_last_n = (int)x;
    x = (long long)sp.seed;
    if ((rc = get_int(o, "seed", 0, 0x7FFFFFFFFFFFFFFFLL, &x, err, errlen))) return rc;
    sp.seed = (uint64_t)x;
    char serr[200];
    if (sampler_params_validate(&sp, serr, sizeof serr)) {
        snprintf(err, errlen, "sampling parameters: %s", serr);
        return 400;
    }
    q->spec.sp = sp;
    return 0;
}

static int parse_outputs(json_t *o, api_infer *q, char *err, size_t errlen)
{
    int rc;
    json_t *v = json_object_get(o, "logits");
    q->spec.logits = LOGITS_NONE;
    if (v) {
        const char *s = json_is_string(v) ? json_string_value(v) : "";
        if (!strcmp(s, "none")) q->spec.logits = LOGITS_NONE;
        else if (!strcmp(s, "last")) q->spec.logits = LOGITS_LAST;
        else if (!strcmp(s, "all")) q->spec.logits = LOGITS_ALL;
        else return fail(err, errlen, 400, "'logits' must be \"none\", \"last\" or \"all\"%s", "");
    }
    long long x = DEFAULT_TOP_LOGPROBS;
    if ((rc = get_int(o, "top_logprobs", 0, API_MAX_TOP_LOGPROBS, &x, err, errlen))) return rc;
    q->spec.top_n = (int)x;
    if ((rc = get_bool(o, "full_logits", &q->spec.full_logits, err, errlen))) return rc;
    if ((rc = get_bool(o, "routing", &q->spec.routing, err, errlen))) return rc;

    v = json_object_get(o, "stop");
    if (v) {
        if (!json_is_array(v) || json_array_size(v) > API_MAX_STOPS) {
            snprintf(err, errlen, "'stop' must be an array of at most %d strings", API_MAX_STOPS);
            return 400;
        }
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *s = json_array_get(v, i);
            if (!json_is_string(s) || json_string_length(s) == 0 || json_string_length(s) > API_MAX_STOP_BYTES ||
                strlen(json_string_value(s)) != json_string_length(s)) {
                snprintf(err, errlen, "'stop'[%zu] must be a non-empty string of at most %d bytes", i,
                         API_MAX_STOP_BYTES);
                return 400;
            }
            if (!(q->stop[q->n_stops] = strdup(json_string_value(s)))) return 500;
            q->n_stops++;
        }
    }
    q->spec.stops = (const char *const *)q->stop;
    q->spec.n_stops = q->n_stops;
    return 0;
}

static int parse_prompts(json_t *o, const api_model *am, api_infer *q, char *err, size_t errlen)
{
    json_t *p = json_object_get(o, "prompt"), *t = json_object_get(o, "tokens"), *ps = json_object_get(o, "prompts");
    if ((p != NULL) + (t != NULL) + (ps != NULL) != 1)
        return fail(err, errlen, 400, "give exactly one of 'prompt' (text), 'tokens' (ids) or 'prompts' (array)%s", "");
    if (p && !json_is_string(p)) return fail(err, errlen, 400, "'prompt' must be a string (or use 'tokens' for ids)%s", "");
    if (t && !json_is_array(t)) return fail(err, errlen, 400, "'tokens' must be an array of token ids%s", "");
    if (p || t) {
        q->n_prompts = 1;
        return parse_prompt(p ? p : t, p ? "prompt" : "tokens", am, &q->prompt[0], &q->n_prompt[0], err, errlen);
    }
    if (!json_is_array(ps) || json_array_size(ps) == 0 || json_array_size(ps) > API_MAX_PROMPTS) {
        snprintf(err, errlen, "'prompts' must be an array of 1 to %d prompts (strings or arrays of ids)",
                 API_MAX_PROMPTS);
        return 400;
    }
    q->multi = 1;
    for (size_t i = 0; i < json_array_size(ps); i++) {
        char what[32];
        snprintf(what, sizeof what, "prompts[%zu]", i);
        int rc = parse_prompt(json_array_get(ps, i), what, am, &q->prompt[i], &q->n_prompt[i], err, errlen);
        if (rc) return rc;
        q->n_prompts++;
    }
    return 0;
}

/* KV blocks are reserved for the whole request: it must fit the pool at all.
 * Optional outputs are bounded too, so one request cannot ask for gigabytes. */
#define API_MAX_OUTPUT_CELLS (4L << 20)  /* ~40 bytes each as JSON values */

static int check_fits(const api_model *am, const api_infer *q, char *err, size_t errlen)
{
    const moe_hparams *hp = &am->model->weights.hp;
    long route_cells = 0, full_cells = 0, logit_cells = 0;
    for (int i = 0; i < q->n_prompts; i++) {
        long pos = (long)q->n_prompt[i] + q->spec.max_tokens;
        long entries = q->spec.logits == LOGITS_ALL ? pos : q->spec.logits == LOGITS_LAST ? 1 : 0;
        logit_cells += entries * (4L * q->spec.top_n + 1);  /* id, token, logit, logprob each */
        if (q->spec.routing) route_cells += pos * hp->n_layer * (hp->n_expert_used > 0 ? hp->n_expert_used : 0);
        if (q->spec.full_logits) full_cells += hp->n_vocab;
    }
    const char *what = route_cells > API_MAX_OUTPUT_CELLS  ? "routing"
                       : full_cells > API_MAX_OUTPUT_CELLS   ? "full_logits"
                       : logit_cells > API_MAX_OUTPUT_CELLS  ? "logits"
                                                             : NULL;
    if (what) {
        snprintf(err, errlen, "the requested %s output is too large (over %ld values): ask for fewer prompts, "
                 "tokens or top_logprobs", what, API_MAX_OUTPUT_CELLS);
        return 413;
    }
    for (int i = 0; i < q->n_prompts; i++) {
        long need = (long)q->n_prompt[i] + (q->spec.max_tokens > 0 ? q->spec.max_tokens - 1 : 0);
        if (need > am->max_seq_len) need = am->max_seq_len;
        if (need > am->kv_positions) {
            snprintf(err, errlen, "the request needs %ld KV cache positions but the pool holds %d: "
                     "lower max_tokens or the prompt, or start the server with a larger --kv-cache-mb",
                     need, am->kv_positions);
            return 413;
        }
    }
    return 0;
}

int api_parse_infer(const char *body, size_t len, const api_model *models, int n_models,
                    api_infer *q, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    json_error_t je;
    json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        snprintf(err, errlen, "invalid JSON at line %d column %d: %s", je.line, je.column, je.text);
        return 400;
    }
    int rc;
    if (!json_is_object(o)) rc = fail(err, errlen, 400, "the body must be a JSON object%s", "");
    else if (!(rc = check_fields(o, err, errlen)) && !(rc = pick_model(o, models, n_models, &q->model, err, errlen)) &&
             (ens_first_member(o, models, n_models, &q->model), 1) &&
             !(rc = parse_sampling(o, &models[q->model], q, err, errlen)) &&
             !(rc = parse_outputs(o, q, err, errlen)) &&
             !(rc = parse_prompts(o, &models[q->model], q, err, errlen)) &&
             !(rc = check_fits(&models[q->model], q, err, errlen)))
        rc = ens_parse(o, models, n_models, q, &q->ens, err, errlen);
    json_decref(o);
    if (rc) api_infer_free(q);
    return rc;
}

void api_infer_free(api_infer *q)
{
    for (int i = 0; i < API_MAX_PROMPTS; i++) free(q->prompt[i]);
    for (int i = 0; i < API_MAX_STOPS; i++) free(q->stop[i]);
    ens_spec_free(q->ens);
    memset(q, 0, sizeof *q);
}

/* Responses --------------------------------------------------------------------- */

static json_t *jnum(double x) { return isfinite(x) ? json_real(x) : json_null(); }

static json_t *jstr_clean(const char *s, size_t n)
{
    size_t m;
    char *c = api_utf8_clean(s, n, &m);
    json_t *j = c ? json_stringn(c, m) : json_null();
    free(c);
    return j;
}

static json_t *token_text(const moe_model *m, int32_t id)
{
    if (!m->tokenizer) return json_null();
    char buf[256];
    int n = tokenizer_token_to_piece(m->tokenizer, id, 1, buf, sizeof buf);
    if (n < 0 || n > (int)sizeof buf) return json_null();
    return jstr_clean(buf, (size_t)n);
}

static json_t *ids_array(const int32_t *ids, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    return a;
}

static const char *finish_name(finish_kind f)
{
    static const char *names[FIN_COUNT] = {"length", "stop", "eos", "cancelled", "timeout", "drained", "error"};
    return names[f];
}

static json_t *logits_json(const moe_model *m, const sched_req *r)
{
    json_t *a = json_array();
    for (int e = 0; e < r->n_entries; e++) {
        json_t *top = json_array();
        for (int j = 0; j < r->top_n; j++) {
            size_t c = (size_t)e * (size_t)r->top_n + (size_t)j;
            json_array_append_new(top, json_pack("{s:i,s:o,s:o,s:o}", "id", r->top_ids[c], "token",
                                                 token_text(m, r->top_ids[c]), "logit", jnum(r->top_logits[c]),
                                                 "logprob", jnum(r->top_logprobs[c])));
        }
        json_array_append_new(a, json_pack("{s:i,s:o}", "pos", r->entry_pos[e], "top", top));
    }
    return a;
}

static json_t *routing_json(const sched_req *r)
{
    json_t *a = json_array();
    for (int p = 0; p < r->n_routed; p++) {
        json_t *ex = json_array(), *w = json_array();
        for (int l = 0; l < r->n_layer; l++) {
            size_t base = ((size_t)p * (size_t)r->n_layer + (size_t)l) * (size_t)r->n_used;
            json_t *el = json_array(), *wl = json_array();
            for (int k = 0; k < r->n_used; k++) {
                json_array_append_new(el, json_integer(r->route_expert[base + (size_t)k]));
                json_array_append_new(wl, jnum(r->route_weight[base + (size_t)k]));
            }
            json_array_append_new(ex, el);
            json_array_append_new(w, wl);
        }
        json_array_append_new(a, json_pack("{s:i,s:i,s:o,s:o}", "pos", p, "token", r->seq_tokens[p],
                                           "experts", ex, "weights", w));
    }
    return a;
}

static json_t *result_json(const api_model *am, const sched_req *r)
{
    json_t *o = json_object();
    json_object_set_new(o, "tokens", ids_array(r->seq_tokens + r->n_prompt, r->n_gen));
    json_object_set_new(o, "text", am->model->tokenizer ? jstr_clean(r->text, r->text_len) : json_null());
    json_object_set_new(o, "finish_reason", json_string(finish_name(r->finish)));
    json_object_set_new(o, "prompt_tokens", ids_array(r->seq_tokens, r->n_prompt));
    if (r->logits != LOGITS_NONE) json_object_set_new(o, "logits", logits_json(am->model, r));
    if (r->full_row) {
        json_t *a = json_array();
        for (int i = 0; i < r->n_vocab; i++) json_array_append_new(a, jnum(r->full_row[i]));
        json_object_set_new(o, "full_logits", a);
        json_object_set_new(o, "full_logits_pos", json_integer(r->full_pos));
    }
    if (r->routing) json_object_set_new(o, "routing", routing_json(r));
    json_object_set_new(o, "usage", json_pack("{s:i,s:i}", "prompt_tokens", r->n_prompt,
                                              "completion_tokens", r->n_gen));
    double t_first = r->t_first > 0 ? r->t_first : r->t_done;
    json_object_set_new(o, "timings", json_pack("{s:o,s:o,s:o}",
                        "queue_ms", jnum((r->t_admit - r->t_arrival) * 1e3),
                        "prefill_ms", jnum((t_first - r->t_admit) * 1e3),
                        "decode_ms", jnum((r->t_done - t_first) * 1e3)));
    return o;
}

char *api_infer_response(const api_model *am, const char *id, sched_req *const *reqs, int n,
                         int multi, size_t *len)
{
    json_t *o;
    if (!multi) {
        o = result_json(am, reqs[0]);
    } else {
        o = json_object();
        json_t *res = json_array();
        int pt = 0, ct = 0;
        for (int i = 0; i < n; i++) {
            json_t *r = result_json(am, reqs[i]);
            json_object_set_new(r, "index", json_integer(i));
            json_array_append_new(res, r);
            pt += reqs[i]->n_prompt;
            ct += reqs[i]->n_gen;
        }
        json_object_set_new(o, "results", res);
        json_object_set_new(o, "usage", json_pack("{s:i,s:i}", "prompt_tokens", pt, "completion_tokens", ct));
    }
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "model", json_string(am->name));
    return dump(o, len);
}

char *api_models_response(const api_model *models, int n_models, size_t *len)
{
    json_t *a = json_array();
    for (int i = 0; i < n_models; i++) {
        const api_model *am = &models[i];
        json_t *o = json_pack("{s:s,s:b}", "name", am->name, "loaded", am->model != NULL);
        if (am->model) {
            const moe_model *m = am->model;
            const moe_hparams *hp = &m->weights.hp;
            char fp[24] = "";
            if (m->tokenizer)
                snprintf(fp, sizeof fp, "%016llx", (unsigned long long)tokenizer_fingerprint(m->tokenizer));
            json_object_set_new(o, "architecture", json_string(moe_arch_get(hp->arch)->name));
            json_object_set_new(o, "parameters", json_integer((json_int_t)moe_hparams_n_params(hp, m->tied_output)));
            json_object_set_new(o, "active_parameters",
                                json_integer((json_int_t)moe_hparams_n_params_active(hp, m->tied_output)));
            json_object_set_new(o, "experts", json_integer(hp->n_expert));
            json_object_set_new(o, "experts_used", json_integer(hp->n_expert_used));
            json_object_set_new(o, "layers", json_integer(hp->n_layer));
            json_object_set_new(o, "embedding", json_integer(hp->n_embd));
            json_object_set_new(o, "vocab_size", json_integer(hp->n_vocab));
            json_object_set_new(o, "vocab_fingerprint", m->tokenizer ? json_string(fp) : json_null());
            json_object_set_new(o, "context_length", json_integer(am->max_seq_len));
            json_object_set_new(o, "kv_cache_positions", json_integer(am->kv_positions));
            size_t nl;
            char *gn = api_utf8_clean(m->name, strnlen(m->name, sizeof m->name), &nl);
            json_object_set_new(o, "general_name", gn ? json_string(gn) : json_null());
            free(gn);
            json_object_set_new(o, "load_ms", jnum(m->load_ms));
        }
        json_array_append_new(a, o);
    }
    return dump(json_pack("{s:o}", "models", a), len);
}

/* The OpenAI list shape: each /models entry plus "id", "object" and "owned_by". */
char *api_models_v1_response(const api_model *models, int n_models, size_t *len)
{
    size_t n;
    char *body = api_models_response(models, n_models, &n);
    json_t *o = body ? json_loadb(body, n, 0, NULL) : NULL;
    free(body);
    if (!o) return NULL;
    json_t *data = json_object_get(o, "models"), *m;
    size_t i;
    json_array_foreach(data, i, m) {
        json_object_set(m, "id", json_object_get(m, "name"));
        json_object_set_new(m, "object", json_string("model"));
        json_object_set_new(m, "created", json_integer(0));
        json_object_set_new(m, "owned_by", json_string("moeserve"));
    }
    json_t *list = json_pack("{s:s,s:O}", "object", "list", "data", data);
    json_decref(o);
    return dump(list, len);
}
