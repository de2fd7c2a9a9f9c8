/* test_kv_cache.c -- block accounting, exhaustion, and that every (layer, seq, pos)
 * gets its own memory. */
#include <stdint.h>

#include "core/kv_cache.h"
#include "tests/testutil.h"

static char err[256];

START_TEST(create_rejects_bad_sizes)
{
    kv_cache *kv = (kv_cache *)1;
    ck_assert_int_eq(kv_cache_create(0, 1, 4, 4, 4, 2, 16, &kv, err, sizeof err), -1);
    ck_assert_ptr_null(kv);
    ck_assert(strlen(err) > 0);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 0, 4, 2, 16, &kv, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 4, -1, 2, 16, &kv, err, sizeof err), -1);
    ck_assert_int_eq(kv_cache_create(2, 1, 4, 4, 4, 0, 16, &kv, err, sizeof err), -1);
    /* absurd sizes: an error, not an overflowed allocation */
    ck_assert_int_eq(kv_cache_create(1 << 30, 1 << 20, 1 << 20, 1 << 30, 1 << 30, 2, 16, &kv,
                                     err, sizeof err), -1);
}
END_TEST

START_TEST(reserve_release_accounting)
{
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(2, 2, 4, 4, 10, 3, 20, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_total(kv), 10);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 10);
    ck_assert_int_eq(kv_cache_block_size(kv), 4);
    ck_assert_uint_eq(kv_cache_bytes(kv), 10u * 2 * 2 * 4 * (2 * 4) * sizeof(float));

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
    ck_assert_int_eq(kv_cache_create(1, 1, 2, 4, 3, 2, 16, &kv, err, sizeof err), 0);
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
static float *key_at(kv_cache *kv, int l, int s, int p, int h, int d)
{
    int bs = kv_cache_block_size(kv);
    return kv_cache_k_tile(kv, l, s, p, h) + (size_t)d * (size_t)bs + (size_t)(p % bs);
}

/* Every key element and V vector of every (layer, seq, pos) lies inside the
 * cache and overlaps no other; values written survive other writes. */
START_TEST(pointers_are_disjoint_and_in_bounds)
{
    const int L = 3, H = 2, D = 3, BS = 4, NB = 7, S = 3, MAXLEN = 10;
    const int kvd = H * D;
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(L, H, D, BS, NB, S, MAXLEN, &kv, err, sizeof err), 0);
    int len[3] = {10, 3, 9};   /* 3 + 1 + 3 = 7 blocks */
    for (int s = 0; s < S; s++) ck_assert_int_eq(kv_cache_seq_reserve(kv, s, len[s], err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_blocks_free(kv), 0);

    float *base = kv_cache_k_tile(kv, 0, 0, 0, 0);
    size_t total = kv_cache_bytes(kv) / sizeof(float);
    ck_assert_uint_eq(total, (size_t)NB * BS * L * 2 * kvd);
    /* the lowest pointer of all is the start of the pool */
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int h = 0; h < H; h++) {
                    if (kv_cache_k_tile(kv, l, s, p, h) < base) base = kv_cache_k_tile(kv, l, s, p, h);
                    if (kv_cache_v(kv, l, s, p, h) < base) base = kv_cache_v(kv, l, s, p, h);
                }
    uint8_t *used = calloc(total, 1);
    ck_assert_ptr_nonnull(used);
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int kvsel = 0; kvsel < 2; kvsel++)
                    for (int h = 0; h < H; h++)
                        for (int i = 0; i < D; i++) {
                            float *v = kvsel ? kv_cache_v(kv, l, s, p, h) + i : key_at(kv, l, s, p, h, i);
                            ptrdiff_t off = v - base;
                            ck_assert(off >= 0 && (size_t)off < total);
                            ck_assert_int_eq(used[off], 0);
                            used[off] = 1;
                            *v = (float)((((l * 16 + s) * 16 + p) * 4 + kvsel) * 4 + h) + 0.001f * (float)i;
                        }
    /* a head's V vectors of consecutive positions in one block are contiguous,
     * and its keys are tiles: element d of consecutive positions side by side */
    ck_assert_ptr_eq(kv_cache_v(kv, 2, 2, 2, 0), kv_cache_v(kv, 2, 2, 1, 0) + D);
    ck_assert_ptr_eq(key_at(kv, 1, 0, 5, 1, 2), key_at(kv, 1, 0, 4, 1, 2) + 1);
    ck_assert_ptr_eq(key_at(kv, 1, 0, 5, 1, 2), key_at(kv, 1, 0, 5, 1, 1) + BS);
    ck_assert_ptr_eq(kv_cache_k_tile(kv, 1, 0, 5, 1), kv_cache_k_tile(kv, 1, 0, 7, 1));
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            for (int p = 0; p < len[s]; p++)
                for (int kvsel = 0; kvsel < 2; kvsel++)
                    for (int h = 0; h < H; h++)
                        for (int i = 0; i < D; i++) {
                            float *v = kvsel ? kv_cache_v(kv, l, s, p, h) + i : key_at(kv, l, s, p, h, i);
                            ck_assert_float_eq(*v, (float)((((l * 16 + s) * 16 + p) * 4 + kvsel) * 4 + h) +
                                                       0.001f * (float)i);
                        }
    free(used);
    kv_cache_free(kv);
}
END_TEST

/* kv_cache_k_store writes element d of the key to its tile place, and only there. */
START_TEST(key_store_fills_the_tile)
{
    const int D = 5, BS = 3;
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(2, 2, D, BS, 4, 1, 12, &kv, err, sizeof err), 0);
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
                ck_assert_float_eq(*key_at(kv, 1, 0, p, h, d), (float)(p * 100 + h * 10 + d));
                ck_assert_float_eq(*key_at(kv, 0, 0, p, h, d), 0.0f);   /* layer 0 untouched */
                ck_assert_float_eq(kv_cache_v(kv, 1, 0, p, h)[d], 0.0f);  /* and the values */
            }
    kv_cache_free(kv);
}
END_TEST

START_TEST(release_then_reserve_reuses_blocks)
{
    kv_cache *kv;
    ck_assert_int_eq(kv_cache_create(1, 1, 2, 2, 4, 2, 8, &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 0, 8, err, sizeof err), 0);
    float *k0 = kv_cache_k_tile(kv, 0, 0, 5, 0);
    kv_cache_seq_release(kv, 0);
    ck_assert_int_eq(kv_cache_seq_reserve(kv, 1, 8, err, sizeof err), 0);
    ck_assert_ptr_eq(kv_cache_k_tile(kv, 0, 1, 5, 0), k0);
    kv_cache_free(kv);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kv_cache");
    TCase *tc = tcase_create("kv_cache");
    tcase_add_test(tc, create_rejects_bad_sizes);
    tcase_add_test(tc, reserve_release_accounting);
    tcase_add_test(tc, exhaustion_and_bad_requests_change_nothing);
    tcase_add_test(tc, pointers_are_disjoint_and_in_bounds);
    tcase_add_test(tc, key_store_fills_the_tile);
    tcase_add_test(tc, release_then_reserve_reuses_blocks);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
