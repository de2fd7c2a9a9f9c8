/* test_api.c -- POST /infer bodies straight through api_parse_infer, without
 * HTTP: every request form the API documents is accepted, and every truncation
 * and single-byte change of those bodies is either accepted or refused with a
 * status api.h names and a message (the libFuzzer target's check, so `make test`
 * keeps tests/fuzz/fuzz_api.c compiling and SAN=1 checks its reads). */
#include "tests/fuzz/fuzz_api.c"

#include "tests/testutil.h"

#define N_BODIES (int)(sizeof fuzz_api_bodies / sizeof fuzz_api_bodies[0])

static void setup(void)
{
    ck_assert_int_eq(fuzz_api_setup(), 0);
}

static void teardown(void)
{
    fuzz_api_teardown();
}

START_TEST(documented_forms_are_accepted)
{
    const char *b = fuzz_api_bodies[_i];
    char err[512];
    api_infer q;
    int rc = api_parse_infer(b, strlen(b), fuzz_models, 2, &q, err, sizeof err);
    ck_assert_msg(rc == 0, "%s -> %d: %s", b, rc, err);
    api_infer_free(&q);
}
END_TEST

START_TEST(refusals_name_the_problem)
{
    static const struct { const char *body; int status; const char *needle; } bad[] = {
        {"{\"prompt\": \"x\", \"model\": \"nope\"}", 404, "nope"},
        {"{\"prompt\": \"x\", \"max_tokenz\": 3}", 400, "max_tokenz"},
        {"{\"prompt\": \"x\"", 400, ""},
        {"{\"tokens\": [1, 99999999]}", 400, "[0, 510)"},
        {"[1, 2]", 400, ""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[512] = "";
        api_infer q;
        int rc = api_parse_infer(bad[i].body, strlen(bad[i].body), fuzz_models, 2, &q, err, sizeof err);
        ck_assert_msg(rc == bad[i].status, "%s -> %d (%s), want %d", bad[i].body, rc, err, bad[i].status);
        ck_assert_msg(err[0] && strstr(err, bad[i].needle), "%s: message '%s' lacks '%s'", bad[i].body, err,
                      bad[i].needle);
    }
}
END_TEST

/* Every truncation, and every byte set to each of a few JSON-significant or
 * invalid ones, of every documented body. */
START_TEST(mutated_bodies_are_accepted_or_refused_cleanly)
{
    static const uint8_t subst[] = {'"', '{', '}', '[', ']', ',', ':', '0', '9', '-', 'e', '.', ' ', '\\',
                                    'n', 0x00, 0x80, 0xFF};
    long accepted = 0, refused = 0;
    for (int i = 0; i < N_BODIES; i++) {
        size_t len = strlen(fuzz_api_bodies[i]);
        uint8_t *buf = malloc(len);
        ck_assert_ptr_nonnull(buf);
        memcpy(buf, fuzz_api_bodies[i], len);
        for (size_t cut = 0; cut < len; cut++) fuzz_api_one(buf, cut) ? refused++ : accepted++;
        for (size_t at = 0; at < len; at++)
            for (size_t s = 0; s < sizeof subst; s++) {
                uint8_t keep = buf[at];
                buf[at] = subst[s];
                fuzz_api_one(buf, len) ? refused++ : accepted++;
                buf[at] = keep;
            }
        free(buf);
    }
    printf("mutated bodies: %ld accepted, %ld refused\n", accepted, refused);
    ck_assert(accepted > 0 && refused > 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("infer");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, documented_forms_are_accepted, 0, N_BODIES);
    tcase_add_test(tc, refusals_name_the_problem);
    tcase_add_test(tc, mutated_bodies_are_accepted_or_refused_cleanly);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
