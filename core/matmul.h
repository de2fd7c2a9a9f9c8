/* matmul.h -- y = x W^T, the one kernel everything heavy goes through.
 *
 * x (m, k) row-major, W (n, k) row-major (GGUF layout: one row per output), y (m, n).
 * Few rows (decode, small expert queues): a kernel that streams each weight row
 * once for all m rows of x. Many rows (prefill): OpenBLAS cblas_sgemm on slices of
 * n. Either way every y element is a dot product computed by one thread in a fixed
 * order, so results do not depend on the number of threads.
 */
#ifndef MOE_CORE_MATMUL_H
#define MOE_CORE_MATMUL_H

#include <limits.h>
#include <stdint.h>

#include "core/model.h"
#include "core/pool.h"

/* Serial, on the calling thread: y[i][j] = sum_t x[i][t] * W[j][t] for j in [n0, n1). */
void matmul_range(const float *x, int m, int k, const float *w, int n0, int n1, float *y, int ldy);

/* The same with W narrower than F32 (a narrow moe_wtype; rows of
 * moe_wtype_row_bytes(wt, k) bytes, whole blocks), widened as it is read: the
 * same bits as matmul_range on the widened W, from fewer bytes. scratch holds
 * (n1 - n0) * k floats, used from matmul_sgemm_min_rows() rows up, where W's
 * slice is widened once and goes to sgemm; NULL keeps the few-rows kernels at
 * every m (the bits of the packed kernel, core/packed.h, not of sgemm). */
void matmul_range_wq(const float *x, int m, int k, const void *w, moe_wtype wt, int n0, int n1,
                     float *y, int ldy, float *scratch);

/* Parallel over slices of n on the pool (p may be NULL: serial). */
void matmul(pool *p, const float *x, int m, int k, const float *w, int n, float *y);

/* The same on OpenBLAS sgemm whatever the switch says: for `moe bench`, which
 * measures the library's peak beside the engine's own. */
void matmul_blas(pool *p, const float *x, int m, int k, const float *w, int n, float *y);

/* Several products of the same x in one parallel run: y_i = x W_i^T for each
 * (w, n, y) of outs, from raw where an output has it and m is below
 * matmul_sgemm_min_rows(), or where it has no w: from the sgemm switch up raw
 * then goes to sgemm (a slice widened into the thread's part of scratch) when
 * sgemm is set and scratch given, else to the few-rows kernels at every m (and
 * without sgemm so do the F32 outputs: the bits of the packed kernel).
 * scratch (matmul_multi_scratch_floats(k) floats a pool thread, or NULL) also
 * lets those widen a k-quant slice once for many rows. The same bits every way
 * as the F32 weights on the same path. One run instead of several saves the barriers between them
 * and keeps the threads streaming across the weights (the q, k and v projections
 * of a decode step are 8 + 2 + 2 MB). Same results as separate matmul calls. */
typedef struct {
    const float *w;
    int n;
    float *y;
    moe_wraw raw;   /* optional: W in a narrower type, read below the sgemm switch */
} matmul_out;
void matmul_multi(pool *p, const float *x, int m, int k, const matmul_out *outs, int n_outs, float *scratch,
                  int sgemm);
size_t matmul_multi_scratch_floats(int k);

/* Plain triple loop, the reference the tests compare both paths against. */
void matmul_ref(const float *x, int m, int k, const float *w, int n, float *y);

/* The OpenBLAS kernel set in use (e.g. "Haswell", "Cooperlake"): the library
 * picks it at load by CPU model, or from OPENBLAS_CORETYPE. On AVX-512 machines
 * the 256-bit Haswell set has half the sgemm peak (docs/PERFORMANCE.md), so the
 * benchmark and the server's ready line say which one runs. */
const char *matmul_blas_corename(void);

/* Rows at or above which matmul_range uses sgemm (measured, see docs/PERFORMANCE.md),
 * or MATMUL_SGEMM_NEVER when the kernel set OpenBLAS runs is slower than the
 * engine's own kernels at every size (a set it fell back to on a CPU it does not
 * know, such as Prescott). */
#define MATMUL_SGEMM_NEVER INT_MAX
int matmul_sgemm_min_rows(void);

/* The switch for an OpenBLAS kernel set of that name (NULL: unknown) in this
 * build: what matmul_sgemm_min_rows() decides from matmul_blas_corename(). */
int matmul_sgemm_rows_for(const char *corename);

/* Nonzero when the engine calls OpenBLAS at all (the switch is not
 * MATMUL_SGEMM_NEVER): what `moe bench` and the server's ready line report. */
int matmul_blas_used(void);

/* Nonzero when OpenBLAS runs its 512-bit kernels (SkylakeX, Cooperlake,
 * SapphireRapids): then its sgemm is as fast as the engine's best kernels on
 * many rows, and the engine keeps using it there. */
int matmul_blas_512_bit(void);

#endif
