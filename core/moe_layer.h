/* moe_layer.h -- the Mixture-of-Experts FFN over a whole batch.
 *
 * Data flow of one layer (docs/ARCHITECTURE.md):
 *   router logits for all rows in one GEMM -> router_topk per row ->
 *   expert_queue_build (counting sort of (row, weight) pairs by expert, capacity cap) ->
 *   for each non-empty expert, once over its queue: gather rows, gate/up GEMM,
 *   silu(gate)*up, down GEMM -> weighted scatter-add into the output rows
 *   (+ the shared expert for qwen2moe).
 */
#ifndef MOE_CORE_MOE_LAYER_H
#define MOE_CORE_MOE_LAYER_H

#include <stdint.h>
#include <stddef.h>

#include "core/model.h"
#include "core/pool.h"

/* Routing ---------------------------------------------------------------- */

/* From one row of router logits (n_expert) choose k experts per the architecture's
 * row of the table: ids[k] in descending score order (ties: lower id first),
 * weights[k] the gate weights (renormalised or not, times expert_weight_scale). */
void router_topk(const moe_arch_info *a, const float *logits, int n_expert, int k,
                 int32_t *ids, float *weights);

/* Per-expert queues ------------------------------------------------------ */

typedef struct {
    int n_expert;
    int cap_pairs;     /* capacity of row/weight arrays */
    int32_t *offset;   /* (n_expert + 1): queue e is [offset[e], offset[e+1]) */
    int32_t *row;      /* (cap_pairs) token row of each routed pair, grouped by expert */
    float *weight;     /* (cap_pairs) its gate weight */
    int32_t *slot;     /* (cap_pairs) which of the row's k choices it is */
} expert_queue;

int expert_queue_init(expert_queue *q, int n_expert, int max_pairs, char *err, size_t errlen);
void expert_queue_free(expert_queue *q);

/* Group the n*k (ids, weights) pairs by expert with a counting sort, rows in
 * ascending order within each queue. capacity < 0: dropless. Otherwise each queue
 * keeps its first `capacity` rows; the rest are dropped (their weight is lost) and
 * counted in dropped[expert] (may be NULL). Allocates nothing. */
void expert_queue_build(expert_queue *q, const int32_t *ids, const float *weights,
                        int n, int k, int capacity, uint64_t *dropped);

/* Capacity for a batch: ceil(cf * n_tokens * k / n_expert); -1 when cf <= 0. */
int expert_capacity(float capacity_factor, int n_tokens, int k, int n_expert);

/* The layer -------------------------------------------------------------- */

typedef struct moe_ffn moe_ffn;   /* scratch, sized once for max_rows */

int moe_ffn_create(const moe_hparams *hp, int max_rows, int n_threads,
                   moe_ffn **out, char *err, size_t errlen);
void moe_ffn_free(moe_ffn *f);

/* Wall seconds of a layer's parts, added to by moe_ffn_forward (moe_ffn_opts). */
typedef struct {
    double routing;          /* router GEMM, top-k, expert queues, gathering each queue's rows */
    double experts;          /* every expert once over its queue (and the shared expert) */
    double combine;          /* each row's weighted sum of its experts' outputs */
} moe_ffn_times;

typedef struct {
    float capacity_factor;   /* <= 0: dropless */
    int32_t *trace_expert;   /* optional: row r writes k ids at trace_expert[r * trace_stride] */
    float *trace_weight;     /* optional: same layout */
    int trace_stride;
    uint64_t *routed;        /* optional (n_expert): += rows each expert processed */
    uint64_t *dropped;       /* optional (n_expert): += rows dropped by capacity */
    moe_ffn_times *times;    /* optional: += this call's wall seconds by part */
} moe_ffn_opts;

/* out (n, n_embd) = MoE FFN of x (n, n_embd, already normalised). out is
 * overwritten. Output does not depend on the pool's thread count. */
void moe_ffn_forward(moe_ffn *f, pool *p, const moe_arch_info *a, const moe_layer_weights *L,
                     const float *x, int n, float *out, const moe_ffn_opts *opts);

/* Dense SwiGLU FFN (llama with n_expert == 0) with the same scratch. */
void dense_ffn_forward(moe_ffn *f, pool *p, const moe_layer_weights *L,
                       const float *x, int n, float *out);

#endif
