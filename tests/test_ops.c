/* test_ops.c -- rmsnorm, softmax, silu, sigmoid, rope, argmax against hand computation. */
#include <math.h>

#include "core/ops.h"
#include "tests/testutil.h"

START_TEST(rmsnorm_matches_formula)
{
    float x[4] = {1, -2, 3, -4}, w[4] = {1, 0.5f, 2, -1}, o[4];
    rmsnorm(o, x, w, 4, 1e-5f);
    double rms = sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-5);
    for (int i = 0; i < 4; i++) ck_assert_double_eq_tol(o[i], x[i] / rms * w[i], 1e-6);
    /* in place */
    rmsnorm(x, x, w, 4, 1e-5f);
    for (int i = 0; i < 4; i++) ck_assert_float_eq(x[i], o[i]);
}
END_TEST

START_TEST(rmsnorm_of_zero_is_zero)
{
    float x[3] = {0, 0, 0}, w[3] = {1, 1, 1};
    rmsnorm(x, x, w, 3, 1e-6f);
    for (int i = 0; i < 3; i++) ck_assert(x[i] == 0.0f);
}
END_TEST

START_TEST(softmax_sums_to_one_and_is_stable)
{
    float x[3] = {1000.0f, 999.0f, -1000.0f};
    softmax(x, 3);
    double e1 = exp(-1.0);
    ck_assert_double_eq_tol(x[0], 1.0 / (1.0 + e1), 1e-6);
    ck_assert_double_eq_tol(x[1], e1 / (1.0 + e1), 1e-6);
    ck_assert(x[2] >= 0.0f && x[2] < 1e-30f);
    ck_assert(isfinite(x[0]) && isfinite(x[1]));

    float y[5] = {0.1f, -0.3f, 2.0f, 0.7f, 0.0f};
    double sum = 0;
    for (int i = 0; i < 5; i++) sum += exp(y[i]);
    float z[5];
    memcpy(z, y, sizeof z);
    softmax(z, 5);
    double tot = 0;
    for (int i = 0; i < 5; i++) {
        ck_assert_double_eq_tol(z[i], exp(y[i]) / sum, 1e-6);
        tot += z[i];
    }
    ck_assert_double_eq_tol(tot, 1.0, 1e-6);
}
END_TEST

START_TEST(silu_and_sigmoid)
{
    ck_assert_float_eq(sigmoid(0.0f), 0.5f);
    ck_assert_float_eq(silu(0.0f), 0.0f);
    ck_assert_double_eq_tol(silu(1.5f), 1.5 / (1 + exp(-1.5)), 1e-6);
    ck_assert_double_eq_tol(silu(-2.0f), -2.0 / (1 + exp(2.0)), 1e-6);
    ck_assert_double_eq_tol(sigmoid(-3.0f), 1.0 / (1 + exp(3.0)), 1e-7);
    /* no overflow at the extremes */
    ck_assert(sigmoid(-1000.0f) == 0.0f);
    ck_assert(sigmoid(1000.0f) == 1.0f);
    ck_assert(silu(-1000.0f) == 0.0f);
    ck_assert(isfinite(silu(1000.0f)));
}
END_TEST

/* Hand-computed rotation of one 4-dim head at pos 3, base 100:
 * theta_0 = 3, theta_1 = 3 * 100^(-1/2) = 0.3. */
START_TEST(rope_normal_pairs_adjacent)
{
    float h[4] = {1, 2, 3, 4};
    rope(h, 4, 4, 3, 100.0f, MOE_ROPE_NORMAL);
    double t0 = 3.0, t1 = 0.3;
    ck_assert_double_eq_tol(h[0], 1 * cos(t0) - 2 * sin(t0), 1e-6);
    ck_assert_double_eq_tol(h[1], 1 * sin(t0) + 2 * cos(t0), 1e-6);
    ck_assert_double_eq_tol(h[2], 3 * cos(t1) - 4 * sin(t1), 1e-6);
    ck_assert_double_eq_tol(h[3], 3 * sin(t1) + 4 * cos(t1), 1e-6);
}
END_TEST

START_TEST(rope_neox_pairs_halves)
{
    float h[4] = {1, 2, 3, 4};
    rope(h, 4, 4, 3, 100.0f, MOE_ROPE_NEOX);
    double t0 = 3.0, t1 = 0.3;
    ck_assert_double_eq_tol(h[0], 1 * cos(t0) - 3 * sin(t0), 1e-6);
    ck_assert_double_eq_tol(h[2], 1 * sin(t0) + 3 * cos(t0), 1e-6);
    ck_assert_double_eq_tol(h[1], 2 * cos(t1) - 4 * sin(t1), 1e-6);
    ck_assert_double_eq_tol(h[3], 2 * sin(t1) + 4 * cos(t1), 1e-6);
}
END_TEST

START_TEST(rope_partial_and_position_zero)
{
    float h[6] = {1, 2, 3, 4, 5, 6}, g[6];
    memcpy(g, h, sizeof g);
    rope(g, 6, 6, 0, 10000.0f, MOE_ROPE_NEOX);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(g[i], h[i]);   /* pos 0: identity */
    /* rope_dim 4 of 6: dims 4, 5 untouched; norm of each rotated pair preserved */
    rope(h, 6, 4, 7, 10000.0f, MOE_ROPE_NORMAL);
    ck_assert_float_eq(h[4], 5.0f);
    ck_assert_float_eq(h[5], 6.0f);
    ck_assert_double_eq_tol(h[0] * h[0] + h[1] * h[1], 5.0, 1e-5);
    ck_assert_double_eq_tol(h[2] * h[2] + h[3] * h[3], 25.0, 1e-5);
    ck_assert_double_eq_tol(h[0], cos(7.0) - 2 * sin(7.0), 1e-6);
    double t1 = 7.0 * pow(10000.0, -2.0 / 4.0);
    ck_assert_double_eq_tol(h[2], 3 * cos(t1) - 4 * sin(t1), 1e-6);
}
END_TEST

START_TEST(argmax_lowest_index_on_ties)
{
    float x[5] = {1, 3, 2, 3, -1};
    ck_assert_int_eq(argmax(x, 5), 1);
    float y[3] = {NAN, 0.5f, 0.5f};
    ck_assert_int_eq(argmax(y, 3), 1);
    float z[1] = {-INFINITY};
    ck_assert_int_eq(argmax(z, 1), 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("ops");
    tcase_add_test(tc, rmsnorm_matches_formula);
    tcase_add_test(tc, rmsnorm_of_zero_is_zero);
    tcase_add_test(tc, softmax_sums_to_one_and_is_stable);
    tcase_add_test(tc, silu_and_sigmoid);
    tcase_add_test(tc, rope_normal_pairs_adjacent);
    tcase_add_test(tc, rope_neox_pairs_halves);
    tcase_add_test(tc, rope_partial_and_position_zero);
    tcase_add_test(tc, argmax_lowest_index_on_ties);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
