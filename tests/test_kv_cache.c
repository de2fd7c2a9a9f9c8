/* test_kv_cache.c -- block accounting, exhaustion, that every (layer, seq, pos)
 * gets its own memory, and the F16 cache's rounding. */
#include <math.h>
#include <stdint.h>

#include "core/kv_cache.h"
#include "core/wconv.h"
#include "tests/testutil.h"

static char err[256];

/* The cache hands out read-only views; the layout tests write through them. */
static unsigned char *mut(const void *p) { return (unsigned char *)(uintptr_t)p; }

/* Element i (of the cache's type) from p, as a float. */
static float elem_get(const kv_cache *kv, const void *p, size_t i)
{
    if (kv_cache_type(kv) == KV_F16) {
        uint16_t h;
        memcpy(&h, (const unsigned char *)p + 2 * i, 2);
        return wconv_f16(h);
    }
    float f;
    memcpy(&f, (const unsigned char *)p + 4 * i, 4);
    return f;
}

START_TEST(create_rejects_bad_sizes)
{
    kv_cache *kv = (kv_cache *)1;
    ck_assert_int_eq(kv_cache_create(0, 1, 4, 4, 4, 2, 16, KV_F32, &kv, err, sizeof err), -1);
    ck_assert_ptr_null(kv);
    ck_assert(strlen(err) > 0);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 0, 4, 2, 16, KV_F32, &kv, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 4, -1, 2, 16, KV_F32, &kv, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 4, 4, 0, 16, KV_F32, &kv, err, sizeof err), -1);
    /* absurd sizes: an error, not an overflowed allocation */
    ck_assert_int_eq(kv_cache_create(1 << 30, 1 << 20, 1 << 20, 1 << 30, 1 << 30, 2, 16, KV_F16, &kv,
                                     err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 4, 4, 2, 16, (kv_type)7, &kv, err, sizeof err), -1);
    ck_assert_ptr_null(kv);
}
END_TEST

/* Loop index 0: F32, 1: F16. */
START_TEST(reserve_release_accounting)
{
    kv_cache *kv;
    kv_type type = _i ? KV_F16 : KV_F32;
    ck_assert_int_eq(kv_cache_create(2, 2, 4, 4, 10, 3, 20, type, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_type(kv), type);
    ck_assert_int_eq(kv_cache_blocks_total(kv), 10);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 10);
    ck_assert_int_eq(kv_cache_block_size(kv), 4);
    ck_assert_uint_eq(kv_cache_bytes(kv), 10u * 2 * 2 * 4 * (2 * 4) * (_i ? 2 : 4));

    ck_assert_int_eq(kv_cache_seq_capacity(kv, 0), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 5, err, sizeof err), 0);   /* 2 blocks */
    ck_assert_int_eq(kv_cache_seq_capacity(kv, 0), 8);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 8);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 3, err, sizeof err), 0);   /* shrink: no-op */
    ck_assert_int_eq(kv_cache_blocks_free(kv), 8);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 9, err, sizeof err), 0);   /* grow by one */
    ck_assert_int_eq(kv_cache_blocks_free(kv), 7);
    ck_assert_int_eq(kv_cache_seq_capacity(kv, 0), 12);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 20, err, sizeof err), 0);  /* 5 blocks */
    ck_assert_int_eq(kv_cache_blocks_free(kv), 2);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 2, 0, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 2);

    kv_cache_seq_release(kv, 1);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 7);
    ck_assert_int_eq(kv_cache_seq_capacity(kv, 1), 0);
    kv_cache_seq_release(kv, 1);   /* twice: harmless */
    kv_cache_seq_release(kv, 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 10);
    kv_cache_free(kv);
}
END_TEST

START_TEST(exhaustion_and_bad_requests_change_nothing)
{
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(1, 1, 2, 4, 3, 2, 16, KV_F32, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 8, err, sizeof err), 0);
    err[0] = '\0';
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 8, err, sizeof err), -1);  /* needs 2, 1 free */
    ck_assert(strstr(err, "exhausted") != NULL);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 1);
    ck_assert_int_eq(kv_cache_seq_capacity(kv, 1), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 2, 1, err, sizeof err), -1);  /* no such slot */
    ck_assert_int_eq(kv_cache_seq_reserve(kv, -1, 1, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 17, err, sizeof err), -1); /* > max_seq_len */
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, -3, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 1);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 4, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 0);
    kv_cache_seq_release(kv, 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 12, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 0);
    kv_cache_free(kv);
}
END_TEST

/* Element d of the key at pos sits in its tile at d * block_size + pos % block_size. */
static unsigned char *key_at(kv_cache *kv, int l, int s, int p, int h, int d)
{
    size_t bs = (size_t)kv_cache_block_size(kv), es = kv_type_size(kv_cache_type(kv));
    return mut(kv_cache_k_tile(kv, l, s, p, h)) + ((size_t)d * bs + (size_t)(p % (int)bs)) * es;
}

static unsigned char *val_at(kv_cache *kv, int l, int s, int p, int h, int i)
{
    return mut(kv_cache_v(kv, l, s, p, h)) + (size_t)i * kv_type_size(kv_cache_type(kv));
}

/* Every key element and V vector of every (layer, seq, pos) lies inside the
 * cache and overlaps no other; values written survive other writes. Loop
 * index 0: F32, 1: F16 (element addresses in units of their size). */
START_TEST(pointers_are_disjoint_and_in_bounds)
{
    const int L = 3, H = 2, D = 3, BS = 4, NB = 7, S = 3, MAXLEN = 10;
    const int kvd = H * D;
    kv_cache *kv;
    kv_type type = _i ? KV_F16 : KV_F32;
    size_t es = kv_type_size(type);
    ck_assert_int_eq(kv_cache_create(L, H, D, BS, NB, S, MAXLEN, type, &kv, err, sizeof err), 0);
    int len[3] = {10, 3, 9};   /* 3 + 1 + 3 = 7 blocks */
    for (int s = 0; s < S; s++) ck_assert_int_eq(kv_cache_seq_reserve(kv, s, len[s], err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 0);

    unsigned char *base = mut(kv_cache_k_tile(kv, 0, 0, 0, 0));
    size_t total = kv_cache_bytes(kv) / es;
    ck_assert_uint_eq(total, (size_t)NB * BS * L * 2 * kvd);
    /* the lowest pointer of all is the start of the pool */
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int h = 0; h < H; h++) {
                    if (key_at(kv, l, s, p, h, 0) < base) base = key_at(kv, l, s, p, h, 0);
                    if (val_at(kv, l, s, p, h, 0) < base) base = val_at(kv, l, s, p, h, 0);
                }
    uint8_t *used = calloc(total, 1);
    ck_assert_ptr_nonnull(used);
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int kvsel = 0; kvsel < 2; kvsel++)
                    for (int h = 0; h < H; h++)
                        for (int i = 0; i < D; i++) {
                            unsigned char *v = kvsel ? val_at(kv, l, s, p, h, i) : key_at(kv, l, s, p, h, i);
                            ptrdiff_t off = v - base;
                            ck_assert(off >= 0 && off % (ptrdiff_t)es == 0 && (size_t)off / es < total);
                            off /= (ptrdiff_t)es;
                            ck_assert_int_eq(used[off], 0);
                            used[off] = 1;
                            /* an integer below 2048: exact in F16 too */
                            float x = (float)(((((l * 3 + s) * 10 + p) * 2 + kvsel) * 2 + h) * 3 + i);
                            uint16_t hx = wconv_to_f16(x);
                            memcpy(v, es == 2 ? (const void *)&hx : (const void *)&x, es);
                        }
    /* a head's V vectors of consecutive positions in one block are contiguous,
     * and its keys are tiles: element d of consecutive positions side by side */
    ck_assert_ptr_eq(val_at(kv, 2, 2, 2, 0, 0), val_at(kv, 2, 2, 1, 0, 0) + D * es);
    ck_assert_ptr_eq(key_at(kv, 1, 0, 5, 1, 2), key_at(kv, 1, 0, 4, 1, 2) + es);
    ck_assert_ptr_eq(key_at(kv, 1, 0, 5, 1, 2), key_at(kv, 1, 0, 5, 1, 1) + BS * es);
    ck_assert_ptr_eq(kv_cache_k_tile(kv, 1, 0, 5, 1), kv_cache_k_tile(kv, 1, 0, 7, 1));
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int kvsel = 0; kvsel < 2; kvsel++)
                    for (int h = 0; h < H; h++)
                        for (int i = 0; i < D; i++) {
                            unsigned char *v = kvsel ? val_at(kv, l, s, p, h, i) : key_at(kv, l, s, p, h, i);
                            ck_assert_float_eq(elem_get(kv, v, 0),
                                               (float)(((((l * 3 + s) * 10 + p) * 2 + kvsel) * 2 + h) * 3 + i));
                        }
    free(used);
    kv_cache_free(kv);
}
END_TEST

/* kv_cache_k_store writes element d of the key to its tile place, and only
 * there; kv_cache_v_store the value's. Loop index 0: F32, 1: F16. */
START_TEST(key_store_fills_the_tile)
{
    const int D = 5, BS = 3;
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(2, 2, D, BS, 4, 1, 12, _i ? KV_F16 : KV_F32, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 12, err, sizeof err), 0);
    float k[5];
    for (int p = 0; p < 12; p++)
        for (int h = 0; h < 2; h++) {
            for (int d = 0; d < D; d++) k[d] = (float)(p * 100 + h * 10 + d);
            kv_cache_k_store(kv, 1, 0, p, h, k);
        }
    for (int p = 0; p < 12; p++)
        for (int h = 0; h < 2; h++)
            for (int d = 0; d < D; d++) {
                ck_assert_float_eq(elem_get(kv, key_at(kv, 1, 0, p, h, d), 0), (float)(p * 100 + h * 10 + d));
                ck_assert_float_eq(elem_get(kv, key_at(kv, 0, 0, p, h, d), 0), 0.0f);   /* layer 0 untouched */
                ck_assert_float_eq(elem_get(kv, kv_cache_v(kv, 1, 0, p, h), (size_t)d), 0.0f);  /* and the values */
            }
    for (int d = 0; d < D; d++) k[d] = (float)(-7 * d - 1);
    kv_cache_v_store(kv, 1, 0, 4, 1, k);
    for (int d = 0; d < D; d++) {
        ck_assert_float_eq(elem_get(kv, kv_cache_v(kv, 1, 0, 4, 1), (size_t)d), (float)(-7 * d - 1));
        ck_assert_float_eq(elem_get(kv, kv_cache_v(kv, 1, 0, 4, 0), (size_t)d), 0.0f);
        ck_assert_float_eq(elem_get(kv, key_at(kv, 1, 0, 4, 1, d), 0), (float)(400 + 10 + d));
    }
    kv_cache_free(kv);
}
END_TEST

START_TEST(release_then_reserve_reuses_blocks)
{
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(1, 1, 2, 2, 4, 2, 8, KV_F32, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 8, err, sizeof err), 0);
    const void *k0 = kv_cache_k_tile(kv, 0, 0, 5, 0);
    kv_cache_seq_release(kv, 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 8, err, sizeof err), 0);
    ck_assert_ptr_eq(kv_cache_k_tile(kv, 0, 1, 5, 0), k0);
    kv_cache_free(kv);
}
END_TEST

/* An F16 cache rounds to the nearest F16, ties to even, clamps what is beyond
 * the largest finite F16 (infinities included) to +-65504 and keeps NaN. */
START_TEST(f16_rounds_and_clamps)
{
    kv_cache *kv;
    const int D = 12;
    ck_assert_int_eq(kv_cache_create(1, 1, D, 16, 1, 1, 16, KV_F16, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 1, err, sizeof err), 0);
    const float ulp1 = 1.0f / 1024.0f;   /* F16's spacing in [1, 2) */
    float in[12] = {1.0f + ulp1 / 2,          /* tie: to even, 1 */
                    1.0f + 3 * ulp1 / 2,      /* tie: to even, 1 + 2 ulp */
                    1.0f + ulp1 * 0.51f,      /* above the tie: 1 + ulp */
                    -2.5f, 65504.0f, 65519.0f, 1e9f, -1e9f, INFINITY, -INFINITY, NAN,
                    1e-9f};                   /* below half the smallest subnormal: 0 */
    float want[12] = {1.0f, 1.0f + 2 * ulp1, 1.0f + ulp1, -2.5f, 65504.0f, 65504.0f, 65504.0f,
                      -65504.0f, 65504.0f, -65504.0f, NAN, 0.0f};
    kv_cache_k_store(kv, 0, 0, 0, 0, in);
    kv_cache_v_store(kv, 0, 0, 0, 0, in);
    for (int d = 0; d < D; d++) {
        float k = elem_get(kv, key_at(kv, 0, 0, 0, 0, d), 0);
        float v = elem_get(kv, kv_cache_v(kv, 0, 0, 0, 0), (size_t)d);
        if (isnan(want[d])) {
            ck_assert(isnan(k) && isnan(v));
            continue;
        }
        ck_assert_msg(k == want[d] && v == want[d], "element %d: %g in, key %g, value %g, want %g",
                      d, (double)in[d], (double)k, (double)v, (double)want[d]);
    }
    kv_cache_free(kv);
}
END_TEST

START_TEST(type_names)
{
    kv_type t = KV_F32;
    ck_assert_int_eq(kv_type_parse("f16", &t), 0);
    ck_assert_int_eq(t, KV_F16);
    ck_assert_str_eq(kv_type_name(t), "f16");
    ck_assert_int_eq(kv_type_parse("f32", &t), 0);
    ck_assert_int_eq(t, KV_F32);
    ck_assert_str_eq(kv_type_name(t), "f32");
    ck_assert_int_eq(kv_type_parse("F16", &t), -1);
    ck_assert_int_eq(kv_type_parse("q8_0", &t), -1);
    ck_assert_int_eq(kv_type_parse("", &t), -1);
    ck_assert_int_eq(t, KV_F32);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kv_cache");
    TCase *tc = tcase_create("kv_cache");
    tcase_add_test(tc, create_rejects_bad_sizes);
    tcase_add_loop_test(tc, reserve_release_accounting, 0, 2);
    tcase_add_test(tc, exhaustion_and_bad_requests_change_nothing);
    tcase_add_loop_test(tc, pointers_are_disjoint_and_in_bounds, 0, 2);
    tcase_add_loop_test(tc, key_store_fills_the_tile, 0, 2);
    tcase_add_test(tc, f16_rounds_and_clamps);
    tcase_add_test(tc, type_names);
    tcase_add_test(tc, release_then_reserve_reuses_blocks);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
