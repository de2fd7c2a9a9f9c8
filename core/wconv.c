/* wconv.c -- narrow weights (the formats of core/model.h) widened to F32 (see wconv.h). */
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

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

uint16_t wconv_to_f16(float f)
{
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);
    if (a >= 0x477ff000u) return sign | 0x7c00;       /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                           /* >= 2^-14: normal half */
        uint32_t r = a - 0x38000000u;                 /* rebias exponent 127 -> 15 */
        r += 0x0fff + ((r >> 13) & 1);
        return sign | (uint16_t)(r >> 13);
    }
    if (a < 0x33000000u) return sign;                 /* < 2^-25: rounds to zero */
    /* subnormal half: count units of 2^-24 */
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                         /* 14..24 */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return sign | (uint16_t)q;
}

float wconv_bf16(uint16_t h)
{
    return bits_f32((uint32_t)h << 16); /* BF16 is the high half of an F32 */
}

static void wconv_b32_rows(float *dst, const unsigned char *b, size_t n, moe_wtype t)
{
    size_t bytes = moe_wtype_row_bytes(t, MOE_Q8_0_BLOCK);
    for (size_t i = 0; i < n; i += MOE_Q8_0_BLOCK, b += bytes) {
        int j = 0;
#if defined(WCONV_VL) && WCONV_VL == 16
        __m512 d, m;
        wconv_b32_factors(b, t, &d, &m);
        for (; j < 32; j += 16) _mm512_storeu_ps(dst + i + (size_t)j, wconv_b32_vec(b, t, j, d, m));
#elif defined(WCONV_VL) && WCONV_VL == 8
        __m256 d, m;
        wconv_b32_factors(b, t, &d, &m);
        for (; j < 32; j += 8) _mm256_storeu_ps(dst + i + (size_t)j, wconv_b32_vec(b, t, j, d, m));
#endif
        for (; j < 32; j++) dst[i + (size_t)j] = wconv_b32_weight(b, t, j);
    }
}

static void wconv_k(float *dst, const unsigned char *b, size_t n, moe_wtype t)
{
    size_t bytes = moe_wtype_row_bytes(t, MOE_QK_K);
    for (size_t i = 0; i < n; i += MOE_QK_K, b += bytes) {
        float ks[32];
        wconv_k_scales(b, t, ks);
        wconv_k_block(b, t, ks, dst + i);
    }
}

void wconv_rows(float *dst, const void *src, size_t n, moe_wtype t)
{
    if (wconv_b32(t)) {
        wconv_b32_rows(dst, src, n, t);
        return;
    }
    if (wconv_kquant(t)) {
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
