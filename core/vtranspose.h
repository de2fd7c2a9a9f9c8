/* vtranspose.h -- a 16x16 block of floats transposed in registers (AVX-512).
 *
 * dst[j * ldd + i] = src[i][d0 + j] for i, j < 16: interleave 32-bit, then
 * 64-bit, then 128-bit lanes twice. A plain copy, so whatever reads dst sees the
 * same bits as after a scalar gather. core/packed.c uses it for the weights
 * and rows it repacks. */
#ifndef MOE_CORE_VTRANSPOSE_H
#define MOE_CORE_VTRANSPOSE_H

#if defined(__AVX512F__)
#include <immintrin.h>
#include <stddef.h>

static inline void transpose16(const float *const *src, int d0, float *dst, size_t ldd)
{
    __m512 r[16], t[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src[i] + d0);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);       /* lane k: i[4k] i+1[4k] i[4k+1] i+1[4k+1] */
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);   /* the same for 4k+2, 4k+3 */
    }
    for (int g = 0; g < 16; g += 4) {                    /* rows g..g+3 of elements 4k+0..3 */
        __m512d lo0 = _mm512_castps_pd(t[g]), lo1 = _mm512_castps_pd(t[g + 2]);
        __m512d hi0 = _mm512_castps_pd(t[g + 1]), hi1 = _mm512_castps_pd(t[g + 3]);
        u[g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
    }
    for (int e = 0; e < 4; e++) {                        /* element 4k + e sits in 128-bit lane k */
        __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
        _mm512_storeu_ps(dst + (size_t)(0 + e) * ldd, _mm512_shuffle_f32x4(v0, v2, 0x88));
        _mm512_storeu_ps(dst + (size_t)(4 + e) * ldd, _mm512_shuffle_f32x4(v1, v3, 0x88));
        _mm512_storeu_ps(dst + (size_t)(8 + e) * ldd, _mm512_shuffle_f32x4(v0, v2, 0xDD));
        _mm512_storeu_ps(dst + (size_t)(12 + e) * ldd, _mm512_shuffle_f32x4(v1, v3, 0xDD));
    }
}
#endif

#endif
