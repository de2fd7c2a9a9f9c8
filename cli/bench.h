/* bench.h -- `moe bench` (throughput against this machine's rooflines) and
 * `moe eval` (bits per byte of a text with the C engine). */
#ifndef MOE_CLI_BENCH_H
#define MOE_CLI_BENCH_H

#include <stddef.h>

#include "core/kv_cache.h"
#include "models/gguf.h"
#include "models/model_file.h"

typedef struct {
    const char *model;  /* GGUF to measure (required) */
    const char *text;   /* optional text for the tokenizer benchmark */
    int threads;
    int quick;          /* fewer repetitions (smoke runs) */
    gguf_load_mode weights; /* --weights auto|mmap|copy (models/gguf.h) */
    moe_proj_mode projections; /* --projections auto|f32|file (models/model_file.h) */
    kv_type kv;         /* --kv-type f32|f16 (core/kv_cache.h) */
} bench_opts;

typedef struct {
    const char *model;
    const char *text;
    int ctx;            /* window length in tokens (0: min(context, 256)) */
    int threads;
} eval_opts;

int bench_run(const bench_opts *o, char *err, size_t errlen);
int eval_run(const eval_opts *o, char *err, size_t errlen);

#endif
