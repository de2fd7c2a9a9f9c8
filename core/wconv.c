/* wconv.c -- 16-bit weights widened to F32 (see wconv.h). */
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

void wconv_rows(float *dst, const uint16_t *src, size_t n, moe_wtype t)
{
    size_t i = 0;
#if WCONV_VL == 16
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, wconv_vec(src + i, t));
#elif WCONV_VL == 8
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, wconv_vec(src + i, t));
#endif
    if (t == MOE_WT_F16)
        for (; i < n; i++) dst[i] = wconv_f16(src[i]);
    else
        for (; i < n; i++) dst[i] = wconv_bf16(src[i]);
}
