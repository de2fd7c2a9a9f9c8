/* api.h -- the JSON side of the HTTP API: request validation, response bodies and
 * the one error envelope {"error": {"code", "type", "message"}}.
 *
 * Everything here runs on the loop thread and never blocks on the scheduler.
 */
#ifndef MOE_SERVER_API_H
#define MOE_SERVER_API_H

#include <stddef.h>
#include <stdint.h>

#include "models/model_file.h"
#include "server/scheduler.h"

#define API_MAX_PROMPTS 64
#define API_MAX_STOPS 8
#define API_MAX_STOP_BYTES 256
#define API_MAX_TOP_LOGPROBS 20

/* A served model as the API sees it. */
typedef struct {
    const char *name;
    const char *path;
    const moe_model *model;   /* NULL while loading */
    int max_seq_len;          /* longest sequence the scheduler accepts */
    int kv_positions;         /* whole KV pool in positions */
} api_model;

/* A validated POST /infer. */
typedef struct {
    int model;                /* index into the api_model array */
    int multi;                /* "prompts" was used: answer with "results" */
    int n_prompts;
    int32_t *prompt[API_MAX_PROMPTS];  /* owned, (n_prompt[i]) ids each */
    int n_prompt[API_MAX_PROMPTS];
    char *stop[API_MAX_STOPS];         /* owned */
    int n_stops;
    sched_spec spec;          /* prompt fields unset; stops point into stop[] */
    struct ens_spec *ens;     /* owned: "ensemble"/"labels" (server/ensemble_req.h), else NULL */
} api_infer;

/* Parses and validates a body. 0 ok (free with api_infer_free), else the HTTP
 * status (400, 404, 413, 503) with a message saying what to fix. */
int api_parse_infer(const char *body, size_t len, const api_model *models, int n_models,
                    api_infer *out, char *err, size_t errlen);
void api_infer_free(api_infer *q);

/* Response body of finished requests (reqs in prompt order), malloc'd JSON. */
char *api_infer_response(const api_model *m, const char *id, sched_req *const *reqs, int n,
                         int multi, size_t *len);
/* GET /models body; openai: GET /v1/models ({"object": "list", "data": [...]}). */
char *api_models_response(const api_model *models, int n_models, size_t *len);
char *api_models_v1_response(const api_model *models, int n_models, size_t *len);

/* The error envelope; type from the status. malloc'd JSON. */
char *api_error_body(int status, const char *message, size_t *len);
const char *api_error_type(int status);

/* Copies s (n bytes) replacing invalid UTF-8 with U+FFFD; malloc'd, NUL-terminated. */
char *api_utf8_clean(const char *s, size_t n, size_t *out_len);

#endif
