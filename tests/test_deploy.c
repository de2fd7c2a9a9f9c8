/* test_deploy.c -- deploy/isa-exec.sh, the container's moeserve and moe: it
 * must exec the build the CPU can run, honour MOESERVE_ISA, pass the arguments
 * through, and refuse an instruction set it has no build for. The builds here
 * are stand-in scripts that print which one ran. */
#include <sys/stat.h>
#include <sys/wait.h>

#include "tests/testutil.h"

#define ISA_EXEC "deploy/isa-exec.sh"

typedef struct {
    char dir[64];
    char prog[160];   /* the dispatcher, installed as dir/bin/moeserve */
} fixture;

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
    ck_assert_int_eq(chmod(path, mode), 0);
}

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot read %s", path);
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return buf;
}

/* A stand-in build of moeserve for level isa: prints "ran ISA", how many
 * arguments it got, and them. */
static void add_build(const fixture *fx, const char *isa)
{
    char path[256], script[256];
    snprintf(path, sizeof path, "%s/%s", fx->dir, isa);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    snprintf(path, sizeof path, "%s/%s/moeserve", fx->dir, isa);
    snprintf(script, sizeof script, "#!/bin/sh\necho ran %s $# \"$@\"\n", isa);
    write_file(path, script, 0755);
}

static void fixture_init(fixture *fx)
{
    snprintf(fx->dir, sizeof fx->dir, "%s", tu_tmpdir());
    char bin[128];
    snprintf(bin, sizeof bin, "%s/bin", fx->dir);
    ck_assert_int_eq(mkdir(bin, 0755), 0);
    snprintf(fx->prog, sizeof fx->prog, "%s/moeserve", bin);
    write_file(fx->prog, read_all(ISA_EXEC), 0755);
}

static void fixture_free(const fixture *fx)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* Runs the dispatcher with MOESERVE_ISA set to isa (NULL: unset) and two
 * arguments; out gets its stdout and stderr, the exit status is returned. */
static int run(const fixture *fx, const char *isa, char *out, size_t outlen)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "env %s%s MOESERVE_ISA_DIR='%s' '%s' --port '8 0' 2>&1", isa ? "MOESERVE_ISA=" : "-u MOESERVE_ISA",
             isa ? isa : "", fx->dir, fx->prog);
    FILE *p = popen(cmd, "r");
    ck_assert(p != NULL);
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* What the dispatcher should choose here, read independently: AVX-512's
 * x86-64-v4 subset in /proc/cpuinfo's first flags line. */
static const char *expected_isa(void)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return "x86-64-v3";
    char line[8192];
    const char *isa = "x86-64-v3";
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) != 0) continue;
        static const char *need[] = {" avx512f ", " avx512bw ", " avx512cd ", " avx512dq ", " avx512vl "};
        char padded[8200];
        line[strcspn(line, "\n")] = 0;
        snprintf(padded, sizeof padded, "%s ", line);
        int all = 1;
        for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) all &= strstr(padded, need[i]) != NULL;
        if (all) isa = "x86-64-v4";
        break;
    }
    fclose(f);
    return isa;
}

START_TEST(runs_the_build_the_cpu_can)
{
    fixture fx;
    fixture_init(&fx);
    add_build(&fx, "x86-64-v3");
    add_build(&fx, "x86-64-v4");
    char out[512], want[64];
    ck_assert_int_eq(run(&fx, NULL, out, sizeof out), 0);
    snprintf(want, sizeof want, "ran %s 2 --port 8 0\n", expected_isa());
    ck_assert_str_eq(out, want);
    fixture_free(&fx);
}
END_TEST

START_TEST(moeserve_isa_picks_the_build)
{
    fixture fx;
    fixture_init(&fx);
    add_build(&fx, "x86-64-v3");
    add_build(&fx, "x86-64-v4");
    char out[512];
    ck_assert_int_eq(run(&fx, "x86-64-v3", out, sizeof out), 0);
    ck_assert_str_eq(out, "ran x86-64-v3 2 --port 8 0\n");
    ck_assert_int_eq(run(&fx, "x86-64-v4", out, sizeof out), 0);
    ck_assert_str_eq(out, "ran x86-64-v4 2 --port 8 0\n");
    fixture_free(&fx);
}
END_TEST

START_TEST(a_missing_build_is_refused)
{
    fixture fx;
    fixture_init(&fx);
    add_build(&fx, "x86-64-v3");
    char out[512];
    ck_assert_int_eq(run(&fx, "x86-64-v4", out, sizeof out), 2);
    ck_assert_msg(strstr(out, "no build for instruction set 'x86-64-v4'") != NULL, "said: %s", out);
    ck_assert_int_eq(run(&fx, "bogus", out, sizeof out), 2);
    ck_assert_msg(strstr(out, "no build for instruction set 'bogus'") != NULL, "said: %s", out);
    fixture_free(&fx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("deploy");
    TCase *tc = tcase_create("isa_exec");
    tcase_add_test(tc, runs_the_build_the_cpu_can);
    tcase_add_test(tc, moeserve_isa_picks_the_build);
    tcase_add_test(tc, a_missing_build_is_refused);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
