/* wconv.h -- 16-bit weights (F16, BF16) widened to F32.
 *
 * Both formats are subsets of F32, so the widening is exact: a kernel that
 * widens its weights as it goes computes what it would on weights converted at
 * load. The vector paths (AVX-512F, or AVX2 with F16C) and the scalar one give
 * the same bits for every value but signalling NaNs, which the F16C
 * instructions quiet.
 */
#ifndef MOE_CORE_WCONV_H
#define MOE_CORE_WCONV_H

#include <stddef.h>
#include <stdint.h>

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

/* One BF16 value: the high half of an F32. */
float wconv_bf16(uint16_t h);

/* dst[i] = src[i] widened from type t (MOE_WT_F16 or MOE_WT_BF16), i < n. */
void wconv_rows(float *dst, const uint16_t *src, size_t n, moe_wtype t);

#endif
