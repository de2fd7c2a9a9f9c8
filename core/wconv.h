/* wconv.h -- weights stored narrower than F32 (the formats of core/model.h)
 * widened to F32.
 *
 * F16 and BF16 are subsets of F32; a block-of-32 weight without a min, an F16
 * scale times an integer of at most 8 bits, has at most 19 significant bits, so
 * these widen exactly. The mins (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) and the k-quants'
 * factors round; every path here computes them in ggml's order, unfused. So a
 * kernel that widens its weights as it goes computes what it would on weights
 * converted at load. The vector paths (AVX-512F, or AVX2 with F16C) and the
 * scalar one give the same bits for every value but signalling NaNs, which the
 * F16C instructions quiet.
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
#elif defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define WCONV_VL 8
static inline __m256 wconv_vec(const uint16_t *p, moe_wtype t)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (t == MOE_WT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* One F16 value, exactly (subnormals normalised, infinities and NaN payloads kept). */
float wconv_f16(uint16_t h);
/* The F16 nearest f (ties to even; from 65520 up, infinity; NaN stays NaN): the
 * rounding of F16C's vcvtps2ph, and of the GGUF writers. */
uint16_t wconv_to_f16(float f);

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

/* Blocks of 32 ---------------------------------------------------------- */

/* IQ4_NL's (and IQ4_XS's) 16 levels, indexed by a 4-bit q. */
static const int8_t wconv_iq4nl_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                              1, 13, 25, 38, 53, 69, 89, 113};

static inline int wconv_b32(moe_wtype t)
{
    return t == MOE_WT_Q8_0 || t == MOE_WT_Q4_0 || t == MOE_WT_Q4_1 || t == MOE_WT_Q5_0 || t == MOE_WT_Q5_1 ||
           t == MOE_WT_IQ4_NL;
}

/* Whether the block holds an F16 min m after its scale d (weight d * q + m). */
static inline int wconv_b32_has_min(moe_wtype t) { return t == MOE_WT_Q4_1 || t == MOE_WT_Q5_1; }

/* Where the q bytes of a block start, and (Q5_0, Q5_1) its word of fifth bits. */
static inline int wconv_b32_qs(moe_wtype t)
{
    return t == MOE_WT_Q4_1 ? 4 : t == MOE_WT_Q5_0 ? 6 : t == MOE_WT_Q5_1 ? 8 : 2;
}
static inline uint32_t wconv_b32_qh(const unsigned char *b, moe_wtype t)
{
    uint32_t qh;
    memcpy(&qh, b + (t == MOE_WT_Q5_0 ? 2 : 4), sizeof qh);   /* little-endian, as ggml reads it */
    return qh;
}

/* The integer weight j (0..31) of the block at b is d times (plus m): its
 * q, offset, or IQ4_NL's level. */
static inline int wconv_b32_q(const unsigned char *b, moe_wtype t, int j)
{
    const unsigned char *q = b + wconv_b32_qs(t);
    if (t == MOE_WT_Q8_0) return (int8_t)q[j];
    int v = j < 16 ? q[j] & 15 : q[j - 16] >> 4;
    if (t == MOE_WT_Q5_0 || t == MOE_WT_Q5_1) v |= (int)((wconv_b32_qh(b, t) >> j) & 1) << 4;
    switch (t) {
    case MOE_WT_Q4_0: return v - 8;
    case MOE_WT_Q5_0: return v - 16;
    case MOE_WT_IQ4_NL: return wconv_iq4nl_levels[v];
    default: return v;
    }
}

/* Weight j (0..31) of the block at b (any address). */
static inline float wconv_b32_weight(const unsigned char *b, moe_wtype t, int j)
{
    float p = wconv_f16_at(b) * (float)wconv_b32_q(b, t, j);
    return wconv_b32_has_min(t) ? p + wconv_f16_at(b + 2) : p;
}

/* What wconv_b32_vec widens the block at b with, into d and m. With AVX-512 and
 * q of 4 or 5 bits: the weight of every q level, computed as wconv_b32_weight
 * does (d: q 0-15, m: q 16-31), so that a vector of weights is one permute;
 * per vector, the integer conversion, offset and products cost more than the
 * FMA of one x row. Otherwise the block's scale d and min m in every lane. */
#if defined(__AVX512F__)
static inline void wconv_b32_factors(const unsigned char *b, moe_wtype t, __m512 *d, __m512 *m)
{
    __m512 sd = _mm512_set1_ps(wconv_f16_at(b));
    __m512 sm = wconv_b32_has_min(t) ? _mm512_set1_ps(wconv_f16_at(b + 2)) : _mm512_setzero_ps();
    if (t == MOE_WT_Q8_0) {
        *d = sd;
        *m = sm;
        return;
    }
    __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(16));
    if (t == MOE_WT_IQ4_NL) lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wconv_iq4nl_levels));
    if (t == MOE_WT_Q4_0) lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
    if (t == MOE_WT_Q5_0) {
        lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(16));
        hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(16));
    }
    *d = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), sd);
    *m = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), sd);
    if (wconv_b32_has_min(t)) {
        *d = _mm512_add_ps(*d, sm);
        *m = _mm512_add_ps(*m, sm);
    }
}

/* WCONV_VL weights from element i (a multiple of WCONV_VL) of the block at b,
 * with d and m from wconv_b32_factors. */
static inline __m512 wconv_b32_vec(const unsigned char *b, moe_wtype t, int i, __m512 d, __m512 m)
{
    const unsigned char *q = b + wconv_b32_qs(t);
    if (t == MOE_WT_Q8_0) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(v), d);
    }
    /* the permutes read an index's low 4 bits: the low nibble, or the high one shifted down */
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    if (i >= 16) v = _mm512_srli_epi32(v, 4);
    __m512 w = _mm512_permutexvar_ps(v, d);
    if (t != MOE_WT_Q5_0 && t != MOE_WT_Q5_1) return w;
    return _mm512_mask_permutexvar_ps(w, (__mmask16)(wconv_b32_qh(b, t) >> i), v, m);   /* the fifth bits */
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline void wconv_b32_factors(const unsigned char *b, moe_wtype t, __m256 *d, __m256 *m)
{
    *d = _mm256_set1_ps(wconv_f16_at(b));
    *m = wconv_b32_has_min(t) ? _mm256_set1_ps(wconv_f16_at(b + 2)) : _mm256_setzero_ps();
}

/* WCONV_VL weights from element i (a multiple of WCONV_VL) of the block at b,
 * whose scale d and min m (unused without one) are in every lane. */
static inline __m256 wconv_b32_vec(const unsigned char *b, moe_wtype t, int i, __m256 d, __m256 m)
{
    const unsigned char *q = b + wconv_b32_qs(t);
    __m256i v;
    if (t == MOE_WT_Q8_0) {
        v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
    } else {
        v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i % 16)));
        v = i >= 16 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
        if (t == MOE_WT_Q5_0 || t == MOE_WT_Q5_1) {
            __m256i at = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(i));
            __m256i h = _mm256_srlv_epi32(_mm256_set1_epi32((int)wconv_b32_qh(b, t)), at);
            v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(1)), 4));
        }
        if (t == MOE_WT_IQ4_NL) {
            __m256i lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)wconv_iq4nl_levels));
            __m256i hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wconv_iq4nl_levels + 8)));
            __m256i upper = _mm256_cmpgt_epi32(v, _mm256_set1_epi32(7));
            v = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(lo, v), _mm256_permutevar8x32_epi32(hi, v), upper);
        } else if (t == MOE_WT_Q4_0 || t == MOE_WT_Q5_0) {
            v = _mm256_sub_epi32(v, _mm256_set1_epi32(t == MOE_WT_Q4_0 ? 8 : 16));
        }
    }
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);
    return wconv_b32_has_min(t) ? _mm256_add_ps(p, m) : p;
}
#endif

/* K-quants ---------------------------------------------------------------- */

static inline int wconv_kquant(moe_wtype t)
{
    return t == MOE_WT_Q2_K || t == MOE_WT_Q3_K || t == MOE_WT_Q4_K || t == MOE_WT_Q5_K || t == MOE_WT_Q6_K ||
           t == MOE_WT_IQ4_XS;
}

/* Weights per sub-block: each has its own factor (and min). */
static inline int wconv_k_sub(moe_wtype t)
{
    return t == MOE_WT_Q4_K || t == MOE_WT_Q5_K || t == MOE_WT_IQ4_XS ? 32 : 16;
}

/* Where the min factors start in ks (0: the type has none). */
static inline int wconv_k_min_at(moe_wtype t)
{
    return t == MOE_WT_Q2_K ? 16 : t == MOE_WT_Q4_K || t == MOE_WT_Q5_K ? 8 : 0;
}

/* The per-sub-block factors of the k-quant super-block at b (any address):
 * ks[s] the scale factor of sub-block s (d * sc; Q3_K and IQ4_XS d * (sc - 32)),
 * ks[wconv_k_min_at(t) + s] its min factor (dmin * m). */
static inline void wconv_k_scales(const unsigned char *b, moe_wtype t, float ks[32])
{
#if defined(__AVX512F__)
    /* the same products, 16 lanes at once (the scalar loop compiles to a lane
     * insert per factor) */
    if (t == MOE_WT_Q6_K) {
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192))));
        _mm512_storeu_ps(ks, _mm512_mul_ps(_mm512_set1_ps(wconv_f16_at(b + 208)), sc));
        return;
    }
    if (t == MOE_WT_Q2_K) {   /* 16 bytes: scale in the low nibble, min in the high */
        __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
        __m512 sc = _mm512_cvtepi32_ps(_mm512_and_si512(s, _mm512_set1_epi32(15)));
        __m512 mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4));
        _mm512_storeu_ps(ks, _mm512_mul_ps(_mm512_set1_ps(wconv_f16_at(b + 80)), sc));
        _mm512_storeu_ps(ks + 16, _mm512_mul_ps(_mm512_set1_ps(wconv_f16_at(b + 82)), mn));
        return;
    }
    if (t == MOE_WT_Q3_K) {
        /* sc_i = (low 4 bits: byte i & 7, shifted by 4 from i = 8) | (high 2:
         * byte 8 + i % 4, shifted by 2 * (i / 4)) << 4, minus 32 */
        /* the 16 bytes that end the block, so scale byte i is lane i + 2 (a copy of
         * the 12 into a buffer stalled the load on store forwarding: a quarter of
         * the time of a Q3_K step) */
        __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 94)));
        __m512i lo = _mm512_permutexvar_epi32(_mm512_setr_epi32(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9), a);
        __m512i hi = _mm512_permutexvar_epi32(_mm512_setr_epi32(10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13), a);
        lo = _mm512_and_si512(_mm512_srlv_epi32(lo, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4)),
                              _mm512_set1_epi32(15));
        hi = _mm512_and_si512(_mm512_srlv_epi32(hi, _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6)),
                              _mm512_set1_epi32(3));
        __m512i sc = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
        _mm512_storeu_ps(ks, _mm512_mul_ps(_mm512_set1_ps(wconv_f16_at(b + 108)), _mm512_cvtepi32_ps(sc)));
        return;
    }
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K) {
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
    }
    if (t == MOE_WT_IQ4_XS) {   /* as the scalar loop below, 8 lanes */
        __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 4)));
        lo = _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        lo = _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)), _mm256_set1_epi32(15));
        __m256i hi = _mm256_set1_epi32((int)((unsigned)b[2] | (unsigned)b[3] << 8));
        hi = _mm256_and_si256(_mm256_srlv_epi32(hi, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), _mm256_set1_epi32(3));
        __m256i ls = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
        _mm256_storeu_ps(ks, _mm256_mul_ps(_mm256_set1_ps(wconv_f16_at(b)), _mm256_cvtepi32_ps(ls)));
        return;
    }
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
    if (t == MOE_WT_Q2_K) {
        float d = wconv_f16_at(b + 80), dmin = wconv_f16_at(b + 82);
        for (int j = 0; j < 16; j++) {
            ks[j] = d * (float)(b[j] & 15);
            ks[16 + j] = dmin * (float)(b[j] >> 4);
        }
        return;
    }
    if (t == MOE_WT_Q3_K) {
        float d = wconv_f16_at(b + 108);
        const unsigned char *s = b + 96;
        for (int i = 0; i < 16; i++) {
            int lo = i < 8 ? s[i] & 15 : s[i - 8] >> 4, hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
            ks[i] = d * (float)((lo | hi << 4) - 32);
        }
        return;
    }
    if (t == MOE_WT_IQ4_XS) {
        float d = wconv_f16_at(b);
        unsigned sh = (unsigned)b[2] | (unsigned)b[3] << 8;
        for (int j = 0; j < 8; j++) {
            int ls = ((b[4 + j / 2] >> (4 * (j % 2))) & 15) | (int)((sh >> (2 * j)) & 3) << 4;
            ks[j] = d * (float)(ls - 32);
        }
        return;
    }
    float d = wconv_f16_at(b + 208);
    for (int j = 0; j < 16; j++) ks[j] = d * (float)(int8_t)b[192 + j];
}

/* The integer q of weight e (0..255) of a k-quant super-block: with Q3_K's and
 * Q6_K's offsets removed; IQ4_XS's level. */
static inline int wconv_k_q(const unsigned char *b, moe_wtype t, int e)
{
    int n = e / 128, j = (e % 128) / 32, l = e % 32;   /* Q2_K, Q3_K: 2-bit q at bits 2j of byte 32n + l */
    switch (t) {
    case MOE_WT_Q2_K: return (b[16 + 32 * n + l] >> (2 * j)) & 3;
    case MOE_WT_Q3_K: return ((b[32 + 32 * n + l] >> (2 * j)) & 3) - ((b[l] >> (e / 32)) & 1 ? 0 : 4);
    case MOE_WT_IQ4_XS: {
        unsigned char v = b[8 + 16 * (e / 32) + e % 16];
        return wconv_iq4nl_levels[l < 16 ? v & 15 : v >> 4];
    }
    case MOE_WT_Q4_K:
    case MOE_WT_Q5_K: {
        int q5 = t == MOE_WT_Q5_K;
        unsigned char v = b[(q5 ? 48 : 16) + 32 * (e / 64) + e % 32];
        int q = (e / 32) % 2 ? v >> 4 : v & 15;
        return q5 ? q | (((b[16 + e % 32] >> (e / 32)) & 1) << 4) : q;
    }
    default: {
        int h = e / 128, part = (e % 128) / 32;
        unsigned char lo = b[64 * h + 32 * (part & 1) + l], hi = b[128 + 32 * h + l];
        int q = (part < 2 ? lo & 15 : lo >> 4) | (((hi >> (2 * part)) & 3) << 4);
        return q - 32;
    }
    }
}

/* Weight e of a k-quant super-block whose factors are ks: the products in
 * ggml's order, each rounded, not fused (the vector kernels do the same). */
static inline float wconv_k_weight(const unsigned char *b, moe_wtype t, const float ks[32], int e)
{
    int s = e / wconv_k_sub(t), m = wconv_k_min_at(t);
    float p = ks[s] * (float)wconv_k_q(b, t, e);
    return m ? p - ks[m + s] : p;
}

#if defined(__AVX512F__)
static inline __m512i wconv_bytes16(const unsigned char *p)
{
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}

/* Each lane of x shifted so that its bit `from` lands at bit `to` (one shift,
 * or none; the bits around it move too, for the caller to mask). */
static inline __m512i wconv_bit_to(__m512i x, int from, int to)
{
    if (from < to) return _mm512_slli_epi32(x, (unsigned)(to - from));
    if (from > to) return _mm512_srli_epi32(x, (unsigned)(from - to));
    return x;
}

/* Q4_K's weights 16h .. 16h + 15 (h 0..15) of the super-block at b, whose
 * factors are ks: sub-block s = h / 2 has 16 possible
 * weights, made as wconv_k_weight makes them, and the vector is a permute of
 * them by the nibbles (bytes 32 (s / 2) + 16 (h % 2) .. of the q, the low
 * nibbles for an even s). The same bits as wconv_k_weight. */
static inline __m512 wconv_q4k_vec(const unsigned char *b, const float ks[32], int h)
{
    int s = h / 2;
    __m512i v = wconv_bytes16(b + 16 + 32 * (s / 2) + 16 * (h % 2));
    if (s % 2) v = _mm512_srli_epi32(v, 4);
    __m512 q = _mm512_cvtepi32_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512 tab = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ks[s]), q), _mm512_set1_ps(ks[8 + s]));
    return _mm512_permutexvar_ps(v, tab);
}
/* Q6_K's weights 16v .. 16v + 15 (v 0..15) of the super-block at b, whose
 * factors are ks: the low 4 bits from ql, the high 2 from qh, put together as
 * wconv_k_q does. The same bits as wconv_k_weight. */
static inline __m512 wconv_q6k_vec(const unsigned char *b, const float ks[32], int v)
{
    int h = v / 8, part = (v % 8) / 2, at = 16 * (v % 2);
    __m512i lo = wconv_bytes16(b + 64 * h + 32 * (part & 1) + at), hi = wconv_bytes16(b + 128 + 32 * h + at);
    lo = part < 2 ? _mm512_and_si512(lo, _mm512_set1_epi32(15)) : _mm512_srli_epi32(lo, 4);
    /* the part's 2 bits of qh moved to bits 4-5, then lo | (hi & 0x30) in one ternary op (0xF8: a | (b & c)) */
    hi = wconv_bit_to(hi, 2 * part, 4);
    __m512i q = _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi32(0x30), 0xF8);
    q = _mm512_sub_epi32(q, _mm512_set1_epi32(32));
    return _mm512_mul_ps(_mm512_set1_ps(ks[v]), _mm512_cvtepi32_ps(q));
}
/* Q5_K's weights 16v .. 16v + 15 (v 0..15) of the super-block at b, whose
 * factors are ks: as wconv_k_weight makes them. */
static inline __m512 wconv_q5k_vec(const unsigned char *b, const float ks[32], int v)
{
    int s = v / 2;
    __m512i q = wconv_bytes16(b + 48 + 32 * (s / 2) + 16 * (v % 2));
    q = s % 2 ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
    /* bit s of qh moved to bit 4, then q | (h & 16) in one ternary op (0xF8: a | (b & c)) */
    __m512i h = wconv_bytes16(b + 16 + 16 * (v % 2));
    h = wconv_bit_to(h, s, 4);
    q = _mm512_ternarylogic_epi32(q, h, _mm512_set1_epi32(16), 0xF8);
    __m512 p = _mm512_mul_ps(_mm512_set1_ps(ks[s]), _mm512_cvtepi32_ps(q));
    return _mm512_sub_ps(p, _mm512_set1_ps(ks[8 + s]));
}

/* Q2_K's or Q3_K's weights 16v .. 16v + 15 (v 0..15) of the super-block at b,
 * whose factors are ks: as wconv_k_weight makes them (the 2 bits at 2j of bytes
 * 32n + 16h .. of the q, v = 8n + 2j + h; Q3_K's - 4 unless the third bit, bit
 * 4n + j of hmask byte). Sub-block v has 4 (Q2_K) or 8 (Q3_K) possible weights:
 * a table of them, repeated over the 16 lanes, is permuted by an index whose
 * low bits are q's (the permute reads 4 bits; the ones above q's do not change
 * the entry). The same bits. */
static inline __m512 wconv_q23k_vec(const unsigned char *b, moe_wtype t, const float ks[32], int v)
{
    int n = v / 8, j = (v % 8) / 2, h = v % 2;
    __m512i idx = wconv_bytes16(b + (t == MOE_WT_Q2_K ? 16 : 32) + 32 * n + 16 * h);
    if (j) idx = _mm512_srli_epi32(idx, (unsigned)(2 * j));
    if (t == MOE_WT_Q2_K) {
        __m512 q = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
        __m512 tab = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ks[v]), q), _mm512_set1_ps(ks[wconv_k_min_at(t) + v]));
        return _mm512_permutexvar_ps(idx, tab);
    }
    /* index bit 2 the third bit: 0 -> q - 4 */
    __m512i hm = wconv_bit_to(wconv_bytes16(b + 16 * h), 4 * n + j, 2);
    idx = _mm512_ternarylogic_epi32(idx, hm, _mm512_set1_epi32(3), 0xE4);   /* (a & c) | (b & ~c) */
    __m512 q = _mm512_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2, -1, 0, 1, 2, 3);
    return _mm512_permutexvar_ps(idx, _mm512_mul_ps(_mm512_set1_ps(ks[v]), q));
}
/* IQ4_XS's weights 16v .. 16v + 15 (v 0..15) of the super-block at b, whose
 * factors are ks: sub-block s = v / 2 has 16 possible
 * weights (its factor times each level, as wconv_k_weight makes them), and the
 * vector is a permute of them by the nibbles of bytes 8 + 16 s .. (the low ones
 * for an even v). The same bits as wconv_k_weight. */
static inline __m512 wconv_iq4xs_vec(const unsigned char *b, const float ks[32], int v)
{
    int s = v / 2;
    __m512i q = wconv_bytes16(b + 8 + 16 * s);
    if (v % 2) q = _mm512_srli_epi32(q, 4);   /* the permute reads an index's low 4 bits */
    __m512 lv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wconv_iq4nl_levels)));
    return _mm512_permutexvar_ps(q, _mm512_mul_ps(_mm512_set1_ps(ks[s]), lv));
}

/* Weights 16v .. 16v + 15 (v 0..15) of the k-quant super-block at b, whose
 * factors are ks, the bits of wconv_k_weight (wconv_k_block stores them). */
static inline __m512 wconv_k_vec(const unsigned char *b, moe_wtype t, const float ks[32], int v)
{
    switch (t) {
    case MOE_WT_Q4_K: return wconv_q4k_vec(b, ks, v);
    case MOE_WT_Q5_K: return wconv_q5k_vec(b, ks, v);
    case MOE_WT_Q6_K: return wconv_q6k_vec(b, ks, v);
    case MOE_WT_IQ4_XS: return wconv_iq4xs_vec(b, ks, v);
    default: return wconv_q23k_vec(b, t, ks, v);
    }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
#include <immintrin.h>
/* 8 bytes from p, each in a 32-bit lane. */
static inline __m256i wconv_bytes8(const unsigned char *p)
{
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* wconv_k_q of weights e .. e + 7 (e a multiple of 8: they share their
 * sub-block and read 8 consecutive bytes of each array), as AVX2 lanes. */
static inline __m256i wconv_k_q8(const unsigned char *b, moe_wtype t, int e)
{
    const __m256i m2 = _mm256_set1_epi32(3), m4 = _mm256_set1_epi32(15);
    int n = e / 128, j = (e % 128) / 32, l = e % 32;
    switch (t) {
    case MOE_WT_Q2_K:
        return _mm256_and_si256(_mm256_srli_epi32(wconv_bytes8(b + 16 + 32 * n + l), 2 * j), m2);
    case MOE_WT_Q3_K: {   /* - 4 unless the third bit, bit e / 32 of hmask[l] */
        __m256i q = _mm256_and_si256(_mm256_srli_epi32(wconv_bytes8(b + 32 + 32 * n + l), 2 * j), m2);
        __m256i h = _mm256_and_si256(_mm256_srli_epi32(wconv_bytes8(b + l), e / 32), _mm256_set1_epi32(1));
        return _mm256_add_epi32(_mm256_sub_epi32(q, _mm256_set1_epi32(4)), _mm256_slli_epi32(h, 2));
    }
    case MOE_WT_IQ4_XS: {   /* the levels are int8: a byte shuffle looks them up */
        __m128i v = _mm_loadl_epi64((const __m128i *)(b + 8 + 16 * (e / 32) + e % 16));
        v = _mm_and_si128(l < 16 ? v : _mm_srli_epi16(v, 4), _mm_set1_epi8(15));
        __m128i lv = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)wconv_iq4nl_levels), v);
        return _mm256_cvtepi8_epi32(lv);
    }
    case MOE_WT_Q4_K:
    case MOE_WT_Q5_K: {
        int q5 = t == MOE_WT_Q5_K;
        __m256i v = wconv_bytes8(b + (q5 ? 48 : 16) + 32 * (e / 64) + l);
        __m256i q = (e / 32) % 2 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, m4);
        if (!q5) return q;
        __m256i h = _mm256_and_si256(_mm256_srli_epi32(wconv_bytes8(b + 16 + l), e / 32), _mm256_set1_epi32(1));
        return _mm256_or_si256(q, _mm256_slli_epi32(h, 4));
    }
    default: {   /* Q6_K: the low 4 bits from ql, the high 2 from qh */
        __m256i lo = wconv_bytes8(b + 64 * n + 32 * (j & 1) + l), hi = wconv_bytes8(b + 128 + 32 * n + l);
        lo = j < 2 ? _mm256_and_si256(lo, m4) : _mm256_srli_epi32(lo, 4);
        hi = _mm256_and_si256(_mm256_srli_epi32(hi, 2 * j), m2);
        return _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
    }
    }
}

/* Weights 8v .. 8v + 7 (v 0..31) of the k-quant super-block at b, whose
 * factors are ks: wconv_k_weight's products, 8 at a time. */
static inline __m256 wconv_k_vec(const unsigned char *b, moe_wtype t, const float ks[32], int v)
{
    int s = 8 * v / wconv_k_sub(t), m = wconv_k_min_at(t);
    __m256 q = _mm256_cvtepi32_ps(wconv_k_q8(b, t, 8 * v));
    /* with a min, one fused multiply-subtract, and still the bits of the product
     * rounded then the min subtracted: the product does not round (an f16 scale's
     * 11 bits times a 6-bit (Q2_K 4-bit) sub-block scale times a 4- or 5-bit
     * (Q2_K 2-bit) q is at most 22 bits), so both round the same exact value
     * once. AVX2 Q4_K, Q5_K, Q2_K +7-10% hot. */
    if (m) return _mm256_fmsub_ps(_mm256_set1_ps(ks[s]), q, _mm256_set1_ps(ks[m + s]));
    return _mm256_mul_ps(_mm256_set1_ps(ks[s]), q);
}
#endif

/* The 256 weights of the k-quant super-block at b (any address) into out,
 * with factors ks from wconv_k_scales: the bits of wconv_k_weight, 16 at a
 * time with AVX-512, 8 with AVX2. */
static inline void wconv_k_block(const unsigned char *b, moe_wtype t, const float ks[32], float out[256])
{
#if defined(__AVX512F__)
#pragma GCC unroll 16
    for (int v = 0; v < 16; v++) _mm512_storeu_ps(out + 16 * v, wconv_k_vec(b, t, ks, v));   /* unrolled: constant offsets */
#elif defined(__AVX2__)
#pragma GCC unroll 32
    for (int v = 0; v < 32; v++) _mm256_storeu_ps(out + 8 * v, wconv_k_vec(b, t, ks, v));
#else
    for (int e = 0; e < 256; e++) out[e] = wconv_k_weight(b, t, ks, e);
#endif
}

/* The n weights at src, of type t (F16 or BF16: src 2-byte aligned; the block
 * types: n whole blocks, any address), widened into dst[0, n). */
void wconv_rows(float *dst, const void *src, size_t n, moe_wtype t);

#endif
