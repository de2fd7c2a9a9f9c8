/* test_default_model.c -- the committed default model runs in C exactly as it was
 * trained: the C BPE tokenizer reproduces the training tokenizer's ids on the whole
 * validation text, and the C engine reproduces the PyTorch model's logits and greedy
 * continuation (fixtures written by models/train/fixtures.py). */
#include <math.h>
#include <stdint.h>

#include "core/engine.h"
#include "models/model_file.h"
#include "models/tokenizer.h"
#include "tests/testutil.h"

/* paths from the project root, where tests run */
#ifndef MODEL_PATH
#define MODEL_PATH  "models/tinyshakespeare-moe.gguf"
#endif
#ifndef VAL_IDS
#define VAL_IDS     "tests/data/tinyshakespeare-moe.val.u16"
#endif
#ifndef GOLDEN_PATH
#define GOLDEN_PATH "tests/data/tinyshakespeare-moe.golden.bin"
#endif
#define MAX_REL_ERR 1e-4

/* Whole file into a malloc'd buffer (NUL-terminated), NULL when unreadable. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0) n = ftell(f);
    if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) != NULL) {
        if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
            free(buf);
            buf = NULL;
        } else {
            buf[n] = '\0';
            *len = (size_t)n;
        }
    }
    fclose(f);
    return buf;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The golden fixture: "MOEGOLD1", u32 n_tokens, n_vocab, n_greedy, then int32
 * tokens, float32 logits (n_tokens, n_vocab), int32 greedy tokens. */
typedef struct {
    int n_tokens, n_vocab, n_greedy;
    int32_t *tokens;
    float *logits;
    int32_t *greedy;
} golden;

static void golden_free(golden *g)
{
    free(g->tokens);
    free(g->logits);
    free(g->greedy);
}

static void golden_load(golden *g)
{
    size_t len = 0;
    unsigned char *buf = (unsigned char *)read_file(GOLDEN_PATH, &len);
    ck_assert_msg(buf != NULL, "cannot read %s", GOLDEN_PATH);
    ck_assert_msg(len >= 20 && memcmp(buf, "MOEGOLD1", 8) == 0, "%s: bad header", GOLDEN_PATH);
    g->n_tokens = (int)le32(buf + 8);
    g->n_vocab = (int)le32(buf + 12);
    g->n_greedy = (int)le32(buf + 16);
    ck_assert(g->n_tokens > 0 && g->n_tokens <= 4096 && g->n_vocab > 0 &&
              g->n_vocab <= 1 << 20 && g->n_greedy >= 0 && g->n_greedy <= 4096);
    size_t nt = (size_t)g->n_tokens, nv = (size_t)g->n_vocab, ng = (size_t)g->n_greedy;
    ck_assert_uint_eq(len, 20 + 4 * (nt + nt * nv + ng));
    g->tokens = malloc(4 * nt);
    g->logits = malloc(4 * nt * nv);
    g->greedy = malloc(4 * ng + 4);
    ck_assert(g->tokens && g->logits && g->greedy);
    /* little-endian host (x86-64/arm64), as the fixture */
    memcpy(g->tokens, buf + 20, 4 * nt);
    memcpy(g->logits, buf + 20 + 4 * nt, 4 * nt * nv);
    memcpy(g->greedy, buf + 20 + 4 * (nt + nt * nv), 4 * ng);
    free(buf);
}

static moe_model *model_load(void)
{
    char err[256];
    moe_model *m = NULL;
    ck_assert_msg(moe_model_load(MODEL_PATH, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_nonnull(m->tokenizer);
    return m;
}

/* max_j |got - want| / max_j |want| over one logits row */
static double row_rel_err(const float *got, const float *want, int n)
{
    double diff = 0, scale = 0;
    for (int j = 0; j < n; j++) {
        diff = fmax(diff, fabs((double)got[j] - want[j]));
        scale = fmax(scale, fabs((double)want[j]));
    }
    return scale > 0 ? diff / scale : diff;
}

static int32_t argmax(const float *v, int n)
{
    int32_t best = 0;
    for (int j = 1; j < n; j++)
        if (v[j] > v[best]) best = j;
    return best;
}

/* Runs tokens [from, to) of seq 0 (positions from..to-1) and returns their logits. */
static void forward_span(moe_engine *e, const int32_t *tokens, int from, int to, float *logits)
{
    int n = to - from;
    int32_t *pos = malloc(sizeof *pos * (size_t)n), *seq = calloc((size_t)n, sizeof *seq);
    uint8_t *want = malloc((size_t)n);
    ck_assert(pos && seq && want);
    for (int i = 0; i < n; i++) {
        pos[i] = from + i;
        want[i] = 1;
    }
    moe_batch b = {.n_tokens = n, .token = tokens + from, .pos = pos, .seq = seq,
                   .want_logits = want};
    char err[256];
    ck_assert_msg(moe_engine_forward(e, &b, logits, err, sizeof err) == 0, "%s", err);
    free(pos);
    free(seq);
    free(want);
}

static moe_engine *engine_create(const moe_model *m, int n_pos)
{
    char err[256];
    moe_engine_params p = moe_engine_default_params(&m->weights.hp);
    p.n_threads = 2;
    moe_engine *e = NULL;
    ck_assert_msg(moe_engine_create(&m->weights, &p, &e, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_engine_seq_reserve(e, 0, n_pos, err, sizeof err) == 0, "%s", err);
    return e;
}

static void assert_rows_match(const float *got, const golden *g, int from, int n)
{
    for (int i = 0; i < n; i++) {
        const float *want = g->logits + (size_t)(from + i) * (size_t)g->n_vocab;
        double rel = row_rel_err(got + (size_t)i * (size_t)g->n_vocab, want, g->n_vocab);
        ck_assert_msg(rel <= MAX_REL_ERR, "position %d: max rel err %.3g > %.0e",
                      from + i, rel, MAX_REL_ERR);
    }
}

START_TEST(validation_text_tokenizes_like_training)
{
    const char *shared = tu_shared_dir();
    char path[512];
    size_t corpus_len = 0, ids_len = 0;
    char *corpus = NULL;
    if (shared) {
        snprintf(path, sizeof path, "%s/corpus/tinyshakespeare.txt", shared);
        corpus = read_file(path, &corpus_len);
    }
    if (!corpus) {
        printf("test_default_model: ../shared/corpus/tinyshakespeare.txt absent, "
               "skipping the validation-text tokenizer check\n");
        return;
    }
    unsigned char *raw = (unsigned char *)read_file(VAL_IDS, &ids_len);
    ck_assert_msg(raw != NULL && ids_len % 2 == 0 && ids_len > 0, "cannot read %s", VAL_IDS);
    size_t n_want = ids_len / 2;

    /* validation = the last 10% of the bytes: from size * 9 / 10 (integer division) */
    size_t cut = corpus_len * 9 / 10;
    moe_model *m = model_load();
    int32_t *ids = NULL;
    size_t n_ids = 0;
    char err[256];
    ck_assert_msg(tokenizer_encode(m->tokenizer, corpus + cut, corpus_len - cut, 0, &ids, &n_ids,
                                   err, sizeof err) == 0, "%s", err);
    size_t first_diff = n_ids < n_want ? n_ids : n_want;
    for (size_t i = 0; i < first_diff; i++)
        if (ids[i] != (int32_t)(raw[2 * i] | raw[2 * i + 1] << 8)) {
            first_diff = i;
            break;
        }
    ck_assert_msg(n_ids == n_want && first_diff == n_want,
                  "C tokenizer: %zu ids, training tokenizer: %zu; first difference at %zu",
                  n_ids, n_want, first_diff);

    /* and back: the ids decode to the validation text byte for byte */
    char *text = NULL;
    size_t text_len = 0;
    ck_assert_msg(tokenizer_decode(m->tokenizer, ids, n_ids, 0, &text, &text_len, err,
                                   sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(text_len, corpus_len - cut);
    ck_assert(memcmp(text, corpus + cut, text_len) == 0);
    free(text);
    free(ids);
    free(raw);
    free(corpus);
    moe_model_free(m);
}
END_TEST

START_TEST(engine_matches_pytorch_logits_and_greedy)
{
    golden g;
    golden_load(&g);
    moe_model *m = model_load();
    const moe_hparams *hp = &m->weights.hp;
    ck_assert_int_eq(hp->n_vocab, g.n_vocab);
    ck_assert(hp->n_expert >= 8 && hp->n_expert_used == 2);
    int total = g.n_tokens + g.n_greedy;
    moe_engine *e = engine_create(m, total);

    float *logits = malloc(sizeof *logits * (size_t)g.n_tokens * (size_t)g.n_vocab);
    int32_t *seq = malloc(sizeof *seq * (size_t)total);
    ck_assert(logits && seq);
    memcpy(seq, g.tokens, sizeof *seq * (size_t)g.n_tokens);
    forward_span(e, seq, 0, g.n_tokens, logits);
    assert_rows_match(logits, &g, 0, g.n_tokens);

    /* greedy decoding one token at a time through the KV cache */
    const float *last = logits + (size_t)(g.n_tokens - 1) * (size_t)g.n_vocab;
    for (int i = 0; i < g.n_greedy; i++) {
        seq[g.n_tokens + i] = argmax(last, g.n_vocab);
        ck_assert_msg(seq[g.n_tokens + i] == g.greedy[i], "greedy token %d: C %d, PyTorch %d",
                      i, seq[g.n_tokens + i], g.greedy[i]);
        if (i + 1 < g.n_greedy) {
            forward_span(e, seq, g.n_tokens + i, g.n_tokens + i + 1, logits);
            last = logits;
        }
    }

    /* a trained router spreads the sample over the experts: none is dead in any layer */
    const uint64_t *routed = moe_engine_expert_routed(e);
    for (int l = 0; l < hp->n_layer; l++)
        for (int x = 0; x < hp->n_expert; x++)
            ck_assert_msg(routed[l * hp->n_expert + x] > 0, "layer %d expert %d never routed", l, x);

    free(seq);
    free(logits);
    moe_engine_free(e);
    moe_model_free(m);
    golden_free(&g);
}
END_TEST

START_TEST(chunked_prompt_gives_the_same_logits)
{
    /* the sample fed in uneven chunks through the KV cache, as continuous batching does */
    golden g;
    golden_load(&g);
    moe_model *m = model_load();
    moe_engine *e = engine_create(m, g.n_tokens);
    float *logits = malloc(sizeof *logits * (size_t)g.n_tokens * (size_t)g.n_vocab);
    ck_assert_ptr_nonnull(logits);
    static const int cuts[] = {0, 1, 12, 13, 40};
    for (int c = 0; c < 5; c++) {
        int from = cuts[c], to = c + 1 < 5 ? cuts[c + 1] : g.n_tokens;
        if (from >= g.n_tokens) break;
        if (to > g.n_tokens) to = g.n_tokens;
        forward_span(e, g.tokens, from, to, logits);
        assert_rows_match(logits, &g, from, to - from);
    }
    free(logits);
    moe_engine_free(e);
    moe_model_free(m);
    golden_free(&g);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("default_model");
    TCase *tc = tcase_create("default_model");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, validation_text_tokenizes_like_training);
    tcase_add_test(tc, engine_matches_pytorch_logits_and_greedy);
    tcase_add_test(tc, chunked_prompt_gives_the_same_logits);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
