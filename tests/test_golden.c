/* test_golden.c -- the C engine against the independent float64 Python reference
 * (tests/reference/ref.py, its own GGUF reader) on tiny synthetic models of every
 * architecture.
 *
 * Per model: the logits at every position of a 24-token sequence must match, with
 * the error of position t measured as
 *
 *     max_j |c_tj - r_tj| / max_j |r_tj|    <= 1e-4
 *
 * (c = engine, r = reference, j over the vocabulary: the largest absolute error
 * relative to the largest logit of that position), and a 32-token greedy
 * continuation decoded one token at a time through the engine's KV cache must be
 * identical to the reference's (which recomputes the whole sequence each step).
 *
 * Runs `$PYTHON tests/reference/ref.py` (PYTHON defaults to /usr/bin/python3) from
 * the repository root, where `make test` runs the suites.
 */
#include <math.h>
#include <stdint.h>

#include "core/engine.h"
#include "models/model_file.h"
#include "models/synth.h"
#include "tests/testutil.h"

#define N_PROMPT 24
#define N_GREEDY 32
#define MAX_REL_ERR 1e-4

static char err[512];

typedef struct {
    const char *arch, *preset;
    ggml_type wtype;  /* the matrices' type (synth_params.wtype) */
    int spm_vocab;  /* tokenizer (and 32000-token vocabulary) from ../shared */
    int split;      /* each expert's matrices as tensors of their own (old Mixtral files) */
    int kv_f16;     /* the engine's KV cache in F16, the reference rounding K and V alike */
} golden_case;

static const golden_case cases[] = {
    {"llama", "tiny", GGML_TYPE_F32, 0, 0, 0},
    {"llama", "dense", GGML_TYPE_F32, 0, 0, 0},
    {"qwen2moe", "tiny", GGML_TYPE_F32, 0, 0, 0},
    {"olmoe", "tiny", GGML_TYPE_F32, 0, 0, 0},
    {"qwen3moe", "tiny", GGML_TYPE_F32, 0, 0, 0},
    {"qwen2moe", "tiny", GGML_TYPE_F16, 0, 0, 0},
    {"llama", "tiny", GGML_TYPE_Q8_0, 0, 0, 0},
    {"llama", "dense", GGML_TYPE_Q8_0, 0, 0, 0},
    {"qwen2moe", "tiny", GGML_TYPE_Q8_0, 0, 0, 0},
    {"olmoe", "tiny", GGML_TYPE_Q8_0, 0, 0, 0},
    {"qwen3moe", "tiny", GGML_TYPE_Q8_0, 0, 0, 0},
    {"llama", "tiny", GGML_TYPE_Q4_0, 0, 0, 0},
    {"qwen2moe", "tiny", GGML_TYPE_Q4_0, 0, 0, 0},
    {"qwen2moe", "tiny256", GGML_TYPE_Q4_K, 0, 0, 0},  /* the Q4_K_M mix: Q4_K and Q6_K */
    {"qwen3moe", "tiny256", GGML_TYPE_Q4_K, 0, 0, 0},
    {"olmoe", "tiny256", GGML_TYPE_Q5_K, 0, 0, 0},     /* Q5_K_M: Q5_K and Q6_K */
    {"llama", "tiny256", GGML_TYPE_Q6_K, 0, 0, 0},
    {"llama", "tiny", GGML_TYPE_Q4_1, 0, 0, 0},
    {"qwen3moe", "tiny", GGML_TYPE_IQ4_NL, 0, 0, 0},
    {"qwen2moe", "tiny", GGML_TYPE_Q4_K, 0, 0, 0},     /* rows not whole super-blocks: Q5_0 and Q8_0 */
    {"olmoe", "tiny", GGML_TYPE_Q5_K, 0, 0, 0},        /* likewise: Q5_1 and Q8_0 */
    {"llama", "tiny256", GGML_TYPE_Q2_K, 0, 0, 0},     /* the Q2_K mix: Q2_K, Q3_K and Q6_K */
    {"qwen2moe", "tiny256", GGML_TYPE_Q3_K, 0, 0, 0},  /* Q3_K_M: Q3_K, Q4_K and Q6_K */
    {"olmoe", "tiny256", GGML_TYPE_IQ4_XS, 0, 0, 0},
    {"qwen2moe", "tiny256odd", GGML_TYPE_Q4_K, 0, 0, 0},  /* Qwen1.5-MoE's Q4_K_M: experts' down in Q8_0 */
    {"qwen2moe", "tiny256odd", GGML_TYPE_Q3_K, 0, 0, 0},  /* and Q3_K_M: Q3_K gate and up, Q5_0 down */
    {"llama", "tiny", GGML_TYPE_F32, 1, 0, 0},
    {"llama", "tiny", GGML_TYPE_F32, 0, 1, 0},
    {"llama", "tiny256", GGML_TYPE_Q4_K, 0, 1, 0},   /* an old Mixtral Q4_K_M file's layout */
    {"llama", "tiny", GGML_TYPE_F32, 0, 0, 1},
    {"qwen2moe", "tiny", GGML_TYPE_F32, 0, 0, 1},
    {"olmoe", "tiny", GGML_TYPE_F32, 0, 0, 1},
    {"qwen3moe", "tiny", GGML_TYPE_F32, 0, 0, 1},
    {"qwen3moe", "tiny256", GGML_TYPE_Q4_K, 0, 0, 1},
};

/* "" for F32, else the type's name, for messages. */
static const char *type_tag(ggml_type t)
{
    return t == GGML_TYPE_F32 ? "" : ggml_type_name(t);
}

/* Prompt ids spread over the vocabulary (a fixed LCG: the same every run). */
static void make_prompt(int32_t *ids, int n, int n_vocab, uint32_t seed)
{
    uint32_t x = seed;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 8) % (uint32_t)n_vocab);
    }
}

static void ids_csv(char *buf, size_t cap, const int32_t *ids, int n)
{
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < n && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%d", i ? "," : "", ids[i]);
}

/* Runs the reference: logits of the prompt into logits_path, and the greedy
 * continuation into greedy[N_GREEDY]. */
static void run_reference(const char *model, const int32_t *prompt, const char *logits_path,
                          int kv_f16, int32_t *greedy)
{
    const char *py = getenv("PYTHON");
    char ids[1024], cmd[2048];
    ids_csv(ids, sizeof ids, prompt, N_PROMPT);
    snprintf(cmd, sizeof cmd, "%s tests/reference/ref.py %s --tokens %s --logits-out %s "
             "--greedy %d --print-json%s", py && *py ? py : "/usr/bin/python3", model, ids,
             logits_path, N_GREEDY, kv_f16 ? " --kv-f16" : "");
    FILE *p = popen(cmd, "r");
    ck_assert_msg(p != NULL, "cannot run %s", cmd);
    char out[4096] = "";
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int status = pclose(p);
    ck_assert_msg(status == 0, "reference failed (status %d): %s\n%s", status, cmd, out);
    const char *s = strstr(out, "\"tokens\": [");
    ck_assert_msg(s != NULL, "no tokens in reference output: %s", out);
    s += strlen("\"tokens\": [");
    for (int i = 0; i < N_GREEDY; i++) {
        char *end;
        long v = strtol(s, &end, 10);
        ck_assert_msg(end != s, "bad reference output: %s", out);
        greedy[i] = (int32_t)v;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
}

static float *read_floats(const char *path, size_t n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    float *v = malloc(n * sizeof *v);
    ck_assert_ptr_nonnull(v);
    ck_assert_uint_eq(fread(v, sizeof *v, n, f), n);
    ck_assert_int_eq(fgetc(f), EOF);
    fclose(f);
    return v;
}

/* max_j |c_j - r_j| / max_j |r_j| */
static double row_rel_err(const float *c, const float *r, int n)
{
    double num = 0, den = 0;
    for (int j = 0; j < n; j++) {
        double d = fabs((double)c[j] - r[j]), a = fabs((double)r[j]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (a > den) den = a;
    }
    return den > 0 ? num / den : num;
}

static int argmax_f(const float *x, int n, float *margin)
{
    int best = 0;
    for (int j = 1; j < n; j++)
        if (x[j] > x[best]) best = j;
    float second = -INFINITY;
    for (int j = 0; j < n; j++)
        if (j != best && x[j] > second) second = x[j];
    *margin = x[best] - second;
    return best;
}

/* The engine's logits for every prompt position, then greedy decoding one token
 * per forward through the KV cache. Returns the smallest top-1 margin seen. */
static float run_engine(const moe_model *m, const int32_t *prompt, int kv_f16, float *logits, int32_t *greedy)
{
    const moe_hparams *hp = &m->weights.hp;
    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = 1;
    ep.max_seqs = 1;
    ep.max_batch_tokens = N_PROMPT;
    ep.max_seq_len = N_PROMPT + N_GREEDY;
    ep.kv_n_blocks = (ep.max_seq_len + ep.kv_block_size - 1) / ep.kv_block_size;
    ep.kv_type = kv_f16 ? KV_F16 : KV_F32;
    moe_engine *e;
    ck_assert_msg(moe_engine_create(&m->weights, &ep, &e, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_engine_seq_reserve(e, 0, ep.max_seq_len, err, sizeof err) == 0, "%s", err);
    int32_t pos[N_PROMPT], seq[N_PROMPT];
    uint8_t want[N_PROMPT];
    for (int i = 0; i < N_PROMPT; i++) { pos[i] = i; seq[i] = 0; want[i] = 1; }
    moe_batch b = {.n_tokens = N_PROMPT, .token = prompt, .pos = pos, .seq = seq, .want_logits = want};
    ck_assert_msg(moe_engine_forward(e, &b, logits, err, sizeof err) == 0, "%s", err);

    int n_vocab = hp->n_vocab;
    float *row = malloc((size_t)n_vocab * sizeof *row), min_margin = INFINITY, margin;
    ck_assert_ptr_nonnull(row);
    memcpy(row, logits + (size_t)(N_PROMPT - 1) * n_vocab, (size_t)n_vocab * sizeof *row);
    for (int i = 0; i < N_GREEDY; i++) {
        greedy[i] = argmax_f(row, n_vocab, &margin);
        if (margin < min_margin) min_margin = margin;
        if (i + 1 == N_GREEDY) break;
        int32_t p = N_PROMPT + i, s = 0;
        uint8_t w = 1;
        moe_batch d = {.n_tokens = 1, .token = &greedy[i], .pos = &p, .seq = &s, .want_logits = &w};
        ck_assert_msg(moe_engine_forward(e, &d, row, err, sizeof err) == 0, "step %d: %s", i, err);
    }
    free(row);
    moe_engine_seq_release(e, 0);
    moe_engine_free(e);
    return min_margin;
}

START_TEST(engine_matches_reference)
{
    const golden_case *gc = &cases[_i];
    char vocab[256] = "";
    if (gc->spm_vocab) {
        const char *shared = tu_shared_dir();
        if (!shared) {
            printf("skip golden %s with the llama-spm vocabulary: ../shared is absent\n", gc->arch);
            return;
        }
        snprintf(vocab, sizeof vocab, "%s/testdata/vocab/ggml-vocab-llama-spm.gguf", shared);
    }
    char dir[64], model[128], ref_logits[128];
    snprintf(dir, sizeof dir, "%s", tu_tmpdir());
    snprintf(model, sizeof model, "%s/model.gguf", dir);
    snprintf(ref_logits, sizeof ref_logits, "%s/ref_logits.f32", dir);
    synth_params sp = {.arch = gc->arch, .preset = gc->preset, .seed = 11 + (uint64_t)_i,
                       .vocab_path = gc->spm_vocab ? vocab : NULL, .wtype = gc->wtype,
                       .split_experts = gc->split};
    ck_assert_msg(synth_write(&sp, model, err, sizeof err) == 0, "%s", err);
    moe_model *m;
    ck_assert_msg(moe_model_load(model, &m, err, sizeof err) == 0, "%s", err);
    int n_vocab = m->weights.hp.n_vocab;

    int32_t prompt[N_PROMPT], greedy_c[N_GREEDY], greedy_r[N_GREEDY];
    make_prompt(prompt, N_PROMPT, n_vocab, 1234u + (uint32_t)_i);
    float *logits = malloc((size_t)N_PROMPT * n_vocab * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    float margin = run_engine(m, prompt, gc->kv_f16, logits, greedy_c);
    run_reference(model, prompt, ref_logits, gc->kv_f16, greedy_r);

    float *ref = read_floats(ref_logits, (size_t)N_PROMPT * n_vocab);
    double worst = 0;
    for (int t = 0; t < N_PROMPT; t++) {
        double r = row_rel_err(logits + (size_t)t * n_vocab, ref + (size_t)t * n_vocab, n_vocab);
        ck_assert_msg(r <= MAX_REL_ERR, "%s/%s/%s%s position %d: relative error %.3g > %g",
                      gc->arch, gc->preset, type_tag(gc->wtype), gc->kv_f16 ? "/kv-f16" : "", t, r,
                      MAX_REL_ERR);
        if (r > worst) worst = r;
    }
    for (int i = 0; i < N_GREEDY; i++)
        ck_assert_msg(greedy_c[i] == greedy_r[i], "%s/%s/%s greedy token %d: engine %d, reference %d",
                      gc->arch, gc->preset, type_tag(gc->wtype), i, greedy_c[i], greedy_r[i]);
    printf("golden %-8s %-7s %-4s%s: max relative error %.2e, smallest greedy top-1 margin %.3f\n",
           gc->arch, gc->preset, type_tag(gc->wtype),
           gc->spm_vocab ? " spm-vocab" : gc->split ? " split-experts" : gc->kv_f16 ? " kv-f16" : "",
           worst, (double)margin);
    free(ref);
    free(logits);
    moe_model_free(m);
    unlink(model);
    unlink(ref_logits);
    rmdir(dir);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, engine_matches_reference, 0, (int)(sizeof cases / sizeof cases[0]));
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
