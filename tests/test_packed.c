/* test_packed.c -- the packed-weight kernel gives core/matmul.c's bits below the
 * sgemm switch (the claim core/packed.h makes), the reference's values above
 * it, writes only its own outputs, and refuses what it cannot do. */
#include "core/matmul.h"
#include "core/packed.h"
#include "tests/testutil.h"

#include <math.h>

static uint32_t rng_state;
static char err[256];

static float *rand_array(size_t n) { return tu_rand_array(&rng_state, n); }

/* y (m, n) by the packed kernel on pool p (NULL: serial). */
static void packed_product(pool *p, const float *x, int m, int k, const float *w, int n, float *y)
{
    packed_w *pw;
    packed_scratch *s;
    ck_assert_msg(packed_w_create(p, w, n, k, &pw, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(packed_scratch_create(m, k, 2, &s, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(packed_w_rows(pw), n);
    ck_assert_int_eq(packed_w_cols(pw), k);
    ck_assert_uint_ge(packed_w_bytes(pw), (size_t)n * (size_t)k * sizeof(float));
    packed_out o = {pw, y};
    packed_matmul(p, s, x, m, k, &o, 1);
    packed_scratch_free(s);
    packed_w_free(pw);
}

/* Every shape class the kernel has: k below, at and past 16 with tails and past
 * matmul.c's 1024-long chunks; n with partial panels; m across the micro-tile
 * (6), the row chunk (64) and the sgemm switch. Below the switch the bits must
 * be matmul's; from it (where matmul runs sgemm) within rounding of the
 * reference. One pool of two threads and the serial path both. */
START_TEST(same_bits_as_the_row_kernel)
{
    if (!packed_supported()) {
        printf("packed kernel: not in this build (no AVX-512), nothing to compare\n");
        return;
    }
    rng_state = 3;
    pool *p;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    static const int ks[] = {1, 15, 16, 17, 100, 1024, 1100, 2053};
    static const int ns[] = {1, 17, 64, 65, 130};
    int sw = tu_many_rows();
    int ms[] = {1, 2, 3, 5, 6, 7, 12, 13, 63, 64, 65, sw - 1, sw, sw + 70};
    for (size_t a = 0; a < sizeof ks / sizeof ks[0]; a++)
        for (size_t b = 0; b < sizeof ns / sizeof ns[0]; b++)
            for (size_t c = 0; c < sizeof ms / sizeof ms[0]; c++) {
                int k = ks[a], n = ns[b], m = ms[c];
                if (k > 1000 && m > 13 && m < sw - 1) continue;   /* time: the big k at a few m */
                float *x = rand_array((size_t)m * k), *w = rand_array((size_t)n * k);
                float *y = malloc((size_t)m * n * sizeof *y), *want = malloc((size_t)m * n * sizeof *want);
                ck_assert(y && want);
                packed_product(c % 2 ? NULL : p, x, m, k, w, n, y);
                if (m < sw) {
                    matmul(NULL, x, m, k, w, n, want);
                    ck_assert_msg(memcmp(y, want, (size_t)m * n * sizeof(float)) == 0,
                                  "m %d n %d k %d: bits differ from matmul", m, n, k);
                } else {
                    matmul_ref(x, m, k, w, n, want);
                    for (size_t i = 0; i < (size_t)m * n; i++)
                        ck_assert_msg(fabsf(y[i] - want[i]) <= 1e-5f * (1.0f + fabsf(want[i])) * sqrtf((float)k),
                                      "m %d n %d k %d: %g against %g", m, n, k, (double)y[i], (double)want[i]);
                }
                free(x); free(w); free(y); free(want);
            }
    pool_free(p);
}
END_TEST

/* Several outputs in one run equal separate runs, and nothing past an output's
 * m x n is written. */
START_TEST(multi_equals_separate_and_stays_in_bounds)
{
    if (!packed_supported()) {
        printf("packed kernel: not in this build (no AVX-512), nothing to run\n");
        return;
    }
    rng_state = 5;
    pool *p;
    ck_assert_int_eq(pool_create(2, &p, err, sizeof err), 0);
    int m = 9, k = 70, ns[3] = {130, 1, 64};
    float *x = rand_array((size_t)m * k);
    packed_w *pw[3];
    packed_out outs[3];
    float *y[3], *want[3];
    packed_scratch *s;
    ck_assert_int_eq(packed_scratch_create(m, k, 2, &s, err, sizeof err), 0);
    for (int i = 0; i < 3; i++) {
        float *w = rand_array((size_t)ns[i] * k);
        ck_assert_int_eq(packed_w_create(NULL, w, ns[i], k, &pw[i], err, sizeof err), 0);
        size_t ny = (size_t)m * ns[i];
        y[i] = malloc((ny + 16) * sizeof(float));
        want[i] = malloc(ny * sizeof(float));
        ck_assert(y[i] && want[i]);
        for (size_t t = 0; t < ny + 16; t++) y[i][t] = -7.0f;
        matmul(NULL, x, m, k, w, ns[i], want[i]);
        outs[i] = (packed_out){pw[i], y[i]};
        free(w);
    }
    packed_matmul(p, s, x, m, k, outs, 3);
    for (int i = 0; i < 3; i++) {
        size_t ny = (size_t)m * ns[i];
        ck_assert_msg(memcmp(y[i], want[i], ny * sizeof(float)) == 0, "output %d", i);
        for (size_t t = ny; t < ny + 16; t++) ck_assert_float_eq(y[i][t], -7.0f);
        packed_w_free(pw[i]);
        free(y[i]);
        free(want[i]);
    }
    packed_scratch_free(s);
    free(x);
    pool_free(p);
}
END_TEST

/* Sizes that make no matrix, and a build without the kernel, are errors with a
 * message, never a half-made object. */
START_TEST(refuses_what_it_cannot_do)
{
    float w[4] = {1, 2, 3, 4};
    packed_w *pw = (packed_w *)w;
    packed_scratch *s = (packed_scratch *)w;
    err[0] = 0;
    ck_assert_int_ne(packed_w_create(NULL, w, 0, 4, &pw, err, sizeof err), 0);
    ck_assert_ptr_null(pw);
    ck_assert(strlen(err) > 0);
    ck_assert_int_ne(packed_w_create(NULL, w, 1, -1, &pw, err, sizeof err), 0);
    ck_assert_int_ne(packed_scratch_create(0, 4, 1, &s, err, sizeof err), 0);
    ck_assert_ptr_null(s);
    ck_assert_int_ne(packed_scratch_create(4, 4, 0, &s, err, sizeof err), 0);
    int made = packed_w_create(NULL, w, 1, 4, &pw, err, sizeof err) == 0;
    ck_assert_int_eq(made, packed_supported());
    if (!made) ck_assert_msg(strstr(err, "AVX-512") != NULL, "%s", err);
    packed_w_free(pw);
    packed_w_free(NULL);
    packed_scratch_free(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("packed");
    TCase *tc = tcase_create("packed");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, same_bits_as_the_row_kernel);
    tcase_add_test(tc, multi_equals_separate_and_stays_in_bounds);
    tcase_add_test(tc, refuses_what_it_cannot_do);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
