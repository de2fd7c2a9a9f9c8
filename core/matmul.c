/* matmul.c -- y = x W^T for row-major x (m, k) and W (n, k).
 *
 * Two paths, one decision (matmul_sgemm_min_rows):
 *  - few rows (decode, small expert queues): the cost is reading W from memory, so
 *    a register-blocked kernel reads each block of 4 weight rows once and dots it
 *    with every row of x while it is in cache. OpenBLAS sgemm packs W for every
 *    call and reaches a fraction of DRAM bandwidth on such skinny shapes.
 *  - many rows (prefill, big queues): OpenBLAS cblas_sgemm, compute-bound.
 *
 * Determinism: in the kernel every y element is one dot product whose order
 * (vector lanes over k, masked tail, fixed horizontal reduction) does not depend on
 * the tile it falls in, on m, or on the thread; matmul() cuts n into slices of a
 * fixed width, so sgemm calls see the same shapes whatever the thread count. */
#include "core/matmul.h"
#include "core/wconv.h"

#include <assert.h>
#include <cblas.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* Measured on the 2-core Zen 4 machines with tools/matmul_bench.c (1 thread,
 * GFLOP/s per CPU-second, W 1024x2048 / 2048x1024): the kernel is ahead of sgemm
 * up to 32 rows (m 16: 70-78 vs 55; m 32: 83-97 vs 73-74), about even from 64 to
 * 256 (kernel 82-118 depending on k, sgemm 83-102), and sgemm's cache blocking is
 * the safer choice for long rows and large m. */
#ifndef SGEMM_MIN_ROWS
#define SGEMM_MIN_ROWS 0   /* 0: decided at run time, sgemm_min_rows() */
#endif
/* Output columns per task: fixed, never derived from the thread count. */
#ifndef SLICE_KERNEL
#define SLICE_KERNEL 64
#endif
#define SLICE_SGEMM 256

/* Vector primitives ------------------------------------------------------- */

#if defined(__AVX512F__)
typedef __m512 vf;
#define VL 16
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vload_n(p, r) _mm512_maskz_loadu_ps((__mmask16)((1u << (r)) - 1u), (p))
#define vfma(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define vsum(v) vsum16(v)
/* The horizontal sum written out, not left to _mm512_reduce_add_ps, whose tree
 * is the compiler header's choice: lanes i + (i + 8), then + (i + 4), then
 * [0] + [2] and [1] + [3], then those two (GCC's order, so the bits are what
 * they were). core/packed.c adds its 16 lane partials in the same tree, which
 * is what makes its results equal to these to the bit. */
static inline float vsum16(__m512 v)
{
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 a = _mm256_add_ps(hi, _mm512_castps512_ps256(v));
    __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    __m128 c = _mm_add_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}
/* vsum16 of four vectors at once, the same additions lane for lane (so the
 * same bits): out[i] = vsum16(v_i). 9 shuffles and 5 adds for four sums where
 * four vsum16 take 16 and 16, and a tile's sums are otherwise a tenth to a
 * quarter of its shuffle-port work (k 1024 to 512). */
static inline void vsum16x4(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float out[4])
{
    /* each vector's lo and hi 256 bits, two vectors a register: a_i = hi + lo */
    __m512 a01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0xEE), _mm512_shuffle_f32x4(v0, v1, 0x44));
    __m512 a23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0xEE), _mm512_shuffle_f32x4(v2, v3, 0x44));
    /* 128-bit lane i: b_i = a_i[4..7] + a_i[0..3] */
    __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(a01, a23, 0xDD), _mm512_shuffle_f32x4(a01, a23, 0x88));
    __m512 c = _mm512_add_ps(b, _mm512_permute_ps(b, _MM_SHUFFLE(1, 0, 3, 2)));   /* b[0] + b[2], b[1] + b[3] */
    __m512 d = _mm512_add_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(2, 3, 0, 1)));   /* c[0] + c[1] */
    __m512 r = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), d);
    _mm_storeu_ps(out, _mm512_castps512_ps128(r));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vf;
#define VL 8
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vload_n(p, r) _mm256_maskload_ps((p), \
    _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
#define vfma(a, b, c) _mm256_fmadd_ps((a), (b), (c))
static inline float vsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
typedef float vf;
#define VL 1
#define vzero() 0.0f
#define vload(p) (*(p))
#define vload_n(p, r) ((void)(r), *(p))   /* never used: VL 1 leaves no tail */
#define vfma(a, b, c) ((a) * (b) + (c))
#define vsum(v) (v)
#endif

/* Keeps a loaded vector in a register: without it GCC folds the load into every
 * FMA that uses it (4x the loads), and the kernel becomes bound by L1 loads. */
#if VL > 1
#define VREG(v) __asm__("" : "+v"(v))
#else
#define VREG(v) ((void)0)
#endif

/* Prefetch into L2 the same position of the next tile's weight rows (a tile
 * ahead: ~16 KB at k 1024), when the tile dots at least PF_MIN_X rows of x.
 * With 4 KB pages this helped every m (+10-20% at m 1-2); with the weights in
 * 2 MiB pages the hardware prefetcher follows one or two rows well and the extra
 * load-queue entries cost m = 1 about 5-7% (tools/stream_ab-style A/B against a
 * raw read, alternated: m 1 84 -> 90% of the read rate at ~70 GB/s, 93 -> 97% at
 * ~45), while from 3-4 rows of x, where the loop spends longer per byte, the
 * prefetch still gains 5-15%. A prefetch past the end of W is harmless (it never
 * faults). */
#define PF_MIN_X 3
#if VL > 1
/* The address is formed as an integer: it may lie past the end of W. */
#define VPREFETCH(base, off) \
    _mm_prefetch((const char *)((uintptr_t)(base) + (off) * sizeof(float)), _MM_HINT_T1)
#else
#define VPREFETCH(base, off) ((void)(base), (void)(off))
#endif

/* Few-rows kernel --------------------------------------------------------- */

#define TILE_W 4   /* weight rows per tile */
#define TILE_X 6   /* x rows per tile: 24 accumulators + 4 weights + 1 x of 32 registers;
                    * 5-20% over 4 rows at 6-48 rows (fewer loads per FMA) */
#define PAIR_X 8   /* x rows of a 2-weight-row tile (16 accumulators), see pair_tiles() */

/* Memory the tiles of a slice's later passes prefetch: those passes read the
 * slice from L2 and leave the memory idle, so they fetch the next slice (the
 * pool hands a thread consecutive tasks, whose slices are consecutive) into the
 * cache, `per_step` lines a step, `n` floats from `base` for this tile. */
typedef struct {
    uintptr_t base;   /* an integer: the next slice may lie past the end of W */
    int per_step, n;
} next_slice;

/* y[b * ldy + a] = the sum of acc[a * lda + b]'s lanes for a < nw, b < nx
 * (compile-time after inlining, so acc stays in registers), four at a time
 * with AVX-512. */
static inline __attribute__((always_inline))
void tile_sums(const vf *acc, const int lda, const int nw, const int nx, float *y, int ldy)
{
    int i = 0;
#if VL == 16
#pragma GCC unroll 32
    for (; i + 4 <= nw * nx; i += 4) {
        float s[4];
        vsum16x4(acc[(i % nw) * lda + i / nw], acc[((i + 1) % nw) * lda + (i + 1) / nw],
                 acc[((i + 2) % nw) * lda + (i + 2) / nw], acc[((i + 3) % nw) * lda + (i + 3) / nw], s);
        for (int q = 0; q < 4; q++) y[(size_t)((i + q) / nw) * ldy + (i + q) % nw] = s[q];
    }
#endif
#pragma GCC unroll 32
    for (; i < nw * nx; i++) y[(size_t)(i / nw) * ldy + i % nw] = vsum(acc[(i % nw) * lda + i / nw]);
}

/* y[b * ldy + a] = x[b] . w[a] for a < nw, b < nx (both compile-time after
 * inlining, so acc lives in registers), over columns [t0, t1) of k: a tile that
 * does not start at 0 takes its accumulators from carry, one that does not end at
 * k leaves them there (k chunks, see tiles_group), so each y element is still the
 * one chain of tile() over all of k. With ns NULL (a compile-time constant too)
 * the tile prefetches the next tile's rows, as the first pass over a slice must;
 * otherwise the part of the next slice ns gives. */
static inline __attribute__((always_inline))
void tile(const float *x, int k, const float *w, float *y, int ldy, const int nw, const int nx,
          const next_slice *ns, int t0, int t1, vf *carry)
{
    vf acc[TILE_W][PAIR_X];   /* only the nw x nx used ones are registers */
    for (int a = 0; a < nw; a++)
        for (int b = 0; b < nx; b++) acc[a][b] = t0 > 0 ? carry[a * TILE_X + b] : vzero();
    int t = t0;
    for (; t + VL <= t1; t += VL) {
        if (ns && (t - t0) * ns->per_step < ns->n)
            for (int l = 0; l < ns->per_step; l++)
                VPREFETCH(ns->base, (size_t)(t - t0) * (size_t)ns->per_step + (size_t)l * VL);
        vf wv[TILE_W];
        for (int a = 0; a < nw; a++) {
            if (!ns && nx >= PF_MIN_X) VPREFETCH(w, (size_t)(a + nw) * k + t);
            wv[a] = vload(w + (size_t)a * k + t);
            VREG(wv[a]);
        }
        for (int b = 0; b < nx; b++) {
            vf xv = vload(x + (size_t)b * k + t);
            VREG(xv);
            for (int a = 0; a < nw; a++) acc[a][b] = vfma(wv[a], xv, acc[a][b]);
        }
    }
#if VL > 1
    if (t < t1) {   /* only the last chunk has a tail: t0 and chunk sizes are multiples of VL */
        int r = t1 - t;
        vf wv[TILE_W];
        for (int a = 0; a < nw; a++) wv[a] = vload_n(w + (size_t)a * k + t, r);
        for (int b = 0; b < nx; b++) {
            vf xv = vload_n(x + (size_t)b * k + t, r);
            for (int a = 0; a < nw; a++) acc[a][b] = vfma(wv[a], xv, acc[a][b]);
        }
    }
#endif
    if (t1 < k) {
        for (int a = 0; a < nw; a++)
            for (int b = 0; b < nx; b++) carry[a * TILE_X + b] = acc[a][b];
        return;
    }
    tile_sums(&acc[0][0], PAIR_X, nw, nx, y, ldy);
}

#define TILE_CASES(NW, NS, T0, T1, C)                                         \
    switch (nx) {                                                             \
    case 1: tile(x, k, w, y, ldy, NW, 1, NS, T0, T1, C); break;               \
    case 2: tile(x, k, w, y, ldy, NW, 2, NS, T0, T1, C); break;               \
    case 3: tile(x, k, w, y, ldy, NW, 3, NS, T0, T1, C); break;               \
    case 4: tile(x, k, w, y, ldy, NW, 4, NS, T0, T1, C); break;               \
    case 5: tile(x, k, w, y, ldy, NW, 5, NS, T0, T1, C); break;               \
    default: tile(x, k, w, y, ldy, NW, 6, NS, T0, T1, C); break;              \
    }

static void tile_full(const float *x, int nx, int k, const float *w, float *y, int ldy,
                      int t0, int t1, vf *carry)
{
    TILE_CASES(TILE_W, NULL, t0, t1, carry)
}

static void tile_full_next(const float *x, int nx, int k, const float *w, float *y, int ldy,
                           int t0, int t1, vf *carry, const next_slice *ns)
{
    TILE_CASES(TILE_W, ns, t0, t1, carry)
}

static void tile_one(const float *x, int nx, int k, const float *w, float *y, int ldy)
{
    TILE_CASES(1, NULL, 0, k, NULL)
}

/* Up to ROW_MAX_X rows of x (decode at batch 1, most expert queues): the weight
 * rows are read one after another, each dotted with every x row, so a task reads
 * one contiguous stream as the hardware prefetcher likes it, where a tile reads
 * TILE_W rows side by side. Each y element is the same lane-wise chain and
 * reduction as in tile(), so the bits do not depend on which kernel ran.
 * Measured against a raw read pass, alternated (2 threads, W 3 GB, k 1024): m 1
 * +3-9%, m 2 +10-15%, m 3 +7% over the tile. With x read through the padded copy
 * (PAD_X below), 4 rows in one pass also beat the tile and the two 2-row passes
 * that replaced it: 6 rounds each, host at 60+ GB/s, k 1024: 65.0 -> 79.8-81.5%
 * of the read rate; at 40-60 GB/s, k 512: 87.2 -> 95.1-97.8%. From 5 rows the x
 * loads (one per FMA) cost more than the tile's reuse saves (m 5 69-92% against
 * 71-87%, m 6-8 down to 44-50% when the memory is fast). */
#define ROW_MAX_X 4
/* rows_dot prefetches the weights 8 KB ahead. From 2 x rows each weight line
 * costs more instructions than the reorder window can hold enough of to keep the
 * stream's misses in flight (Zen 4, A/B as above, alternated, 3 runs at 54-68
 * GB/s: m 2 +4-10, m 3 +11-16, m 4 (then two passes of 2) +3-6 points of the
 * read rate; m 1 gained nothing there). On Emerald Rapids one row gains too,
 * likely because an expert task's stream restarts at every 256 KB slice (a gate
 * slice, then an up slice) and the hardware prefetcher has to ramp up again:
 * `decode_bench` alternated with the build before, the experts' time against
 * the projections' in the same steps fell 16% at batch 1 (9 rounds each), 13% at
 * batch 4 and 8% at batch 16 (6 rounds each). Past the end of the slice it
 * touches the next task's weights, harmlessly. */
#define ROW_PF_AHEAD 2048
/* Rows of x whose stride is a multiple of 4 KB (k 1024, 2048, ...) sit in the
 * same L1 set at every step, together with the weight line being read and the
 * ones prefetched; with 2-4 rows the x lines keep being evicted while the
 * weights stream. rows_dot therefore reads a copy of x with rows PAD_X floats
 * apart (same values, same order, same bits) when it fits a stack buffer of
 * PAD_FLOATS. Kernel A/B against the raw read, host at 71 GB/s (6 rounds): m 2 / 3
 * / 4 at k 1024: 89.9 / 69.2 / 68.6 -> 94.4 / 93.1 / 69.6% of the read rate
 * (pads of 16 and 48 floats alike); no change when the host is at 40-48 GB/s.
 * One row of x cannot conflict with itself and is read in place. */
#define PAD_X 16
#define PAD_FLOATS 10240   /* 40 KB: m 4 up to k 2544, m 2 up to k 5104 */

static inline __attribute__((always_inline))
void rows_dot(const float *x, int ldx, int k, const float *w, int n0, int n1, float *y, int ldy, const int nx)
{
    for (int j = n0; j < n1; j++) {
        const float *wr = w + (size_t)j * k;
        vf acc[ROW_MAX_X];
        for (int b = 0; b < nx; b++) acc[b] = vzero();
        int t = 0;
        for (; t + VL <= k; t += VL) {
            VPREFETCH(wr, (size_t)t + ROW_PF_AHEAD);
            vf wv = vload(wr + t);
            VREG(wv);
            for (int b = 0; b < nx; b++) acc[b] = vfma(wv, vload(x + (size_t)b * ldx + t), acc[b]);
        }
#if VL > 1
        if (t < k) {
            vf wv = vload_n(wr + t, k - t);
            for (int b = 0; b < nx; b++) acc[b] = vfma(wv, vload_n(x + (size_t)b * ldx + t, k - t), acc[b]);
        }
#endif
        for (int b = 0; b < nx; b++) y[(size_t)b * ldy + j] = vsum(acc[b]);
    }
}

/* 7-8 rows of x (typical expert queues at batch 64): the 4x6 tiles would take a
 * second pass of 1-2 rows over the slice; tiles of 2 weight rows by all 7-8 x
 * rows read the weights in one pass, still with more FMAs than loads a step.
 * Same chains, same bits. Kernel A/B against the raw read (6 rounds, 2 threads,
 * host at 44-46 GB/s): k 1024 m 7/8 82.1/76.9 -> 83.8/80.4% of the read rate,
 * k 512 73.8/71.5 -> 80.9/81.1%; at 5-6 rows it gains nothing, so they stay on
 * the 4x6 tiles. */
static inline __attribute__((always_inline))
void pair_tiles(const float *x, int k, const float *w, int n0, int n1, float *y, int ldy, const int nx)
{
    int j = n0;
    for (; j + 2 <= n1; j += 2) tile(x, k, w + (size_t)j * k, y + j, ldy, 2, nx, NULL, 0, k, NULL);
    if (j < n1) tile(x, k, w + (size_t)j * k, y + j, ldy, 1, nx, NULL, 0, k, NULL);
}

/* Tiles over weight rows [g0, g1) (whole tiles, at most GROUP_W rows), in passes
 * of TILE_X x rows: x block outer, weight tiles inner, so the block stays in L1
 * while the rows come from L2 after the first pass (the other order reads every
 * x row from L2 for every tile; same tiles, same bits; m 16 +6%, m 24-48 +13-16%,
 * m 64 +7%, A/B as above). Rows longer than KC_MAX are taken in chunks of it,
 * each chunk over all the tiles before the next, so the block's chunk (6 x 4 KB)
 * stays in L1 too: at k 2048 a whole block is 48 KB, the size of L1, and the x
 * loads went to L2 (hot, 2 threads, m 16: 261-335 -> 329-364 GFLOP/s; m 64
 * 315-353 -> 364-371). The passes after the first fetch the next group's rows
 * (next_slice). */
#define GROUP_W 64    /* = SLICE_KERNEL: one task's slice is one group */
#define KC_MAX 1024   /* a multiple of VL */
static void tiles_group(const float *x, int m, int k, const float *w, int g0, int g1, float *y, int ldy)
{
    vf carry[GROUP_W / TILE_W * TILE_W * TILE_X];   /* 24 KB with AVX-512 */
    int kc = k > KC_MAX ? KC_MAX : k, n_chunks = (k + kc - 1) / kc;
    int calls = (m - 1) / TILE_X * n_chunks * ((g1 - g0) / TILE_W), q = 0;
    size_t total = (size_t)(g1 - g0) * (size_t)k, per = 0;
    if (calls > 0) per = (total + (size_t)calls - 1) / (size_t)calls;
    per = (per + VL - 1) / VL * VL;
    int per_step = (int)((per + (size_t)kc - 1) / (size_t)kc);
    for (int i = 0; i < m; i += TILE_X) {
        int nx = m - i < TILE_X ? m - i : TILE_X;
        const float *xb = x + (size_t)i * k;
        for (int t0 = 0; t0 < k; t0 += kc) {
            int t1 = t0 + kc < k ? t0 + kc : k;
            for (int j = g0; j < g1; j += TILE_W) {
                vf *c = carry + (j - g0) / TILE_W * (TILE_W * TILE_X);
                float *yb = y + (size_t)i * ldy + j;
                if (i == 0) {
                    tile_full(xb, nx, k, w + (size_t)j * k, yb, ldy, t0, t1, c);
                    continue;
                }
                size_t done = (size_t)q * per, left = done < total ? total - done : 0;
                next_slice ns = {(uintptr_t)(w + (size_t)g1 * k) + done * sizeof(float), per_step,
                                 (int)(left < per ? left : per)};
                tile_full_next(xb, nx, k, w + (size_t)j * k, yb, ldy, t0, t1, c, &ns);
                q++;
            }
        }
    }
}

/* Each block of TILE_W weight rows is read from memory once and dotted with all m
 * rows of x, TILE_X at a time, while it sits in L1/L2. */
static void matmul_few_rows(const float *x, int m, int k, const float *w, int n0, int n1,
                            float *y, int ldy)
{
    if (m == 1) {
        rows_dot(x, k, k, w, n0, n1, y, ldy, 1);
        return;
    }
    if (m <= ROW_MAX_X) {
        float xp[PAD_FLOATS];
        int ldx = k;
        if ((size_t)m * (size_t)(k + PAD_X) <= PAD_FLOATS) {
            ldx = k + PAD_X;
            for (int b = 0; b < m; b++) memcpy(xp + (size_t)b * ldx, x + (size_t)b * k, (size_t)k * sizeof *x);
            x = xp;
        }
        switch (m) {
        case 2: rows_dot(x, ldx, k, w, n0, n1, y, ldy, 2); return;
        case 3: rows_dot(x, ldx, k, w, n0, n1, y, ldy, 3); return;
        default: rows_dot(x, ldx, k, w, n0, n1, y, ldy, 4); return;
        }
    }
    switch (m) {
    case 7: pair_tiles(x, k, w, n0, n1, y, ldy, 7); return;
    case 8: pair_tiles(x, k, w, n0, n1, y, ldy, 8); return;
    default: break;
    }
    int j_end = n0 + (n1 - n0) / TILE_W * TILE_W;
    for (int g0 = n0; g0 < j_end; g0 += GROUP_W)
        tiles_group(x, m, k, w, g0, g0 + GROUP_W < j_end ? g0 + GROUP_W : j_end, y, ldy);
    int j = j_end;
    for (; j < n1; j++)
        for (int i = 0; i < m; i += TILE_X) {
            int nx = m - i < TILE_X ? m - i : TILE_X;
            tile_one(x + (size_t)i * k, nx, k, w + (size_t)j * k, y + (size_t)i * ldy + j, ldy);
        }
}

/* Few rows, narrow weights (F16, BF16, the block and k-quant types) ---------- */

/* VL weights widened to F32 as they are read (exact, see core/wconv.h), and the
 * r < VL of a 16-bit row's tail with zeros after them, as vload_n gives. */
#if defined(WCONV_VL) && WCONV_VL == VL
static inline vf widen(const uint16_t *p, const moe_wtype t) { return wconv_vec(p, t); }
#else
static inline vf widen(const uint16_t *p, const moe_wtype t)
{
    float f[VL];
    wconv_rows(f, p, VL, t);
    return vload(f);
}
#endif

static inline vf widen_n(const uint16_t *p, int r, const moe_wtype t)
{
    uint16_t h[VL] = {0};
    memcpy(h, p, (size_t)r * sizeof *h);
    return widen(h, t);
}

/* The kernels walk a row a step at a time: a block of 32 weights (its scale,
 * and min, read once a step), a k-quant super-block (256 weights, its
 * sub-blocks' factors computed once a step) or one vector of 16-bit weights. */
#define KQUANT(wt) wconv_kquant(wt)
#define BLOCK32(wt) wconv_b32(wt)
#define WSTEP(wt) (BLOCK32(wt) ? MOE_Q8_0_BLOCK : KQUANT(wt) ? MOE_QK_K : VL)
#define WSTEP_BYTES(wt) (BLOCK32(wt) || KQUANT(wt) ? (int)moe_wtype_row_bytes(wt, WSTEP(wt)) : VL * 2)

/* A block's d and m for wload (wconv_b32_factors where the widening has this
 * kernel's width; the scalar widening reads them from the block itself). */
static inline void b32_factors(const unsigned char *blk, moe_wtype wt, vf *d, vf *m)
{
#if defined(WCONV_VL) && WCONV_VL == VL
    if (BLOCK32(wt)) {
        wconv_b32_factors(blk, wt, d, m);
        return;
    }
#else
    (void)blk;
    (void)wt;
#endif
    *d = vzero();
    *m = vzero();
}

/* VL weights at element i of the step at p: 16-bit, or a block of 32 with its
 * scale d and min m (unused without one) in every lane. (A k-quant step is
 * widened whole into a buffer: kquant_step.) */
static inline vf wload(const unsigned char *p, int i, const moe_wtype wt, vf d, vf m)
{
    if (!BLOCK32(wt)) return widen((const uint16_t *)p + i, wt);
#if defined(WCONV_VL) && WCONV_VL == VL
    return wconv_b32_vec(p, wt, i, d, m);
#else
    (void)d;
    (void)m;
    float f[VL];
    for (int l = 0; l < VL; l++) f[l] = wconv_b32_weight(p, wt, i + l);
    return vload(f);
#endif
}

/* A k-quant super-block widened into wb (256 floats in L1): the shifts and
 * masks of its packed formats cost as much per vector as the FMAs of several x
 * rows, so they are done once a step, not per x row and vector. */
#define KQUANT_STEP_OF(T, name)                                 \
    static inline __attribute__((always_inline)) void name(const unsigned char *p, float *wb) \
    {                                                           \
        float ks[32];                                           \
        wconv_k_scales(p, T, ks);                               \
        wconv_k_block(p, T, ks, wb);                            \
    }
KQUANT_STEP_OF(MOE_WT_Q2_K, kquant_step_q2_k)
KQUANT_STEP_OF(MOE_WT_Q3_K, kquant_step_q3_k)
KQUANT_STEP_OF(MOE_WT_Q4_K, kquant_step_q4_k)
KQUANT_STEP_OF(MOE_WT_Q5_K, kquant_step_q5_k)
KQUANT_STEP_OF(MOE_WT_Q6_K, kquant_step_q6_k)
KQUANT_STEP_OF(MOE_WT_IQ4_XS, kquant_step_iq4_xs)

/* One function per type, each with its unpacking fixed at compile time (a
 * shared one, too large to inline, tested the type at every step: a Q3_K_M
 * batch-1 step spent a fifth of its time in it), and inlined into the
 * kernels: since each type's kernels are a function of their own GCC left
 * some of them as calls, one a super-block (Q2_K mix batch 1 131-133 tok/s
 * called, 152 inlined; Q3_K_M 124-139 against 142-152). */
static inline void kquant_step(const unsigned char *p, const moe_wtype wt, float *wb)
{
    switch (wt) {
    case MOE_WT_Q2_K: kquant_step_q2_k(p, wb); break;
    case MOE_WT_Q3_K: kquant_step_q3_k(p, wb); break;
    case MOE_WT_Q4_K: kquant_step_q4_k(p, wb); break;
    case MOE_WT_Q5_K: kquant_step_q5_k(p, wb); break;
    case MOE_WT_Q6_K: kquant_step_q6_k(p, wb); break;
    default: kquant_step_iq4_xs(p, wb); break;
    }
}

/* The x rows of one pass over the weight rows: 8 accumulators a weight row.
 * More rows take several passes over a task's slice, the later ones from L2.
 * Widening the slice once into a buffer for the F32 tiles from 16 rows instead
 * measured the same (F16, prefill of 512 tokens, queues of about 64 rows:
 * 698-717 against 709-715 tok/s), so the buffer serves only sgemm. */
#define NARROW_XB 8

/* y[b * ldy + j] = x[b] . widen(w[j]) for j in [n0, n1), b < nx: each weight row
 * read once (one contiguous stream over the slice, as rows_dot) and dotted with
 * every x row while its widened vector is in a register. Every y element is the
 * chain of tile() and rows_dot(), FMAs over k in order, the masked tail, vsum, so
 * the bits are those of the F32 kernel on the widened weights. Quantized rows
 * are whole blocks: no tail. It runs F16 and BF16 at one x row, and on Emerald
 * Rapids it needs rows_dot's prefetch as much: the bench model in F16 at batch 1
 * decoded 27.5-30.2 tok/s without it and 36.7-48.0 with it (`decode_bench`, 9
 * rounds each, alternated; the projections 11.5-12.7 -> 7.0-9.3 ms a step, the
 * experts 16.4-17.9 -> 10.4-13.5), as much as tiles of 4 rows gave (37.8-44.3). */
static inline __attribute__((always_inline))
void narrow_dot(const float *x, int k, const unsigned char *w, const moe_wtype wt, int n0, int n1, float *y,
                int ldy, const int nx)
{
    size_t rb = moe_wtype_row_bytes(wt, (size_t)k);
    for (int j = n0; j < n1; j++) {
        const unsigned char *p = w + (size_t)j * rb;
        vf acc[NARROW_XB];
        for (int b = 0; b < nx; b++) acc[b] = vzero();
        int t = 0;
        for (; t + WSTEP(wt) <= k; t += WSTEP(wt), p += WSTEP_BYTES(wt)) {
            VPREFETCH(p, ROW_PF_AHEAD);   /* 8 KB ahead, as rows_dot: the same stream restarts */
            if (KQUANT(wt)) {
                float wb[MOE_QK_K];
                kquant_step(p, wt, wb);
                for (int i = 0; i < MOE_QK_K; i += VL) {
                    vf wv = vload(wb + i);
                    for (int b = 0; b < nx; b++) acc[b] = vfma(wv, vload(x + (size_t)b * k + t + i), acc[b]);
                }
                continue;
            }
            vf d, m;
            b32_factors(p, wt, &d, &m);
            for (int i = 0; i < WSTEP(wt); i += VL) {
                vf wv = wload(p, i, wt, d, m);
                VREG(wv);
                for (int b = 0; b < nx; b++) acc[b] = vfma(wv, vload(x + (size_t)b * k + t + i), acc[b]);
            }
        }
#if VL > 1
        if ((wt == MOE_WT_F16 || wt == MOE_WT_BF16) && t < k) {
            vf wv = widen_n((const uint16_t *)p, k - t, wt);
            for (int b = 0; b < nx; b++) acc[b] = vfma(wv, vload_n(x + (size_t)b * k + t, k - t), acc[b]);
        }
#endif
        for (int b = 0; b < nx; b++) y[(size_t)b * ldy + j] = vsum(acc[b]);
    }
}

/* From 5 x rows each x load feeds two FMAs: tiles of 2 weight rows by nx x rows
 * (as pair_tiles), prefetched as below (the hardware prefetcher does not follow
 * rows read side by side; the same column of the next tile's rows left Q8_0 and
 * F16 at batch 64 5-14% slower); an odd last row goes to narrow_dot. Same
 * chains, same bits. */
#define NARROW_TILE_R 2
#define TILE_R_MAX 4

/* 1-4 x rows (decode at batch 1-4, small expert queues): narrow_dot's nx
 * chains of FMAs a weight row, 4 cycles an FMA, bound it at 4 nx weights a
 * cycle, below the rate at which the block and k-quant types are widened and,
 * for Q8_0, the rate of fast memory; so tiles of 4 weight rows (2 from 3 x
 * rows) run more chains side by side. F16 and BF16 take them from 2 x rows: at
 * one, with two bytes a weight, one chain nearly keeps up with the memory and
 * the tiles read 3-8% less. A tile's R rows are R * rb bytes in a row, and the
 * prefetch walks them in that order 16 rows ahead (at least FEW_X_PF_AHEAD
 * bytes), past the end of the task's slice too (the next slice is the next
 * rows): one tile ahead left the loads waiting, stopping at the slice's end
 * lost nearly all of the gain, and the same column of each row (R streams side
 * by side) cost Q8_0 10-15% at batch 1 when the memory is slow. Bench preset,
 * `decode_bench`, batch 1 / 4 tok/s: Q4_0 177-181 / 287 -> 288-293 / 428-434,
 * Q4_K_M 140-143 / 224-229 -> 190-198 / 314-319, Q8_0 with fast memory 172-180
 * / 250 -> 229-239 / 371-383. docs/PERFORMANCE.md, "Few x rows on the 4- and
 * 5-bit types" and the sections after it. */
#define FEW_X_PF_AHEAD 8192
#define FEW_X_PF_ROWS ((size_t)16)

/* With AVX-512 the k-quants' vectors are made in registers where the FMAs use
 * them (wconv_k_vec); otherwise a super-block is widened into a buffer first
 * (through the buffer the AVX-512 tiles had lost 8% at batch 4). */
#if defined(WCONV_VL) && WCONV_VL == VL && VL == 16
#define K_IN_REGISTERS 1
#else
#define K_IN_REGISTERS 0
#endif

static inline int few_x_tile_rows(moe_wtype wt, int nx)
{
    /* the blocks of 32, and the k-quants: made in registers with AVX-512, else
     * through the super-block buffer (AVX2: Q4_K_M batch 1 / 4 64 / 114 -> 87-92
     * / 139-146 tok/s; one chain of 8-wide FMAs is 2 weights a cycle) */
    int tiled = BLOCK32(wt) || KQUANT(wt);
    if (nx > 1 && (wt == MOE_WT_F16 || wt == MOE_WT_BF16)) tiled = 1;
    if (!tiled || nx > 4) return 0;
    /* AVX2's blocks of 32 at 1-2 x rows: 2 weight rows, whose accumulators,
     * factors and widening temporaries fit 16 registers where 4 rows' spilled
     * (hot, one core, x86-64-v3 build: one x row Q4_1 6.7 -> 9.7 GB/s, Q5_1 6.9
     * -> 7.7, the others +4-6%; two x rows +12-28%, Q8_0 too; Q8_0 at one, the
     * k-quants and F16 slower with 2) */
    if (VL == 8 && BLOCK32(wt) && nx <= 2 && (nx == 2 || wt != MOE_WT_Q8_0)) return 2;
    if (nx <= 2) return 4;
    /* 3-4 x rows: 4 weight rows for the k-quants made by one permute a vector
     * with AVX-512 (hot, one core, 4 x rows: Q4_K, IQ4_XS, Q2_K +14-20%; decode
     * at batch 4 +2-10%); the others' own temporaries would spill (Q5_K, Q6_K
     * -15 to -59% hot), F16 read slower at batch 4 (196 against 248 tok/s), and
     * AVX2's 16 registers do not hold 16 accumulators (-20%) */
    if (K_IN_REGISTERS && (wt == MOE_WT_Q4_K || wt == MOE_WT_IQ4_XS || wt == MOE_WT_Q2_K)) return 4;
    return 2;
}

static inline __attribute__((always_inline))
void narrow_tiles(const float *x, int k, const unsigned char *w, const moe_wtype wt, int n0, int n1, float *y,
             int ldy, const int nx, const int R)
{
    size_t rb = moe_wtype_row_bytes(wt, (size_t)k);
    size_t ahead = FEW_X_PF_ROWS * rb > FEW_X_PF_AHEAD ? FEW_X_PF_ROWS * rb : FEW_X_PF_AHEAD;
    int j = n0;
    for (; j + R <= n1; j += R) {
        /* row r's step at p + r * rb: one pointer (an array of R pointers was
         * kept in a vector register, each one extracted at every use) */
        const unsigned char *row0 = w + (size_t)j * rb, *p = row0;
        vf acc[TILE_R_MAX][NARROW_XB];
        for (int r = 0; r < R; r++)
            for (int b = 0; b < nx; b++) acc[r][b] = vzero();
        int t = 0;
        for (; t + WSTEP(wt) <= k; t += WSTEP(wt), p += WSTEP_BYTES(wt)) {
            vf d[TILE_R_MAX], m[TILE_R_MAX], a[TILE_R_MAX];
            float wb[TILE_R_MAX][MOE_QK_K];   /* a k-quant step's rows, widened */
            /* the tile's R rows are R * rb bytes in a row: fetched in that order, ahead
             * of where the tile has come to (as an integer: past the end of W too) */
            uintptr_t at = (uintptr_t)row0 + ahead + ((uintptr_t)p - (uintptr_t)row0) * (size_t)R;
            for (size_t l = 0; l < (size_t)R * WSTEP_BYTES(wt); l += 64) VPREFETCH(at + l, 0);
#if K_IN_REGISTERS
            if (KQUANT(wt)) {   /* each vector made where it is used */
                float ks_st[TILE_R_MAX][32];
                for (int r = 0; r < R; r++) wconv_k_scales(p + (size_t)r * rb, wt, ks_st[r]);
                /* read back through a pointer GCC cannot see through, so each factor
                 * is a broadcast from memory (a load); seeing the stores, GCC made each
                 * one a cross-lane permute of the stored register, and with the
                 * weights' permutes and byte expansions the shuffle unit was the
                 * limit (Q4_K_M batch 1 165-192 -> 227-231 tok/s, Q2_K +34%) */
                const float (*ks)[32] = ks_st;
                __asm__("" : "+r"(ks) : "m"(ks_st));
                /* unrolled, each vector's offsets in the super-block are constants:
                 * GCC kept the loop and computed them per vector (Q6_K, Q5_K_M,
                 * Q3_K_M +12-20% at batch 1-4, Q4_K_M +10%) */
#pragma GCC unroll 16
                for (int h = 0; h < MOE_QK_K / VL; h++) {
                    for (int r = 0; r < R; r++) {
                        a[r] = wconv_k_vec(p + (size_t)r * rb, wt, ks[r], h);
                        VREG(a[r]);
                    }
                    for (int b = 0; b < nx; b++) {
                        vf xv = vload(x + (size_t)b * k + t + h * VL);
                        VREG(xv);
                        for (int r = 0; r < R; r++) acc[r][b] = vfma(a[r], xv, acc[r][b]);
                    }
                }
                continue;
            }
#endif
            for (int r = 0; r < R; r++) {
                b32_factors(p + (size_t)r * rb, wt, &d[r], &m[r]);
                if (KQUANT(wt)) kquant_step(p + (size_t)r * rb, wt, wb[r]);
            }
            for (int i = 0; i < WSTEP(wt); i += VL) {
                for (int r = 0; r < R; r++) {
                    a[r] = KQUANT(wt) ? vload(wb[r] + i) : wload(p + (size_t)r * rb, i, wt, d[r], m[r]);
                    VREG(a[r]);
                }
                for (int b = 0; b < nx; b++) {
                    vf xv = vload(x + (size_t)b * k + t + i);
                    VREG(xv);
                    for (int r = 0; r < R; r++) acc[r][b] = vfma(a[r], xv, acc[r][b]);
                }
            }
        }
#if VL > 1
        if ((wt == MOE_WT_F16 || wt == MOE_WT_BF16) && t < k) {
            for (int r = 0; r < R; r++) {
                vf a = widen_n((const uint16_t *)(p + (size_t)r * rb), k - t, wt);
                for (int b = 0; b < nx; b++) acc[r][b] = vfma(a, vload_n(x + (size_t)b * k + t, k - t), acc[r][b]);
            }
        }
#endif
        tile_sums(&acc[0][0], NARROW_XB, R, nx, y + j, ldy);
    }
    if (j < n1) narrow_dot(x, k, w, wt, j, n1, y, ldy, nx);
}

#define FEW_X(WT, NX)                                                                  \
    do {                                                                               \
        if (few_x_tile_rows(WT, NX))                                                   \
            narrow_tiles(x, k, w, WT, n0, n1, y, ldy, NX, few_x_tile_rows(WT, NX));    \
        else                                                                           \
            narrow_dot(x, k, w, WT, n0, n1, y, ldy, NX);                               \
    } while (0)

#define NARROW_CASES(WT)                                                               \
    switch (nx) {                                                                      \
    case 1: FEW_X(WT, 1); break;                                                       \
    case 2: FEW_X(WT, 2); break;                                                       \
    case 3: FEW_X(WT, 3); break;                                                       \
    case 4: FEW_X(WT, 4); break;                                                       \
    case 5: narrow_tiles(x, k, w, WT, n0, n1, y, ldy, 5, NARROW_TILE_R); break;        \
    case 6: narrow_tiles(x, k, w, WT, n0, n1, y, ldy, 6, NARROW_TILE_R); break;        \
    case 7: narrow_tiles(x, k, w, WT, n0, n1, y, ldy, 7, NARROW_TILE_R); break;        \
    default: narrow_tiles(x, k, w, WT, n0, n1, y, ldy, 8, NARROW_TILE_R); break;       \
    }

/* One function per type, so each kernel's widening is fixed at compile time.
 * (As cases of one function, 14 types by 8 row counts, GCC gave up on the
 * later ones: F16 decode at batch 4 ran at half speed, its accumulators on
 * the stack.) */
#define NARROW_TYPE(name, WT)                                                                     \
    static void name(const float *x, int nx, int k, const unsigned char *w, int n0, int n1, float *y, \
                     int ldy)                                                                     \
    {                                                                                             \
        NARROW_CASES(WT)                                                                          \
    }
NARROW_TYPE(narrow_f16, MOE_WT_F16)
NARROW_TYPE(narrow_bf16, MOE_WT_BF16)
NARROW_TYPE(narrow_q8_0, MOE_WT_Q8_0)
NARROW_TYPE(narrow_q4_0, MOE_WT_Q4_0)
NARROW_TYPE(narrow_q4_1, MOE_WT_Q4_1)
NARROW_TYPE(narrow_q5_0, MOE_WT_Q5_0)
NARROW_TYPE(narrow_q5_1, MOE_WT_Q5_1)
NARROW_TYPE(narrow_iq4_nl, MOE_WT_IQ4_NL)
NARROW_TYPE(narrow_q2_k, MOE_WT_Q2_K)
NARROW_TYPE(narrow_q3_k, MOE_WT_Q3_K)
NARROW_TYPE(narrow_q4_k, MOE_WT_Q4_K)
NARROW_TYPE(narrow_q5_k, MOE_WT_Q5_K)
NARROW_TYPE(narrow_q6_k, MOE_WT_Q6_K)
NARROW_TYPE(narrow_iq4_xs, MOE_WT_IQ4_XS)

static void narrow_block(const float *x, int nx, int k, const unsigned char *w, moe_wtype wt, int n0, int n1,
                         float *y, int ldy)
{
    switch (wt) {
    case MOE_WT_F16: narrow_f16(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_BF16: narrow_bf16(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q8_0: narrow_q8_0(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q4_0: narrow_q4_0(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q4_1: narrow_q4_1(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q5_0: narrow_q5_0(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q5_1: narrow_q5_1(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_IQ4_NL: narrow_iq4_nl(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q2_K: narrow_q2_k(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q3_K: narrow_q3_k(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q4_K: narrow_q4_k(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q5_K: narrow_q5_k(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_Q6_K: narrow_q6_k(x, nx, k, w, n0, n1, y, ldy); break;
    case MOE_WT_IQ4_XS: narrow_iq4_xs(x, nx, k, w, n0, n1, y, ldy); break;
    default: assert(!"narrow_block: not a narrow type");
    }
}

/* Many rows: OpenBLAS ---------------------------------------------------- */

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

/* We parallelise above BLAS (slices on our pool), so BLAS must not start its own
 * threads: a process-wide setting of the library, made once. */
static void blas_single_thread(void)
{
    openblas_set_num_threads(1);
}

static void matmul_sgemm(const float *x, int m, int k, const float *w, int n0, int n1,
                         float *y, int ldy)
{
    pthread_once(&blas_once, blas_single_thread);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n1 - n0, k, 1.0f, x, k,
                w + (size_t)n0 * k, k, 0.0f, y + n0, ldy);
}

/* Which OpenBLAS kernel sets sgemm is worth switching to, and from how many rows.
 *
 * Under an AVX-512 build of the kernel: with 256-bit OpenBLAS kernels (Haswell,
 * Zen; what OPENBLAS_CORETYPE=Haswell pins) the kernel stays ahead up to 128 rows
 * and more (Zen 5, 2 threads, W 1024x2048 / 2048x1024: m 64 245-288 vs 206-224
 * GFLOP/s, m 128 251-286 vs 221-230, m 192 226-287 vs 236-238). With 512-bit ones
 * (SkylakeX, Cooperlake, SapphireRapids) sgemm takes over at 96: since the
 * k-chunked tiles the kernel leads at 64 rows (hot, 332-351 vs 322-324 GFLOP/s),
 * the two are even at 72-88, and sgemm leads from 96 (362-366 vs 307-347). Moving
 * this switch from 64 to 96 took `moe bench` with Cooperlake kernels from 384 to
 * 426-427 tok/s at batch 64 (its 64-row projections) and prefill from 74.3-74.9
 * to 76.2-76.3% of the sgemm peak (two runs each, alternated). An AVX2 build of
 * the kernel hands over at 64.
 *
 * Any other set is one OpenBLAS fell back to: Debian 12's OpenBLAS 0.3.21 does
 * not know Emerald Rapids (family 6, model 207) and runs its SSE3 Prescott
 * kernels there, sgemm 21-51 GFLOP/s on a 2048 square against 165-248 for its
 * SkylakeX and Cooperlake sets on the same CPU, so `moe bench` prefilled at 144
 * tok/s against 266-323 on the engine's own kernels (docs/PERFORMANCE.md). A
 * vector build never hands work to such a set; only the scalar build, which has
 * nothing faster, keeps sgemm from 64 rows whatever the set. */
static int blas_is_512_bit(const char *name)
{
    return name && (strstr(name, "SkylakeX") || strstr(name, "Cooperlake") || strstr(name, "SapphireRapids"));
}

static int blas_is_256_bit(const char *name)
{
    return name && (strstr(name, "Haswell") || strstr(name, "Zen"));
}

int matmul_sgemm_rows_for(const char *corename)
{
    if (VL == 1) return 64;
    if (blas_is_512_bit(corename)) return VL == 16 ? 96 : 64;
    if (blas_is_256_bit(corename)) return VL == 16 ? 128 : 64;
    return MATMUL_SGEMM_NEVER;
}

static pthread_once_t rows_once = PTHREAD_ONCE_INIT;
static int min_rows_at_run_time;   /* written once, under rows_once */
static int blas_512_at_run_time;   /* likewise: OpenBLAS runs 512-bit kernels */

static void decide_min_rows(void)
{
    const char *name = openblas_get_corename();
    blas_512_at_run_time = blas_is_512_bit(name);
    min_rows_at_run_time = matmul_sgemm_rows_for(name);
}

static int sgemm_min_rows(void)
{
    if (SGEMM_MIN_ROWS > 0) return SGEMM_MIN_ROWS;
    pthread_once(&rows_once, decide_min_rows);
    return min_rows_at_run_time;
}

/* API --------------------------------------------------------------------- */

const char *matmul_blas_corename(void)
{
    const char *name = openblas_get_corename();
    return name ? name : "unknown";
}

int matmul_sgemm_min_rows(void)
{
    return sgemm_min_rows();
}

int matmul_blas_used(void)
{
    return sgemm_min_rows() != MATMUL_SGEMM_NEVER;
}

int matmul_blas_512_bit(void)
{
    pthread_once(&rows_once, decide_min_rows);
    return blas_512_at_run_time;
}

void matmul_range(const float *x, int m, int k, const float *w, int n0, int n1, float *y, int ldy)
{
    if (m <= 0 || n1 <= n0) return;
    if (m >= sgemm_min_rows() && k > 0) matmul_sgemm(x, m, k, w, n0, n1, y, ldy);
    else matmul_few_rows(x, m, k, w, n0, n1, y, ldy);
}

/* The few-rows kernels on narrow W at any m: in passes of NARROW_XB x rows, each
 * widening W again as it reads it; a k-quant, whose unpacking costs more than
 * several x rows' FMAs, is widened once into scratch (when given) for more rows,
 * and the F32 row kernels take it from there: the same bits. */
static void wq_rows(const float *x, int m, int k, const unsigned char *w, moe_wtype wt, int n0, int n1,
                    float *y, int ldy, float *scratch)
{
    if (scratch && m > NARROW_XB && KQUANT(wt)) {
        wconv_rows(scratch, w + (size_t)n0 * moe_wtype_row_bytes(wt, (size_t)k), (size_t)(n1 - n0) * (size_t)k, wt);
        matmul_few_rows(x, m, k, scratch, 0, n1 - n0, y + n0, ldy);
        return;
    }
    for (int i = 0; i < m; i += NARROW_XB) {
        int nx = m - i < NARROW_XB ? m - i : NARROW_XB;
        narrow_block(x + (size_t)i * k, nx, k, w, wt, n0, n1, y + (size_t)i * ldy, ldy);
    }
}

void matmul_range_wq(const float *x, int m, int k, const void *w, moe_wtype wt, int n0, int n1,
                     float *y, int ldy, float *scratch)
{
    if (m <= 0 || n1 <= n0) return;
    size_t rb = moe_wtype_row_bytes(wt, (size_t)k);
    if (scratch && m >= sgemm_min_rows() && k > 0) {
        /* sgemm's bits are those of its call shape: the slice widened once, then
         * the F32 call of the same shape */
        wconv_rows(scratch, (const unsigned char *)w + (size_t)n0 * rb, (size_t)(n1 - n0) * (size_t)k, wt);
        matmul_sgemm(x, m, k, scratch, 0, n1 - n0, y + n0, ldy);
        return;
    }
    wq_rows(x, m, k, w, wt, n0, n1, y, ldy, scratch);
}

void matmul(pool *p, const float *x, int m, int k, const float *w, int n, float *y)
{
    matmul_out o = {w, n, y, {NULL, MOE_WT_F32}};
    matmul_multi(p, x, m, k, &o, 1, NULL, 1);
}

typedef struct {
    const float *x, *w;
    int m, k, n;
    float *y;
} blas_job;

static void blas_task(void *ctx, int task, int thread)
{
    (void)thread;
    const blas_job *j = ctx;
    int n0 = task * SLICE_SGEMM, n1 = n0 + SLICE_SGEMM < j->n ? n0 + SLICE_SGEMM : j->n;
    matmul_sgemm(j->x, j->m, j->k, j->w, n0, n1, j->y, j->n);
}

void matmul_blas(pool *p, const float *x, int m, int k, const float *w, int n, float *y)
{
    if (m <= 0 || n <= 0) return;
    blas_job j = {x, w, m, k, n, y};
    pool_run(p, (n + SLICE_SGEMM - 1) / SLICE_SGEMM, blas_task, &j);   /* p NULL: serial */
}

#define MULTI_MAX 4

typedef struct {
    const float *x;
    int m, k, slice, n_outs;
    float *scratch;             /* per thread SLICE_SGEMM * k floats, or NULL */
    int sgemm;                  /* raw-only outputs of many rows on sgemm, not the row kernels */
    matmul_out outs[MULTI_MAX];
    int first[MULTI_MAX + 1];   /* first task of each output; first[n_outs] = all */
} multi_job;

static void multi_task(void *ctx, int task, int thread)
{
    const multi_job *j = ctx;
    int i = 0;
    while (task >= j->first[i + 1]) i++;
    const matmul_out *o = &j->outs[i];
    int n0 = (task - j->first[i]) * j->slice;
    int n1 = n0 + j->slice < o->n ? n0 + j->slice : o->n;
    int raw = o->raw.raw && o->raw.type != MOE_WT_F32;
    float *scratch = j->scratch ? j->scratch + (size_t)thread * matmul_multi_scratch_floats(j->k) : NULL;
    if (raw && (j->m < sgemm_min_rows() || (!o->w && !(j->sgemm && scratch)))) {
        wq_rows(j->x, j->m, j->k, o->raw.raw, o->raw.type, n0, n1, o->y, o->n, scratch);
    } else if (raw && !o->w) {   /* only the narrow copy, many rows: sgemm on a widened slice */
        matmul_range_wq(j->x, j->m, j->k, o->raw.raw, o->raw.type, n0, n1, o->y, o->n, scratch);
    } else if (j->sgemm) {
        matmul_range(j->x, j->m, j->k, o->w, n0, n1, o->y, o->n);
    } else {                     /* F32 beside narrow-only outputs on the row kernels: the same path */
        matmul_few_rows(j->x, j->m, j->k, o->w, n0, n1, o->y, o->n);
    }
}

size_t matmul_multi_scratch_floats(int k) { return (size_t)SLICE_SGEMM * (size_t)(k > 0 ? k : 0); }

void matmul_multi(pool *p, const float *x, int m, int k, const matmul_out *outs, int n_outs, float *scratch,
                  int sgemm)
{
    if (m <= 0) return;
    int i = 0;
    while (i < n_outs) {   /* up to MULTI_MAX non-empty outputs a job */
        multi_job j = {.x = x, .m = m, .k = k, .slice = m >= sgemm_min_rows() ? SLICE_SGEMM : SLICE_KERNEL,
                       .scratch = scratch, .sgemm = sgemm};
        for (; i < n_outs && j.n_outs < MULTI_MAX; i++) {
            if (outs[i].n <= 0) continue;
            j.outs[j.n_outs] = outs[i];
            j.first[j.n_outs + 1] = j.first[j.n_outs] + (outs[i].n + j.slice - 1) / j.slice;
            j.n_outs++;
        }
        pool_run(p, j.first[j.n_outs], multi_task, &j);
    }
}

void matmul_ref(const float *x, int m, int k, const float *w, int n, float *y)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int t = 0; t < k; t++) s += (double)x[(size_t)i * k + t] * (double)w[(size_t)j * k + t];
            y[(size_t)i * n + j] = (float)s;
        }
}
