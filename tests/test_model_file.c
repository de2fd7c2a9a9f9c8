/* test_model_file.c -- synthetic models load with the hyperparameters they were
 * written with, F16 equals F32 to F16 precision, and hostile model files (missing
 * or misshapen tensors, impossible hyperparameters) fail with a message that says
 * what is wrong. */
/* The libFuzzer target's body for the tokenizer, loader and engine
 * (LLVMFuzzerTestOneInput), run below on mutated models so that `make test` keeps
 * it compiling and SAN=1 sees what it reads. First: it defines _GNU_SOURCE (memfd). */
#include "tests/fuzz/fuzz_model.c"

#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "models/gguf.h"
#include "models/model_file.h"
#include "models/pages.h"
#include "models/synth.h"
#include "core/matmul.h"
#include "core/wconv.h"
#include "tests/testutil.h"

static char err[512];

/* A temporary directory with one synthetic model in it. */
typedef struct {
    char dir[64];
    char path[128];   /* the synthetic model */
    char other[128];  /* a variant written by the test */
} fixture;

static void fixture_synth(fixture *fx, const char *arch, const char *preset, ggml_type wtype)
{
    snprintf(fx->dir, sizeof fx->dir, "%s", tu_tmpdir());
    snprintf(fx->path, sizeof fx->path, "%s/model.gguf", fx->dir);
    snprintf(fx->other, sizeof fx->other, "%s/variant.gguf", fx->dir);
    synth_params p = {.arch = arch, .preset = preset, .seed = 7, .wtype = wtype};
    ck_assert_msg(synth_write(&p, fx->path, err, sizeof err) == 0, "synth %s: %s", arch, err);
}

static void fixture_done(fixture *fx)
{
    unlink(fx->path);
    unlink(fx->other);
    rmdir(fx->dir);
}

/* Loads path, expecting failure; returns the message. */
static const char *load_error(const char *path)
{
    moe_model *m = (moe_model *)1;
    err[0] = 0;
    ck_assert_int_eq(moe_model_load(path, &m, err, sizeof err), -1);
    ck_assert_ptr_null(m);
    ck_assert(strlen(err) > 0);
    return err;
}

#define ck_assert_err_has(msg, needle) \
    ck_assert_msg(strstr((msg), (needle)) != NULL, "error '%s' does not mention '%s'", (msg), (needle))

/* Rewriting a file with one change ------------------------------------------- */

typedef enum { EDIT_NONE, EDIT_U32, EDIT_STR, EDIT_F32 } edit_kind;

typedef struct {
    const char *drop_key;       /* key left out */
    const char *set_key;        /* key set (added or replaced) */
    edit_kind set_kind;
    uint32_t set_u32;
    const char *set_str;
    float set_f32;
    const char *drop_tensor;    /* tensor left out */
    const char *halve_tensor;   /* tensor written with its outermost dim halved */
    int to_bf16;                /* every F32 matrix written as BF16 */
    int to_f32;                 /* every F16/BF16/Q8_0 tensor written as F32 (exactly) */
    const char *to_f32_tensor;  /* only this one */
    uint32_t alignment;         /* general.alignment, 0: unchanged */
    int pad_len;                /* length of an extra string key (shifts the data section) */
} edit;

/* Weight j of a block of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) by the
 * format's definition (core/model.h), written apart from core/wconv. */
static float b32_definition(const uint8_t *blk, ggml_type t, int j)
{
    static const int levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    uint16_t hv;
    memcpy(&hv, blk, 2);
    float d = gguf_f16_to_f32(hv);
    if (t == GGML_TYPE_Q8_0) return d * (float)(int8_t)blk[2 + j];
    int at = t == GGML_TYPE_Q4_1 ? 4 : t == GGML_TYPE_Q5_0 ? 6 : t == GGML_TYPE_Q5_1 ? 8 : 2;
    int q = j < 16 ? blk[at + j] & 15 : blk[at + j - 16] >> 4;
    if (t == GGML_TYPE_Q5_0 || t == GGML_TYPE_Q5_1) {
        const uint8_t *h = blk + at - 4;   /* the fifth bits, little-endian, bit j for weight j */
        q |= ((h[j / 8] >> (j % 8)) & 1) << 4;
    }
    if (t == GGML_TYPE_Q4_0) return d * (float)(q - 8);
    if (t == GGML_TYPE_Q5_0) return d * (float)(q - 16);
    if (t == GGML_TYPE_IQ4_NL) return d * (float)levels[q];
    memcpy(&hv, blk + 2, 2);
    return d * (float)q + gguf_f16_to_f32(hv);   /* Q4_1, Q5_1: + m */
}

static moe_wtype kquant_of(ggml_type t)
{
    switch (t) {
    case GGML_TYPE_Q2_K: return MOE_WT_Q2_K;
    case GGML_TYPE_Q3_K: return MOE_WT_Q3_K;
    case GGML_TYPE_Q4_K: return MOE_WT_Q4_K;
    case GGML_TYPE_Q5_K: return MOE_WT_Q5_K;
    case GGML_TYPE_Q6_K: return MOE_WT_Q6_K;
    default: return MOE_WT_IQ4_XS;
    }
}

/* Copies src to dst with one edit (keys in order, tensors by reference). */
static void rewrite(const char *src, const char *dst, const edit *e)
{
    gguf_file *f;
    ck_assert_msg(gguf_open(src, &f, err, sizeof err) == 0, "%s", err);
    gguf_writer *w = gguf_writer_create();
    ck_assert_ptr_nonnull(w);
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        gguf_str k = gguf_kv_key(f, i);
        char key[256];
        ck_assert_uint_lt(k.len, sizeof key);
        memcpy(key, k.data, k.len);
        key[k.len] = 0;
        if (e->drop_key && !strcmp(key, e->drop_key)) continue;
        ck_assert_int_eq(gguf_writer_copy_kv(w, f, key), 0);
    }
    if (e->set_kind == EDIT_U32) ck_assert_int_eq(gguf_writer_set_u32(w, e->set_key, e->set_u32), 0);
    if (e->set_kind == EDIT_STR) ck_assert_int_eq(gguf_writer_set_str(w, e->set_key, e->set_str), 0);
    if (e->set_kind == EDIT_F32) ck_assert_int_eq(gguf_writer_set_f32(w, e->set_key, e->set_f32), 0);
    if (e->alignment) ck_assert_int_eq(gguf_writer_set_u32(w, "general.alignment", e->alignment), 0);
    if (e->pad_len) {
        char pad[64];
        ck_assert_int_lt(e->pad_len, (int)sizeof pad);
        memset(pad, 'x', (size_t)e->pad_len);
        pad[e->pad_len] = 0;
        ck_assert_int_eq(gguf_writer_set_str(w, "test.pad", pad), 0);
    }
    uint16_t *bf16[256];    /* converted data, alive until the write */
    int n_bf16 = 0;
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_get_tensor(f, i);
        char name[256];
        ck_assert_uint_lt(t->name.len, sizeof name);
        memcpy(name, t->name.data, t->name.len);
        name[t->name.len] = 0;
        if (e->drop_tensor && !strcmp(name, e->drop_tensor)) continue;
        uint64_t ne[GGUF_MAX_DIMS];
        memcpy(ne, t->ne, sizeof ne);
        if (e->halve_tensor && !strcmp(name, e->halve_tensor)) ne[t->n_dims - 1] /= 2;
        const void *data = t->data;
        ggml_type type = t->type;
        if (e->to_bf16 && t->type == GGML_TYPE_F32 && t->n_dims >= 2) {
            ck_assert_int_lt(n_bf16, 256);
            uint16_t *h = malloc(t->n_elements * sizeof *h);
            ck_assert_ptr_nonnull(h);
            for (uint64_t j = 0; j < t->n_elements; j++) h[j] = gguf_f32_to_bf16(((const float *)t->data)[j]);
            bf16[n_bf16++] = h;
            data = h;
            type = GGML_TYPE_BF16;
        }
        if ((e->to_f32 || (e->to_f32_tensor && !strcmp(name, e->to_f32_tensor))) && t->type != GGML_TYPE_F32) {
            ck_assert_int_lt(n_bf16, 256);
            float *fl = malloc(t->n_elements * sizeof *fl);
            ck_assert_ptr_nonnull(fl);
            if (ggml_block_size(t->type) == 32) {
                /* the definitions (b32_definition), not core/wconv */
                size_t bb = ggml_type_size(t->type);
                for (uint64_t j = 0; j < t->n_elements; j++)
                    fl[j] = b32_definition((const uint8_t *)t->data + j / 32 * bb, t->type, (int)(j % 32));
            } else if (ggml_block_size(t->type) == 256) {
                /* k-quants as core/wconv reads them (the golden tests check that
                 * against the numpy reader) */
                wconv_rows(fl, t->data, t->n_elements, kquant_of(t->type));
            }
            for (uint64_t j = 0; j < t->n_elements && (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_BF16); j++) {
                uint16_t hv;
                memcpy(&hv, (const uint8_t *)t->data + 2 * j, 2);
                fl[j] = t->type == GGML_TYPE_F16 ? gguf_f16_to_f32(hv) : gguf_bf16_to_f32(hv);
            }
            bf16[n_bf16++] = (uint16_t *)(void *)fl;
            data = fl;
            type = GGML_TYPE_F32;
        }
        ck_assert_int_eq(gguf_writer_add_tensor(w, name, type, t->n_dims, ne, data), 0);
    }
    ck_assert_msg(gguf_writer_write(w, dst, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < n_bf16; i++) free(bf16[i]);
    gguf_writer_free(w);
    gguf_close(f);
}

static const char *edited_error(fixture *fx, const edit *e)
{
    rewrite(fx->path, fx->other, e);
    return load_error(fx->other);
}

/* Loading what synth writes ------------------------------------------------- */

static const char *archs[] = {"llama", "qwen2moe", "olmoe", "qwen3moe"};

/* Every weight pointer lies inside the file mapping (F32 used in place). */
static int in_mapping(const moe_model *m, const float *p)
{
    const gguf_tensor *t = gguf_find_tensor(m->gguf, "token_embd.weight");
    const char *lo = (const char *)t->data - t->offset, *hi = lo + m->mapped_bytes;
    return (const char *)p >= lo && (const char *)p < hi;
}

START_TEST(each_arch_loads_with_its_hparams)
{
    const char *arch = archs[_i];
    fixture fx;
    fixture_synth(&fx, arch, "tiny", GGML_TYPE_F32);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.path, &m, err, sizeof err) == 0, "%s: %s", arch, err);
    const moe_hparams *hp = &m->weights.hp;
    ck_assert_int_eq(hp->arch, moe_arch_from_name(arch));
    ck_assert_int_eq(hp->n_layer, 2);
    ck_assert_int_eq(hp->n_embd, 64);
    ck_assert_int_eq(hp->n_head, 4);
    /* OLMoE has as many KV heads as heads; Qwen3-MoE heads are wider than n_embd/n_head */
    ck_assert_int_eq(hp->n_head_kv, !strcmp(arch, "olmoe") ? 4 : 2);
    ck_assert_int_eq(hp->head_dim, !strcmp(arch, "qwen3moe") ? 32 : 16);
    ck_assert_int_eq(hp->rope_dim, hp->head_dim);
    ck_assert_int_eq(hp->n_ff, 96);
    ck_assert_int_eq(hp->n_expert, 8);
    ck_assert_int_eq(hp->n_expert_used, 2);
    ck_assert_int_eq(hp->n_ff_shexp, !strcmp(arch, "qwen2moe") ? 128 : 0);
    ck_assert_int_eq(hp->n_ctx_train, 512);
    ck_assert_float_eq_tol(hp->rms_eps, 1e-5f, 1e-10f);
    ck_assert_float_eq(hp->rope_base, !strcmp(arch, "llama") ? 10000.0f : 1000000.0f);
    ck_assert_ptr_nonnull(m->tokenizer);
    ck_assert_int_eq(hp->n_vocab, tokenizer_n_vocab(m->tokenizer));
    ck_assert_int_eq(m->tied_output, 0);
    ck_assert_uint_eq(m->converted_bytes, 0);
    ck_assert(in_mapping(m, m->weights.layers[1].exp_down));
    ck_assert(in_mapping(m, m->weights.output));
    ck_assert_ptr_ne(m->weights.output, m->weights.tok_embd);
    char want[64];
    snprintf(want, sizeof want, "synth-%s-tiny", arch);
    ck_assert_str_eq(m->name, want);
    ck_assert_uint_eq(m->mapped_bytes, gguf_file_size(m->gguf));
    ck_assert(m->load_ms >= 0);
    moe_model_free(m);
    fixture_done(&fx);
}
END_TEST

START_TEST(dense_llama_loads)
{
    fixture fx;
    fixture_synth(&fx, "llama", "dense", GGML_TYPE_F32);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.path, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(m->weights.hp.n_expert, 0);
    ck_assert_int_eq(m->weights.hp.n_expert_used, 0);
    ck_assert_int_eq(m->weights.hp.n_ff, 192);
    ck_assert_ptr_nonnull(m->weights.layers[0].ffn_down);
    ck_assert_ptr_null(m->weights.layers[0].router);
    moe_model_free(m);

    /* non-llama architectures cannot be dense */
    synth_params p = {.arch = "olmoe", .preset = "dense", .seed = 1};
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), -1);
    ck_assert_err_has(err, "dense");
    fixture_done(&fx);
}
END_TEST

/* Same parameters, same bytes; another seed, other weights. */
START_TEST(synth_is_deterministic)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_F32);
    synth_params p = {.arch = "qwen2moe", .preset = "tiny", .seed = 7};
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), 0);
    gguf_file *a, *b;
    ck_assert_int_eq(gguf_open(fx.path, &a, err, sizeof err), 0);
    ck_assert_int_eq(gguf_open(fx.other, &b, err, sizeof err), 0);
    ck_assert_uint_eq(gguf_file_size(a), gguf_file_size(b));
    ck_assert_int_eq(gguf_n_tensors(a), gguf_n_tensors(b));
    for (int64_t i = 0; i < gguf_n_tensors(a); i++) {
        const gguf_tensor *ta = gguf_get_tensor(a, i), *tb = gguf_get_tensor(b, i);
        ck_assert_uint_eq(ta->nbytes, tb->nbytes);
        ck_assert(memcmp(ta->data, tb->data, ta->nbytes) == 0);
    }
    gguf_close(b);
    p.seed = 8;
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), 0);
    ck_assert_int_eq(gguf_open(fx.other, &b, err, sizeof err), 0);
    const gguf_tensor *ta = gguf_find_tensor(a, "blk.0.ffn_up_exps.weight");
    const gguf_tensor *tb = gguf_find_tensor(b, "blk.0.ffn_up_exps.weight");
    ck_assert(memcmp(ta->data, tb->data, ta->nbytes) != 0);
    gguf_close(a);
    gguf_close(b);
    fixture_done(&fx);
}
END_TEST

/* FFN matrix `which` (0 gate, 1 up, 2 down; n floats) as F32: the F32 one, or
 * raw's widened when the file kept them. The caller frees it. */
static float *ffn_f32(const float *gate, const float *up, const float *down, const moe_ffn_raw *raw, int which,
                      size_t n)
{
    float *out = malloc(n * sizeof *out);
    ck_assert_ptr_nonnull(out);
    const float *f[3] = {gate, up, down};
    const unsigned char *h[3] = {raw->gate, raw->up, raw->down};
    const moe_wtype t[3] = {raw->type, raw->up_type, raw->down_type};
    if (raw->type == MOE_WT_F32) {
        ck_assert(f[which] && !h[which]);
        memcpy(out, f[which], n * sizeof *out);
    } else {
        ck_assert(h[which] && !f[which]);
        wconv_rows(out, h[which], n, t[which]);
    }
    return out;
}

/* The same for the routed experts of a layer. */
static float *experts_f32(const moe_layer_weights *L, int which, size_t n)
{
    return ffn_f32(L->exp_gate, L->exp_up, L->exp_down, &L->exp_raw, which, n);
}

static void assert_close_f16(const float *a, const float *b, size_t n, const char *what);

/* A projection's n weights in F32, allocated: its F32 form, or (read only in
 * the file's type) its raw copy widened. */
static float *proj_f32(const float *w, moe_wraw raw, size_t n)
{
    float *out = malloc(n * sizeof *out);
    ck_assert_ptr_nonnull(out);
    if (w) memcpy(out, w, n * sizeof *out);
    else wconv_rows(out, raw.raw, n, raw.type);
    return out;
}

static void assert_close_f16_proj(const float *a, const float *w, moe_wraw raw, size_t n, const char *what)
{
    float *b = proj_f32(w, raw, n);
    assert_close_f16(a, b, n, what);
    free(b);
}

static void assert_close_f16(const float *a, const float *b, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        /* F16 keeps 11 significant bits: relative error <= 2^-11, plus subnormals */
        float tol = fabsf(a[i]) * (1.0f / 2048.0f) + 6e-8f;
        ck_assert_msg(fabsf(a[i] - b[i]) <= tol, "%s[%zu]: f32 %g vs f16 %g", what, i,
                      (double)a[i], (double)b[i]);
    }
}

START_TEST(f16_equals_f32_to_f16_precision)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_F32);
    synth_params p = {.arch = "qwen2moe", .preset = "tiny", .seed = 7, .wtype = GGML_TYPE_F16};
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), 0);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    moe_load_opts file_proj = {GGUF_LOAD_MMAP, MOE_PROJ_FILE};
    ck_assert_msg(moe_model_load_opts(fx.other, &file_proj, &b, err, sizeof err) == 0, "%s", err);
    const moe_hparams *hp = &a->weights.hp;
    ck_assert(memcmp(hp, &b->weights.hp, sizeof *hp) == 0);
    size_t e = (size_t)hp->n_embd, v = (size_t)hp->n_vocab, q = (size_t)hp->n_head * hp->head_dim;
    size_t kv = (size_t)hp->n_head_kv * hp->head_dim, ff = (size_t)hp->n_ff, ne = (size_t)hp->n_expert;
    size_t sh = (size_t)hp->n_ff_shexp;
    assert_close_f16_proj(a->weights.tok_embd, b->weights.tok_embd, b->weights.tok_embd_raw, v * e, "tok_embd");
    /* the projections stay F16 in the file, read there at every batch size */
    ck_assert_ptr_null(b->weights.output);
    ck_assert_int_eq(b->weights.output_raw.type, MOE_WT_F16);
    assert_close_f16_proj(a->weights.output, b->weights.output, b->weights.output_raw, v * e, "output");
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_weights *x = &a->weights.layers[l], *y = &b->weights.layers[l];
        ck_assert(!y->wq && !y->wk && !y->wv && !y->wo);
        assert_close_f16_proj(x->wq, y->wq, y->wq_raw, q * e, "wq");
        assert_close_f16_proj(x->wk, y->wk, y->wk_raw, kv * e, "wk");
        assert_close_f16_proj(x->wo, y->wo, y->wo_raw, e * q, "wo");
        assert_close_f16(x->router, y->router, ne * e, "router");
        /* the experts stay F16 in the file, read where they are */
        ck_assert_int_eq(x->exp_raw.type, MOE_WT_F32);
        ck_assert_int_eq(y->exp_raw.type, MOE_WT_F16);
        float *gate = experts_f32(y, 0, ne * ff * e), *down = experts_f32(y, 2, ne * e * ff);
        assert_close_f16(x->exp_gate, gate, ne * ff * e, "exp_gate");
        assert_close_f16(x->exp_down, down, ne * e * ff, "exp_down");
        free(gate);
        free(down);
        /* and so does the shared expert */
        ck_assert_int_eq(y->shexp_raw.type, MOE_WT_F16);
        float *up = ffn_f32(y->shexp_gate, y->shexp_up, y->shexp_down, &y->shexp_raw, 1, sh * e);
        assert_close_f16(x->shexp_up, up, sh * e, "shexp_up");
        free(up);
        /* vectors stay F32 in an F16 file: identical */
        ck_assert(memcmp(x->bq, y->bq, q * sizeof(float)) == 0);
        ck_assert(memcmp(x->attn_norm, y->attn_norm, e * sizeof(float)) == 0);
    }
    /* nothing is converted: the embeddings' rows are widened as a batch looks
     * them up (the router stays F32, as llama.cpp's converters keep it) */
    ck_assert_ptr_null(b->weights.tok_embd);
    ck_assert_uint_eq(b->converted_bytes, 0);
    ck_assert_uint_eq(a->converted_bytes, 0);
    ck_assert(b->mapped_bytes < a->mapped_bytes);
    moe_model_free(a);
    moe_model_free(b);
    fixture_done(&fx);
}
END_TEST

/* Logits of the n rows of one forward over tokens 0..n-1 of one sequence. */
static void engine_run_rows(const moe_weights *w, int n, float *out)
{
    moe_engine_params ep = moe_engine_default_params(&w->hp);
    ep.n_threads = 2;
    moe_engine *e;
    ck_assert_msg(moe_engine_create(w, &ep, &e, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_engine_seq_reserve(e, 0, n, err, sizeof err) == 0, "%s", err);
    int32_t tok[64], pos[64], seq[64];
    uint8_t want[64];
    ck_assert_int_le(n, 64);
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)((i * 37 + 11) % w->hp.n_vocab);
        pos[i] = i;
        seq[i] = 0;
        want[i] = 1;
    }
    moe_batch b = {.n_tokens = n, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
    ck_assert_msg(moe_engine_forward(e, &b, out, err, sizeof err) == 0, "%s", err);
    moe_engine_free(e);
}

/* Up to MOE_RAW_PROJ_MAX_ROWS rows the engine reads the attention and output
 * projections where an F16 or Q8_0 file keeps them, beyond that their F32
 * conversion: with decoys (zeros) put in place of the conversions, a 1-row
 * forward still gives the model's logits to the bit and a 12-row one does not. */
START_TEST(decode_reads_projections_in_the_file_type)
{
    static const ggml_type types[2] = {GGML_TYPE_F16, GGML_TYPE_Q8_0};
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "tiny", types[_i]);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.path, &m, err, sizeof err) == 0, "%s", err);
    moe_weights decoy = m->weights;
    const moe_hparams *hp = &decoy.hp;
    ck_assert_ptr_nonnull(decoy.output_raw.raw);
    ck_assert_int_eq(decoy.output_raw.type, types[_i] == GGML_TYPE_F16 ? MOE_WT_F16 : MOE_WT_Q8_0);
    size_t big = (size_t)hp->n_vocab * hp->n_embd;
    float *zeros = calloc(big, sizeof *zeros);
    moe_layer_weights *layers = malloc((size_t)hp->n_layer * sizeof *layers);
    ck_assert(zeros && layers);
    for (int l = 0; l < hp->n_layer; l++) {
        layers[l] = m->weights.layers[l];
        ck_assert_ptr_nonnull(layers[l].wq_raw.raw);
        ck_assert_ptr_nonnull(layers[l].wo_raw.raw);
        layers[l].wq = layers[l].wk = layers[l].wv = layers[l].wo = zeros;
    }
    decoy.layers = layers;
    decoy.output = zeros;
    for (int n = 1; n <= 12; n += 11) {
        size_t nl = (size_t)n * hp->n_vocab;
        float *a = malloc(nl * sizeof *a), *b = malloc(nl * sizeof *b);
        ck_assert(a && b);
        engine_run_rows(&m->weights, n, a);
        engine_run_rows(&decoy, n, b);
        int same = memcmp(a, b, nl * sizeof *a) == 0;
        ck_assert_msg(same == (n <= MOE_RAW_PROJ_MAX_ROWS), "%d rows: logits %s", n, same ? "equal" : "differ");
        free(a);
        free(b);
    }
    free(zeros);
    free(layers);
    moe_model_free(m);
    fixture_done(&fx);
}
END_TEST

/* Logits of one engine run over m: a 500-token prompt (seq 0: some expert queues
 * reach the sgemm switch), a ragged batch of 8 sequences x 5 tokens, then 4 decode
 * steps of those 8 sequences, on 2 threads. out: (500 + 40 + 32) x n_vocab. */
static void engine_run_all(const moe_model *m, float *out)
{
    const moe_hparams *hp = &m->weights.hp;
    enum { N_PROMPT = 500, N_SEQ = 8, N_EACH = 5, N_STEPS = 4 };
    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = 2;
    ep.max_seqs = 1 + N_SEQ;
    ep.max_batch_tokens = N_PROMPT;
    ep.max_seq_len = N_PROMPT;
    ep.kv_n_blocks = (1 + N_SEQ) * ((N_PROMPT + ep.kv_block_size - 1) / ep.kv_block_size);
    moe_engine *e;
    ck_assert_msg(moe_engine_create(&m->weights, &ep, &e, err, sizeof err) == 0, "%s", err);
    for (int s = 0; s <= N_SEQ; s++)
        ck_assert_msg(moe_engine_seq_reserve(e, s, s ? N_EACH + N_STEPS : N_PROMPT, err, sizeof err) == 0, "%s", err);
    static int32_t tok[N_PROMPT], pos[N_PROMPT], seq[N_PROMPT];
    static uint8_t want[N_PROMPT];
    uint32_t r = 12345;
    for (int i = 0; i < N_PROMPT; i++) {
        r = r * 1664525u + 1013904223u;
        tok[i] = (int32_t)(r >> 8) % hp->n_vocab;
        pos[i] = i;
        seq[i] = 0;
        want[i] = 1;
    }
    moe_batch b = {.n_tokens = N_PROMPT, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
    ck_assert_msg(moe_engine_forward(e, &b, out, err, sizeof err) == 0, "%s", err);
    out += (size_t)N_PROMPT * hp->n_vocab;
    uint64_t most = 0; /* some queue of the prompt (or the dense FFN) took the sgemm path */
    for (int i = 0; i < hp->n_layer * hp->n_expert; i++)
        if (moe_engine_expert_routed(e)[i] > most) most = moe_engine_expert_routed(e)[i];
    ck_assert_uint_ge(hp->n_expert ? most : N_PROMPT, (uint64_t)tu_many_rows());
    for (int i = 0; i < N_SEQ * N_EACH; i++) {
        seq[i] = 1 + i % N_SEQ;
        pos[i] = i / N_SEQ;
    }
    b.n_tokens = N_SEQ * N_EACH;
    ck_assert_msg(moe_engine_forward(e, &b, out, err, sizeof err) == 0, "%s", err);
    out += (size_t)N_SEQ * N_EACH * hp->n_vocab;
    for (int st = 0; st < N_STEPS; st++) {
        for (int i = 0; i < N_SEQ; i++) {
            seq[i] = 1 + i;
            pos[i] = N_EACH + st;
            tok[i] = (int32_t)((st * 31 + i * 7) % hp->n_vocab);
        }
        b.n_tokens = N_SEQ;
        ck_assert_msg(moe_engine_forward(e, &b, out, err, sizeof err) == 0, "%s", err);
        out += (size_t)N_SEQ * hp->n_vocab;
    }
    moe_engine_free(e);
}

/* Whether two models give the same logits to the bit through engine_run_all. */
static int same_logits(const moe_model *a, const moe_model *b)
{
    size_t n = (size_t)(500 + 40 + 32) * (size_t)a->weights.hp.n_vocab;
    float *la = malloc(n * sizeof *la), *lb = malloc(n * sizeof *lb);
    ck_assert(la && lb);
    engine_run_all(a, la);
    engine_run_all(b, lb);
    int same = memcmp(la, lb, n * sizeof *la) == 0;
    free(la);
    free(lb);
    return same;
}

/* Rewrites src to dst with general.alignment 1 and a padding key that shifts
 * the data section until `tensor`'s address is not a multiple of `align`. */
static void rewrite_misaligned(const char *src, const char *dst, const char *tensor, uintptr_t align)
{
    int misaligned = 0;
    for (int pad = 1; pad <= 4 && !misaligned; pad++) {
        edit e = {.alignment = 1, .pad_len = pad};
        rewrite(src, dst, &e);
        gguf_file *g;
        ck_assert_int_eq(gguf_open(dst, &g, err, sizeof err), 0);
        misaligned = (uintptr_t)gguf_find_tensor(g, tensor)->data % align != 0;
        gguf_close(g);
    }
    ck_assert(misaligned);
}

/* The files of experts_narrow_equal_their_f32_widening: arch NULL is the F16
 * fixture itself (synth F16) or rewritten to BF16; the others synth writes. */
typedef struct {
    const char *arch, *preset;
    ggml_type synth;
    moe_wtype want;     /* the routed experts' (dense: the FFN's) gate type */
    int misaligned;     /* rewritten so the experts sit at odd addresses */
    int shexp;          /* a shared expert kept in the same type */
    moe_wtype down, v;  /* a mix's types of the experts' down projections and of attn_v (F32: no mix) */
} narrow_case;

static const narrow_case narrow_cases[] = {
    {NULL, NULL, GGML_TYPE_F16, MOE_WT_F16, 0, 0, MOE_WT_F32, MOE_WT_F32},
    {NULL, NULL, GGML_TYPE_BF16, MOE_WT_BF16, 0, 0, MOE_WT_F32, MOE_WT_F32},
    {"qwen3moe", "tiny", GGML_TYPE_Q8_0, MOE_WT_Q8_0, 1, 0, MOE_WT_F32, MOE_WT_F32},
    {"qwen2moe", "tiny", GGML_TYPE_Q8_0, MOE_WT_Q8_0, 0, 1, MOE_WT_F32, MOE_WT_F32},
    {"llama", "dense", GGML_TYPE_Q8_0, MOE_WT_Q8_0, 0, 0, MOE_WT_F32, MOE_WT_F32},
    {"qwen3moe", "tiny256", GGML_TYPE_Q4_K, MOE_WT_Q4_K, 1, 0, MOE_WT_Q6_K, MOE_WT_Q6_K},
    {"qwen2moe", "tiny256", GGML_TYPE_Q4_K, MOE_WT_Q4_K, 0, 1, MOE_WT_Q6_K, MOE_WT_Q6_K},
    {"olmoe", "tiny256", GGML_TYPE_Q5_K, MOE_WT_Q5_K, 0, 0, MOE_WT_Q6_K, MOE_WT_Q6_K},
    {"qwen2moe", "tiny", GGML_TYPE_Q4_0, MOE_WT_Q4_0, 1, 1, MOE_WT_F32, MOE_WT_F32},
    {"llama", "tiny", GGML_TYPE_Q4_1, MOE_WT_Q4_1, 1, 0, MOE_WT_F32, MOE_WT_F32},
    {"llama", "dense", GGML_TYPE_Q5_0, MOE_WT_Q5_0, 0, 0, MOE_WT_F32, MOE_WT_F32},
    {"qwen3moe", "tiny", GGML_TYPE_IQ4_NL, MOE_WT_IQ4_NL, 1, 0, MOE_WT_F32, MOE_WT_F32},
    /* Q4_K_M and Q5_K_M of rows that are not whole super-blocks: llama.cpp's
     * fallbacks, Q5_0 or Q5_1 and Q8_0 (Qwen1.5-MoE's files) */
    {"qwen2moe", "tiny", GGML_TYPE_Q4_K, MOE_WT_Q5_0, 0, 1, MOE_WT_Q8_0, MOE_WT_Q8_0},
    {"olmoe", "tiny", GGML_TYPE_Q5_K, MOE_WT_Q5_1, 1, 0, MOE_WT_Q8_0, MOE_WT_Q8_0},
    {"llama", "tiny256", GGML_TYPE_Q2_K, MOE_WT_Q2_K, 1, 0, MOE_WT_Q3_K, MOE_WT_Q3_K},
    {"qwen2moe", "tiny256", GGML_TYPE_Q3_K, MOE_WT_Q3_K, 0, 1, MOE_WT_Q4_K, MOE_WT_Q4_K},
    {"olmoe", "tiny256", GGML_TYPE_IQ4_XS, MOE_WT_IQ4_XS, 1, 0, MOE_WT_F32, MOE_WT_F32},
    /* Qwen1.5-MoE's shape: k-quant gate and up, the experts' down (rows of 160)
     * in Q5_0, the shared expert's in Q4_K */
    {"qwen2moe", "tiny256odd", GGML_TYPE_Q3_K, MOE_WT_Q3_K, 1, 1, MOE_WT_Q5_0, MOE_WT_Q4_K},
};

/* Writes case c's file to src (fx->other is scratch), or names the fixture. */
static void narrow_case_file(fixture *fx, const narrow_case *c, char *src, size_t cap)
{
    snprintf(src, cap, "%s/narrow.gguf", fx->dir);
    if (!c->arch && c->synth == GGML_TYPE_F16) {
        snprintf(src, cap, "%s", fx->path);
    } else if (!c->arch) {
        edit eb = {.to_f32 = 1};
        rewrite(fx->path, fx->other, &eb);  /* F16 -> F32 ... */
        edit e2 = {.to_bf16 = 1};
        rewrite(fx->other, src, &e2);       /* ... -> BF16 */
    } else {
        synth_params p = {.arch = c->arch, .preset = c->preset, .seed = 9, .wtype = c->synth};
        ck_assert_msg(synth_write(&p, fx->other, err, sizeof err) == 0, "%s", err);
        edit none = {0};
        if (c->misaligned) rewrite_misaligned(fx->other, src, "blk.1.ffn_up_exps.weight", 2);
        else rewrite(fx->other, src, &none);
    }
}

/* The FFNs read where the file keeps them (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
 * Q6_K; routed experts, shared expert, dense FFN) give the very bits of the same
 * weights widened to F32 at load: each file against its exact F32 rewrite,
 * through prefill, a ragged batch and decode (narrow_cases). */
START_TEST(experts_narrow_equal_their_f32_widening)
{
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "tiny", GGML_TYPE_F16);
    for (size_t ci = 0; ci < sizeof narrow_cases / sizeof narrow_cases[0]; ci++) {
        const narrow_case *c = &narrow_cases[ci];
        char src[160];
        narrow_case_file(&fx, c, src, sizeof src);
        edit e = {.to_f32 = 1};
        rewrite(src, fx.other, &e);
        moe_model *a, *b;
        ck_assert_msg(moe_model_load(src, &a, err, sizeof err) == 0, "%s", err);
        ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
        const moe_layer_weights *la0 = &a->weights.layers[0], *lb0 = &b->weights.layers[0];
        ck_assert_int_eq(a->weights.hp.n_expert ? la0->exp_raw.type : la0->ffn_raw.type, c->want);
        if (c->shexp) ck_assert_int_eq(la0->shexp_raw.type, c->want);
        if (c->down != MOE_WT_F32) {
            ck_assert_int_eq(la0->exp_raw.up_type, c->want);
            ck_assert_int_eq(la0->exp_raw.down_type, c->down);
            ck_assert_int_eq(la0->wv_raw.type, c->v);
            ck_assert_int_eq(la0->wq_raw.type, c->want);
        }
        ck_assert_int_eq(lb0->exp_raw.type, MOE_WT_F32);
        ck_assert_int_eq(lb0->shexp_raw.type, MOE_WT_F32);
        ck_assert_int_eq(lb0->ffn_raw.type, MOE_WT_F32);
        if (c->misaligned) ck_assert_uint_ne((uintptr_t)a->weights.layers[1].exp_raw.up % 2, 0);
        size_t n = (size_t)(500 + 40 + 32) * (size_t)a->weights.hp.n_vocab;
        float *la = malloc(n * sizeof *la), *lb = malloc(n * sizeof *lb);
        ck_assert(la && lb);
        engine_run_all(a, la);
        engine_run_all(b, lb);
        size_t diff = 0;
        for (size_t i = 0; i < n; i++) diff += memcmp(&la[i], &lb[i], sizeof(float)) != 0;
        ck_assert_msg(diff == 0, "case %zu (%s): %zu of %zu logits differ", ci, moe_wtype_name(c->want), diff, n);
        /* and with the projections read only in the file's type (MOE_PROJ_FILE) */
        moe_model *af;
        moe_load_opts file_proj = {GGUF_LOAD_MMAP, MOE_PROJ_FILE};
        ck_assert_msg(moe_model_load_opts(src, &file_proj, &af, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(af->proj_f32, 0);
        ck_assert(!af->weights.layers[0].wq || !af->weights.layers[0].wq_raw.raw);
        engine_run_all(af, la);
        for (size_t i = 0; i < n; i++) diff += memcmp(&la[i], &lb[i], sizeof(float)) != 0;
        ck_assert_msg(diff == 0, "case %zu (%s), projections in the file's type: %zu of %zu logits differ", ci,
                      moe_wtype_name(c->want), diff, n);
        moe_model_free(af);
        free(la);
        free(lb);
        moe_model_free(a);
        moe_model_free(b);
        if (strcmp(src, fx.path)) unlink(src);
    }
    fixture_done(&fx);
}
END_TEST

START_TEST(bf16_equals_f32_to_bf16_precision)
{
    fixture fx;
    fixture_synth(&fx, "olmoe", "tiny", GGML_TYPE_F32);
    edit e = {.to_bf16 = 1};
    rewrite(fx.path, fx.other, &e);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
    const moe_hparams *hp = &a->weights.hp;
    size_t e_ = (size_t)hp->n_embd, v = (size_t)hp->n_vocab, ne = (size_t)hp->n_expert;
    size_t q = (size_t)hp->n_head * hp->head_dim, kv = (size_t)hp->n_head_kv * hp->head_dim;
    ck_assert_int_eq(b->weights.layers[1].exp_raw.type, MOE_WT_BF16);
    float *up = experts_f32(&b->weights.layers[1], 1, ne * (size_t)hp->n_ff * e_);
    float *out = proj_f32(b->weights.output, b->weights.output_raw, v * e_);
    float *wv = proj_f32(b->weights.layers[0].wv, b->weights.layers[0].wv_raw, kv * e_);
    const float *pairs[][2] = {
        {a->weights.tok_embd, b->weights.tok_embd}, {a->weights.output, out},
        {a->weights.layers[1].exp_up, up},
        {a->weights.layers[0].wv, wv},
    };
    size_t sizes[] = {v * e_, v * e_, ne * (size_t)hp->n_ff * e_, kv * e_};
    for (int p = 0; p < 4; p++)
        for (size_t i = 0; i < sizes[p]; i++) {
            float x = pairs[p][0][i], y = pairs[p][1][i];
            /* BF16 keeps 8 significant bits: relative error <= 2^-8 */
            ck_assert_msg(fabsf(x - y) <= fabsf(x) / 256.0f, "tensor %d [%zu]: %g vs %g", p, i,
                          (double)x, (double)y);
        }
    /* the full q/k norms of OLMoE are vectors: still F32, used in place */
    ck_assert(memcmp(a->weights.layers[0].q_norm, b->weights.layers[0].q_norm, q * sizeof(float)) == 0);
    /* the embeddings, output and projections are converted (a small model: by
     * MOE_PROJ_AUTO), the experts are not */
    ck_assert_int_eq(b->proj_f32, 1);
    ck_assert_uint_gt(b->converted_bytes, 4 * 2 * v * e_);
    ck_assert_uint_lt(b->converted_bytes, 4 * (2 * v * e_ + ne * 3 * (size_t)hp->n_ff * e_));
    free(up);
    free(out);
    free(wv);
    moe_model_free(a);
    moe_model_free(b);
    fixture_done(&fx);
}
END_TEST

/* With general.alignment 1 the F32 data may sit at any byte offset: the loader
 * copies it (UBSan would flag a misaligned float load otherwise). */
START_TEST(misaligned_f32_is_copied)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    moe_model *a;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    rewrite_misaligned(fx.path, fx.other, "token_embd.weight", 4);
    moe_model *b;
    ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_gt(b->converted_bytes, 0);
    ck_assert_uint_eq((uintptr_t)b->weights.layers[1].exp_down % 4, 0);
    const moe_hparams *hp = &a->weights.hp;
    size_t n = (size_t)hp->n_expert * hp->n_ff * hp->n_embd;
    ck_assert(memcmp(a->weights.layers[1].exp_down, b->weights.layers[1].exp_down, n * 4) == 0);
    ck_assert(memcmp(a->weights.output, b->weights.output, (size_t)hp->n_vocab * hp->n_embd * 4) == 0);
    moe_model_free(a);
    moe_model_free(b);
    fixture_done(&fx);
}
END_TEST

/* 16-bit experts at odd addresses (a file aligned to 1 byte) cannot be read in
 * place: they are converted to F32 like the rest, to the same values. */
START_TEST(misaligned_16bit_experts_are_converted)
{
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "tiny", GGML_TYPE_F16);
    rewrite_misaligned(fx.path, fx.other, "blk.0.ffn_gate_exps.weight", 2);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(a->weights.layers[0].exp_raw.type, MOE_WT_F16);
    ck_assert_int_eq(b->weights.layers[0].exp_raw.type, MOE_WT_F32);
    const moe_hparams *hp = &a->weights.hp;
    size_t n = (size_t)hp->n_expert * hp->n_ff * hp->n_embd;
    for (int w = 0; w < 3; w++) {
        float *x = experts_f32(&a->weights.layers[0], w, n), *y = experts_f32(&b->weights.layers[0], w, n);
        ck_assert(memcmp(x, y, n * sizeof *x) == 0);
        free(x);
        free(y);
    }
    moe_model_free(a);
    moe_model_free(b);
    fixture_done(&fx);
}
END_TEST

START_TEST(tied_output_and_name_from_stem)
{
    fixture fx;
    fixture_synth(&fx, "olmoe", "tiny", GGML_TYPE_F32);
    edit e = {.drop_tensor = "output.weight", .drop_key = "general.name"};
    rewrite(fx.path, fx.other, &e);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.other, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(m->tied_output, 1);
    ck_assert_ptr_eq(m->weights.output, m->weights.tok_embd);
    ck_assert_str_eq(m->name, "variant");
    moe_model_free(m);
    fixture_done(&fx);
}
END_TEST

/* Hostile files ------------------------------------------------------------- */

START_TEST(missing_tensor_is_named)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_F32);
    edit e1 = {.drop_tensor = "blk.1.ffn_up_exps.weight"};
    ck_assert_err_has(edited_error(&fx, &e1), "blk.1.ffn_up_exps.weight");
    edit e2 = {.drop_tensor = "blk.0.attn_k.bias"};
    ck_assert_err_has(edited_error(&fx, &e2), "blk.0.attn_k.bias");
    edit e3 = {.drop_tensor = "blk.1.ffn_gate_inp_shexp.weight"};
    ck_assert_err_has(edited_error(&fx, &e3), "blk.1.ffn_gate_inp_shexp.weight");
    edit e4 = {.drop_tensor = "token_embd.weight"};
    ck_assert_err_has(edited_error(&fx, &e4), "token_embd.weight");
    fixture_done(&fx);
}
END_TEST

START_TEST(wrong_shape_names_expected_and_found)
{
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "tiny", GGML_TYPE_F32);
    edit e1 = {.halve_tensor = "blk.1.ffn_down_exps.weight"};
    const char *msg = edited_error(&fx, &e1);
    ck_assert_err_has(msg, "blk.1.ffn_down_exps.weight");
    ck_assert_err_has(msg, "[96, 64, 8]");
    ck_assert_err_has(msg, "[96, 64, 4]");
    edit e2 = {.halve_tensor = "blk.0.attn_q_norm.weight"};   /* per head: 32 wide */
    msg = edited_error(&fx, &e2);
    ck_assert_err_has(msg, "blk.0.attn_q_norm.weight");
    ck_assert_err_has(msg, "[32]");
    ck_assert_err_has(msg, "[16]");
    edit e3 = {.halve_tensor = "output.weight"};
    ck_assert_err_has(edited_error(&fx, &e3), "output.weight");
    fixture_done(&fx);
}
END_TEST

/* Overwrites the ggml type of tensor `name` in the file's tensor infos. */
static void patch_tensor_type(const char *path, const char *name, uint32_t type)
{
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f), len = strlen(name);
    char *at = NULL;
    for (size_t i = 8; i + len + 16 < n && !at; i++) {
        uint64_t slen;
        memcpy(&slen, buf + i - 8, 8);
        if (slen == len && !memcmp(buf + i, name, len)) at = buf + i + len;
    }
    ck_assert_msg(at != NULL, "tensor info of %s not found", name);
    uint32_t n_dims;
    memcpy(&n_dims, at, 4);
    long off = (long)(at - buf) + 4 + 8 * (long)n_dims;
    ck_assert_int_eq(fseek(f, off, SEEK_SET), 0);
    ck_assert_uint_eq(fwrite(&type, 4, 1, f), 1);
    fclose(f);
}

/* A file that keeps each expert's matrices as tensors of their own (Mixtral
 * files before April 2024) loads with the experts copied, byte for byte, into
 * one block per layer and matrix; a missing expert or experts of one matrix in
 * different types are refused by name. */
START_TEST(split_experts_are_merged)
{
    fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "%s", tu_tmpdir());
    snprintf(fx.path, sizeof fx.path, "%s/model.gguf", fx.dir);
    snprintf(fx.other, sizeof fx.other, "%s/variant.gguf", fx.dir);
    for (int q = 0; q < 2; q++) {
        synth_params p = {.arch = "llama", .preset = q ? "tiny256" : "tiny", .seed = 7,
                          .wtype = q ? GGML_TYPE_Q4_K : GGML_TYPE_F32, .split_experts = 1};
        ck_assert_msg(synth_write(&p, fx.path, err, sizeof err) == 0, "%s", err);
        moe_model *m;
        ck_assert_msg(moe_model_load(fx.path, &m, err, sizeof err) == 0, "%s", err);
        const moe_hparams *hp = &m->weights.hp;
        ck_assert_uint_gt(m->merged_bytes, 0);
        ck_assert_ptr_null(gguf_find_tensor(m->gguf, "blk.1.ffn_down_exps.weight"));
        for (int il = 0; il < hp->n_layer; il++) {
            const moe_layer_weights *L = &m->weights.layers[il];
            const void *base[3] = {q ? (const void *)L->exp_raw.gate : (const void *)L->exp_gate,
                                   q ? (const void *)L->exp_raw.up : (const void *)L->exp_up,
                                   q ? (const void *)L->exp_raw.down : (const void *)L->exp_down};
            static const char *const mat[3] = {"gate", "up", "down"};
            for (int i = 0; i < 3; i++)
                for (int x = 0; x < hp->n_expert; x++) {
                    char nm[64];
                    snprintf(nm, sizeof nm, "blk.%d.ffn_%s.%d.weight", il, mat[i], x);
                    const gguf_tensor *t = gguf_find_tensor(m->gguf, nm);
                    ck_assert_ptr_nonnull(t);
                    ck_assert_msg(memcmp((const char *)base[i] + (size_t)x * t->nbytes, t->data, t->nbytes) == 0,
                                  "%s differs in the merged block", nm);
                }
        }
        if (q) ck_assert_int_eq(m->weights.layers[0].exp_raw.down_type, MOE_WT_Q6_K);
        moe_model_free(m);
    }
    edit e = {.drop_tensor = "blk.1.ffn_up.3.weight"};
    rewrite(fx.path, fx.other, &e);
    const char *msg = load_error(fx.other);
    ck_assert_err_has(msg, "blk.1.ffn_up.3.weight");
    synth_params p = {.arch = "llama", .preset = "tiny", .seed = 7, .split_experts = 1};
    ck_assert_msg(synth_write(&p, fx.path, err, sizeof err) == 0, "%s", err);
    patch_tensor_type(fx.path, "blk.0.ffn_down.2.weight", GGML_TYPE_F16);
    msg = load_error(fx.path);
    ck_assert_err_has(msg, "blk.0.ffn_down.2.weight");
    ck_assert_err_has(msg, "share a type");
    fixture_done(&fx);
}
END_TEST

/* src written as n_parts files named as gguf-split names them,
 * PREFIX-0000i-of-0000n.gguf: the first with every key, all with split.no
 * (0-based, part `wrong_no` given a wrong one) and split.count, the tensors
 * dealt out in file order. */
static void split_write(const char *src, const char *prefix, int n_parts, int wrong_no)
{
    gguf_file *f;
    ck_assert_msg(gguf_open(src, &f, err, sizeof err) == 0, "%s", err);
    int64_t nt = gguf_n_tensors(f);
    for (int p = 0; p < n_parts; p++) {
        gguf_writer *w = gguf_writer_create();
        ck_assert_ptr_nonnull(w);
        for (int64_t i = 0; p == 0 && i < gguf_n_kv(f); i++) {
            gguf_str k = gguf_kv_key(f, i);
            char key[256];
            ck_assert_uint_lt(k.len, sizeof key);
            memcpy(key, k.data, k.len);
            key[k.len] = 0;
            ck_assert_int_eq(gguf_writer_copy_kv(w, f, key), 0);
        }
        ck_assert_int_eq(gguf_writer_set_u32(w, "split.no", (uint32_t)(p == wrong_no ? p + 1 : p)), 0);
        ck_assert_int_eq(gguf_writer_set_u32(w, "split.count", (uint32_t)n_parts), 0);
        for (int64_t i = nt * p / n_parts; i < nt * (p + 1) / n_parts; i++) {
            const gguf_tensor *t = gguf_get_tensor(f, i);
            char name[256];
            ck_assert_uint_lt(t->name.len, sizeof name);
            memcpy(name, t->name.data, t->name.len);
            name[t->name.len] = 0;
            ck_assert_int_eq(gguf_writer_add_tensor(w, name, t->type, t->n_dims, t->ne, t->data), 0);
        }
        char path[256];
        snprintf(path, sizeof path, "%s-%05d-of-%05d.gguf", prefix, p + 1, n_parts);
        ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
        gguf_writer_free(w);
    }
    gguf_close(f);
}

/* A model split by gguf-split loads from its first part, with the same logits to
 * the bit as the whole file; the other parts, a missing part, a part that says
 * it is another, and a first part not named as gguf-split names it are refused
 * with what to do. */
START_TEST(split_files_load_from_the_first_part)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_Q8_0);
    char prefix[160], first[192], second[192], third[192], renamed[192];
    snprintf(prefix, sizeof prefix, "%s/split", fx.dir);
    snprintf(first, sizeof first, "%s-00001-of-00003.gguf", prefix);
    snprintf(second, sizeof second, "%s-00002-of-00003.gguf", prefix);
    snprintf(third, sizeof third, "%s-00003-of-00003.gguf", prefix);
    snprintf(renamed, sizeof renamed, "%s/first.gguf", fx.dir);
    split_write(fx.path, prefix, 3, -1);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load(first, &b, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(a->n_parts, 1);
    ck_assert_int_eq(b->n_parts, 3);
    ck_assert_int_eq(gguf_n_tensors(b->gguf) < gguf_n_tensors(a->gguf), 1);
    ck_assert(same_logits(a, b));
    moe_model_free(a);
    moe_model_free(b);
    ck_assert_err_has(load_error(second), "load its first part");
    ck_assert_int_eq(rename(first, renamed), 0);
    ck_assert_err_has(load_error(renamed), "cannot be found");
    ck_assert_int_eq(unlink(third), 0);
    ck_assert_int_eq(rename(renamed, first), 0);
    ck_assert_err_has(load_error(first), "part 3 of 3");
    split_write(fx.path, prefix, 3, 1);
    ck_assert_err_has(load_error(first), "not part 2 of 3");
    unlink(first);
    unlink(second);
    unlink(third);
    fixture_done(&fx);
}
END_TEST

START_TEST(unsupported_tensor_type_is_named)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    patch_tensor_type(fx.path, "blk.1.attn_v.weight", 9);    /* q8_1: not read */
    const char *msg = load_error(fx.path);
    ck_assert_err_has(msg, "blk.1.attn_v.weight");
    ck_assert_err_has(msg, "q8_1");
    fixture_done(&fx);
    /* a type that is read, but rows of 64 are not whole super-blocks of 256 */
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    patch_tensor_type(fx.path, "blk.1.attn_v.weight", 12);
    msg = load_error(fx.path);
    ck_assert_err_has(msg, "blk.1.attn_v.weight");
    ck_assert_err_has(msg, "whole blocks of 256");
    fixture_done(&fx);
}
END_TEST

START_TEST(wrong_key_types_and_values)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    edit e1 = {.set_key = "llama.block_count", .set_kind = EDIT_STR, .set_str = "two"};
    ck_assert_err_has(edited_error(&fx, &e1), "llama.block_count");
    edit e2 = {.set_key = "llama.expert_used_count", .set_kind = EDIT_U32, .set_u32 = 9};
    ck_assert_err_has(edited_error(&fx, &e2), "expert_used_count");
    edit e3 = {.set_key = "llama.attention.head_count", .set_kind = EDIT_U32, .set_u32 = 0};
    ck_assert_err_has(edited_error(&fx, &e3), "head_count");
    edit e4 = {.set_key = "llama.attention.head_count_kv", .set_kind = EDIT_U32, .set_u32 = 3};
    ck_assert_err_has(edited_error(&fx, &e4), "multiple");
    edit e5 = {.set_key = "llama.attention.layer_norm_rms_epsilon", .set_kind = EDIT_F32, .set_f32 = -1};
    ck_assert_err_has(edited_error(&fx, &e5), "layer_norm_rms_epsilon");
    edit e6 = {.set_key = "llama.rope.dimension_count", .set_kind = EDIT_U32, .set_u32 = 7};
    ck_assert_err_has(edited_error(&fx, &e6), "rope.dimension_count");
    edit e7 = {.set_key = "llama.vocab_size", .set_kind = EDIT_U32, .set_u32 = 5};
    ck_assert_err_has(edited_error(&fx, &e7), "vocab_size");
    edit e8 = {.drop_key = "llama.context_length"};
    ck_assert_err_has(edited_error(&fx, &e8), "missing key llama.context_length");
    edit e9 = {.drop_key = "llama.expert_used_count"};
    ck_assert_err_has(edited_error(&fx, &e9), "expert_used_count");
    fixture_done(&fx);
}
END_TEST

/* A quantized model with a tied output (token_embd also the output matrix),
 * its projections and embeddings read only in the file's type: the logits of
 * every row, past the sgemm switch, are those of the F32 rewrite to the bit;
 * and so with only the output tied to F32 embeddings (an F32 token_embd beside
 * the file-type projections). */
START_TEST(tied_output_beside_file_type_projections)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_Q8_0);
    char tied[160];
    snprintf(tied, sizeof tied, "%s/tied.gguf", fx.dir);
    edit drop = {.drop_tensor = "output.weight"};
    rewrite(fx.path, tied, &drop);
    edit f32 = {.to_f32 = 1};
    rewrite(tied, fx.other, &f32);
    moe_model *a, *b;
    moe_load_opts file_proj = {GGUF_LOAD_MMAP, MOE_PROJ_FILE};
    ck_assert_msg(moe_model_load_opts(tied, &file_proj, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
    ck_assert(a->tied_output && !a->weights.layers[0].wq && !a->weights.tok_embd && !a->weights.output);
    ck_assert(a->weights.output_raw.raw == a->weights.tok_embd_raw.raw);
    ck_assert(same_logits(a, b));
    moe_model_free(a);
    /* token_embd in F32, the rest Q8_0 */
    char mixed[160];
    snprintf(mixed, sizeof mixed, "%s/mixed.gguf", fx.dir);
    edit embd_f32 = {.to_f32_tensor = "token_embd.weight"};
    rewrite(tied, mixed, &embd_f32);
    ck_assert_msg(moe_model_load_opts(mixed, &file_proj, &a, err, sizeof err) == 0, "%s", err);
    ck_assert(a->tied_output && !a->weights.layers[0].wq && a->weights.output == a->weights.tok_embd);
    ck_assert(same_logits(a, b));
    moe_model_free(a);
    unlink(mixed);
    moe_model_free(b);
    unlink(tied);
    fixture_done(&fx);
}
END_TEST

/* Qwen1.5-MoE files converted before the expert width keys existed: the widths
 * come from the gate tensors, and the model is the one with the keys, to the
 * bit. Without the keys and the tensor to take them from, the error says so. */
START_TEST(expert_widths_from_tensors_without_keys)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_F32);
    char mid[160];
    snprintf(mid, sizeof mid, "%s/mid.gguf", fx.dir);
    edit e1 = {.drop_key = "qwen2moe.expert_feed_forward_length"};
    rewrite(fx.path, mid, &e1);
    edit e2 = {.drop_key = "qwen2moe.expert_shared_feed_forward_length"};
    rewrite(mid, fx.other, &e2);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load(fx.other, &b, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(b->weights.hp.n_ff, a->weights.hp.n_ff);
    ck_assert_int_eq(b->weights.hp.n_ff_shexp, a->weights.hp.n_ff_shexp);
    ck_assert_int_ne(a->weights.hp.n_ff, a->weights.hp.n_ff_shexp);
    ck_assert(same_logits(a, b));
    moe_model_free(a);
    moe_model_free(b);
    edit e3 = {.drop_key = "qwen2moe.expert_shared_feed_forward_length", .drop_tensor = "blk.0.ffn_gate_shexp.weight"};
    rewrite(fx.path, fx.other, &e3);
    const char *msg = load_error(fx.other);
    ck_assert_err_has(msg, "expert_shared_feed_forward_length");
    unlink(mid);
    fixture_done(&fx);
}
END_TEST

START_TEST(absurd_dims_are_rejected_before_use)
{
    fixture fx;
    fixture_synth(&fx, "olmoe", "tiny", GGML_TYPE_F32);
    static const struct { const char *key; uint32_t v; } cases[] = {
        {"olmoe.embedding_length", 0x7fffffffu},
        {"olmoe.block_count", 1000000},
        {"olmoe.expert_count", 4000000000u},
        {"olmoe.feed_forward_length", 0xffffffffu},
        {"olmoe.attention.head_count", 1u << 30},
        {"olmoe.attention.key_length", 1u << 31},
        {"olmoe.context_length", 0},
        {"olmoe.expert_count", 0},          /* olmoe cannot be dense */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        edit e = {.set_key = cases[i].key, .set_kind = EDIT_U32, .set_u32 = cases[i].v};
        ck_assert_err_has(edited_error(&fx, &e), cases[i].key);
    }
    /* a plausible but wrong size: caught by the tensor shapes */
    edit e = {.set_key = "olmoe.embedding_length", .set_kind = EDIT_U32, .set_u32 = 128};
    ck_assert_err_has(edited_error(&fx, &e), "expected shape");
    fixture_done(&fx);
}
END_TEST

START_TEST(unknown_architecture_lists_the_supported)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    edit e1 = {.set_key = "general.architecture", .set_kind = EDIT_STR, .set_str = "gptj"};
    const char *msg = edited_error(&fx, &e1);
    ck_assert_err_has(msg, "gptj");
    ck_assert_err_has(msg, "llama, qwen2moe, olmoe, qwen3moe");
    edit e2 = {.drop_key = "general.architecture"};
    ck_assert_err_has(edited_error(&fx, &e2), "general.architecture");
    fixture_done(&fx);
}
END_TEST

START_TEST(not_a_model_file)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    load_error("/nonexistent/model.gguf");
    FILE *f = fopen(fx.other, "wb");
    ck_assert_ptr_nonnull(f);
    fputs("definitely not GGUF", f);
    fclose(f);
    load_error(fx.other);
    /* the file cut in half: the reader sees it, not the loader */
    gguf_file *g;
    ck_assert_int_eq(gguf_open(fx.path, &g, err, sizeof err), 0);
    size_t half = gguf_file_size(g) / 2;
    gguf_close(g);
    ck_assert_int_eq(truncate(fx.path, (off_t)half), 0);
    load_error(fx.path);
    fixture_done(&fx);
}
END_TEST

/* --weights copy: the same bytes in other memory, the same weights, read-only, and
 * the same errors for files that are not models. */
START_TEST(copy_mode_equals_mmap)
{
    fixture fx;
    fixture_synth(&fx, "qwen2moe", "tiny", GGML_TYPE_F32);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load(fx.path, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load_mode(fx.path, GGUF_LOAD_COPY, &b, err, sizeof err) == 0, "%s", err);
    ck_assert(!a->copied && b->copied);
    ck_assert_uint_eq(a->mapped_bytes, b->mapped_bytes);
    const gguf_tensor *ta = gguf_find_tensor(a->gguf, "blk.1.ffn_down_exps.weight");
    const gguf_tensor *tb = gguf_find_tensor(b->gguf, "blk.1.ffn_down_exps.weight");
    ck_assert(ta && tb && ta->data != tb->data && ta->nbytes == tb->nbytes);
    ck_assert(memcmp(ta->data, tb->data, (size_t)ta->nbytes) == 0);
    ck_assert(in_mapping(b, b->weights.layers[1].exp_down));
    const moe_hparams *h = &a->weights.hp;
    size_t n_out = (size_t)h->n_vocab * (size_t)h->n_embd;
    ck_assert(memcmp(a->weights.output, b->weights.output, n_out * sizeof(float)) == 0);
    ck_assert_str_eq(a->name, b->name);
    moe_model_free(a);
    moe_model_free(b);

    /* not models: the same refusals as mapping them */
    moe_model *m = (moe_model *)1;
    ck_assert_int_eq(moe_model_load_mode("/nonexistent/model.gguf", GGUF_LOAD_COPY, &m, err, sizeof err), -1);
    ck_assert_ptr_null(m);
    ck_assert_err_has(err, "cannot open");
    ck_assert_int_eq(moe_model_load_mode(fx.dir, GGUF_LOAD_COPY, &m, err, sizeof err), -1);
    ck_assert_err_has(err, "not a regular file");
    FILE *f = fopen(fx.other, "wb");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    ck_assert_int_eq(moe_model_load_mode(fx.other, GGUF_LOAD_COPY, &m, err, sizeof err), -1);
    ck_assert_err_has(err, "empty file");
    gguf_file *g;
    ck_assert_int_eq(gguf_open(fx.path, &g, err, sizeof err), 0);
    size_t half = gguf_file_size(g) / 2;
    gguf_close(g);
    ck_assert_int_eq(truncate(fx.path, (off_t)half), 0);
    char want[sizeof err];
    load_error(fx.path);
    snprintf(want, sizeof want, "%s", err);
    ck_assert_int_eq(moe_model_load_mode(fx.path, GGUF_LOAD_COPY, &m, err, sizeof err), -1);
    ck_assert_str_eq(err, want);
    fixture_done(&fx);
}
END_TEST

/* The smaps parser reads the field of the mapping asked for and no other: a
 * longer name is not the field, a malformed value or a field the entry lacks
 * is -1 (not the next entry's value). */
START_TEST(smaps_field_of_one_mapping)
{
    static const char text[] =
        "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/daemon\n"
        "Size:                328 kB\n"
        "FilePmdMapped:         0 kB\n"
        "7f0000000000-7f0000400000 r--p 00000000 fd:01 42 /models/m.gguf\n"
        "Size:               4096 kB\n"
        "FilePmdMappedX:        7 kB\n"
        "FilePmdMapped:      2048 kB\n"
        "VmFlags: rd mr mw me hg\n"
        "7f0000400000-7f0000600000 r--p 00000000 fd:01 43 /models/n.gguf\n"
        "FilePmdMapped:      junk\n"
        "AnonHugePages:        12 kB\n"
        "7f0000600000-7f0000800000 r--p 00000000 fd:01 44 /models/o.gguf\n"
        "Size:                  8 kB\n";
    struct { uintptr_t start; const char *field; long want; } cases[] = {
        {0x7f0000000000, "FilePmdMapped", 2048}, {0x400000, "FilePmdMapped", 0},
        {0x400000, "Size", 328},                 {0x7f0000400000, "FilePmdMapped", -1},
        {0x7f0000400000, "AnonHugePages", 12},   {0x7f0000000000, "AnonHugePages", -1},
        {0x7f0000600000, "FilePmdMapped", -1},   {0x7f0000600000, "Size", 8},
        {0x1000, "Size", -1},                    {0x7f0000000000, "FilePmd", -1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        FILE *f = fmemopen((void *)text, sizeof text - 1, "r");
        ck_assert_ptr_nonnull(f);
        long kb = pages_smaps_field_kb(f, cases[i].start, cases[i].field);
        fclose(f);
        ck_assert_msg(kb == cases[i].want, "%#lx %s: %ld, want %ld", (unsigned long)cases[i].start,
                      cases[i].field, kb, cases[i].want);
    }
    /* a path of 3000 bytes made of "ab-": wherever the reads split it, what follows
     * a split is not a header */
    char big[4096];
    int n = snprintf(big, sizeof big, "7f0000800000-7f0000a00000 r--p 00000000 fd:01 45 /");
    for (int i = 0; i < 1000; i++) n += snprintf(big + n, sizeof big - (size_t)n, "ab-");
    n += snprintf(big + n, sizeof big - (size_t)n, "\nFilePmdMapped:      2048 kB\n");
    FILE *f = fmemopen(big, (size_t)n, "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(pages_smaps_field_kb(f, 0x7f0000800000, "FilePmdMapped"), 2048);
    fclose(f);
}
END_TEST

/* Free memory is MemAvailable or less (a cgroup limit can only lower it), and
 * THP is on unless the kernel's setting says [never]. */
START_TEST(free_memory_and_thp_as_the_kernel_says)
{
    FILE *f = fopen("/proc/meminfo", "r");
    ck_assert_ptr_nonnull(f);
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    fclose(f);
    ck_assert_int_gt(kb, 0);
    size_t avail = pages_mem_available();
    ck_assert_uint_gt(avail, 0);
    /* memory moves between the two reads: allow 256 MiB */
    ck_assert_msg(avail <= (size_t)kb * 1024 + ((size_t)256 << 20), "%zu > MemAvailable %lld kB", avail, kb);
    f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) {
        ck_assert(!pages_thp_enabled());
        return;
    }
    ck_assert_ptr_nonnull(fgets(line, sizeof line, f));
    fclose(f);
    ck_assert_int_eq(pages_thp_enabled(), strstr(line, "[never]") == NULL);
}
END_TEST

/* Holds every page of a file in the page cache as a 4 KiB folio, mapped, so that
 * nothing can drop it: what a file read through small mappings looks like. */
static void *pin_small_pages(const char *path, size_t *size)
{
    int fd = open(path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    struct stat st;
    ck_assert_int_eq(fstat(fd, &st), 0);
    *size = (size_t)st.st_size;
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    char *p = mmap(NULL, *size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    ck_assert(p != MAP_FAILED);
    (void)madvise(p, *size, MADV_RANDOM); /* no readahead: one 4 KiB folio a fault */
    volatile char sum = 0;
    for (size_t i = 0; i < *size; i += 4096) sum = (char)(sum + p[i]);
    (void)sum;
    return p;
}

/* --weights auto against --weights mmap on the same file, held in 4 KiB pages.
 * Each branch follows what the kernel reported to the mmap load: where it
 * reported 4 KiB pages, the file (F32, or F16 whose experts are read in place)
 * is copied into huge pages when THP is on and memory allows; the weights are
 * the same bytes either way. */
static void auto_against_mmap(int f16)
{
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "small", f16);
    size_t size;
    void *pin = pin_small_pages(fx.path, &size);
    ck_assert_uint_gt(size, (size_t)4 << 20);
    moe_model *a, *b;
    ck_assert_msg(moe_model_load_mode(fx.path, GGUF_LOAD_MMAP, &a, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(moe_model_load_mode(fx.path, GGUF_LOAD_AUTO, &b, err, sizeof err) == 0, "%s", err);
    const char *pa = gguf_placement(a->gguf), *pb = gguf_placement(b->gguf);
    ck_assert(!a->copied);
    if (strstr(pa, "4 KiB")) {
        int can_copy = pages_thp_enabled() && pages_mem_available() / 2 >= size;
        ck_assert_msg(b->copied == can_copy, "f16 %d: auto gave '%s' after mmap's '%s'", f16, pb, pa);
        ck_assert(can_copy ? strstr(pb, "copied into huge pages") != NULL : strstr(pb, "4 KiB") != NULL);
    } else {
        /* the kernel did not say (no FilePmdMapped), or mapped 2 MiB anyway */
        ck_assert_msg(!strcmp(pa, "mapped") || strstr(pa, "2 MiB"), "%s", pa);
        ck_assert(!b->copied);
    }
    const moe_hparams *h = &a->weights.hp;
    size_t n_exp = (size_t)h->n_expert * (size_t)h->n_ff * (size_t)h->n_embd;
    float *da = experts_f32(&a->weights.layers[1], 2, n_exp), *db = experts_f32(&b->weights.layers[1], 2, n_exp);
    ck_assert(memcmp(da, db, n_exp * sizeof(float)) == 0);
    free(da);
    free(db);
    size_t n_out = (size_t)h->n_vocab * (size_t)h->n_embd;
    float *oa = proj_f32(a->weights.output, a->weights.output_raw, n_out);
    float *ob = proj_f32(b->weights.output, b->weights.output_raw, n_out);
    ck_assert(memcmp(oa, ob, n_out * sizeof(float)) == 0);
    free(oa);
    free(ob);
    moe_model_free(a);
    moe_model_free(b);
    munmap(pin, size);
    fixture_done(&fx);
}

/* gguf_page_in clamps to the file and leaves every page of the range in memory,
 * where before it the clean pages had been dropped from the page cache. */
START_TEST(page_in_reads_the_range)
{
    fixture fx;
    fixture_synth(&fx, "qwen3moe", "small", GGML_TYPE_F32);
    int fd = open(fx.path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(fdatasync(fd), 0); /* dirty pages cannot be dropped */
    gguf_file *f;
    ck_assert_msg(gguf_open_mode(fx.path, GGUF_LOAD_MMAP, &f, err, sizeof err) == 0, "%s", err);
    size_t size = gguf_file_size(f);
    ck_assert_uint_eq(gguf_page_in(f, size, 4096), 0);
    ck_assert_uint_eq(gguf_page_in(f, 0, 0), 0);
    ck_assert_uint_eq(gguf_page_in(f, size - 100, 4096), 100);
    /* the last tensor in the file lies past the first 2 MiB, which the open touched */
    const gguf_tensor *t = gguf_get_tensor(f, 0);
    for (int64_t i = 1; i < gguf_n_tensors(f); i++)
        if (gguf_get_tensor(f, i)->offset > t->offset) t = gguf_get_tensor(f, i);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)t->data & ~(uintptr_t)(page - 1);
    size_t span = (size_t)((uintptr_t)t->data + t->nbytes - lo), n_pages = (span + (size_t)page - 1) / (size_t)page;
    ck_assert_uint_gt(n_pages, 4);
    unsigned char *vec = malloc(n_pages);
    ck_assert_ptr_nonnull(vec);
    ck_assert_int_eq(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    ck_assert_int_eq(mincore((void *)lo, span, vec), 0);
    size_t resident = 0;
    for (size_t i = 0; i < n_pages; i++) resident += vec[i] & 1;
    ck_assert_msg(resident < n_pages, "dropped from the cache, %zu of %zu pages still resident", resident, n_pages);
    ck_assert_uint_eq(gguf_page_in(f, 0, size), size);
    ck_assert_int_eq(mincore((void *)lo, span, vec), 0);
    for (size_t i = 0; i < n_pages; i++) ck_assert_msg(vec[i] & 1, "page %zu of %zu not read in", i, n_pages);
    free(vec);
    gguf_close(f);
    close(fd);
    fixture_done(&fx);
}
END_TEST

/* A file of one 6 MiB F16 tensor held in 4 KiB pages, opened with AUTO: copied
 * when the tensor is routed experts (read in place, 16-bit), not when it is
 * anything else (converted to F32 at load, the file then read once). */
static void auto_by_tensor_name(const char *dir, const char *name, int want_copy)
{
    char path[160];
    snprintf(path, sizeof path, "%s/one.gguf", dir);
    uint64_t ne[2] = {1024, 3072};
    uint16_t *h = calloc(ne[0] * ne[1], sizeof *h);
    ck_assert_ptr_nonnull(h);
    gguf_writer *w = gguf_writer_create();
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(gguf_writer_add_tensor(w, name, GGML_TYPE_F16, 2, ne, h), 0);
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    free(h);
    size_t size;
    void *pin = pin_small_pages(path, &size);
    gguf_file *f;
    ck_assert_msg(gguf_open_mode(path, GGUF_LOAD_MMAP, &f, err, sizeof err) == 0, "%s", err);
    int small = strstr(gguf_placement(f), "4 KiB") != NULL;
    gguf_close(f);
    ck_assert_msg(gguf_open_mode(path, GGUF_LOAD_AUTO, &f, err, sizeof err) == 0, "%s", err);
    if (small && pages_thp_enabled() && pages_mem_available() / 2 >= size) {
        ck_assert_msg(gguf_copied(f) == want_copy, "%s: %s", name, gguf_placement(f));
        if (!want_copy) ck_assert_msg(strstr(gguf_placement(f), "read once"), "%s", gguf_placement(f));
    }
    gguf_close(f);
    munmap(pin, size);
    unlink(path);
}

START_TEST(auto_mode_copies_only_what_pays)
{
    auto_against_mmap(0);
    auto_against_mmap(1);
    const char *dir = tu_tmpdir();
    auto_by_tensor_name(dir, "blk.0.ffn_up_exps.weight", 1);
    auto_by_tensor_name(dir, "token_embd.weight", 0);
    rmdir(dir);
}
END_TEST

START_TEST(synth_rejects_bad_params)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    synth_params p = {.arch = "mamba", .preset = "tiny"};
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), -1);
    ck_assert_err_has(err, "mamba");
    p.arch = "llama";
    p.preset = "huge";
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), -1);
    ck_assert_err_has(err, "huge");
    p.preset = "tiny";
    p.vocab_path = "/nonexistent/vocab.gguf";
    ck_assert_int_eq(synth_write(&p, fx.other, err, sizeof err), -1);
    ck_assert_err_has(err, "vocab");
    ck_assert_int_eq(access(fx.other, F_OK), -1);  /* nothing half-written left behind */
    fixture_done(&fx);
}
END_TEST

/* The built-in vocabulary is a working byte-level BPE: English text merges into
 * fewer tokens than bytes, any bytes round-trip, <|endoftext|> is BOS and EOS. */
START_TEST(builtin_vocab_tokenizes)
{
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.path, &m, err, sizeof err) == 0, "%s", err);
    const moe_tokenizer *t = m->tokenizer;
    ck_assert_int_eq(tokenizer_get_kind(t), TOKENIZER_BPE);
    int32_t eot = tokenizer_eos(t);
    ck_assert_int_eq(eot, m->weights.hp.n_vocab - 1);
    ck_assert_int_eq(tokenizer_bos(t), eot);
    ck_assert_str_eq(tokenizer_token_text(t, eot), "<|endoftext|>");
    ck_assert(tokenizer_is_eog(t, eot));
    static const char *texts[] = {
        "The model reads the batch and the router chooses the experts for each token.",
        "caf\xc3\xa9 \xe2\x82\xac 42 \t\n\x01\xff odd bytes",
    };
    for (int i = 0; i < 2; i++) {
        size_t len = strlen(texts[i]), n, out_len;
        int32_t *ids;
        char *back;
        ck_assert_msg(tokenizer_encode(t, texts[i], len, 0, &ids, &n, err, sizeof err) == 0, "%s", err);
        if (i == 0) ck_assert_msg(n < len / 2, "%zu tokens for %zu bytes: merges not used", n, len);
        ck_assert_int_eq(tokenizer_decode(t, ids, n, 0, &back, &out_len, err, sizeof err), 0);
        ck_assert_uint_eq(out_len, len);
        ck_assert(memcmp(back, texts[i], len) == 0);
        free(ids);
        free(back);
    }
    moe_model_free(m);
    fixture_done(&fx);
}
END_TEST

START_TEST(vocab_from_another_gguf)
{
    const char *shared = tu_shared_dir();
    if (!shared) {
        printf("skip vocab_from_another_gguf: ../shared is absent\n");
        return;
    }
    char vocab[256];
    snprintf(vocab, sizeof vocab, "%s/testdata/vocab/ggml-vocab-llama-spm.gguf", shared);
    fixture fx;
    fixture_synth(&fx, "llama", "tiny", GGML_TYPE_F32);
    synth_params p = {.arch = "qwen3moe", .preset = "tiny", .seed = 3, .vocab_path = vocab};
    ck_assert_msg(synth_write(&p, fx.other, err, sizeof err) == 0, "%s", err);
    moe_model *m;
    ck_assert_msg(moe_model_load(fx.other, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(m->weights.hp.n_vocab, 32000);
    ck_assert_ptr_nonnull(m->tokenizer);
    ck_assert_int_eq(tokenizer_get_kind(m->tokenizer), TOKENIZER_SPM);
    ck_assert_int_eq(tokenizer_bos(m->tokenizer), 1);
    moe_model_free(m);
    fixture_done(&fx);
}
END_TEST

/* The fuzz target on each architecture's tiny model as written (tokenizer, load,
 * engine, one forward) and with bytes of its header changed: in the first and the
 * last 1.5 KB before the tensor data (the header, counts and hyperparameters; the
 * last tensors' names, dims, types and offsets), every third byte set to 0x00,
 * 0xFF or its value + 1 in turn. Each mutant must come back as a clean error or a
 * model that runs; SAN=1 checks every read on the way. */
static void read_whole(const char *path, uint8_t **buf, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert(n > 0);
    rewind(f);
    *buf = malloc((size_t)n);
    ck_assert_ptr_nonnull(*buf);
    ck_assert_uint_eq(fread(*buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
}

/* Bytes before the tensor data: where the first tensor's data starts in buf. */
static size_t header_bytes(const uint8_t *buf, size_t len)
{
    gguf_file *f;
    ck_assert_msg(gguf_open_memory(buf, len, &f, err, sizeof err) == 0, "%s", err);
    const gguf_tensor *t = gguf_get_tensor(f, 0);
    size_t end = (size_t)((const uint8_t *)t->data - buf) - (size_t)t->offset;
    gguf_close(f);
    ck_assert(end > 0 && end < len);
    return end;
}

static void mutate_range(uint8_t *buf, size_t len, size_t from, size_t to)
{
    for (size_t i = from; i < to; i += 3) {
        uint8_t keep = buf[i];
        buf[i] = i % 9 == 0 ? 0x00 : i % 9 == 3 ? 0xFF : (uint8_t)(keep + 1);
        ck_assert_int_eq(LLVMFuzzerTestOneInput(buf, len), 0);
        buf[i] = keep;
    }
}

START_TEST(fuzz_target_on_mutated_models)
{
    fixture fx;
    /* F32, then F16, Q8_0 and the Q4_K_M mix (FFNs read in the file's types) */
    static const ggml_type types[4] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K};
    fixture_synth(&fx, archs[_i % 4], _i >= 12 ? "tiny256" : "tiny", types[_i / 4]);
    uint8_t *buf;
    size_t len;
    read_whole(fx.path, &buf, &len);
    ck_assert_int_eq(LLVMFuzzerTestOneInput(buf, len), 0);
    size_t end = header_bytes(buf, len), span = 1536;
    mutate_range(buf, len, 0, end < span ? end : span);
    if (end > 2 * span) mutate_range(buf, len, end - span, end);
    free(buf);
    fixture_done(&fx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("model_file");
    TCase *tc = tcase_create("load");
    tcase_add_loop_test(tc, each_arch_loads_with_its_hparams, 0, 4);
    tcase_add_test(tc, dense_llama_loads);
    tcase_add_test(tc, synth_is_deterministic);
    tcase_add_test(tc, f16_equals_f32_to_f16_precision);
    tcase_add_test(tc, bf16_equals_f32_to_bf16_precision);
    tcase_add_test(tc, experts_narrow_equal_their_f32_widening);
    tcase_add_test(tc, split_experts_are_merged);
    tcase_add_test(tc, expert_widths_from_tensors_without_keys);
    tcase_add_test(tc, tied_output_beside_file_type_projections);
    tcase_add_test(tc, split_files_load_from_the_first_part);
    tcase_add_loop_test(tc, decode_reads_projections_in_the_file_type, 0, 2);
    tcase_add_test(tc, misaligned_f32_is_copied);
    tcase_add_test(tc, misaligned_16bit_experts_are_converted);
    tcase_add_test(tc, tied_output_and_name_from_stem);
    tcase_add_test(tc, builtin_vocab_tokenizes);
    tcase_add_test(tc, vocab_from_another_gguf);
    suite_add_tcase(s, tc);
    TCase *th = tcase_create("hostile");
    tcase_add_test(th, missing_tensor_is_named);
    tcase_add_test(th, wrong_shape_names_expected_and_found);
    tcase_add_test(th, unsupported_tensor_type_is_named);
    tcase_add_test(th, wrong_key_types_and_values);
    tcase_add_test(th, absurd_dims_are_rejected_before_use);
    tcase_add_test(th, unknown_architecture_lists_the_supported);
    tcase_add_test(th, not_a_model_file);
    tcase_add_test(th, copy_mode_equals_mmap);
    tcase_add_test(th, smaps_field_of_one_mapping);
    tcase_add_test(th, free_memory_and_thp_as_the_kernel_says);
    tcase_add_test(th, page_in_reads_the_range);
    tcase_add_test(th, auto_mode_copies_only_what_pays);
    tcase_add_test(th, synth_rejects_bad_params);
    tcase_add_loop_test(th, fuzz_target_on_mutated_models, 0, 16);
    suite_add_tcase(s, th);
    return tu_run_suite(s);
}
