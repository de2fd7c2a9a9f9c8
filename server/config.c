/* config.c -- flags and environment variables (one table drives both and --help). */
#include "server/config.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_INT, OPT_LONG, OPT_SEC, OPT_STR, OPT_MODEL, OPT_LOGFMT, OPT_WEIGHTS, OPT_PROJ, OPT_KVTYPE, OPT_FLAG } opt_kind;

typedef struct {
    const char *flag;  /* without the leading dashes */
    opt_kind kind;
    size_t offset;
    long lo, hi;       /* range for numbers */
    const char *help;
} opt_def;

#define OFF(f) offsetof(server_config, f)
static const opt_def opts[] = {
    {"model", OPT_MODEL, 0, 0, 0, "[NAME=]FILE  GGUF model to serve; repeat for several (env: comma-separated)"},
    {"host", OPT_STR, OFF(host), 0, 0, "ADDR  address to listen on (default 127.0.0.1)"},
    {"port", OPT_INT, OFF(port), 0, 65535, "N  port (default 8080; 0 = any free port)"},
    {"threads", OPT_INT, OFF(threads), 0, 1024, "N  compute threads per model (default: online CPUs)"},
    {"compute-nice", OPT_INT, OFF(compute_nice), 0, 19, "N  nice increment of compute threads so the HTTP loop preempts them (default 10; 0 = off)"},
    {"max-seqs", OPT_INT, OFF(max_seqs), 1, 4096, "N  sequences decoding at once per model (default 64)"},
    {"max-batch-tokens", OPT_INT, OFF(max_batch_tokens), 0, 1 << 20, "N  tokens per forward step (default 0 = auto: the most that stay on the engine's row kernel, 95 or 127, 63 in an AVX2 build (the model-loaded log line gives it), so results never depend on batching)"},
    {"batch-wait-us", OPT_INT, OFF(batch_wait_us), 0, 10000000, "N  wait this long for more arrivals before an idle step (default 0)"},
    {"kv-cache-mb", OPT_INT, OFF(kv_cache_mb), 0, 1 << 22, "N  KV cache pool per model in MiB (default: max-seqs full contexts, at most 1024)"},
    {"kv-cache-tokens", OPT_INT, OFF(kv_cache_tokens), 0, 1 << 28, "N  KV cache pool per model in positions (instead of --kv-cache-mb)"},
    {"kv-type", OPT_KVTYPE, OFF(kv_type), 0, 0, "f32|f16  KV cache elements (default f32). f16 holds twice the positions in the same memory and halves what attention reads (long contexts decode faster); keys and values are rounded to F16, so logits differ slightly from f32's"},
    {"ctx", OPT_INT, OFF(ctx), 0, 1 << 24, "N  longest sequence, prompt + generated (default: model context, at most 4096)"},
    {"max-queue", OPT_INT, OFF(max_queue), 0, 1 << 20, "N  waiting requests per model before 503 (default 256)"},
    {"max-body-bytes", OPT_LONG, OFF(max_body_bytes), 1, 1L << 30, "N  largest request body (default 1048576)"},
    {"request-timeout", OPT_SEC, OFF(request_timeout), 0, 0, "SEC  deadline of one request, then 504 (default 600)"},
    {"api-key", OPT_STR, OFF(api_key), 0, 0, "KEY  require Authorization: Bearer KEY (health/ready stay open)"},
    {"drain-delay", OPT_SEC, OFF(drain_delay), 0, 0, "SEC  after SIGTERM keep serving this long, ready=503 (default 0)"},
    {"drain-timeout", OPT_SEC, OFF(drain_timeout), 0, 0, "SEC  after SIGTERM finish in-flight work this long, then 503 (default 30)"},
    {"log-format", OPT_LOGFMT, OFF(log_fmt), 0, 0, "text|json  log format (default text)"},
    {"weights", OPT_WEIGHTS, OFF(weights), 0, 0, "auto|mmap|copy  where model files go: auto (default) maps them and, where the kernel maps them in 4 KiB pages, copies them into huge pages when the copy takes at most half the free memory (faster decode, by a few percent to a third depending on the CPU; costs the copy at load); mmap always maps, copy always copies. The load line says which"},
    {"quiet", OPT_FLAG, OFF(quiet), 0, 0, "  no per-request log lines"},
    {"projections", OPT_PROJ, OFF(projections), 0, 0, "auto|f32|file  the attention and output projections of a quantized (or F16) file: f32 also converts them to F32 (which the fastest many-row kernel packs: twice their F32 bytes in memory), file reads them in the file's type at every batch size (the same results; 7-14% slower at 16-64 sequences on the bench model's Q4_K_M, 12 GB less memory for Mixtral's); auto (default) converts when the copies and the file take at most half the free memory. The load line says which"},
    {"no-preload", OPT_FLAG, OFF(no_preload), 0, 0, "  say ready as soon as a model file is mapped, without reading its weights first: the first requests then wait for the disk (seconds for a few GB; by default they are read before /ready answers 200, unless the file is larger than the free memory)"},
    {"no-packed-projections", OPT_FLAG, OFF(no_packed_projections), 0, 0, "  keep no packed copy of the attention and output projection weights: saves their memory again (445 MiB for the bench model; the load line gives it), costs speed from a few rows a step up; results are the same"},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

void server_config_default(server_config *c)
{
    memset(c, 0, sizeof *c);
    c->port = 8080;
    c->compute_nice = 10;  /* measured: /health p99 13 ms -> 5 ms on a busy 2-core machine */
    c->max_seqs = 64;
    c->max_queue = 256;
    c->max_body_bytes = 1 << 20;
    c->request_timeout = 600;
    c->drain_timeout = 30;
    c->weights = GGUF_LOAD_AUTO;
    c->projections = MOE_PROJ_AUTO;
}

void server_config_free(server_config *c)
{
    for (int i = 0; i < c->n_models; i++) {
        free(c->models[i].name);
        free(c->models[i].path);
    }
    free(c->host);
    free(c->api_key);
    memset(c, 0, sizeof *c);
}

void server_config_usage(const char *prog)
{
    printf("usage: %s --model [NAME=]FILE [--model ...] [options]\n\n"
           "Serves Mixture-of-Experts GGUF models over HTTP (POST /infer, GET /models,\n"
           "/health, /ready, /metrics). Every flag is also an environment variable:\n"
           "MOESERVE_<FLAG> with dashes as underscores (MOESERVE_PORT=9000).\n\n", prog);
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *h = opts[i].help;
        const char *sp = strstr(h, "  ");
        int arglen = sp ? (int)(sp - h) : 0;
        char left[64];
        snprintf(left, sizeof left, "--%s %.*s", opts[i].flag, arglen, h);
        printf("  %-30s %s\n", left, sp ? sp + 2 : h);
    }
    printf("  %-30s %s\n", "--help", "this text");
}

/* The file name without directories and extension: the default model name. */
static char *file_stem(const char *path)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    const char *dot = strrchr(b, '.');
    size_t n = dot && dot != b ? (size_t)(dot - b) : strlen(b);
    char *s = malloc(n + 1);
    if (!s) return NULL;
    memcpy(s, b, n);
    s[n] = 0;
    return s;
}

static int valid_model_name(const char *s)
{
    if (!*s || strlen(s) > 64) return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("._-", *s)) return 0;
    return 1;
}

static int add_model(server_config *c, const char *v, char *err, size_t errlen)
{
    if (c->n_models >= SERVER_MAX_MODELS) {
        snprintf(err, errlen, "--model: at most %d models", SERVER_MAX_MODELS);
        return -1;
    }
    const char *eq = strchr(v, '=');
    char *name, *path;
    if (eq) {
        name = strndup(v, (size_t)(eq - v));
        path = strdup(eq + 1);
    } else {
        name = file_stem(v);
        path = strdup(v);
    }
    if (!name || !path || !*path || !valid_model_name(name)) {
        snprintf(err, errlen, "--model %s: want [NAME=]FILE, NAME of letters, digits, '.', '_', '-' (at most 64)", v);
        free(name);
        free(path);
        return -1;
    }
    for (int i = 0; i < c->n_models; i++)
        if (!strcmp(c->models[i].name, name)) {
            snprintf(err, errlen, "--model: two models named '%s' (use NAME=FILE)", name);
            free(name);
            free(path);
            return -1;
        }
    c->models[c->n_models].name = name;
    c->models[c->n_models].path = path;
    c->n_models++;
    return 0;
}

static int set_opt(server_config *c, const opt_def *o, const char *v, const char *src,
                   char *err, size_t errlen)
{
    char *base = (char *)c + o->offset;
    char *end;
    switch (o->kind) {
    case OPT_MODEL: {
        /* The environment variable may list several, comma-separated. */
        if (strcmp(src, "env")) return add_model(c, v, err, errlen);
        char *copy = strdup(v), *save = NULL;
        if (!copy) return -1;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
            if (add_model(c, t, err, errlen)) { free(copy); return -1; }
        free(copy);
        return 0;
    }
    case OPT_INT:
    case OPT_LONG: {
        errno = 0;
        long n = strtol(v, &end, 10);
        if (errno || end == v || *end || n < o->lo || n > o->hi) {
            snprintf(err, errlen, "%s --%s '%s': want an integer in [%ld, %ld]", src, o->flag, v, o->lo, o->hi);
            return -1;
        }
        if (o->kind == OPT_INT) *(int *)base = (int)n;
        else *(long *)base = n;
        return 0;
    }
    case OPT_SEC: {
        errno = 0;
        double d = strtod(v, &end);
        if (errno || end == v || *end || !(d >= 0 && d <= 1e7)) {
            snprintf(err, errlen, "%s --%s '%s': want seconds >= 0", src, o->flag, v);
            return -1;
        }
        *(double *)base = d;
        return 0;
    }
    case OPT_STR: {
        char **p = (char **)base;
        free(*p);
        *p = strdup(v);
        return *p ? 0 : -1;
    }
    case OPT_LOGFMT:
        if (!strcmp(v, "text")) c->log_fmt = LOG_TEXT;
        else if (!strcmp(v, "json")) c->log_fmt = LOG_JSON;
        else {
            snprintf(err, errlen, "%s --log-format '%s': want text or json", src, v);
            return -1;
        }
        return 0;
    case OPT_WEIGHTS:
        if (gguf_load_mode_parse(v, (gguf_load_mode *)base)) {
            snprintf(err, errlen, "%s --weights '%s': want auto, mmap or copy", src, v);
            return -1;
        }
        return 0;
    case OPT_PROJ:
        if (moe_proj_mode_parse(v, (moe_proj_mode *)base)) {
            snprintf(err, errlen, "%s --projections '%s': want auto, f32 or file", src, v);
            return -1;
        }
        return 0;
    case OPT_KVTYPE:
        if (kv_type_parse(v, (kv_type *)base)) {
            snprintf(err, errlen, "%s --kv-type '%s': want f32 or f16", src, v);
            return -1;
        }
        return 0;
    case OPT_FLAG:
        *(int *)base = strcmp(v, "0") != 0;
        return 0;
    }
    return -1;
}

static const opt_def *find_opt(const char *flag)
{
    for (size_t i = 0; i < N_OPTS; i++)
        if (!strcmp(opts[i].flag, flag)) return &opts[i];
    return NULL;
}

static int read_env(server_config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        char name[64] = "MOESERVE_";
        size_t n = strlen(name);
        for (const char *f = opts[i].flag; *f && n + 1 < sizeof name; f++)
            name[n++] = *f == '-' ? '_' : (char)toupper((unsigned char)*f);
        name[n] = 0;
        const char *v = getenv(name);
        if (v && *v && set_opt(c, &opts[i], v, "env", err, errlen)) return -1;
    }
    return 0;
}

int server_config_parse(server_config *c, int argc, char **argv, char *err, size_t errlen)
{
    if (read_env(c, err, errlen)) return -1;
    int env_models = c->n_models;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            server_config_usage(argv[0]);
            return 1;
        }
        if (strncmp(a, "--", 2)) {
            snprintf(err, errlen, "unexpected argument '%s' (see --help)", a);
            return -1;
        }
        char flag[64];
        const char *eq = strchr(a + 2, '=');
        size_t fl = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (fl >= sizeof flag) fl = sizeof flag - 1;
        memcpy(flag, a + 2, fl);
        flag[fl] = 0;
        const opt_def *o = find_opt(flag);
        if (!o) {
            snprintf(err, errlen, "unknown flag --%s (see --help)", flag);
            return -1;
        }
        const char *v;
        if (o->kind == OPT_FLAG) v = eq ? eq + 1 : "1";
        else if (eq) v = eq + 1;
        else if (i + 1 < argc) v = argv[++i];
        else {
            snprintf(err, errlen, "--%s needs a value (see --help)", flag);
            return -1;
        }
        /* Models on the command line replace those from the environment. */
        if (o->kind == OPT_MODEL && env_models) {
            for (int m = 0; m < env_models; m++) {
                free(c->models[m].name);
                free(c->models[m].path);
            }
            c->n_models = 0;
            env_models = 0;
        }
        if (set_opt(c, o, v, "flag", err, errlen)) return -1;
    }
    if (!c->host && !(c->host = strdup("127.0.0.1"))) return -1;
    if (c->n_models == 0) {
        snprintf(err, errlen, "no model: give --model FILE (or MOESERVE_MODEL)");
        return -1;
    }
    if (c->api_key && !*c->api_key) {
        free(c->api_key);
        c->api_key = NULL;
    }
    return 0;
}
