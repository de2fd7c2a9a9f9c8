/* synth.h -- deterministic synthetic models for tests and benchmarks. */
#ifndef MOE_MODELS_SYNTH_H
#define MOE_MODELS_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#include "models/gguf.h"

typedef struct {
    const char *arch;       /* llama | qwen2moe | olmoe | qwen3moe */
    const char *preset;     /* tiny | small | bench | dense (llama, n_expert 0) | tiny256 | tiny256odd */
    uint64_t seed;
    const char *vocab_path; /* GGUF to copy tokenizer.* from; NULL: built-in byte-level BPE */
    ggml_type wtype;        /* matrices' type: F32 (0, default), F16, BF16, Q8_0, Q4_0, Q4_1,
                             * Q5_0, Q5_1, IQ4_NL, Q6_K, IQ4_XS, or Q2_K, Q3_K, Q4_K, Q5_K
                             * for llama.cpp's Q2_K, Q3_K_M, Q4_K_M, Q5_K_M mixes (down
                             * projections, attn_v and output in more bits); rows that are
                             * not whole super-blocks in llama.cpp's fallback type (Q4_K ->
                             * Q5_0, ...); vectors, routers and matrices whose rows are not
                             * whole blocks of that either stay F32 */
    int split_experts;      /* each expert's matrices as tensors of their own, blk.N.ffn_gate.X.weight
                             * (Mixtral files before April 2024), not ffn_gate_exps */
} synth_params;

/* The --type names synth takes, each with its wtype (q4_k_m: GGML_TYPE_Q4_K). */
#define SYNTH_TYPES "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, iq4_xs"

/* 0 and *t set for a name of SYNTH_TYPES; -1 for any other. */
int synth_type_from_name(const char *name, ggml_type *t);

/* Whether synth writes models of this wtype. */
int synth_writes_type(ggml_type t);

int synth_write(const synth_params *p, const char *out_path, char *err, size_t errlen);

#endif
