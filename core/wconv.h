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

/* One F16 value, exactly (subnormals normalised, infinities and NaN payloads kept). */
float wconv_f16(uint16_t h);

/* One BF16 value: the high half of an F32. */
float wconv_bf16(uint16_t h);

/* dst[i] = src[i] widened from type t (MOE_WT_F16 or MOE_WT_BF16), i < n. */
void wconv_rows(float *dst, const uint16_t *src, size_t n, moe_wtype t);

#endif
