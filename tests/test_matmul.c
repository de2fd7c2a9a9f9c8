/* test_matmul.c -- both matmul paths against the plain reference, and
 * bit-identical results whatever the number of threads. */
#include "core/matmul.h"
#include "core/wconv.h"
#include "models/gguf.h"
#include "tests/testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint32_t rng_state;

static float *rand_array(size_t n) { return tu_rand_array(&rng_state, n); }

/* |y - ref| within a relative bound of the sum of |x_t w_t| (the scale rounding
 * errors of a float dot product grow with). */
static void check_close(const float *x, int m, int k, const float *w, int n, const float *y,
                        int ldy, const float *ref)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double mag = 0.0;
            for (int t = 0; t < k; t++)
                mag += fabs((double)x[(size_t)i * k + t] * (double)w[(size_t)j * k + t]);
            double d = fabs((double)y[(size_t)i * ldy + j] - (double)ref[(size_t)i * n + j]);
            if (d > 2e-6 * mag + 1e-30)
                ck_abort_msg("m=%d k=%d n=%d y[%d][%d]=%g ref=%g", m, k, n, i, j,
                             (double)y[(size_t)i * ldy + j], (double)ref[(size_t)i * n + j]);
        }
}

/* matmul (or, with blas, matmul_blas) against the reference on random data. */
static void compare_shape_on(pool *p, int m, int k, int n, int blas)
{
    float *x = rand_array((size_t)m * k), *w = rand_array((size_t)n * k);
    float *y = malloc((size_t)m * n * sizeof *y), *ref = malloc((size_t)m * n * sizeof *ref);
    ck_assert(y && ref);
    matmul_ref(x, m, k, w, n, ref);
    if (blas) matmul_blas(p, x, m, k, w, n, y);
    else matmul(p, x, m, k, w, n, y);
    check_close(x, m, k, w, n, y, n, ref);
    free(x); free(w); free(y); free(ref);
}

static void compare_shape(pool *p, int m, int k, int n) { compare_shape_on(p, m, k, n, 0); }

START_TEST(few_rows_and_sgemm_match_reference)
{
    rng_state = 1;
    static const int ks[] = {1, 3, 8, 15, 16, 17, 33, 100, 257, 1100};   /* 1100: two k chunks, masked tail */
    static const int ns[] = {1, 3, 4, 5, 63, 64, 65, 130};
    int ms[40], nm = 0;
    for (int m = 1; m <= 20; m++) ms[nm++] = m;
    ms[nm++] = tu_many_rows() - 1;
    ms[nm++] = tu_many_rows();
    ms[nm++] = 33;
    ms[nm++] = 64;
    ms[nm++] = tu_many_rows() + 7;
    char err[128];
    pool *p = NULL;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    for (int a = 0; a < nm; a++)
        for (size_t b = 0; b < sizeof ks / sizeof ks[0]; b++)
            for (size_t c = 0; c < sizeof ns / sizeof ns[0]; c++)
                compare_shape((a + b + c) % 2 ? p : NULL, ms[a], ks[b], ns[c]);
    pool_free(p);
}
END_TEST

/* matmul_range writes exactly columns [n0, n1) of y with stride ldy. */
START_TEST(range_writes_only_its_columns)
{
    rng_state = 7;
    int k = 37, n = 50, ldy = 61;
    int rows[] = {1, 3, 6, tu_many_rows() + 3};
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        int m = rows[r];
        float *x = rand_array((size_t)m * k), *w = rand_array((size_t)n * k);
        float *y = malloc((size_t)m * ldy * sizeof *y), *ref = malloc((size_t)m * n * sizeof *ref);
        ck_assert(y && ref);
        for (int i = 0; i < m * ldy; i++) y[i] = 12345.0f;
        matmul_ref(x, m, k, w, n, ref);
        int n0 = 9, n1 = 43;
        matmul_range(x, m, k, w, n0, n1, y, ldy);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < ldy; j++) {
                float v = y[(size_t)i * ldy + j];
                int ok = (j < n0 || j >= n1) ? v == 12345.0f : fabsf(v - ref[(size_t)i * n + j]) < 1e-4f;
                if (!ok) ck_abort_msg("m=%d: y[%d][%d] = %g", m, i, j, (double)v);
            }
        free(x); free(w); free(y); free(ref);
    }
}
END_TEST

START_TEST(bit_identical_across_thread_counts)
{
    rng_state = 3;
    int k = 129, n = 517;
    int rows[] = {1, 2, 5, 11, 40, tu_many_rows(), tu_many_rows() + 5};
    char err[128];
    pool *pools[3];
    for (int t = 0; t < 3; t++) ck_assert_int_eq(pool_create(t + 1, &pools[t], err, sizeof err), 0);
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        int m = rows[r];
        float *x = rand_array((size_t)m * k), *w = rand_array((size_t)n * k);
        float *y[3];
        for (int t = 0; t < 3; t++) {
            y[t] = malloc((size_t)m * n * sizeof(float));
            ck_assert_ptr_nonnull(y[t]);
            matmul(pools[t], x, m, k, w, n, y[t]);
        }
        ck_assert(memcmp(y[0], y[1], (size_t)m * n * sizeof(float)) == 0);
        ck_assert(memcmp(y[0], y[2], (size_t)m * n * sizeof(float)) == 0);
        /* and again on the same pool: no state carried between runs */
        matmul(pools[1], x, m, k, w, n, y[1]);
        ck_assert(memcmp(y[0], y[1], (size_t)m * n * sizeof(float)) == 0);
        for (int t = 0; t < 3; t++) free(y[t]);
        free(x); free(w);
    }
    for (int t = 0; t < 3; t++) pool_free(pools[t]);
}
END_TEST

/* In the few-rows kernel a row's result does not depend on the other rows of x,
 * whether 2-4 rows are read through the padded copy (k 77, 3000 up to 3 rows) or
 * in place (k 3000 at 4 rows, k 6000: too long for the copy's buffer). */
START_TEST(few_rows_result_independent_of_m)
{
    rng_state = 11;
    static const int ks[] = {77, 3000, 6000};
    for (size_t c = 0; c < sizeof ks / sizeof ks[0]; c++) {
        int k = ks[c], n = 23, m = ks[c] > 100 ? 12 : tu_many_rows() - 1;
        ck_assert_int_ge(m, 2);
        float *x = rand_array((size_t)m * k), *w = rand_array((size_t)n * k);
        float *y = malloc((size_t)m * n * sizeof *y), *y1 = malloc((size_t)9 * n * sizeof *y1);
        ck_assert(y && y1);
        matmul(NULL, x, m, k, w, n, y);
        /* 1-4 rows take the row-streaming kernel, 7-8 the 2-row tiles, others the 4x6 tiles */
        for (int rows = 1; rows <= 9; rows++)
            for (int i = 0; i + rows <= m; i++) {
                matmul(NULL, x + (size_t)i * k, rows, k, w, n, y1);
                ck_assert_msg(memcmp(y + (size_t)i * n, y1, (size_t)rows * n * sizeof(float)) == 0,
                              "k %d rows %d at %d", k, rows, i);
            }
        free(x); free(w); free(y); free(y1);
    }
}
END_TEST

/* matmul_multi gives the bits separate matmul calls give, for any number of
 * outputs (more than one job holds), with empty ones among them. */
START_TEST(multi_equals_separate_calls)
{
    rng_state = 17;
    int k = 70, ns[6] = {130, 0, 64, 1, 257, 33};
    char err[128];
    pool *p;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    int rows[] = {1, 3, 7, tu_many_rows()};
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        int m = rows[r];
        float *x = rand_array((size_t)m * k), *w[6], *y[6], *want[6];
        uint16_t *h[6] = {NULL};
        matmul_out outs[6];
        for (int i = 0; i < 6; i++) {
            size_t ny = (size_t)m * (size_t)(ns[i] ? ns[i] : 1), nw = (size_t)(ns[i] ? ns[i] : 1) * k;
            w[i] = rand_array(nw);
            y[i] = malloc(ny * sizeof(float));
            want[i] = malloc(ny * sizeof(float));
            ck_assert(y[i] && want[i]);
            outs[i] = (matmul_out){w[i], ns[i], y[i], {NULL, MOE_WT_F32}};
            if (i == 2 || i == 4) {  /* also in F16: read from there below the sgemm switch */
                h[i] = malloc(nw * sizeof *h[i]);
                ck_assert_ptr_nonnull(h[i]);
                for (size_t t = 0; t < nw; t++) h[i][t] = gguf_f32_to_f16(w[i][t]);
                wconv_rows(w[i], h[i], nw, MOE_WT_F16);
                outs[i].raw = (moe_wraw){(const unsigned char *)h[i], MOE_WT_F16};
            }
            for (size_t t = 0; t < ny; t++) y[i][t] = want[i][t] = -7.0f;
            matmul(NULL, x, m, k, w[i], ns[i], want[i]);
            /* below the switch the F32 weights must not be read: a decoy there */
            if (h[i] && m < tu_many_rows()) memset(w[i], 0, nw * sizeof(float));
        }
        matmul_multi(p, x, m, k, outs, 6, NULL, 1);
        for (int i = 0; i < 6; i++) {
            size_t ny = (size_t)m * (size_t)(ns[i] ? ns[i] : 1);
            ck_assert_msg(memcmp(y[i], want[i], ny * sizeof(float)) == 0, "m=%d output %d", m, i);
            free(w[i]); free(y[i]); free(want[i]); free(h[i]);
        }
        free(x);
    }
    pool_free(p);
}
END_TEST

/* Q8_0 as ggml defines it: each weight is the block's F16 scale times its int8,
 * the scale max |x| / 127, so every weight is within half a step of its source
 * and the largest one in a block is exactly +-127 steps. */
START_TEST(q8_0_blocks_round_trip)
{
    rng_state = 5;
    size_t n = 32 * 40;
    float *src = rand_array(n), *back = malloc(n * sizeof *back);
    unsigned char *q = malloc(n / 32 * 34);
    ck_assert(back && q);
    src[100] = 3.5f;                                  /* one block with a large weight */
    gguf_quantize_q8_0(src, n, q);
    wconv_rows(back, q, n, MOE_WT_Q8_0);
    for (size_t b = 0; b < n / 32; b++) {
        uint16_t h;
        memcpy(&h, q + b * 34, 2);
        float d = gguf_f16_to_f32(h), amax = 0.0f;
        int top = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(src[b * 32 + i]));
        ck_assert_float_eq_tol(d, amax / 127.0f, amax / 127.0f / 1024.0f);
        for (int i = 0; i < 32; i++) {
            size_t j = b * 32 + i;
            ck_assert(back[j] == d * (float)(int8_t)q[b * 34 + 2 + i]);
            ck_assert_msg(fabsf(back[j] - src[j]) <= 0.5f * d + amax / 2048.0f, "weight %zu: %g from %g", j,
                          (double)back[j], (double)src[j]);
            top |= abs((int8_t)q[b * 34 + 2 + i]) == 127;
        }
        ck_assert(top);
    }
    free(src);
    free(back);
    free(q);
}
END_TEST

/* The k-quants as ggml defines them (a Q4_K or Q5_K weight (d * sc) * q - dmin *
 * m per sub-block of 32, a Q6_K one (d * sc) * (q - 32) per 16): what the
 * quantizer writes reads back within a step of its sub-block's range. */
START_TEST(k_quants_round_trip)
{
    rng_state = 9;
    size_t n = 256 * 6;
    float *src = rand_array(n), *back = malloc(n * sizeof *back);
    unsigned char *q = malloc(n / 256 * 210);
    ck_assert(back && q);
    src[300] = 4.0f;   /* a sub-block with a large weight */
    for (int t = 0; t < 3; t++) {
        moe_wtype wt = t == 1 ? MOE_WT_Q6_K : t == 2 ? MOE_WT_Q5_K : MOE_WT_Q4_K;
        int sub = t == 1 ? 16 : 32, levels = t == 1 ? 63 : t == 2 ? 31 : 15;
        if (t == 1) gguf_quantize_q6_k(src, n, q);
        else if (t == 2) gguf_quantize_q5_k(src, n, q);
        else gguf_quantize_q4_k(src, n, q);
        wconv_rows(back, q, n, wt);
        for (size_t s0 = 0; s0 < n; s0 += (size_t)sub) {
            float lo = 0.0f, hi = 0.0f;
            for (int l = 0; l < sub; l++) {
                lo = fminf(lo, src[s0 + l]);
                hi = fmaxf(hi, src[s0 + l]);
            }
            /* one quantization step, with the 6-bit and F16 rounding of the factors */
            float step = (t == 1 ? 2.0f * fmaxf(hi, -lo) : hi - lo) / (float)levels * 1.1f + 1e-6f;
            for (int l = 0; l < sub; l++)
                ck_assert_msg(fabsf(back[s0 + l] - src[s0 + l]) <= step, "%s weight %zu: %g from %g (step %g)",
                              moe_wtype_name(wt), s0 + l, (double)back[s0 + l], (double)src[s0 + l], (double)step);
        }
    }
    free(src);
    free(back);
    free(q);
}
END_TEST

/* The types of wq_equals_widened_f32: each with its quantizer (NULL: 16-bit,
 * rows with and without a vector tail) and a byte of the second or third row's
 * first block to flip (-1: none), a scale made negative or a min flipped. */
typedef struct {
    moe_wtype wt;
    void (*quantize)(const float *x, uint64_t n, void *blocks);
    int flip_row, flip_byte;
} wq_case;

static const wq_case wq_cases[] = {
    {MOE_WT_F16, NULL, -1, 0},
    {MOE_WT_BF16, NULL, -1, 0},
    {MOE_WT_Q8_0, gguf_quantize_q8_0, 2, 1},      /* a negative scale */
    {MOE_WT_Q4_0, gguf_quantize_q4_0, 1, 1},      /* a flipped scale */
    {MOE_WT_Q4_1, gguf_quantize_q4_1, 1, 3},      /* a flipped min */
    {MOE_WT_Q5_0, gguf_quantize_q5_0, 1, 1},
    {MOE_WT_Q5_1, gguf_quantize_q5_1, 2, 3},
    {MOE_WT_IQ4_NL, gguf_quantize_iq4_nl, 1, 1},
    {MOE_WT_Q2_K, gguf_quantize_q2_k, 1, 83},     /* a negative dmin */
    {MOE_WT_Q3_K, gguf_quantize_q3_k, 1, 109},    /* a negative d */
    {MOE_WT_Q4_K, gguf_quantize_q4_k, -1, 0},
    {MOE_WT_Q5_K, gguf_quantize_q5_k, -1, 0},
    {MOE_WT_Q6_K, gguf_quantize_q6_k, 1, 209},    /* a negative d */
    {MOE_WT_IQ4_XS, gguf_quantize_iq4_xs, 2, 1},  /* a negative d */
};

/* Weights narrower than F32 (16-bit, blocks of 32, k-quants) widened as they are
 * read give the bits of matmul_range on the widened weights, for every x-row
 * count of each kernel (1-4 streamed, from 5 in pairs, in passes of 8 rows,
 * from the sgemm switch widened into scratch for sgemm), k with and without a
 * vector tail (16-bit), quantized blocks at odd addresses with zero and
 * negative scales, odd slices, and only the slice's columns written. */
START_TEST(wq_equals_widened_f32)
{
    rng_state = 77;
    int ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 40, 0};
    ms[14] = tu_many_rows() + 3;
    for (size_t t = 0; t < sizeof wq_cases / sizeof wq_cases[0]; t++) {
        const wq_case *c = &wq_cases[t];
        moe_wtype wt = c->wt;
        int ks16[] = {64, 100, 1024 + 7}, ksq[] = {32, 96, 1024}, ksk[] = {256, 512, 1024};
        for (size_t ik = 0; ik < 3; ik++) {
            int k = !c->quantize ? ks16[ik] : moe_wtype_block(wt) == 32 ? ksq[ik] : ksk[ik], n = 37, n0 = 3, n1 = 36;
            size_t rb = moe_wtype_row_bytes(wt, (size_t)k), nw = (size_t)n * k;
            /* quantized ones a byte off alignment, as their blocks lie in a file */
            size_t off = c->quantize ? 1 : 0;
            unsigned char *buf = malloc((size_t)n * rb + off), *wq = buf + off;
            float *wf = malloc(nw * sizeof *wf), *src = rand_array(nw);
            float *scratch = malloc(nw * sizeof *scratch);
            ck_assert(buf && wf && scratch);
            if (c->quantize) {
                for (int i = 0; i < 32; i++) src[k + i] = 0.0f;  /* a block (or sub-block) of zeros */
                c->quantize(src, nw, wq);
                if (c->flip_row >= 0) wq[(size_t)c->flip_row * rb + (size_t)c->flip_byte] ^= 0x80;
            } else {
                for (size_t i = 0; i < nw; i++) {
                    uint32_t bits;
                    memcpy(&bits, &src[i], 4);
                    uint16_t h = wt == MOE_WT_BF16 ? (uint16_t)(bits >> 16) : gguf_f32_to_f16(src[i]);
                    memcpy(wq + 2 * i, &h, 2);
                }
            }
            wconv_rows(wf, wq, nw, wt);
            for (size_t im = 0; im < sizeof ms / sizeof ms[0]; im++) {
                int m = ms[im];
                float *x = rand_array((size_t)m * k);
                float *ya = malloc((size_t)m * n * sizeof *ya), *yb = malloc((size_t)m * n * sizeof *yb);
                ck_assert(ya && yb);
                for (size_t i = 0; i < (size_t)m * n; i++) ya[i] = yb[i] = -7.0f;
                matmul_range(x, m, k, wf, n0, n1, ya, n);
                matmul_range_wq(x, m, k, wq, wt, n0, n1, yb, n, scratch);
                ck_assert_msg(memcmp(ya, yb, (size_t)m * n * sizeof *ya) == 0, "%s k %d m %d: not the same bits",
                              moe_wtype_name(wt), k, m);
                for (int r = 0; r < m; r++) ck_assert(yb[(size_t)r * n] == -7.0f && yb[(size_t)r * n + n - 1] == -7.0f);
                free(x);
                free(ya);
                free(yb);
            }
            free(buf);
            free(wf);
            free(src);
            free(scratch);
        }
    }
}
END_TEST

static float f16_at(const unsigned char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return gguf_f16_to_f32(h);
}

static void range_of(const float *x, int n, float *lo, float *hi, float *amax)
{
    *lo = *hi = x[0];
    for (int i = 1; i < n; i++) {
        *lo = fminf(*lo, x[i]);
        *hi = fmaxf(*hi, x[i]);
    }
    *amax = fmaxf(fabsf(*lo), fabsf(*hi));
}

/* Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K and IQ4_XS as the quantizer writes them
 * read back within the error of their format (half a step where q rounds,
 * plus the clipping that the factors' own 4- or 6-bit and F16 rounding can
 * cause; comments give each bound). */
START_TEST(legacy_and_small_quants_round_trip)
{
    rng_state = 13;
    size_t n = 256 * 6;
    float *src = rand_array(n), *back = malloc(n * sizeof *back);
    unsigned char *q = malloc(n / 32 * 24);
    ck_assert(back && q);
    src[300] = 4.0f;
    src[700] = -3.0f;
    static const moe_wtype types[] = {MOE_WT_Q4_0, MOE_WT_Q4_1, MOE_WT_Q5_0, MOE_WT_Q5_1, MOE_WT_IQ4_NL,
                                      MOE_WT_Q2_K, MOE_WT_Q3_K, MOE_WT_IQ4_XS};
    static void (*const quant[])(const float *, uint64_t, void *) = {
        gguf_quantize_q4_0, gguf_quantize_q4_1, gguf_quantize_q5_0, gguf_quantize_q5_1, gguf_quantize_iq4_nl,
        gguf_quantize_q2_k, gguf_quantize_q3_k, gguf_quantize_iq4_xs};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        moe_wtype wt = types[t];
        size_t blk = moe_wtype_block(wt), bb = moe_wtype_row_bytes(wt, blk);
        int sub = wt == MOE_WT_Q2_K || wt == MOE_WT_Q3_K ? 16 : 32;
        quant[t](src, n, q);
        wconv_rows(back, q, n, wt);
        for (size_t s0 = 0; s0 < n; s0 += (size_t)sub) {
            const unsigned char *b = q + s0 / blk * bb;
            float lo, hi, amax, tol;
            range_of(src + s0, sub, &lo, &hi, &amax);
            switch (wt) {
            case MOE_WT_Q4_1:   /* half of (max - min) / 15, d and m rounded to F16 */
            case MOE_WT_Q5_1:
                tol = 0.51f * (hi - lo) / (wt == MOE_WT_Q4_1 ? 15.0f : 31.0f) + 2e-3f * (hi - lo + fabsf(lo));
                break;
            case MOE_WT_Q4_0:   /* d = amax / 8 (Q5_0: 16); the far side clips at 7 (15) steps */
            case MOE_WT_Q5_0:
                tol = 1.01f * amax / (wt == MOE_WT_Q4_0 ? 8.0f : 16.0f);
                break;
            case MOE_WT_IQ4_NL: /* d = amax / 127; levels up to 24 apart, the far side clips at 113 */
                tol = 14.01f * amax / 127.0f;
                break;
            case MOE_WT_Q2_K: { /* half a step (max(hi, 0) - min(lo, 0)) / 3, the 4-bit scale
                                 * clipping 3 steps of d / 2, the min d_min / 2 */
                float s = (fmaxf(hi, 0.0f) - fminf(lo, 0.0f)) / 3.0f;
                tol = 0.5f * s + 2.0f * f16_at(b + 80) + 0.51f * f16_at(b + 82);
                break;
            }
            case MOE_WT_Q3_K:   /* a step amax / 4, the 6-bit scale clipping 4 steps of d / 2 */
                tol = 1.01f * amax / 4.0f + 2.01f * fabsf(f16_at(b + 108));
                break;
            default:            /* IQ4_XS: IQ4_NL's 14 steps of amax / 127, 127 of d / 2 */
                tol = 14.01f * amax / 127.0f + 71.0f * fabsf(f16_at(b));
                break;
            }
            for (int l = 0; l < sub; l++)
                ck_assert_msg(fabsf(back[s0 + l] - src[s0 + l]) <= tol + 1e-6f, "%s weight %zu: %g from %g (tol %g)",
                              moe_wtype_name(wt), s0 + l, (double)back[s0 + l], (double)src[s0 + l], (double)tol);
        }
    }
    free(src);
    free(back);
    free(q);
}
END_TEST

/* Every quantized type's vector widening (wconv_rows) gives the bits of its
 * scalar definition, weight by weight, blocks at an odd address, including a
 * block of zeros and flipped signs of scales and mins. */
START_TEST(widening_equals_scalar_definition)
{
    rng_state = 31;
    size_t n = 256 * 8;
    float *src = rand_array(n), *back = malloc(n * sizeof *back);
    unsigned char *buf = malloc(n / 256 * 210 * 2 + 1), *q = buf + 1;
    ck_assert(back && buf);
    for (int i = 0; i < 32; i++) src[256 + i] = 0.0f;
    for (size_t t = 0; t < sizeof wq_cases / sizeof wq_cases[0]; t++) {
        const wq_case *c = &wq_cases[t];
        if (!c->quantize) continue;
        size_t blk = moe_wtype_block(c->wt), bb = moe_wtype_row_bytes(c->wt, blk);
        c->quantize(src, n, q);
        if (c->flip_row >= 0) q[(size_t)c->flip_row * bb + (size_t)c->flip_byte] ^= 0x80;
        wconv_rows(back, q, n, c->wt);
        for (size_t b = 0; b < n / blk; b++) {
            const unsigned char *at = q + b * bb;
            float ks[32];
            if (blk == MOE_QK_K) wconv_k_scales(at, c->wt, ks);
            for (size_t e = 0; e < blk; e++) {
                float want = blk == MOE_QK_K ? wconv_k_weight(at, c->wt, ks, (int)e) : wconv_b32_weight(at, c->wt, (int)e);
                ck_assert_msg(memcmp(&want, &back[b * blk + e], sizeof want) == 0, "%s block %zu weight %zu: %a, not %a",
                              moe_wtype_name(c->wt), b, e, (double)back[b * blk + e], (double)want);
            }
        }
    }
    free(src);
    free(back);
    free(buf);
}
END_TEST

/* OpenBLAS's kernel sets: the 512- and 256-bit ones get work from their switch,
 * a set it fell back to (Prescott on a CPU it does not know) never does in a
 * vector build; the scalar build has nothing faster than any of them. And a
 * matmul at many rows equals the reference whichever path the switch picks. */
START_TEST(sgemm_switch_by_kernel_set)
{
    static const char *slow[] = {"Prescott", "Core2", "Nehalem", "Sandybridge", "Atom", "", NULL};
#if defined(__AVX512F__)
    ck_assert_int_eq(matmul_sgemm_rows_for("Cooperlake"), 96);
    ck_assert_int_eq(matmul_sgemm_rows_for("SkylakeX"), 96);
    ck_assert_int_eq(matmul_sgemm_rows_for("Haswell"), 128);
    ck_assert_int_eq(matmul_sgemm_rows_for("Zen"), 128);
    int slow_rows = MATMUL_SGEMM_NEVER;
#elif defined(__AVX2__) && defined(__FMA__)
    ck_assert_int_eq(matmul_sgemm_rows_for("Cooperlake"), 64);
    ck_assert_int_eq(matmul_sgemm_rows_for("Haswell"), 64);
    int slow_rows = MATMUL_SGEMM_NEVER;
#else
    ck_assert_int_eq(matmul_sgemm_rows_for("Cooperlake"), 64);
    int slow_rows = 64;
#endif
    for (size_t i = 0; i < sizeof slow / sizeof slow[0]; i++)
        ck_assert_int_eq(matmul_sgemm_rows_for(slow[i]), slow_rows);
    ck_assert_int_eq(matmul_sgemm_min_rows(), matmul_sgemm_rows_for(matmul_blas_corename()));
    ck_assert_int_eq(matmul_blas_used(), matmul_sgemm_min_rows() != MATMUL_SGEMM_NEVER);
    rng_state = 23;
    compare_shape_on(NULL, 300, 70, 40, 1);
    compare_shape_on(NULL, 5, 1100, 300, 1);   /* two sgemm slices */
}
END_TEST

START_TEST(empty_shapes_do_nothing)
{
    float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1}, y[4] = {9, 9, 9, 9};
    matmul(NULL, x, 0, 4, w, 1, y);
    matmul(NULL, x, 1, 4, w, 0, y);
    matmul_range(x, 1, 4, w, 1, 1, y, 1);
    ck_assert_float_eq(y[0], 9.0f);
    /* k == 0: an empty dot product is 0 */
    matmul(NULL, x, 1, 0, w, 2, y);
    ck_assert_float_eq(y[0], 0.0f);
    ck_assert_float_eq(y[1], 0.0f);
    ck_assert_int_ge(matmul_sgemm_min_rows(), 2);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("matmul");
    TCase *tc = tcase_create("matmul");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, few_rows_and_sgemm_match_reference);
    tcase_add_test(tc, range_writes_only_its_columns);
    tcase_add_test(tc, bit_identical_across_thread_counts);
    tcase_add_test(tc, few_rows_result_independent_of_m);
    tcase_add_test(tc, sgemm_switch_by_kernel_set);
    tcase_add_test(tc, multi_equals_separate_calls);
    tcase_add_test(tc, empty_shapes_do_nothing);
    tcase_add_test(tc, q8_0_blocks_round_trip);
    tcase_add_test(tc, k_quants_round_trip);
    tcase_add_test(tc, wq_equals_widened_f32);
    tcase_add_test(tc, widening_equals_scalar_definition);
    tcase_add_test(tc, legacy_and_small_quants_round_trip);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
