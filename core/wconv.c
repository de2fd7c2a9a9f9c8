/* wconv.c -- narrow weights (F16, BF16, Q8_0, Q4_K, Q6_K) widened to F32 (see wconv.h). */
#include "core/wconv.h"

#include <string.h>

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float wconv_f16(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13)); /* inf, nan (payload kept) */
    if (e != 0) return bits_f32(sign | ((e + 112) << 23) | (m << 13));
    if (m == 0) return bits_f32(sign);
    /* subnormal m * 2^-24: normalise into an f32 exponent */
    e = 113;
    while (!(m & 0x400)) {
        m <<= 1;
        e--;
    }
    return bits_f32(sign | (e << 23) | ((m & 0x3ff) << 13));
}

float wconv_bf16(uint16_t h)
{
    return bits_f32((uint32_t)h << 16); /* BF16 is the high half of an F32 */
}

static void wconv_q8_0(float *dst, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i += MOE_Q8_0_BLOCK, b += MOE_Q8_0_BYTES) {
        float d = wconv_f16_at(b);
        const unsigned char *q = b + 2;
        size_t j = 0;
#if defined(WCONV_VL) && WCONV_VL == 16
        for (; j < MOE_Q8_0_BLOCK; j += 16) _mm512_storeu_ps(dst + i + j, wconv_q8_0_vec(q + j, _mm512_set1_ps(d)));
#elif defined(WCONV_VL) && WCONV_VL == 8
        for (; j < MOE_Q8_0_BLOCK; j += 8) _mm256_storeu_ps(dst + i + j, wconv_q8_0_vec(q + j, _mm256_set1_ps(d)));
#endif
        for (; j < MOE_Q8_0_BLOCK; j++) dst[i + j] = d * (float)(int8_t)q[j];
    }
}

static void wconv_k(float *dst, const unsigned char *b, size_t n, moe_wtype t)
{
    size_t bytes = moe_wtype_row_bytes(t, MOE_QK_K);
    for (size_t i = 0; i < n; i += MOE_QK_K, b += bytes) {
        float ks[16];
        wconv_k_scales(b, t, ks);
        wconv_k_block(b, t, ks, dst + i);
    }
}

static void wconv_q4_0(float *dst, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i += MOE_Q8_0_BLOCK, b += MOE_Q4_0_BYTES) {
        float d = wconv_f16_at(b);
        int j = 0;
#if defined(WCONV_VL) && WCONV_VL == 16
        for (; j < 32; j += 16) _mm512_storeu_ps(dst + i + j, wconv_q4_0_vec(b + 2, j >= 16, _mm512_set1_ps(d)));
#elif defined(WCONV_VL) && WCONV_VL == 8
        for (; j < 32; j += 8) _mm256_storeu_ps(dst + i + j, wconv_q4_0_vec(b + 2 + j % 16, j >= 16, _mm256_set1_ps(d)));
#endif
        for (; j < 32; j++) dst[i + (size_t)j] = wconv_q4_0_weight(b, d, j);
    }
}

void wconv_rows(float *dst, const void *src, size_t n, moe_wtype t)
{
    if (t == MOE_WT_Q8_0) {
        wconv_q8_0(dst, src, n);
        return;
    }
    if (t == MOE_WT_Q4_0) {
        wconv_q4_0(dst, src, n);
        return;
    }
    if (t == MOE_WT_Q4_K || t == MOE_WT_Q5_K || t == MOE_WT_Q6_K) {
        wconv_k(dst, src, n, t);
        return;
    }
    const uint16_t *h = src;
    size_t i = 0;
#if WCONV_VL == 16
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, wconv_vec(h + i, t));
#elif WCONV_VL == 8
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, wconv_vec(h + i, t));
#endif
    if (t == MOE_WT_F16)
        for (; i < n; i++) dst[i] = wconv_f16(h[i]);
    else
        for (; i < n; i++) dst[i] = wconv_bf16(h[i]);
}
