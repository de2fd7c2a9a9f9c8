/* synth.h -- deterministic synthetic models for tests and benchmarks. */
#ifndef MOE_MODELS_SYNTH_H
#define MOE_MODELS_SYNTH_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *arch;       /* llama | qwen2moe | olmoe | qwen3moe */
    const char *preset;     /* tiny | small | bench | dense (llama, n_expert 0) */
    uint64_t seed;
    const char *vocab_path; /* GGUF to copy tokenizer.* from; NULL: built-in byte-level BPE */
    int f16;                /* store weights as F16 instead of F32 */
} synth_params;

int synth_write(const synth_params *p, const char *out_path, char *err, size_t errlen);

#endif
