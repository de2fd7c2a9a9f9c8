/* test_cli.c -- build/moe as a user runs it: `generate --json` (token ids in,
 * greedy tokens out, the KV cache in either type), `info`, and bad flags giving
 * a message and a non-zero exit. */
#include <jansson.h>
#include <sys/wait.h>

#include "models/synth.h"
#include "tests/testutil.h"

static char g_model[128];

/* Runs `build/moe ARGS`; returns its exit status and its standard output (and
 * its standard error too when with_stderr) in out. */
static int moe_run(const char *args, int with_stderr, char *out, size_t cap)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/moe %s %s", tu_build_dir(), args, with_stderr ? "2>&1" : "2>/dev/null");
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The "tokens" of a `generate --json` line, as a JSON array (owned). */
static json_t *generate_tokens(const char *extra)
{
    char args[512], out[8192];
    snprintf(args, sizeof args, "generate -m %s --tokens 5,17,42,9 -n 12 --threads 2 --json %s", g_model, extra);
    int rc = moe_run(args, 0, out, sizeof out);
    ck_assert_msg(rc == 0, "moe %s: exit %d: %s", args, rc, out);
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    ck_assert_msg(j != NULL, "not JSON (%s): %s", je.text, out);
    json_t *prompt = json_object_get(j, "prompt_tokens"), *toks = json_object_get(j, "tokens");
    ck_assert_int_eq(json_array_size(prompt), 4);
    ck_assert_int_eq(json_integer_value(json_array_get(prompt, 2)), 42);
    ck_assert(json_is_string(json_object_get(j, "text")));
    ck_assert_msg(json_is_array(toks) && json_array_size(toks) >= 1 && json_array_size(toks) <= 12, "%s", out);
    json_incref(toks);
    json_decref(j);
    return toks;
}

START_TEST(generate_json_in_both_kv_types)
{
    json_t *a = generate_tokens(""), *b = generate_tokens("");
    ck_assert_msg(json_equal(a, b), "greedy decoding is not repeatable");
    json_t *f32 = generate_tokens("--kv-type f32");
    ck_assert(json_equal(a, f32));
    json_t *f16 = generate_tokens("--kv-type f16");
    for (size_t i = 0; i < json_array_size(f16); i++) {
        json_int_t t = json_integer_value(json_array_get(f16, i));
        ck_assert(t >= 0 && t < 510);   /* the built-in vocabulary */
    }
    json_decref(a);
    json_decref(b);
    json_decref(f32);
    json_decref(f16);
}
END_TEST

START_TEST(info_names_the_kv_cache)
{
    char args[256], out[8192];
    snprintf(args, sizeof args, "info %s", g_model);
    ck_assert_int_eq(moe_run(args, 1, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "kv cache:") && strstr(out, "--kv-type f16"), "%s", out);
}
END_TEST

START_TEST(bad_flags_fail_with_a_message)
{
    static const char *bad[] = {
        "generate -m %s --tokens 1,2 --kv-type q8_0",
        "generate -m %s --tokens 1,2 --kv-type",
        "generate -m %s --tokens 1,2 -n -4",
        "generate -m %s",
        "generate -m %s --tokens 1,x",
        "bench -m %s --kv-type f8",
        "info %s.missing",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char args[512], out[8192];
        snprintf(args, sizeof args, bad[i], g_model);
        int rc = moe_run(args, 1, out, sizeof out);
        ck_assert_msg(rc != 0, "moe %s exited 0: %s", args, out);
        ck_assert_msg(strstr(out, "moe") != NULL, "moe %s: no message: '%s'", args, out);
    }
}
END_TEST

int main(void)
{
    snprintf(g_model, sizeof g_model, "%s/cli.gguf", tu_tmpdir());
    char err[256];
    synth_params sp = {.arch = "qwen3moe", .preset = "tiny", .seed = 3};
    if (synth_write(&sp, g_model, err, sizeof err)) {
        fprintf(stderr, "synth: %s\n", err);
        return 1;
    }
    Suite *s = suite_create("cli");
    TCase *tc = tcase_create("cli");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, generate_json_in_both_kv_types);
    tcase_add_test(tc, info_names_the_kv_cache);
    tcase_add_test(tc, bad_flags_fail_with_a_message);
    suite_add_tcase(s, tc);
    int rc = tu_run_suite(s);
    unlink(g_model);
    *strrchr(g_model, '/') = 0;
    rmdir(g_model);
    return rc;
}
