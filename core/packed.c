/* packed.c -- projection weights as phase-major W^T panels, and the
 * broadcast-form kernel that multiplies by them (core/packed.h says why).
 *
 * Layout. Panel p holds outputs [64p, 64p + 64). Within it, phase j (0..15)
 * holds k = j, j + 16, j + 32, ... as T = ceil(k / 16) steps of 64 floats:
 *   P[p][j][t][c] = W[64p + c][16t + j], zero past n or k.
 * x is repacked the same way per call, in chunks of up to MC rows (so a
 * micro-tile's next step is 256 bytes on, not a whole x column away: at 2048
 * rows that was a TLB miss a step): chunk c, phase j, step t, row r of the chunk
 * holds x[64c + r][16t + j]. One step of a phase is then 64 weights against one
 * x value per row.
 *
 * Work. One task per panel. For each chunk of up to MC rows and each phase, a
 * micro-tile of MR rows by 64 outputs keeps 24 accumulators in registers over
 * a pass of up to TB steps of the phase (the pass's 16 KB of weights stay in L1
 * across the chunk's rows; a longer phase continues its chains in the next
 * pass), and leaves its lane partials in the thread's scratch; the tree then
 * adds the 16 partials of every output, the same tree as core/matmul.c's
 * vsum16. Zero padding stands where matmul.c's masked tail loads give zeros, so
 * the padded steps are the same FMAs on both sides. */
#include "core/packed.h"

#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/hugemem.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#include "core/vtranspose.h"
#endif

#define NR 64         /* outputs per panel: four vectors */
#define PH 16         /* phases: the lanes of core/matmul.c's chains */
#define MR 6          /* x rows per micro-tile: 24 accumulators, 4 weight vectors, 1 broadcast */
#define MC 64         /* x rows per chunk: its partials (16 x 64 x 64 floats, 256 KB) stay in L2 */
#define TB 64         /* steps of a phase per pass (k 1024) when several micro-tiles share
                       * it: the pass's weights and x (16 KB each at 64 rows) stay in L1;
                       * longer rows continue the chains. A single micro-tile takes whole
                       * phases, so it reads the panel in one sequential stream (passes
                       * of 64 steps made batch-1 decode's k-2048 projection 17% slower) */
#define MAX_OUTS 8
/* Below this many x rows the loop is a plain stream the hardware prefetcher
 * follows; from it up each weight line takes long enough that the task fetches
 * the next panel itself (as core/matmul.c's tiles do from 3 rows). */
#define PF_MIN_ROWS 3

struct packed_w {
    int n, k;
    int steps;            /* T = ceil(k / 16) */
    int n_panels;
    size_t panel_floats;  /* PH * T * NR */
    size_t bytes;
    float *p;             /* n_panels * panel_floats, in huge pages */
};

struct packed_scratch {
    int max_m, max_k, n_threads;
    float *x;             /* the repacked x: PH * ceil(max_k / 16) * max_m, in huge pages */
    size_t x_bytes;
    float *part;          /* per thread: PH * MC * NR lane partials */
};

static int steps_of(int k) { return (k + PH - 1) / PH; }

int packed_w_rows(const packed_w *pw) { return pw->n; }
int packed_w_cols(const packed_w *pw) { return pw->k; }
size_t packed_w_bytes(const packed_w *pw) { return pw ? pw->bytes : 0; }

size_t packed_w_bytes_for(int n, int k)
{
    if (n <= 0 || k <= 0) return 0;
    return (size_t)((n + NR - 1) / NR) * PH * (size_t)steps_of(k) * NR * sizeof(float);
}

void packed_w_free(packed_w *pw)
{
    if (!pw) return;
    hugemem_free(pw->p, pw->bytes);
    free(pw);
}

void packed_scratch_free(packed_scratch *s)
{
    if (!s) return;
    hugemem_free(s->x, s->x_bytes);
    free(s->part);
    free(s);
}

#if defined(__AVX512F__)

int packed_supported(void) { return 1; }

/* Packing ----------------------------------------------------------------- */

/* The lanes of a 16-wide vector that hold the `left` remaining elements. */
static inline __mmask16 tail_mask(int left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* One row's 16 values of step t (zero past k) to its 16 phases by a masked load
 * and a scatter: for the rows outside whole 16-row blocks and the last, partial
 * step. (Zero-padded 16 x 16 blocks in their place cost a batch-1 decode step
 * about 6%: 64 of them a call for a single row of 1024.) */
static void scatter_step(const float *row, int t, int k, float *dst, __m512i phase_at)
{
    _mm512_i32scatter_ps(dst, phase_at, _mm512_maskz_loadu_ps(tail_mask(k - t * PH), row + (size_t)t * PH), 4);
}

/* Rows [0, rows) of src (row-major, k long) in phase-major form:
 * dst[(j * T + t) * ld + r] = src[r][16t + j], zero past k. The weights' panels
 * (ld 64) and x's chunks (ld their row count) both take this form. Whole 16-row
 * blocks of whole steps go through the register transpose. */
static void pack_rows(const float *src, int rows, int k, float *dst, int ld)
{
    int T = steps_of(k), full_steps = k / PH;
    size_t ldd = (size_t)T * (size_t)ld;   /* from one phase to the next */
    __m512i phase_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)ldd));
    int r0 = 0;
    for (; r0 + 16 <= rows; r0 += 16) {
        const float *r[16];
        for (int i = 0; i < 16; i++) r[i] = src + (size_t)(r0 + i) * (size_t)k;
        for (int t = 0; t < full_steps; t++) transpose16(r, t * PH, dst + (size_t)t * (size_t)ld + (size_t)r0, ldd);
        for (int i = 0; i < 16 && full_steps < T; i++)
            scatter_step(r[i], full_steps, k, dst + (size_t)full_steps * (size_t)ld + (size_t)(r0 + i), phase_at);
    }
    for (; r0 < rows; r0++)
        for (int t = 0; t < T; t++)
            scatter_step(src + (size_t)r0 * (size_t)k, t, k, dst + (size_t)t * (size_t)ld + (size_t)r0, phase_at);
}

typedef struct {
    packed_w *pw;
    const float *w;
} pack_job;

/* Panel p: P[p][j][t][c] = W[64p + c][16t + j]; the columns past n stay as
 * hugemem_alloc left them, zero. */
static void pack_panel(void *ctx, int p, int thread)
{
    (void)thread;
    const pack_job *job = ctx;
    const packed_w *pw = job->pw;
    int c0 = p * NR, cols = pw->n - c0 < NR ? pw->n - c0 : NR;
    pack_rows(job->w + (size_t)c0 * (size_t)pw->k, cols, pw->k, pw->p + (size_t)p * pw->panel_floats, NR);
}

int packed_w_create(pool *p, const float *w, int n, int k, packed_w **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n <= 0 || k <= 0) {
        snprintf(err, errlen, "packed weights: sizes must be positive (%d x %d)", n, k);
        return -1;
    }
    packed_w *pw = calloc(1, sizeof *pw);
    if (!pw) goto oom;
    pw->n = n;
    pw->k = k;
    pw->steps = steps_of(k);
    pw->n_panels = (n + NR - 1) / NR;
    pw->panel_floats = (size_t)PH * (size_t)pw->steps * NR;
    pw->bytes = packed_w_bytes_for(n, k);
    pw->p = hugemem_alloc(pw->bytes);
    if (!pw->p) goto oom;
    pack_job job = {pw, w};
    pool_run(p, pw->n_panels, pack_panel, &job);   /* p NULL: serial */
    *out = pw;
    return 0;
oom:
    snprintf(err, errlen, "packed weights: out of memory for %d x %d", n, k);
    packed_w_free(pw);
    return -1;
}

/* The chunk of x rows from m0 repacked: X[m0 * PH * T + (j * T + t) * rows + r]
 * = x[m0 + r][16t + j] for r < rows, zero past k. */
static size_t chunk_at(int m0, int T) { return (size_t)m0 * PH * (size_t)T; }

static void pack_x(const float *x, int m, int k, float *X)
{
    for (int m0 = 0; m0 < m; m0 += MC) {
        int rows = m - m0 < MC ? m - m0 : MC;
        pack_rows(x + (size_t)m0 * (size_t)k, rows, k, X + chunk_at(m0, steps_of(k)), rows);
    }
}

/* Kernel ------------------------------------------------------------------ */

/* Lines of the next panel a micro-tile asks for: `per_step` each step for its
 * first `steps` steps, from `base` (an integer: it may lie past the last panel,
 * where a prefetch is harmless). */
typedef struct {
    uintptr_t base;
    int per_step, steps;
} next_panel;

/* Steps [t0, t1) of one phase for nx (compile-time after inlining) rows against
 * one panel, the rows' x values ldx floats from one step to the next: the lane
 * chains acc[r][v] start at zero (t0 == 0) or where the previous pass left them
 * in part[r * 4 + v], and are left there. */
static inline __attribute__((always_inline))
void micro(const float *xj, int ldx, int t0, int t1, const float *pj, const int nx, __m512 *part,
           const next_panel *np)
{
    __m512 acc[MR][4];
    for (int r = 0; r < nx; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = t0 > 0 ? part[r * 4 + v] : _mm512_setzero_ps();
    for (int t = t0; t < t1; t++) {
        if (t - t0 < np->steps)
            for (int l = 0; l < np->per_step; l++)
                _mm_prefetch((const char *)(np->base + ((size_t)(t - t0) * (size_t)np->per_step + (size_t)l) * 64),
                             _MM_HINT_T1);
        const float *wt = pj + (size_t)t * NR;
        __m512 w0 = _mm512_loadu_ps(wt), w1 = _mm512_loadu_ps(wt + 16);
        __m512 w2 = _mm512_loadu_ps(wt + 32), w3 = _mm512_loadu_ps(wt + 48);
        /* in registers: otherwise GCC folds each load into every FMA that uses it */
        __asm__("" : "+v"(w0));
        __asm__("" : "+v"(w1));
        __asm__("" : "+v"(w2));
        __asm__("" : "+v"(w3));
        const float *xt = xj + (size_t)t * (size_t)ldx;
        for (int r = 0; r < nx; r++) {
            __m512 b = _mm512_set1_ps(xt[r]);
            acc[r][0] = _mm512_fmadd_ps(w0, b, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, b, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(w2, b, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(w3, b, acc[r][3]);
        }
    }
    for (int r = 0; r < nx; r++)
        for (int v = 0; v < 4; v++) part[r * 4 + v] = acc[r][v];
}

static void micro_rows(const float *xj, int ldx, int t0, int t1, const float *pj, int nx, __m512 *part,
                       const next_panel *np)
{
    switch (nx) {
    case 1: micro(xj, ldx, t0, t1, pj, 1, part, np); break;
    case 2: micro(xj, ldx, t0, t1, pj, 2, part, np); break;
    case 3: micro(xj, ldx, t0, t1, pj, 3, part, np); break;
    case 4: micro(xj, ldx, t0, t1, pj, 4, part, np); break;
    case 5: micro(xj, ldx, t0, t1, pj, 5, part, np); break;
    default: micro(xj, ldx, t0, t1, pj, MR, part, np); break;
    }
}

/* y row = the 16 phase partials of each output added in vsum16's tree:
 * (P[i + 8] + P[i]) for i < 8, then + the one 4 up, then [0] + [2] and [1] + [3],
 * then those two. Columns past `cols` are not stored. */
static void partials_sum(const __m512 *part, size_t phase_stride, float *y, int cols)
{
    for (int v = 0; v < 4 && v * 16 < cols; v++) {
        __m512 a[8], b[4];
        for (int i = 0; i < 8; i++) a[i] = _mm512_add_ps(part[(size_t)(i + 8) * phase_stride + v],
                                                       part[(size_t)i * phase_stride + v]);
        for (int i = 0; i < 4; i++) b[i] = _mm512_add_ps(a[i + 4], a[i]);
        __m512 s = _mm512_add_ps(_mm512_add_ps(b[0], b[2]), _mm512_add_ps(b[1], b[3]));
        _mm512_mask_storeu_ps(y + v * 16, tail_mask(cols - v * 16), s);
    }
}

typedef struct {
    packed_scratch *s;
    const float *X;
    int m, T;
    const packed_out *outs;
    int n_outs;
    int first[MAX_OUTS + 1];   /* task index of each output's first panel */
} matmul_job;

static void task_at(const matmul_job *job, int task, int *o, int *p)
{
    int i = 0;
    while (task >= job->first[i + 1]) i++;
    *o = i;
    *p = task - job->first[i];
}

/* The next task's panel, spread over this task's first chunk of micro-tiles. */
static next_panel next_panel_plan(const matmul_job *job, int task, int micro_tiles, int steps)
{
    next_panel np = {0, 0, 0};
    if (job->m < PF_MIN_ROWS || task + 1 >= job->first[job->n_outs]) return np;
    int o, p;
    task_at(job, task + 1, &o, &p);
    const packed_w *w = job->outs[o].w;
    size_t lines = w->panel_floats / 16, per_tile = (lines + (size_t)micro_tiles - 1) / (size_t)micro_tiles;
    np.base = (uintptr_t)(w->p + (size_t)p * w->panel_floats);
    np.per_step = (int)((per_tile + (size_t)steps - 1) / (size_t)steps);
    np.steps = (int)((per_tile + (size_t)np.per_step - 1) / (size_t)np.per_step);
    return np;
}

static void matmul_task(void *ctx, int task, int thread)
{
    const matmul_job *job = ctx;
    int o, p;
    task_at(job, task, &o, &p);
    const packed_w *w = job->outs[o].w;
    const float *panel = w->p + (size_t)p * w->panel_floats;
    int m = job->m, T = job->T, cols = w->n - p * NR < NR ? w->n - p * NR : NR;
    __m512 *part = (__m512 *)(job->s->part + (size_t)thread * PH * MC * NR);
    int chunk0 = m < MC ? m : MC, tb = m > MR ? TB : T, passes = (T + tb - 1) / tb;
    next_panel np = next_panel_plan(job, task, passes * PH * ((chunk0 + MR - 1) / MR), T < tb ? T : tb);
    next_panel none = {0, 0, 0};
    for (int m0 = 0; m0 < m; m0 += MC) {
        int rows = m - m0 < MC ? m - m0 : MC;
        size_t phase_stride = (size_t)rows * 4;   /* vectors from one phase's partials to the next */
        for (int t0 = 0; t0 < T; t0 += tb) {
            int t1 = T - t0 < tb ? T : t0 + tb;
            for (int j = 0; j < PH; j++) {
                const float *pj = panel + (size_t)j * (size_t)T * NR;
                const float *xj = job->X + chunk_at(m0, T) + (size_t)j * (size_t)T * (size_t)rows;
                for (int i = 0; i < rows; i += MR) {
                    int nx = rows - i < MR ? rows - i : MR;
                    micro_rows(xj + i, rows, t0, t1, pj, nx, part + (size_t)j * phase_stride + (size_t)i * 4,
                               m0 == 0 ? &np : &none);
                    if (m0 == 0) np.base += (size_t)np.per_step * (size_t)np.steps * 64;
                }
            }
        }
        float *y = job->outs[o].y + (size_t)p * NR;
        for (int r = 0; r < rows; r++)
            partials_sum(part + (size_t)r * 4, phase_stride, y + (size_t)(m0 + r) * (size_t)w->n, cols);
    }
}

void packed_matmul(pool *p, packed_scratch *s, const float *x, int m, int k,
                   const packed_out *outs, int n_outs)
{
    assert(n_outs >= 1 && n_outs <= MAX_OUTS);
    assert(m <= s->max_m && k <= s->max_k && (!p || pool_n_threads(p) <= s->n_threads));
    if (m <= 0) return;
    matmul_job job = {.s = s, .X = s->x, .m = m, .T = steps_of(k), .outs = outs, .n_outs = n_outs};
    for (int i = 0; i < n_outs; i++) {
        assert(outs[i].w->k == k);
        job.first[i + 1] = job.first[i] + outs[i].w->n_panels;
    }
    pack_x(x, m, k, s->x);
    pool_run(p, job.first[n_outs], matmul_task, &job);   /* p NULL: serial */
}

#else /* no AVX-512: the engine keeps its projections on core/matmul.c */

int packed_supported(void) { return 0; }

int packed_w_create(pool *p, const float *w, int n, int k, packed_w **out, char *err, size_t errlen)
{
    (void)p;
    (void)w;
    (void)n;
    (void)k;
    *out = NULL;
    snprintf(err, errlen, "packed weights need an AVX-512 build");
    return -1;
}

void packed_matmul(pool *p, packed_scratch *s, const float *x, int m, int k,
                   const packed_out *outs, int n_outs)
{
    (void)p;
    (void)s;
    (void)x;
    (void)m;
    (void)k;
    (void)outs;
    (void)n_outs;
    assert(!"packed_matmul without AVX-512");
}

#endif

int packed_scratch_create(int max_m, int max_k, int n_threads, packed_scratch **out,
                          char *err, size_t errlen)
{
    *out = NULL;
    if (max_m <= 0 || max_k <= 0 || n_threads <= 0) {
        snprintf(err, errlen, "packed scratch: sizes must be positive (m %d, k %d, threads %d)",
                 max_m, max_k, n_threads);
        return -1;
    }
    packed_scratch *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->max_m = max_m;
    s->max_k = max_k;
    s->n_threads = n_threads;
    s->x_bytes = (size_t)PH * (size_t)steps_of(max_k) * (size_t)max_m * sizeof(float);
    size_t pf = (size_t)n_threads * PH * MC * NR;
    s->x = hugemem_alloc(s->x_bytes);
    s->part = aligned_alloc(64, pf * sizeof(float));
    if (!s->x || !s->part) goto oom;
    *out = s;
    return 0;
oom:
    snprintf(err, errlen, "packed scratch: out of memory for %d rows of %d", max_m, max_k);
    packed_scratch_free(s);
    return -1;
}
