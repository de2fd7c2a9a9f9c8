/* vexp.h -- exp of sixteen floats at once (AVX-512), for the hot loops that
 * need many: SiLU in the experts, softmax in attention.
 *
 * Range reduction e^t = 2^i * e^r with |r| <= ln2/2 (ln2 split in two parts so
 * r keeps its low bits), then a degree-6 Taylor polynomial: about 1 ulp against
 * expf. Inputs are clamped to [-104, 89], where the result is already 0 or inf
 * after the final scaling. Each lane is computed alone, so a value does not
 * depend on its neighbours or on where it sits in a vector. */
#ifndef MOE_CORE_VEXP_H
#define MOE_CORE_VEXP_H

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 vexp16(__m512 t)
{
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 i = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(i, _mm512_set1_ps(0.693145751953125f), t);
    r = _mm512_fnmadd_ps(i, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, i);   /* p * 2^i, inf/0 past the range */
}
#endif

#endif
