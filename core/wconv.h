/* wconv.h -- weights stored narrower than F32 (F16, BF16, Q8_0) widened to F32.
 *
 * The widening is exact: F16 and BF16 are subsets of F32, and a Q8_0 weight,
 * an F16 scale times an int8, has at most 19 significant bits, so its F32
 * product is exact. A kernel that widens its weights as it goes therefore
 * computes what it would on weights converted at load. The vector paths
 * (AVX-512F, or AVX2 with F16C) and the scalar one give the same bits for
 * every value but signalling NaNs, which the F16C instructions quiet.
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
#endif

/* One F16 value, exactly (subnormals normalised, infinities and NaN payloads kept). */
float wconv_f16(uint16_t h);

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* The scale of the Q8_0 block at b (any address). */
static inline float wconv_q8_0_scale(const unsigned char *b)
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

/* The n weights at src, of type t (F16 or BF16: src 2-byte aligned; Q8_0: n a
 * multiple of 32, any address), widened into dst[0, n). */
void wconv_rows(float *dst, const void *src, size_t n, moe_wtype t);

#endif
