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
 * F32 as they read them, in the order ggml's dequantization computes them, so
 * the results are those of converting them at load. The formats (ggml's):
 *
 * F16, BF16: subsets of F32, exact.
 * Blocks of 32 weights, an F16 scale d first; the 4-bit q are 16 bytes, the low
 * nibbles the first 16 weights and the high ones the last 16:
 *   Q8_0 (34 bytes): 32 int8 q; weight d * q.
 *   Q4_0 (18): 4-bit q; d * (q - 8).
 *   Q4_1 (20): F16 m after d, 4-bit q; d * q + m.
 *   Q5_0 (22): a 32-bit word of fifth bits (bit j for weight j), 4-bit q; d * (q - 16).
 *   Q5_1 (24): m, the fifth bits, 4-bit q; d * q + m.
 *   IQ4_NL (18): 4-bit indices into a table of 16 int8 levels; d * level.
 * ggml's k-quants, super-blocks of 256 weights in sub-blocks of 16 or 32:
 *   Q2_K (84): 16 bytes of 4-bit scales and mins, 64 bytes of 2-bit q, F16 d and dmin;
 *     weight (d * sc) * q - (dmin * m), per sub-block of 16.
 *   Q3_K (110): 32 bytes of third bits, 64 of 2-bit q, 12 of sixteen 6-bit scales,
 *     F16 d; (d * (sc - 32)) * (q - 4 unless its third bit), per sub-block of 16.
 *   Q4_K (144): F16 d and dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes
 *     of 4-bit q; (d * sc) * q - (dmin * m), per sub-block of 32.
 *   Q5_K (176): Q4_K with a fifth bit of q in 32 bytes before the 4-bit ones.
 *   Q6_K (210): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, F16 d;
 *     (d * sc) * (q - 32), per sub-block of 16.
 *   IQ4_XS (136): F16 d, 2 + 4 bytes of eight 6-bit scales, 128 bytes of 4-bit
 *     indices into IQ4_NL's table; (d * (sc - 32)) * level, per sub-block of 32.
 * Where a product or sum rounds (the mins, the k-quants' factors times q) it is
 * computed in ggml's order, unfused; elsewhere every step is exact. */
typedef enum {
    MOE_WT_F32 = 0, MOE_WT_F16, MOE_WT_BF16, MOE_WT_Q8_0, MOE_WT_Q4_K, MOE_WT_Q6_K, MOE_WT_Q5_K, MOE_WT_Q4_0,
    MOE_WT_Q4_1, MOE_WT_Q5_0, MOE_WT_Q5_1, MOE_WT_IQ4_NL, MOE_WT_Q2_K, MOE_WT_Q3_K, MOE_WT_IQ4_XS,
    MOE_WT_COUNT
} moe_wtype;

#define MOE_Q8_0_BLOCK 32   /* weights of a block of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) */
#define MOE_Q8_0_BYTES 34
#define MOE_Q4_0_BYTES 18
#define MOE_Q4_1_BYTES 20
#define MOE_Q5_0_BYTES 22
#define MOE_Q5_1_BYTES 24
#define MOE_IQ4_NL_BYTES 18
#define MOE_QK_K 256        /* weights of a k-quant super-block */
#define MOE_Q2_K_BYTES 84
#define MOE_Q3_K_BYTES 110
#define MOE_Q4_K_BYTES 144
#define MOE_Q5_K_BYTES 176
#define MOE_Q6_K_BYTES 210
#define MOE_IQ4_XS_BYTES 136

typedef struct {
    const char *name;
    unsigned block;   /* weights a block holds (1: not blocked) */
    unsigned bytes;   /* bytes a block takes */
} moe_wtype_info;

static inline const moe_wtype_info *moe_wtype_get(moe_wtype t)
{
    static const moe_wtype_info info[MOE_WT_COUNT] = {
        [MOE_WT_F32] = {"F32", 1, 4},
        [MOE_WT_F16] = {"F16", 1, 2},
        [MOE_WT_BF16] = {"BF16", 1, 2},
        [MOE_WT_Q8_0] = {"Q8_0", MOE_Q8_0_BLOCK, MOE_Q8_0_BYTES},
        [MOE_WT_Q4_K] = {"Q4_K", MOE_QK_K, MOE_Q4_K_BYTES},
        [MOE_WT_Q6_K] = {"Q6_K", MOE_QK_K, MOE_Q6_K_BYTES},
        [MOE_WT_Q5_K] = {"Q5_K", MOE_QK_K, MOE_Q5_K_BYTES},
        [MOE_WT_Q4_0] = {"Q4_0", MOE_Q8_0_BLOCK, MOE_Q4_0_BYTES},
        [MOE_WT_Q4_1] = {"Q4_1", MOE_Q8_0_BLOCK, MOE_Q4_1_BYTES},
        [MOE_WT_Q5_0] = {"Q5_0", MOE_Q8_0_BLOCK, MOE_Q5_0_BYTES},
        [MOE_WT_Q5_1] = {"Q5_1", MOE_Q8_0_BLOCK, MOE_Q5_1_BYTES},
        [MOE_WT_IQ4_NL] = {"IQ4_NL", MOE_Q8_0_BLOCK, MOE_IQ4_NL_BYTES},
        [MOE_WT_Q2_K] = {"Q2_K", MOE_QK_K, MOE_Q2_K_BYTES},
        [MOE_WT_Q3_K] = {"Q3_K", MOE_QK_K, MOE_Q3_K_BYTES},
        [MOE_WT_IQ4_XS] = {"IQ4_XS", MOE_QK_K, MOE_IQ4_XS_BYTES},
    };
    return &info[(unsigned)t < MOE_WT_COUNT ? t : MOE_WT_F32];
}

static inline const char *moe_wtype_name(moe_wtype t)
{
    return (unsigned)t < MOE_WT_COUNT ? moe_wtype_get(t)->name : "?";
}

/* Weights a block of type t holds: a row holds whole blocks. */
static inline size_t moe_wtype_block(moe_wtype t) { return moe_wtype_get(t)->block; }

/* A type the narrow-weight kernels read (not F32, not unknown). */
static inline int moe_wtype_narrow(moe_wtype t)
{
    return t != MOE_WT_F32 && (unsigned)t < MOE_WT_COUNT;
}

/* Bytes of a row of k weights of type t (k whole blocks). */
static inline size_t moe_wtype_row_bytes(moe_wtype t, size_t k)
{
    const moe_wtype_info *i = moe_wtype_get(t);
    return k / i->block * i->bytes;
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
    moe_wraw wq_raw, wk_raw, wv_raw, wo_raw; /* optional: wq..wo in the file's type; where a
                                              * raw is set its F32 form may be NULL (read there only) */

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
    moe_wraw tok_embd_raw;    /* optional: token_embd in the file's type (then tok_embd may be
                               * NULL: the rows a batch looks up are widened) */
    const float *output_norm; /* (n_embd) */
    const float *output;      /* (n_vocab, n_embd); == tok_embd when tied */
    moe_wraw output_raw;      /* optional: output in the file's type (then output may be NULL) */
    moe_layer_weights *layers;/* (n_layer), owned by whoever filled this struct */
} moe_weights;

/* Checks that every pointer the architecture needs is set and the hyperparameters
 * are consistent (positive sizes, k <= n_expert, n_head % n_head_kv == 0, even
 * rope_dim <= head_dim, ...). Returns 0 or -1 with a message. */
int moe_weights_validate(const moe_weights *w, char *err, size_t errlen);

/* Whether every attention and output projection has its F32 form (a model
 * whose file keeps them narrower reads them there only: moe_wraw). */
int moe_weights_f32_projections(const moe_weights *w);

/* An FFN's types as text into buf: "Q4_K", "Q3_K (down Q5_0)" when the down
 * projection's differs, or all three. Returns buf. */
const char *moe_ffn_raw_types(const moe_ffn_raw *r, char *buf, size_t cap);

/* Parameter counts: total, and active for one token (k of n experts). */
uint64_t moe_hparams_n_params(const moe_hparams *hp, int tied_output);
uint64_t moe_hparams_n_params_active(const moe_hparams *hp, int tied_output);

#endif
