/* synth.h -- deterministic synthetic models for tests and benchmarks. */
#ifndef MOE_MODELS_SYNTH_H
#define MOE_MODELS_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#include "models/gguf.h"

typedef struct {
    const char *arch;       /* llama | qwen2moe | olmoe | qwen3moe */
    const char *preset;     /* tiny | small | bench | dense (llama, n_expert 0) */
    uint64_t seed;
    const char *vocab_path; /* GGUF to copy tokenizer.* from; NULL: built-in byte-level BPE */
    ggml_type wtype;        /* matrices' type: F32 (0, default), F16, BF16, Q8_0, Q4_0, Q6_K, or
                             * Q4_K / Q5_K for llama.cpp's Q4_K_M / Q5_K_M mixes (down
                             * projections, attn_v and output in Q6_K); vectors, routers and
                             * matrices whose rows are not whole blocks stay F32 */
} synth_params;

int synth_write(const synth_params *p, const char *out_path, char *err, size_t errlen);

#endif
