/* config.h -- moeserve's settings: command-line flags, each also an environment
 * variable (MOESERVE_<FLAG>, dashes as underscores; a flag beats its variable).
 *
 *   server_config c; server_config_default(&c);
 *   if (server_config_parse(&c, argc, argv, err, sizeof err)) ...  (1: --help printed)
 *   ... server_config_free(&c);
 */
#ifndef MOE_SERVER_CONFIG_H
#define MOE_SERVER_CONFIG_H

#include <stddef.h>

#include "core/kv_cache.h"
#include "models/gguf.h"
#include "models/model_file.h"

#define SERVER_MAX_MODELS 16

typedef enum { LOG_TEXT = 0, LOG_JSON = 1 } log_format;

typedef struct {
    char *name;  /* owned: request field "model" */
    char *path;  /* owned: GGUF file */
} server_model_spec;

typedef struct {
    server_model_spec models[SERVER_MAX_MODELS];
    int n_models;
    char *host;              /* owned; default 127.0.0.1 */
    int port;                /* 0: any free port (the log line says which) */
    int threads;             /* compute threads per model (0: online CPUs) */
    int compute_nice;        /* nice increment of compute threads (the loop keeps 0) */
    int max_seqs;            /* sequences decoding at once per model */
    int max_batch_tokens;    /* token budget of one step (0: auto, see server.c) */
    int batch_wait_us;       /* window for near-simultaneous arrivals */
    int kv_cache_mb;         /* KV pool per model in MiB (0: from kv_cache_tokens or auto) */
    int kv_cache_tokens;     /* KV pool per model in positions (0: auto) */
    kv_type kv_type;         /* --kv-type f32|f16 (core/kv_cache.h) */
    int ctx;                 /* longest sequence (0: the model's context length) */
    int max_queue;           /* waiting requests per model before 503 */
    long max_body_bytes;
    double request_timeout;  /* seconds from arrival to answer, else 504 */
    char *api_key;           /* owned; NULL: no auth */
    double drain_delay;      /* seconds still serving after SIGTERM */
    double drain_timeout;    /* seconds from SIGTERM until the rest gets 503 */
    log_format log_fmt;
    int quiet;               /* no per-request log lines */
    gguf_load_mode weights;  /* --weights auto|mmap|copy (models/gguf.h) */
    moe_proj_mode projections; /* --projections auto|f32|file (models/model_file.h) */
    int no_packed_projections; /* --no-packed-projections: no packed copy (core/packed.h) */
    int no_preload;          /* --no-preload: /ready before the weights are read from disk */
} server_config;

void server_config_default(server_config *c);
/* Reads the environment, then argv. 0 ok, 1 --help was printed (exit 0), -1 bad
 * flag (message in err). */
int server_config_parse(server_config *c, int argc, char **argv, char *err, size_t errlen);
void server_config_free(server_config *c);
void server_config_usage(const char *prog);

#endif
