/* wconv.h -- weights stored narrower than F32 (F16, BF16, Q8_0, Q4_K, Q6_K)
 * widened to F32.
 *
 * F16, BF16 and Q8_0 widen exactly: F16 and BF16 are subsets of F32, and a Q8_0
 * weight, an F16 scale times an int8, has at most 19 significant bits. The
 * k-quants' products round; every path here computes them in ggml's order,
 * unfused. So a kernel that widens its weights as it goes computes what it
 * would on weights converted at load. The vector paths (AVX-512F, or AVX2 with
 * F16C) and the scalar one give the same bits for every value but signalling
 * NaNs, which the F16C instructions quiet.
 */
#ifndef MOE_CORE_WCONV_H
#define MOE_CORE_WCONV_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/model.h"

/* WCONV_VL 16-bit values widened at once, where the ISA has it: the one
 * definition wconv_rows and the kernels of core/matmul.c share. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define WCONV_VL 16
static inline __m512 wconv_vec(const uint16_t *p, moe_wtype t)
{
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (t == MOE_WT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* 16 Q8_0 weights from their int8 q (any address) and their block's scale d. */
static inline __m512 wconv_q8_0_vec(const unsigned char *q, __m512 d)
{
    __m128i b = _mm_loadu_si128((const __m128i *)q);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}
/* 16 Q4_0 weights from the nibbles at q (the high ones when high) and scale d. */
static inline __m512 wconv_q4_0_vec(const unsigned char *q, int high, __m512 d)
{
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    v = high ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(8))), d);
}
#elif defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define WCONV_VL 8
static inline __m256 wconv_vec(const uint16_t *p, moe_wtype t)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (t == MOE_WT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 wconv_q8_0_vec(const unsigned char *q, __m256 d)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)q);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
}
static inline __m256 wconv_q4_0_vec(const unsigned char *q, int high, __m256 d)
{
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    v = high ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(8))), d);
}
#endif

/* One F16 value, exactly (subnormals normalised, infinities and NaN payloads kept). */
float wconv_f16(uint16_t h);

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* The F16 value at b (any address): a Q8_0 block's scale, a k-quant's d. */
static inline float wconv_f16_at(const unsigned char *b)
{
    uint16_t h;
    memcpy(&h, b, sizeof h);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return wconv_f16(h);
#endif
}

/* One BF16 value: the high half of an F32. */
float wconv_bf16(uint16_t h);

/* Weight j (0..31) of the Q4_0 block at b with scale d. */
static inline float wconv_q4_0_weight(const unsigned char *b, float d, int j)
{
    unsigned char v = b[2 + j % 16];
    return d * (float)((j < 16 ? v & 15 : v >> 4) - 8);
}

/* The per-sub-block factors of the k-quant super-block at b (any address):
 * Q4_K, Q5_K ks[j] = d * sc_j and ks[8 + j] = dmin * m_j for its 8 sub-blocks of 32;
 * Q6_K ks[j] = d * sc_j for its 16 sub-blocks of 16. */
static inline void wconv_k_scales(const unsigned char *b, moe_wtype t, float ks[16])
{
#if defined(__AVX512F__)
    /* the same products, 16 lanes at once (the scalar loop compiles to a lane
     * insert per factor) */
    if (t == MOE_WT_Q6_K) {
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192))));
        _mm512_storeu_ps(ks, _mm512_mul_ps(_mm512_set1_ps(wconv_f16_at(b + 208)), sc));
        return;
    }
    /* lanes: sc0-3, sc4-7, m0-3, m4-7 from the 12 scale bytes s (16 read: the
     * block's q follow). sc_j = s[j] & 63, m_j = s[j+4] & 63 (j < 4); sc_j =
     * (s[j+4] & 15) | (s[j-4] >> 6) << 4, m_j = s[j+4] >> 4 | (s[j] >> 6) << 4 */
    __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 4)));
    __m512i lo = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11), a);
    __m512i hi = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7), a);
    lo = _mm512_mask_srli_epi32(lo, (__mmask16)0xF000, lo, 4);
    lo = _mm512_and_si512(lo, _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    hi = _mm512_maskz_slli_epi32((__mmask16)0xF0F0, _mm512_srli_epi32(hi, 6), 4);
    __m512 dm = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(wconv_f16_at(b)),
                                     _mm512_set1_ps(wconv_f16_at(b + 2)));
    _mm512_storeu_ps(ks, _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_or_si512(lo, hi))));
    return;
#endif
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K) {
        float d = wconv_f16_at(b), dmin = wconv_f16_at(b + 2);
        const unsigned char *s = b + 4;
        for (int j = 0; j < 8; j++) {
            int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
            ks[j] = d * (float)sc;
            ks[8 + j] = dmin * (float)m;
        }
        return;
    }
    float d = wconv_f16_at(b + 208);
    for (int j = 0; j < 16; j++) ks[j] = d * (float)(int8_t)b[192 + j];
}

/* The integer q of weight e (0..255) of a k-quant super-block (Q6_K: with its
 * offset of 32 removed). */
static inline int wconv_k_q(const unsigned char *b, moe_wtype t, int e)
{
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K) {
        int q5 = t == MOE_WT_Q5_K;
        unsigned char v = b[(q5 ? 48 : 16) + 32 * (e / 64) + e % 32];
        int q = (e / 32) % 2 ? v >> 4 : v & 15;
        return q5 ? q | (((b[16 + e % 32] >> (e / 32)) & 1) << 4) : q;
    }
    int h = e / 128, l = e % 128, part = l / 32, at = l % 32;
    unsigned char lo = b[64 * h + 32 * (part & 1) + at], hi = b[128 + 32 * h + at];
    int q = (part < 2 ? lo & 15 : lo >> 4) | (((hi >> (2 * part)) & 3) << 4);
    return q - 32;
}

/* Weight e of a k-quant super-block whose factors are ks: the products in
 * ggml's order, each rounded, not fused (the vector kernels do the same). */
static inline float wconv_k_weight(const unsigned char *b, moe_wtype t, const float ks[16], int e)
{
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K) {
        float p = ks[e / 32] * (float)wconv_k_q(b, t, e);
        return p - ks[8 + e / 32];
    }
    return ks[e / 16] * (float)wconv_k_q(b, t, e);
}

/* The 256 weights of the k-quant super-block at b (any address) into out,
 * with factors ks from wconv_k_scales: the bits of wconv_k_weight, 16 at a
 * time where AVX-512 has it. */
static inline void wconv_k_block(const unsigned char *b, moe_wtype t, const float ks[16], float out[256])
{
#if defined(__AVX512F__)
    const __m512i m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3);
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K) {
        int q5 = t == MOE_WT_Q5_K;
        const __m512i one = _mm512_set1_epi32(1);
        __m512i h0 = _mm512_setzero_si512(), h1 = h0;   /* Q5_K: the fifth bits, bit j for sub-block j */
        if (q5) {
            h0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 16)));
            h1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 32)));
        }
        for (int c = 0; c < 4; c++) {          /* 64 weights: sub-blocks 2c (low nibbles), 2c + 1 */
            const unsigned char *q = b + (q5 ? 48 : 16) + 32 * c;
            __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
            __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
            __m512i q00 = _mm512_and_si512(v0, m4), q01 = _mm512_and_si512(v1, m4);
            __m512i q10 = _mm512_srli_epi32(v0, 4), q11 = _mm512_srli_epi32(v1, 4);
            if (q5) {
                unsigned j0 = (unsigned)(2 * c), j1 = j0 + 1;
                q00 = _mm512_or_si512(q00, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h0, j0), one), 4));
                q01 = _mm512_or_si512(q01, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h1, j0), one), 4));
                q10 = _mm512_or_si512(q10, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h0, j1), one), 4));
                q11 = _mm512_or_si512(q11, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h1, j1), one), 4));
            }
            __m512 d0 = _mm512_set1_ps(ks[2 * c]), m0 = _mm512_set1_ps(ks[8 + 2 * c]);
            __m512 d1 = _mm512_set1_ps(ks[2 * c + 1]), m1 = _mm512_set1_ps(ks[9 + 2 * c]);
            float *o = out + 64 * c;
            _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_mul_ps(d0, _mm512_cvtepi32_ps(q00)), m0));
            _mm512_storeu_ps(o + 16, _mm512_sub_ps(_mm512_mul_ps(d0, _mm512_cvtepi32_ps(q01)), m0));
            _mm512_storeu_ps(o + 32, _mm512_sub_ps(_mm512_mul_ps(d1, _mm512_cvtepi32_ps(q10)), m1));
            _mm512_storeu_ps(o + 48, _mm512_sub_ps(_mm512_mul_ps(d1, _mm512_cvtepi32_ps(q11)), m1));
        }
        return;
    }
    const __m512i off = _mm512_set1_epi32(32);
    for (int h = 0; h < 2; h++)
        for (int at = 0; at < 32; at += 16) {  /* weights 128h + 32 part + at + 0..15, part 0..3 */
            const unsigned char *ql = b + 64 * h + at, *qh = b + 128 + 32 * h + at;
            __m512i la = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)ql));
            __m512i lb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 32)));
            __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qh));
            __m512i q[4] = {
                _mm512_or_si512(_mm512_and_si512(la, m4), _mm512_slli_epi32(_mm512_and_si512(hi, m2), 4)),
                _mm512_or_si512(_mm512_and_si512(lb, m4),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hi, 2), m2), 4)),
                _mm512_or_si512(_mm512_srli_epi32(la, 4),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hi, 4), m2), 4)),
                _mm512_or_si512(_mm512_srli_epi32(lb, 4), _mm512_slli_epi32(_mm512_srli_epi32(hi, 6), 4)),
            };
            for (int part = 0; part < 4; part++) {
                int e = 128 * h + 32 * part + at;
                __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(q[part], off));
                _mm512_storeu_ps(out + e, _mm512_mul_ps(_mm512_set1_ps(ks[e / 16]), w));
            }
        }
#else
    for (int e = 0; e < 256; e++) out[e] = wconv_k_weight(b, t, ks, e);
#endif
}

/* The n weights at src, of type t (F16 or BF16: src 2-byte aligned; Q8_0, Q4_K,
 * Q6_K: n whole blocks, any address), widened into dst[0, n). */
void wconv_rows(float *dst, const void *src, size_t n, moe_wtype t);

#endif
