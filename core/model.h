/* model.h -- what the engine knows about a model: architecture, hyperparameters
 * and plain float weight pointers.
 *
 * core/ never reads files: models/ maps a GGUF file, converts what needs converting
 * and fills a moe_weights whose pointers stay valid while the moe_model that owns
 * them lives. Every matrix is row-major with the *output* dimension first, as GGUF
 * stores it (ne[0] is the row length): W (n_out, n_in) and y = W x is a dot product
 * of x with each row.
 */
#ifndef MOE_CORE_MODEL_H
#define MOE_CORE_MODEL_H

#include <stddef.h>
#include <stdint.h>

/* Architectures ---------------------------------------------------------- */

typedef enum {
    MOE_ARCH_LLAMA = 0,   /* Mixtral-style when n_expert > 0, dense otherwise */
    MOE_ARCH_QWEN2MOE,
    MOE_ARCH_OLMOE,
    MOE_ARCH_QWEN3MOE,
    MOE_ARCH_COUNT
} moe_arch;

typedef enum {
    MOE_ROPE_NORMAL = 0,  /* rotate pairs (x[2i], x[2i+1]) */
    MOE_ROPE_NEOX         /* rotate pairs (x[i], x[i + d/2]) */
} moe_rope_mode;

typedef enum {
    MOE_QK_NORM_NONE = 0,
    MOE_QK_NORM_FULL,     /* olmoe: RMS norm over the whole q / k vector, weight (n_head*head_dim) */
    MOE_QK_NORM_HEAD      /* qwen3moe: RMS norm per head, weight (head_dim) */
} moe_qk_norm;

typedef enum {
    MOE_SCORE_SOFTMAX = 0 /* p = softmax(router logits over all experts) */
} moe_score_fn;

/* One row per architecture: everything that differs between them lives here, so a
 * new architecture is a new row, not a new code path. */
typedef struct {
    const char *name;          /* GGUF general.architecture */
    moe_rope_mode rope;
    moe_qk_norm qk_norm;
    int qkv_bias;              /* attn_q/k/v.bias present */
    moe_score_fn score;
    int renorm_topk;           /* weights = p_top / sum(p_top) */
    float expert_weight_scale; /* multiplies the final expert weights (1 for all so far) */
    int shared_expert;         /* qwen2moe: + sigmoid(gate_shexp . x) * shared FFN(x) */
} moe_arch_info;

/* The table (core/arch.c). Read-only. */
const moe_arch_info *moe_arch_get(moe_arch arch);
/* Look up by GGUF name; returns MOE_ARCH_COUNT when unknown. */
moe_arch moe_arch_from_name(const char *name);

/* Hyperparameters -------------------------------------------------------- */

typedef struct {
    moe_arch arch;
    int n_vocab;
    int n_embd;
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;        /* key_length == value_length (checked at load) */
    int n_ctx_train;     /* context_length */
    int n_ff;            /* width of the dense FFN, or of one expert when n_expert > 0 */
    int n_expert;        /* 0 = dense */
    int n_expert_used;   /* k of top-k */
    int n_ff_shexp;      /* qwen2moe shared expert width, 0 otherwise */
    int rope_dim;        /* dimensions rotated per head (== head_dim unless the file says) */
    float rope_base;
    float rms_eps;
} moe_hparams;

/* Weights (F32, row-major, shapes as (rows, cols)) ------------------------ */

/* The routed experts may stay in the file's format: they are most of an MoE
 * model's bytes, and decode streams them every step. The kernels widen them to
 * F32 as they read them, exactly (F16 and BF16 are subsets of F32; a Q8_0
 * weight d * q, an F16 scale times an int8, needs at most 19 significant bits),
 * so the results are those of converting them at load. Q8_0 is ggml's block of
 * 32 weights in 34 bytes: the scale d (F16), then 32 int8 q. */
typedef enum { MOE_WT_F32 = 0, MOE_WT_F16, MOE_WT_BF16, MOE_WT_Q8_0, MOE_WT_Q4_K, MOE_WT_Q6_K, MOE_WT_Q5_K,
               MOE_WT_Q4_0 } moe_wtype;

#define MOE_Q8_0_BLOCK 32
#define MOE_Q8_0_BYTES 34
/* Q4_0: an F16 scale d, then 16 bytes of 4-bit q, the low nibbles the first 16
 * weights and the high ones the last; weight = d * (q - 8), exact like Q8_0's. */
#define MOE_Q4_0_BYTES 18
/* ggml's k-quants, super-blocks of 256 weights (the types of Q4_K_M and Q5_K_M
 * files):
 * Q4_K: F16 d and dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of
 *   4-bit q; weight = (d * sc) * q - (dmin * m), per sub-block of 32.
 * Q5_K: the same with a fifth bit of q in 32 bytes before the 4-bit ones.
 * Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, F16 d;
 *   weight = (d * sc) * (q - 32), per sub-block of 16.
 * Their products are rounded (unlike Q8_0's): kernels and conversion compute
 * them in this order, unfused, so they still give the same bits. */
#define MOE_QK_K 256
#define MOE_Q4_K_BYTES 144
#define MOE_Q6_K_BYTES 210
#define MOE_Q5_K_BYTES 176

static inline const char *moe_wtype_name(moe_wtype t)
{
    static const char *const names[] = {"F32", "F16", "BF16", "Q8_0", "Q4_K", "Q6_K", "Q5_K", "Q4_0"};
    return (unsigned)t < sizeof names / sizeof names[0] ? names[t] : "?";
}

/* Weights a block of type t holds: a row holds whole blocks. */
static inline size_t moe_wtype_block(moe_wtype t)
{
    if (t == MOE_WT_Q8_0 || t == MOE_WT_Q4_0) return MOE_Q8_0_BLOCK;
    return t == MOE_WT_Q4_K || t == MOE_WT_Q5_K || t == MOE_WT_Q6_K ? MOE_QK_K : 1;
}

/* A type the narrow-weight kernels read (not F32, not unknown). */
static inline int moe_wtype_narrow(moe_wtype t)
{
    return t == MOE_WT_F16 || t == MOE_WT_BF16 || t == MOE_WT_Q8_0 || t == MOE_WT_Q4_0 || t == MOE_WT_Q4_K ||
           t == MOE_WT_Q5_K || t == MOE_WT_Q6_K;
}

/* Bytes of a row of k weights of type t (k whole blocks). */
static inline size_t moe_wtype_row_bytes(moe_wtype t, size_t k)
{
    if (t == MOE_WT_Q8_0) return k / MOE_Q8_0_BLOCK * MOE_Q8_0_BYTES;
    if (t == MOE_WT_Q4_0) return k / MOE_Q8_0_BLOCK * MOE_Q4_0_BYTES;
    if (t == MOE_WT_Q4_K) return k / MOE_QK_K * MOE_Q4_K_BYTES;
    if (t == MOE_WT_Q6_K) return k / MOE_QK_K * MOE_Q6_K_BYTES;
    if (t == MOE_WT_Q5_K) return k / MOE_QK_K * MOE_Q5_K_BYTES;
    return k * (t == MOE_WT_F32 ? 4 : 2);
}

/* A projection matrix also readable where the file keeps it in a narrower type
 * (raw NULL: only the F32 one). Decode, whose few rows make the projections a
 * stream of their bytes, reads the narrower form; many rows read the F32 one
 * (or its packed copy): the same bits either way. */
typedef struct {
    const unsigned char *raw;
    moe_wtype type;
} moe_wraw;

/* An FFN's three matrices where the file keeps them in narrower types, read
 * there at every batch size (then the F32 pointers are NULL: not converted).
 * type F32: not kept. The three types may differ (a Q4_K_M file keeps some
 * down projections in Q6_K). */
typedef struct {
    moe_wtype type, up_type, down_type;   /* gate's, up's, down's */
    const unsigned char *gate, *up, *down;
} moe_ffn_raw;

typedef struct {
    const float *attn_norm;   /* (n_embd) */
    const float *wq;          /* (n_head*head_dim, n_embd) */
    const float *wk;          /* (n_head_kv*head_dim, n_embd) */
    const float *wv;          /* (n_head_kv*head_dim, n_embd) */
    const float *wo;          /* (n_embd, n_head*head_dim) */
    const float *bq, *bk, *bv;/* optional biases (n_head*head_dim), (n_head_kv*head_dim) x2 */
    const float *q_norm;      /* optional: (n_head*head_dim) FULL, (head_dim) HEAD */
    const float *k_norm;      /* optional: (n_head_kv*head_dim) FULL, (head_dim) HEAD */
    const float *ffn_norm;    /* (n_embd) */
    moe_wraw wq_raw, wk_raw, wv_raw, wo_raw; /* optional: wq..wo in the file's type */

    /* dense FFN, n_expert == 0 */
    const float *ffn_gate;    /* (n_ff, n_embd) */
    const float *ffn_up;      /* (n_ff, n_embd) */
    const float *ffn_down;    /* (n_embd, n_ff) */
    moe_ffn_raw ffn_raw;      /* or these three in the file's type */

    /* MoE FFN, n_expert > 0 */
    const float *router;      /* (n_expert, n_embd) */
    const float *exp_gate;    /* (n_expert, n_ff, n_embd) */
    const float *exp_up;      /* (n_expert, n_ff, n_embd) */
    const float *exp_down;    /* (n_expert, n_embd, n_ff) */
    moe_ffn_raw exp_raw;      /* or these three in the file's type */

    /* shared expert (qwen2moe) */
    const float *shexp_gate_inp; /* (n_embd): one gate logit */
    const float *shexp_gate;  /* (n_ff_shexp, n_embd) */
    const float *shexp_up;    /* (n_ff_shexp, n_embd) */
    const float *shexp_down;  /* (n_embd, n_ff_shexp) */
    moe_ffn_raw shexp_raw;    /* or these three in the file's type */
} moe_layer_weights;

typedef struct {
    moe_hparams hp;
    const float *tok_embd;    /* (n_vocab, n_embd) */
    const float *output_norm; /* (n_embd) */
    const float *output;      /* (n_vocab, n_embd); == tok_embd when tied */
    moe_wraw output_raw;      /* optional: output in the file's type */
    moe_layer_weights *layers;/* (n_layer), owned by whoever filled this struct */
} moe_weights;

/* Checks that every pointer the architecture needs is set and the hyperparameters
 * are consistent (positive sizes, k <= n_expert, n_head % n_head_kv == 0, even
 * rope_dim <= head_dim, ...). Returns 0 or -1 with a message. */
int moe_weights_validate(const moe_weights *w, char *err, size_t errlen);

/* Parameter counts: total, and active for one token (k of n experts). */
uint64_t moe_hparams_n_params(const moe_hparams *hp, int tied_output);
uint64_t moe_hparams_n_params_active(const moe_hparams *hp, int tied_output);

#endif
