/* engine.h -- the batched forward pass.
 *
 *   moe_engine *e; moe_engine_create(&weights, &params, &e, err, sizeof err);
 *   moe_engine_seq_reserve(e, seq, n_positions, err, sizeof err);
 *   moe_engine_forward(e, &batch, logits, err, sizeof err);
 *   moe_engine_seq_release(e, seq);
 *   moe_engine_free(e);
 *
 * A batch is ragged: tokens of many sequences at once, each with its position and
 * sequence slot, in any mix of prompt chunks and single decode tokens (continuous
 * batching). Within one sequence the batch's positions must be consecutive and
 * continue what the cache holds. One forward at a time per engine; the engine is
 * not thread-safe, it uses its own pool for parallelism.
 */
#ifndef MOE_CORE_ENGINE_H
#define MOE_CORE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "core/kv_cache.h"
#include "core/model.h"

typedef struct moe_engine moe_engine;

typedef struct {
    int n_threads;           /* compute threads including the caller (>= 1) */
    int max_seqs;            /* sequence slots */
    int max_batch_tokens;    /* largest batch forward accepts (scratch sized once) */
    int kv_block_size;       /* positions per KV block (e.g. 16) */
    int kv_n_blocks;         /* blocks in the pool */
    kv_type kv_type;         /* KV_F32 (default) or KV_F16: half the memory a position, and
                              * half the bytes attention reads; K and V rounded to F16 */
    int max_seq_len;         /* longest sequence (<= context length) */
    float capacity_factor;   /* <= 0: dropless (default) */
    int packed_projections;  /* moe_pack_mode: Q/K/V, attention output and logits on copies of
                              * those weights packed for core/packed.c (same bits, faster
                              * from a few rows up, costs their memory again) */
} moe_engine_params;

/* When the packed copies are made. AT_CREATE is the default where the build has
 * AVX-512 (packed_supported()), OFF elsewhere. BACKGROUND returns from create at
 * once and packs on a thread of the engine's own; forwards run on the row kernel
 * until the copies are complete, with the same results (a server's readiness
 * need not wait for the copy). */
enum { MOE_PACK_OFF = 0, MOE_PACK_AT_CREATE = 1, MOE_PACK_BACKGROUND = 2 };

/* Defaults for a model: 1 thread, 8 seqs, 512 tokens, KV (F32) for 8 full contexts. */
moe_engine_params moe_engine_default_params(const moe_hparams *hp);

typedef struct {
    int n_tokens;
    const int32_t *token;        /* (n_tokens) ids, checked against n_vocab */
    const int32_t *pos;          /* (n_tokens) position within its sequence */
    const int32_t *seq;          /* (n_tokens) sequence slot */
    const uint8_t *want_logits;  /* (n_tokens) nonzero: write a logits row */
    int32_t *trace_expert;       /* optional (n_tokens, n_layer, n_expert_used) */
    float *trace_weight;         /* optional, same shape */
} moe_batch;

int moe_engine_create(const moe_weights *w, const moe_engine_params *p,
                      moe_engine **out, char *err, size_t errlen);
void moe_engine_free(moe_engine *e);

int moe_engine_seq_reserve(moe_engine *e, int seq, int n_pos, char *err, size_t errlen);
void moe_engine_seq_release(moe_engine *e, int seq);
/* Keeps positions [0, n_pos) of seq (n_pos <= what it holds); the next batch
 * continues at n_pos, overwriting what followed. */
int moe_engine_seq_truncate(moe_engine *e, int seq, int n_pos, char *err, size_t errlen);

/* logits: (number of rows with want_logits, n_vocab), in batch order.
 * Returns 0, or -1 with a message (bad id, position not reserved, batch too big,
 * ...) and no state changed except KV positions of this batch. */
int moe_engine_forward(moe_engine *e, const moe_batch *b, float *logits,
                       char *err, size_t errlen);

/* Where forwards spend their time, by phase of the pass. */
typedef enum {
    MOE_PHASE_PROJECTIONS = 0,  /* attention's Q, K, V and output projections */
    MOE_PHASE_ATTENTION,        /* biases, q/k norms, RoPE, K/V into the cache, softmax(QK^T)V */
    MOE_PHASE_ROUTING,          /* router GEMM, top-k, expert queues, gathering their rows */
    MOE_PHASE_EXPERTS,          /* each expert over its queue (+ shared expert; a dense FFN) */
    MOE_PHASE_COMBINE,          /* each row's weighted sum of its experts' outputs */
    MOE_PHASE_LOGITS,           /* final norm and output projection of the rows that want logits */
    MOE_PHASE_OTHER,            /* the rest: embeddings, norms, residual adds, batch setup */
    MOE_PHASE_COUNT
} moe_phase;

/* "projections", "attention", "routing", "experts", "combine", "logits", "other". */
const char *moe_phase_name(moe_phase ph);

/* Wall seconds of every successful forward so far, by phase (out has
 * MOE_PHASE_COUNT entries; they add up to the forwards' total). */
void moe_engine_phase_seconds(const moe_engine *e, double *out);

const moe_hparams *moe_engine_hparams(const moe_engine *e);
/* Cumulative rows routed to / dropped by each (layer, expert): (n_layer, n_expert). */
const uint64_t *moe_engine_expert_routed(const moe_engine *e);
const uint64_t *moe_engine_expert_dropped(const moe_engine *e);
int moe_engine_kv_blocks_free(const moe_engine *e);
int moe_engine_kv_blocks_total(const moe_engine *e);
int moe_engine_kv_block_size(const moe_engine *e);
size_t moe_engine_kv_bytes(const moe_engine *e);
/* Memory of the packed projection weights (0 when packed_projections is off). */
size_t moe_engine_packed_bytes(const moe_engine *e);
/* Nonzero once the packed copies are complete and in use. */
int moe_engine_packed_ready(const moe_engine *e);
/* What the packed copies take for a model with these hyperparameters in this
 * build (0 without AVX-512), before any engine exists (moe info). */
size_t moe_engine_packed_bytes_for(const moe_hparams *hp);

/* Batches of at most this many rows read the attention and output projections
 * where the file keeps them in a narrower type (moe_wraw in core/model.h);
 * larger ones read the F32 conversion or its packed copy, where the model has
 * them (models/model_file.h, moe_proj_mode), else the file's type as well. */
#define MOE_RAW_PROJ_MAX_ROWS 8

#endif
