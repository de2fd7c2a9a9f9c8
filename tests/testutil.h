/* testutil.h -- helpers shared by the Check suites. */
#ifndef MOE_TESTS_TESTUTIL_H
#define MOE_TESTS_TESTUTIL_H

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/matmul.h"
#include "core/sampler.h"

/* Sampling at temperature temp with every filter (top-k, top-p, min-p, penalty)
 * off, so a test's expectation is plain softmax(l / temp). */
static inline sampler_params tu_sampler_plain(float temp, uint64_t seed)
{
    sampler_params p = sampler_default_params();
    p.temperature = temp;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = seed;
    return p;
}

/* The row count from which matmul_range takes its many-rows path (sgemm), or
 * 128 where this build and OpenBLAS's kernel set never use sgemm: the tests'
 * "many rows" either way, so the large sizes stay covered on every machine. */
static inline int tu_many_rows(void)
{
    return matmul_blas_used() ? matmul_sgemm_min_rows() : 128;
}

/* Path of ../shared (beside the project root), or NULL when absent. Tests that
 * need it print why they skip. */
static inline const char *tu_shared_dir(void)
{
    static const char *candidates[] = {"../shared", NULL};
    const char *env = getenv("MOE_SHARED");
    if (env && access(env, R_OK) == 0) return env;
    for (int i = 0; candidates[i]; i++)
        if (access(candidates[i], R_OK) == 0) return candidates[i];
    return NULL;
}

/* The build directory the tests run from (build or build-san). */
static inline const char *tu_build_dir(void)
{
    const char *b = getenv("MOE_BUILD");
    return b ? b : "build";
}

/* A fresh temporary directory for one test (removed by the OS tmp cleaner; tests
 * remove what they create). Returns a static buffer. */
static inline const char *tu_tmpdir(void)
{
    static char dir[64];
    snprintf(dir, sizeof dir, "/tmp/moetest.XXXXXX");
    if (!mkdtemp(dir)) return "/tmp";
    return dir;
}

/* Runs a suite, prints Check's summary line, returns the process exit code. */
static inline int tu_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* Uniform in [-1, 1) from a 32-bit LCG: the suites' seedable source. */
static inline float tu_frand(uint32_t *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* n of them in a malloc'd array. */
static inline float *tu_rand_array(uint32_t *state, size_t n)
{
    float *a = malloc(n * sizeof *a);
    ck_assert_ptr_nonnull(a);
    for (size_t i = 0; i < n; i++) a[i] = tu_frand(state);
    return a;
}

#endif
