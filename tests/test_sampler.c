/* test_sampler.c -- greedy, seeded draws, top-k/top-p/min-p filters, repetition
 * penalty, parameter validation and stop strings across chunk boundaries. */
#include <math.h>
#include <stdint.h>

#include "core/sampler.h"
#include "tests/testutil.h"

static char err[256];

static sampler *make(int n_vocab, sampler_params p)
{
    sampler *s = NULL;
    ck_assert_msg(sampler_create(n_vocab, &p, &s, err, sizeof err) == 0, "%s", err);
    return s;
}

START_TEST(defaults_validate)
{
    sampler_params p = sampler_default_params();
    ck_assert_int_eq(sampler_params_validate(&p, err, sizeof err), 0);
}
END_TEST

START_TEST(validate_names_the_bad_field)
{
    struct { sampler_params p; const char *field; } bad[8];
    for (int i = 0; i < 8; i++) bad[i].p = sampler_default_params();
    bad[0].p.temperature = -0.1f; bad[0].field = "temperature";
    bad[1].p.temperature = NAN;   bad[1].field = "temperature";
    bad[2].p.top_k = -1;          bad[2].field = "top_k";
    bad[3].p.top_p = 0.0f;        bad[3].field = "top_p";
    bad[4].p.top_p = 1.5f;        bad[4].field = "top_p";
    bad[5].p.min_p = -0.5f;       bad[5].field = "min_p";
    bad[6].p.repeat_penalty = 0;  bad[6].field = "repeat_penalty";
    bad[7].p.repeat_last_n = -2;  bad[7].field = "repeat_last_n";
    for (int i = 0; i < 8; i++) {
        err[0] = '\0';
        ck_assert_int_eq(sampler_params_validate(&bad[i].p, err, sizeof err), -1);
        ck_assert_msg(strstr(err, bad[i].field) != NULL, "case %d: '%s'", i, err);
        sampler *s = (sampler *)1;
        ck_assert_int_eq(sampler_create(10, &bad[i].p, &s, err, sizeof err), -1);
        ck_assert_ptr_null(s);
    }
    sampler_params ok = sampler_default_params();
    sampler *s;
    ck_assert_int_eq(sampler_create(0, &ok, &s, err, sizeof err), -1);
}
END_TEST

START_TEST(greedy_is_argmax)
{
    float logits[6] = {0.1f, 2.0f, -1.0f, 3.5f, 3.5f, 0.0f};
    sampler *s = make(6, tu_sampler_plain(0.0f, 1));
    for (int i = 0; i < 5; i++) ck_assert_int_eq(sampler_sample(s, logits, NULL, 0), 3);
    double z = 0;
    for (int i = 0; i < 6; i++) z += exp(logits[i] - 3.5);
    ck_assert_double_eq_tol(sampler_last_prob(s), 1.0 / z, 1e-6);
    sampler_free(s);
}
END_TEST

START_TEST(top_k_one_is_greedy)
{
    float logits[50];
    for (int i = 0; i < 50; i++) logits[i] = sinf((float)i * 1.7f) * 3.0f;
    int best = 0;
    for (int i = 1; i < 50; i++) if (logits[i] > logits[best]) best = i;
    sampler_params p = tu_sampler_plain(1.5f, 42);
    p.top_k = 1;
    sampler *s = make(50, p);
    for (int i = 0; i < 100; i++) ck_assert_int_eq(sampler_sample(s, logits, NULL, 0), best);
    ck_assert_double_eq_tol(sampler_last_prob(s), 1.0, 1e-6);
    sampler_free(s);
}
END_TEST

START_TEST(same_seed_same_tokens)
{
    enum { V = 64, N = 200 };
    float logits[V];
    for (int i = 0; i < V; i++) logits[i] = cosf((float)i * 0.37f);
    sampler_params p = sampler_default_params();
    p.temperature = 1.0f;
    p.top_k = 0;
    p.seed = 1234;
    sampler *a = make(V, p), *b = make(V, p);
    p.seed = 1235;
    sampler *c = make(V, p);
    int differ = 0;
    for (int i = 0; i < N; i++) {
        int32_t ta = sampler_sample(a, logits, NULL, 0);
        ck_assert_int_eq(ta, sampler_sample(b, logits, NULL, 0));
        ck_assert(ta >= 0 && ta < V);
        differ += ta != sampler_sample(c, logits, NULL, 0);
    }
    ck_assert_int_gt(differ, N / 4);   /* another seed draws another sequence */
    sampler_free(a);
    sampler_free(b);
    sampler_free(c);
}
END_TEST

/* Frequencies follow softmax(l / T): with 4 tokens and 20000 draws each frequency
 * is within 0.02 of its probability (about 6 sigma). */
START_TEST(draws_follow_the_distribution)
{
    float logits[4] = {1.0f, 0.0f, 2.0f, -1.0f};
    const float T = 0.7f;
    sampler *s = make(4, tu_sampler_plain(T, 7));
    int count[4] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++) count[sampler_sample(s, logits, NULL, 0)]++;
    double z = 0;
    for (int i = 0; i < 4; i++) z += exp(logits[i] / T);
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq_tol((double)count[i] / N, exp(logits[i] / T) / z, 0.02);
    sampler_free(s);
}
END_TEST

START_TEST(top_k_keeps_only_k_best)
{
    float logits[8] = {0.5f, 0.4f, 0.3f, 0.2f, 0.1f, 0.0f, -0.1f, 0.45f};
    sampler_params p = tu_sampler_plain(1.0f, 3);
    p.top_k = 3;   /* ids 0, 7, 1 */
    sampler *s = make(8, p);
    int seen[8] = {0};
    for (int i = 0; i < 3000; i++) seen[sampler_sample(s, logits, NULL, 0)]++;
    ck_assert(seen[0] > 0 && seen[7] > 0 && seen[1] > 0);
    for (int i = 2; i < 7; i++) ck_assert_int_eq(seen[i], 0);
    sampler_free(s);
}
END_TEST

/* probs ~ 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.8 >= 0.7);
 * min_p 0.25 keeps those >= 0.125 (the first three). */
START_TEST(top_p_and_min_p_exclude_the_tail)
{
    float logits[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    sampler_params p = tu_sampler_plain(1.0f, 11);
    p.top_p = 0.7f;
    sampler *s = make(4, p);
    int seen[4] = {0};
    for (int i = 0; i < 4000; i++) seen[sampler_sample(s, logits, NULL, 0)]++;
    ck_assert(seen[0] > 0 && seen[1] > 0);
    ck_assert_int_eq(seen[2], 0);
    ck_assert_int_eq(seen[3], 0);
    /* renormalised over the kept: 0.5/0.8 */
    ck_assert_double_eq_tol(seen[0] / 4000.0, 0.625, 0.04);
    sampler_free(s);

    p = tu_sampler_plain(1.0f, 12);
    p.min_p = 0.25f;
    s = make(4, p);
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 4000; i++) seen[sampler_sample(s, logits, NULL, 0)]++;
    ck_assert(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);
    ck_assert_int_eq(seen[3], 0);
    sampler_free(s);
}
END_TEST

/* A 3000-token vocabulary (the nucleus search partitions rather than sorts at
 * this size): p_r ~ exp(-0.05 r) over a shuffled rank r, so top_p 0.9 keeps the
 * 47 best, each drawn about 100 times in 20000 draws; nothing else may appear. */
START_TEST(top_p_on_a_large_vocabulary)
{
    enum { V = 3000, N = 20000 };
    static float logits[V];
    static int seen[V];
    int rank_of[V];
    for (int i = 0; i < V; i++) {
        rank_of[i] = (int)(((long)i * 7919) % V);
        logits[i] = -0.05f * (float)rank_of[i];
    }
    double total = 0, acc = 0;
    for (int r = 0; r < V; r++) total += exp(-0.05 * r);
    int keep = 0;
    while (acc < 0.9 * total) acc += exp(-0.05 * keep++);
    ck_assert_int_eq(keep, 47);
    sampler_params p = tu_sampler_plain(1.0f, 99);
    p.top_p = 0.9f;
    sampler *s = make(V, p);
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < N; i++) seen[sampler_sample(s, logits, NULL, 0)]++;
    for (int i = 0; i < V; i++) {
        if (rank_of[i] < keep) ck_assert_msg(seen[i] > 0, "rank %d never drawn", rank_of[i]);
        else ck_assert_msg(seen[i] == 0, "rank %d drawn", rank_of[i]);
    }
    sampler_free(s);
}
END_TEST

START_TEST(repetition_penalty_lowers_repeated_tokens)
{
    /* tokens 0 and 1 lead; both appear in the history, so with a strong penalty
     * greedy picks token 2 */
    float logits[4] = {2.0f, 1.9f, 1.5f, -1.0f};
    int32_t hist[5] = {0, 1, 0, 0, 99 /* out of range: ignored */};
    sampler_params p = tu_sampler_plain(0.0f, 0);
    p.repeat_penalty = 1.5f;
    p.repeat_last_n = 64;
    sampler *s = make(4, p);
    ck_assert_int_eq(sampler_sample(s, logits, hist, 5), 2);
    /* only the last token in the window: token 0 penalised once (2.0/1.5), 1 wins */
    sampler_free(s);
    p.repeat_last_n = 2;   /* window {0, 99} */
    s = make(4, p);
    ck_assert_int_eq(sampler_sample(s, logits, hist, 5), 1);
    sampler_free(s);
    p.repeat_last_n = 0;   /* no history */
    s = make(4, p);
    ck_assert_int_eq(sampler_sample(s, logits, hist, 5), 0);
    sampler_free(s);
    /* negative logits are multiplied: -1 * 1.5 moves further down; logits untouched */
    float neg[3] = {-0.5f, -0.6f, -0.7f};
    int32_t h2[1] = {0};
    p.repeat_last_n = -1;
    s = make(3, p);
    ck_assert_int_eq(sampler_sample(s, neg, h2, 1), 1);
    ck_assert_float_eq(neg[0], -0.5f);
    sampler_free(s);
}
END_TEST

/* Stop strings ------------------------------------------------------------ */

START_TEST(stop_matcher_holds_back_partial_matches)
{
    const char *stops[2] = {"</s>", "STOP"};
    stop_matcher *m;
    ck_assert_int_eq(stop_matcher_create(stops, 2, &m, err, sizeof err), 0);
    ck_assert_int_eq(stop_matcher_feed(m, "hello <", 7), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 6);       /* "<" held back */
    ck_assert_int_eq(stop_matcher_feed(m, "/", 1), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 6);
    ck_assert_int_eq(stop_matcher_feed(m, "b>", 2), 0);   /* not a stop after all */
    ck_assert_uint_eq(stop_matcher_safe_len(m), 10);
    ck_assert_int_eq(stop_matcher_feed(m, " ST", 3), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 11);
    ck_assert_int_eq(stop_matcher_feed(m, "O", 1), 0);
    ck_assert_int_eq(stop_matcher_feed(m, "Px</s>", 6), 1);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 11);      /* text before "STOP" */
    ck_assert(strncmp(stop_matcher_text(m), "hello </b> ", 11) == 0);
    ck_assert_int_eq(stop_matcher_feed(m, "more", 4), 1); /* stays stopped */
    ck_assert_uint_eq(stop_matcher_safe_len(m), 11);
    stop_matcher_free(m);
}
END_TEST

START_TEST(stop_matcher_earliest_match_and_edge_cases)
{
    const char *stops[2] = {"abcd", "bc"};
    stop_matcher *m;
    ck_assert_int_eq(stop_matcher_create(stops, 2, &m, err, sizeof err), 0);
    ck_assert_int_eq(stop_matcher_feed(m, "xxab", 4), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 2);
    ck_assert_int_eq(stop_matcher_feed(m, "cd", 2), 1);   /* both complete: "abcd" starts first */
    ck_assert_uint_eq(stop_matcher_safe_len(m), 2);
    stop_matcher_free(m);

    /* a long text in one-byte chunks, the stop at the very end */
    const char *one[1] = {"END"};
    ck_assert_int_eq(stop_matcher_create(one, 1, &m, err, sizeof err), 0);
    for (int i = 0; i < 500; i++) ck_assert_int_eq(stop_matcher_feed(m, "E", 1), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 499);
    ck_assert_int_eq(stop_matcher_feed(m, "N", 1), 0);
    ck_assert_int_eq(stop_matcher_feed(m, "D", 1), 1);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 499);
    stop_matcher_free(m);

    /* no stops: everything is safe */
    ck_assert_int_eq(stop_matcher_create(NULL, 0, &m, err, sizeof err), 0);
    ck_assert_int_eq(stop_matcher_feed(m, "abc", 3), 0);
    ck_assert_uint_eq(stop_matcher_safe_len(m), 3);
    stop_matcher_free(m);

    const char *empty[1] = {""};
    m = (stop_matcher *)1;
    ck_assert_int_eq(stop_matcher_create(empty, 1, &m, err, sizeof err), -1);
    ck_assert_ptr_null(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("sampler");
    TCase *tc = tcase_create("sampler");
    tcase_add_test(tc, defaults_validate);
    tcase_add_test(tc, validate_names_the_bad_field);
    tcase_add_test(tc, greedy_is_argmax);
    tcase_add_test(tc, top_k_one_is_greedy);
    tcase_add_test(tc, same_seed_same_tokens);
    tcase_add_test(tc, draws_follow_the_distribution);
    tcase_add_test(tc, top_k_keeps_only_k_best);
    tcase_add_test(tc, top_p_and_min_p_exclude_the_tail);
    tcase_add_test(tc, top_p_on_a_large_vocabulary);
    tcase_add_test(tc, repetition_penalty_lowers_repeated_tokens);
    tcase_add_test(tc, stop_matcher_holds_back_partial_matches);
    tcase_add_test(tc, stop_matcher_earliest_match_and_edge_cases);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
