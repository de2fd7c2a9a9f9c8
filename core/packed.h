/* packed.h -- projection weights repacked once for a broadcast-form kernel.
 *
 *   packed_w *wq;       packed_w_create(pool, w, n, k, &wq, err, sizeof err);
 *   packed_scratch *s;  packed_scratch_create(max_m, max_k, n_threads, &s, err, sizeof err);
 *   packed_out o = {wq, y};
 *   packed_matmul(pool, s, x, m, k, &o, 1);      // y (m, n) = x W^T
 *   packed_scratch_free(s); packed_w_free(wq);
 *
 * Why. core/matmul.c computes every output as a dot product along k, so both
 * operands are vectors along k and, from 16 rows up, a weight vector comes from
 * L2 for every block of 6 x rows: about 10 bytes of L2 traffic per FMA, which
 * holds its 64-row tiles to 58-73% of the FMA peak. Here the weights are stored
 * as W^T in panels of 64 outputs, so one x value broadcast against four weight
 * vectors makes 64 outputs' worth of FMAs, and the part of a panel in use (16 KB)
 * stays in L1 while up to 64 x rows pass over it (docs/PERFORMANCE.md).
 *
 * Same bits. core/matmul.c's kernel keeps 16 lane chains per output (lane j
 * adds k = j, j + 16, ... in order) and sums the lanes in a fixed tree. Here
 * the panel is stored phase by phase (k = j, j + 16, ... for j = 0..15), each
 * phase is run as its own chain, and the 16 phase results are added in that
 * tree, so an output is equal to the bit to what matmul_range computes below
 * the sgemm switch, for any m: a row's result does not depend on its batch,
 * whatever the batch size.
 *
 * AVX-512 builds only (packed_supported()); elsewhere the engine keeps the
 * projections on core/matmul.c. The packed copy costs the memory of the weights
 * it holds (packed_w_bytes). */
#ifndef MOE_CORE_PACKED_H
#define MOE_CORE_PACKED_H

#include <stddef.h>

#include "core/pool.h"

/* Nonzero when this build has the kernel (AVX-512). */
int packed_supported(void);

typedef struct packed_w packed_w;

/* Packs W (n, k) row-major, in parallel on p (NULL: serially). W is only read. */
int packed_w_create(pool *p, const float *w, int n, int k, packed_w **out, char *err, size_t errlen);
void packed_w_free(packed_w *pw);
size_t packed_w_bytes(const packed_w *pw);
size_t packed_w_bytes_for(int n, int k);   /* what packing an n x k matrix takes */
int packed_w_rows(const packed_w *pw);   /* n: outputs */
int packed_w_cols(const packed_w *pw);   /* k: inputs */

/* Per-call buffers (the repacked x and each thread's lane partials), sized once. */
typedef struct packed_scratch packed_scratch;
int packed_scratch_create(int max_m, int max_k, int n_threads, packed_scratch **out,
                          char *err, size_t errlen);
void packed_scratch_free(packed_scratch *s);

/* One product of the shared x: y (m, w->n, row-major) = x W^T. */
typedef struct {
    const packed_w *w;
    float *y;
} packed_out;

/* y_i = x W_i^T for each of outs, all W_i with k columns, as one parallel run
 * (p NULL: serial). x is (m, k) row-major; m <= the scratch's max_m, k <= its
 * max_k, and the pool has at most the scratch's thread count. */
void packed_matmul(pool *p, packed_scratch *s, const float *x, int m, int k,
                   const packed_out *outs, int n_outs);

#endif
