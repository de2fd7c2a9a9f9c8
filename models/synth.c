/* synth.c -- deterministic synthetic models for tests and benchmarks.
 *
 * A synthetic model is a valid GGUF file of one of the served architectures with
 * weights drawn from a seeded PRNG. Every tensor has its own stream, seeded from
 * (seed, tensor name), so the file depends only on the parameters, never on the
 * order tensors are generated in.
 *
 * Writing never holds the model in memory: the file is first written with all
 * tensor data pointing at one read-only region of zeros (an anonymous mapping the
 * size of the largest tensor, backed by the shared zero page), then each tensor is
 * mapped read-write on its own and generated in place. The 3-4 GB bench preset
 * costs page cache, not heap.
 */
#include "models/synth.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/model.h"
#include "models/gguf.h"

/* Shapes ------------------------------------------------------------------ */

typedef struct {
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_expert, n_expert_used;
    int n_ff_shexp, n_ctx;
} synth_shape;

/* Presets (before per-architecture adjustments in synth_shape_for):
 *   tiny:  2 layers, n_embd 64, 4 heads (2 KV) of 16, 8 experts top-2 of width 96.
 *   tiny256: 2 layers, n_embd 256, 4 heads (2 KV) of 64, 8 experts top-2 of width 256
 *     (qwen2moe: + a shared expert of 512): rows of whole k-quant super-blocks.
 *   tiny256odd: tiny256 with experts 160 wide, so that their down projections' rows
 *     are not whole super-blocks (Qwen1.5-MoE's are 1408): a k-quant file keeps those
 *     in llama.cpp's fallback type beside k-quant gate, up and shared expert.
 *   small: 4 layers, n_embd 128, 8 heads (4 KV) of 16, 16 experts top-4 of width 128.
 *   dense: llama only, tiny sizes with one dense FFN of width 192. (Not tied: with random
 *     tied embeddings a token's own logit dominates and greedy decoding repeats it.)
 *   bench: 16 layers, n_embd 1024, 16 heads (4 KV) of 64, 32 experts top-4 of width 512
 *     (qwen2moe: + a shared expert of width 1024).
 *     llama with the built-in vocabulary (510 tokens): per layer 3*32*512*1024 =
 *     50,331,648 expert + 2,621,440 attention + 32,768 router + 2,048 norm weights =
 *     52,987,904; 16 layers = 847,806,464, plus embeddings, output and final norm
 *     2*510*1024 + 1024 = 1,045,504: 848,851,968 parameters, a 3.40 GB F32 file,
 *     144,208,896 active per token. With a 32000-token vocabulary: 913,343,488 (3.65 GB).
 *     Other architectures (built-in / 32000 vocabulary): qwen2moe 899.2 M / 963.7 M,
 *     olmoe 874.1 M / 938.5 M, qwen3moe 890.8 M / 955.3 M parameters. */
static const struct { const char *name; synth_shape s; } presets[] = {
    {"tiny",  {2, 64, 4, 2, 16, 96, 8, 2, 128, 512}},
    {"small", {4, 128, 8, 4, 16, 128, 16, 4, 256, 1024}},
    {"dense", {2, 64, 4, 2, 16, 192, 0, 0, 0, 512}},
    {"bench", {16, 1024, 16, 4, 64, 512, 32, 4, 1024, 4096}},
    {"tiny256", {2, 256, 4, 2, 64, 256, 8, 2, 512, 512}},
    {"tiny256odd", {2, 256, 4, 2, 64, 160, 8, 2, 512, 512}},
};

/* The preset's shape adjusted to what each architecture looks like in practice:
 * OLMoE has as many KV heads as query heads; Qwen3-MoE heads are wider than
 * n_embd / n_head (its q projection is not square). */
static int synth_shape_for(moe_arch arch, const char *preset, synth_shape *out,
                           char *err, size_t errlen)
{
    size_t i, n = sizeof presets / sizeof presets[0];
    for (i = 0; i < n; i++)
        if (!strcmp(presets[i].name, preset)) break;
    if (i == n) {
        snprintf(err, errlen, "unknown preset '%s' (tiny, small, dense, bench, tiny256, tiny256odd)", preset);
        return -1;
    }
    synth_shape s = presets[i].s;
    if (s.n_expert == 0 && arch != MOE_ARCH_LLAMA) {
        snprintf(err, errlen, "preset '%s' is dense: only --arch llama can be dense", preset);
        return -1;
    }
    if (arch == MOE_ARCH_OLMOE) s.n_head_kv = s.n_head;
    if (arch == MOE_ARCH_QWEN3MOE) s.head_dim = 2 * s.n_embd / s.n_head;
    *out = s;
    return 0;
}

/* Deterministic numbers ------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

/* Tensor list -------------------------------------------------------------- */

typedef struct {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[3];
    float mean, std;   /* uniform distribution with this mean and standard deviation */
} synth_tensor;

typedef struct {
    synth_tensor *t;
    int n, cap;
} synth_list;

static void list_add(synth_list *l, const char *name, float mean, float std,
                     uint32_t n_dims, uint64_t ne0, uint64_t ne1, uint64_t ne2)
{
    assert(l->n < l->cap); /* capacity is computed from the shape */
    synth_tensor *t = &l->t[l->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    t->ne[0] = ne0; t->ne[1] = ne1; t->ne[2] = ne2;
    t->mean = mean;
    t->std = std;
}

/* Scales chosen so the model is not flat: every projection keeps activations near
 * unit RMS, the router's logits spread by ~2 (clear top-k choices), and the output
 * logits by ~4 (greedy decoding with clear top-1 margins). Norm weights are near 1. */
static void list_layer(synth_list *l, const moe_arch_info *a, const synth_shape *s, int il, int split)
{
    char nm[64];
    uint64_t e = (uint64_t)s->n_embd, hd = (uint64_t)s->head_dim;
    uint64_t q = (uint64_t)s->n_head * hd, kv = (uint64_t)s->n_head_kv * hd;
    float in_e = 1.0f / sqrtf((float)e);
#define ADD(suffix, mean, std, nd, a0, a1, a2) \
    (snprintf(nm, sizeof nm, "blk.%d.%s", il, suffix), list_add(l, nm, mean, std, nd, a0, a1, a2))
    ADD("attn_norm.weight", 1.0f, 0.1f, 1, e, 1, 1);
    ADD("attn_q.weight", 0.0f, in_e, 2, e, q, 1);
    ADD("attn_k.weight", 0.0f, in_e, 2, e, kv, 1);
    ADD("attn_v.weight", 0.0f, in_e, 2, e, kv, 1);
    ADD("attn_output.weight", 0.0f, 1.0f / sqrtf((float)q), 2, q, e, 1);
    if (a->qkv_bias) {
        ADD("attn_q.bias", 0.0f, 0.2f, 1, q, 1, 1);
        ADD("attn_k.bias", 0.0f, 0.2f, 1, kv, 1, 1);
        ADD("attn_v.bias", 0.0f, 0.2f, 1, kv, 1, 1);
    }
    if (a->qk_norm == MOE_QK_NORM_FULL) {
        ADD("attn_q_norm.weight", 1.0f, 0.1f, 1, q, 1, 1);
        ADD("attn_k_norm.weight", 1.0f, 0.1f, 1, kv, 1, 1);
    } else if (a->qk_norm == MOE_QK_NORM_HEAD) {
        ADD("attn_q_norm.weight", 1.0f, 0.1f, 1, hd, 1, 1);
        ADD("attn_k_norm.weight", 1.0f, 0.1f, 1, hd, 1, 1);
    }
    ADD("ffn_norm.weight", 1.0f, 0.1f, 1, e, 1, 1);
    uint64_t ff = (uint64_t)s->n_ff, ne = (uint64_t)s->n_expert;
    float in_ff = 1.0f / sqrtf((float)ff);
    if (s->n_expert == 0) {
        ADD("ffn_gate.weight", 0.0f, in_e, 2, e, ff, 1);
        ADD("ffn_up.weight", 0.0f, in_e, 2, e, ff, 1);
        ADD("ffn_down.weight", 0.0f, in_ff, 2, ff, e, 1);
    } else {
        ADD("ffn_gate_inp.weight", 0.0f, 2.0f * in_e, 2, e, ne, 1);
        if (split) {
            /* Mixtral files before April 2024: each expert's matrices as tensors of
             * their own, in the order of the checkpoint (w1, w2, w3) */
            for (uint64_t x = 0; x < ne; x++) {
                char sfx[48];
                snprintf(sfx, sizeof sfx, "ffn_gate.%llu.weight", (unsigned long long)x);
                ADD(sfx, 0.0f, in_e, 2, e, ff, 1);
                snprintf(sfx, sizeof sfx, "ffn_down.%llu.weight", (unsigned long long)x);
                ADD(sfx, 0.0f, in_ff, 2, ff, e, 1);
                snprintf(sfx, sizeof sfx, "ffn_up.%llu.weight", (unsigned long long)x);
                ADD(sfx, 0.0f, in_e, 2, e, ff, 1);
            }
        } else {
            ADD("ffn_gate_exps.weight", 0.0f, in_e, 3, e, ff, ne);
            ADD("ffn_up_exps.weight", 0.0f, in_e, 3, e, ff, ne);
            ADD("ffn_down_exps.weight", 0.0f, in_ff, 3, ff, e, ne);
        }
    }
    if (a->shared_expert) {
        uint64_t sh = (uint64_t)s->n_ff_shexp;
        ADD("ffn_gate_inp_shexp.weight", 0.0f, in_e, 1, e, 1, 1);
        ADD("ffn_gate_shexp.weight", 0.0f, in_e, 2, e, sh, 1);
        ADD("ffn_up_shexp.weight", 0.0f, in_e, 2, e, sh, 1);
        ADD("ffn_down_shexp.weight", 0.0f, 1.0f / sqrtf((float)sh), 2, sh, e, 1);
    }
#undef ADD
}

static int list_build(synth_list *l, const moe_arch_info *a, const synth_shape *s, int n_vocab, int split)
{
    l->cap = 3 + (24 + (split ? 3 * s->n_expert : 0)) * s->n_layer;
    l->n = 0;
    l->t = calloc((size_t)l->cap, sizeof *l->t);
    if (!l->t) return -1;
    uint64_t e = (uint64_t)s->n_embd, v = (uint64_t)n_vocab;
    list_add(l, "token_embd.weight", 0.0f, 0.5f, 2, e, v, 1);
    for (int il = 0; il < s->n_layer; il++) list_layer(l, a, s, il, split);
    list_add(l, "output_norm.weight", 1.0f, 0.1f, 1, e, 1, 1);
    list_add(l, "output.weight", 0.0f, 4.0f / sqrtf((float)e), 2, e, v, 1);
    return 0;
}

static uint64_t tensor_elems(const synth_tensor *t)
{
    return t->ne[0] * t->ne[1] * t->ne[2];
}

/* The type llama.cpp's mixes give a matrix of a model quantized to wtype:
 * Q2_K keeps the down projections and attn_v in Q3_K, Q3_K_M in Q4_K, Q4_K_M
 * and Q5_K_M in Q6_K (llama.cpp does so for some layers' down projections; all
 * here), and all four the output in Q6_K. */
static ggml_type mix_type(const synth_tensor *t, ggml_type wtype)
{
    int output = !strcmp(t->name, "output.weight");
    int more_bits = strstr(t->name, "ffn_down") || strstr(t->name, "attn_v");
    switch (wtype) {
    case GGML_TYPE_Q2_K: return output ? GGML_TYPE_Q6_K : more_bits ? GGML_TYPE_Q3_K : wtype;
    case GGML_TYPE_Q3_K: return output ? GGML_TYPE_Q6_K : more_bits ? GGML_TYPE_Q4_K : wtype;
    case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q5_K: return output || more_bits ? GGML_TYPE_Q6_K : wtype;
    default: return wtype;
    }
}

/* llama.cpp's stand-in for a k-quant whose rows are not whole super-blocks
 * (Qwen1.5-MoE's experts, 1408 wide, keep their down projections so). */
static ggml_type row_fallback(ggml_type t)
{
    switch (t) {
    case GGML_TYPE_Q2_K:
    case GGML_TYPE_Q3_K:
    case GGML_TYPE_IQ4_XS: return GGML_TYPE_IQ4_NL;
    case GGML_TYPE_Q4_K: return GGML_TYPE_Q5_0;
    case GGML_TYPE_Q5_K: return GGML_TYPE_Q5_1;
    case GGML_TYPE_Q6_K: return GGML_TYPE_Q8_0;
    default: return t;
    }
}

/* Matrices are stored in the model's type (mix_type), or its row_fallback;
 * vectors (norms, biases, the shared expert gate) stay F32, as llama.cpp's
 * converters and quantizer do, and so do the routers (llama.cpp does not
 * quantize ffn_gate_inp) and matrices whose rows are not whole blocks even of
 * the fallback (llama.cpp would write F16). */
static ggml_type tensor_type(const synth_tensor *t, ggml_type wtype)
{
    if (t->n_dims < 2 || strstr(t->name, "ffn_gate_inp")) return GGML_TYPE_F32;
    ggml_type type = mix_type(t, wtype);
    if (t->ne[0] % ggml_block_size(type)) type = row_fallback(type);
    return t->ne[0] % ggml_block_size(type) ? GGML_TYPE_F32 : type;
}

typedef void (*quantizer)(const float *x, uint64_t n, void *blocks);

/* The quantizer of a block type (synth_write admits no other). */
static quantizer quantizer_of(ggml_type t)
{
    switch (t) {
    case GGML_TYPE_Q8_0: return gguf_quantize_q8_0;
    case GGML_TYPE_Q4_0: return gguf_quantize_q4_0;
    case GGML_TYPE_Q4_1: return gguf_quantize_q4_1;
    case GGML_TYPE_Q5_0: return gguf_quantize_q5_0;
    case GGML_TYPE_Q5_1: return gguf_quantize_q5_1;
    case GGML_TYPE_IQ4_NL: return gguf_quantize_iq4_nl;
    case GGML_TYPE_Q2_K: return gguf_quantize_q2_k;
    case GGML_TYPE_Q3_K: return gguf_quantize_q3_k;
    case GGML_TYPE_Q4_K: return gguf_quantize_q4_k;
    case GGML_TYPE_Q5_K: return gguf_quantize_q5_k;
    case GGML_TYPE_IQ4_XS: return gguf_quantize_iq4_xs;
    default: return gguf_quantize_q6_k;
    }
}

/* Fills one tensor in place: uniform values with the tensor's mean and std,
 * drawn in element order whatever the type (so an F16 or Q8_0 model holds the
 * F32 model's values, rounded). */
static void tensor_fill(const synth_tensor *t, uint64_t seed, ggml_type type, void *dst)
{
    uint64_t state = seed ^ fnv1a(t->name);
    float half_width = t->std * 1.7320508f; /* uniform on [-a, a] has std a / sqrt(3) */
    uint64_t n = tensor_elems(t);
    float block[GGML_QK_K];
    uint64_t bn = ggml_block_size(type), bb = ggml_type_size(type);
    for (uint64_t i = 0; i < n; i++) {
        float u = (float)(splitmix64(&state) >> 40) * (1.0f / 16777216.0f); /* [0, 1) exact */
        float x = t->mean + half_width * (2.0f * u - 1.0f);
        if (type == GGML_TYPE_F16) ((uint16_t *)dst)[i] = gguf_f32_to_f16(x);
        else if (type == GGML_TYPE_BF16) ((uint16_t *)dst)[i] = gguf_f32_to_bf16(x);
        else if (type == GGML_TYPE_F32) ((float *)dst)[i] = x;
        else {
            block[i % bn] = x;
            if (i % bn != bn - 1) continue;
            unsigned char *at = (unsigned char *)dst + i / bn * bb;
            quantizer_of(type)(block, bn, at);
        }
    }
}

/* llama.cpp's general.file_type for a model of mostly these matrices. */
static uint32_t file_type(ggml_type wtype)
{
    switch (wtype) {
    case GGML_TYPE_F16: return 1;
    case GGML_TYPE_Q8_0: return 7;
    case GGML_TYPE_Q4_0: return 2;
    case GGML_TYPE_Q4_1: return 3;
    case GGML_TYPE_Q5_0: return 8;
    case GGML_TYPE_Q5_1: return 9;
    case GGML_TYPE_Q2_K: return 10;
    case GGML_TYPE_Q3_K: return 12;   /* MOSTLY_Q3_K_M */
    case GGML_TYPE_IQ4_NL: return 25;
    case GGML_TYPE_IQ4_XS: return 30;
    case GGML_TYPE_Q4_K: return 15;   /* MOSTLY_Q4_K_M */
    case GGML_TYPE_Q5_K: return 17;   /* MOSTLY_Q5_K_M */
    case GGML_TYPE_Q6_K: return 18;
    case GGML_TYPE_BF16: return 32;
    default: return 0;
    }
}

/* Built-in byte-level BPE vocabulary -------------------------------------------
 *
 * GPT-2 style: 256 byte tokens in the byte-to-unicode form (printable bytes stand
 * for themselves, the others are shifted to U+0100 and up, so a space is 'Ġ'),
 * then merges learned at write time from a short English text, then <|endoftext|>
 * as BOS and EOS. Learning the merges (instead of listing them) keeps the list
 * consistent by construction: both sides of every merge are tokens. */

static const char bpe_text[] =
    "The service answers questions from many people at the same time. Each question is cut "
    "into tokens, and the tokens of every request that is waiting are put together into one "
    "batch. The model reads the batch layer by layer. In each layer a small router looks at "
    "every token and chooses the experts that should work on it. Only those experts run, so "
    "the machine does less work than a dense model of the same size would need. When the "
    "answer is ready, the tokens are turned back into text and sent to the person who asked. "
    "There are many things to get right. The file that holds the model must be read with care, "
    "because a broken file should give a clear message and not bring the whole service down. "
    "The numbers must be the same when the work is shared between two threads or done by one. "
    "A request that is cancelled should stop costing time at once. We measure how fast the "
    "memory can be read and how many operations the processor can do in a second, and then "
    "we compare what we get with what the hardware could give. The first time you start the "
    "server it loads the weights, which can take a while for a large model, and it tells the "
    "load balancer that it is not ready yet. After that it is ready to take requests. If you "
    "want to know more about what happens inside, look at the metrics: they show how many "
    "tokens went to each expert in every layer, how long people waited in the queue, and how "
    "long it took to produce the first token and each token after it. This is also where you "
    "would see that one expert gets much more work than the others, which is something that "
    "happens with real models more often than you might think. Good tests compare the "
    "results with an independent reference that was written in a different language, with "
    "its own reader for the file format, so that the same mistake is not made twice. The "
    "reference is slow, but it is simple enough that anyone can check it line by line. "
    "Small models with random weights are enough for these tests, as long as the weights are "
    "large enough that the most likely next token is clearly ahead of the second one. "
    "Otherwise the two programs could disagree only because of rounding, and then the test "
    "would tell us nothing about whether the code is correct. Writing these files takes less "
    "than a second for the small ones, and about a minute for the large one that is used to "
    "measure the speed of the engine on this kind of machine.";

enum { BPE_MAX_MERGES = 320, BPE_MAX_TOKENS = 256 + BPE_MAX_MERGES + 1 };

typedef struct {
    char *tok[BPE_MAX_TOKENS];    /* UTF-8 token strings, owned */
    int n_tok;
    char *merge[BPE_MAX_MERGES];  /* "left right", owned */
    int n_merge;
} bpe_vocab;

static void bpe_vocab_free(bpe_vocab *v)
{
    for (int i = 0; i < v->n_tok; i++) free(v->tok[i]);
    for (int i = 0; i < v->n_merge; i++) free(v->merge[i]);
}

/* GPT-2's byte-to-unicode order: printable bytes first (ids 0..187), then the
 * rest mapped to U+0100.. (ids 188..255). Writes each byte's code point. */
static void byte_codepoints(int *cp_of_byte, int *byte_of_id)
{
    int id = 0, extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        cp_of_byte[b] = printable ? b : 256 + extra++;
    }
    for (int b = 0; b < 256; b++)
        if (cp_of_byte[b] < 256) byte_of_id[id++] = b;
    for (int b = 0; b < 256; b++)
        if (cp_of_byte[b] >= 256) byte_of_id[id++] = b;
}

static char *utf8_of(int cp)
{
    char *s = malloc(3);
    if (!s) return NULL;
    if (cp < 0x80) { s[0] = (char)cp; s[1] = 0; }
    else { s[0] = (char)(0xC0 | (cp >> 6)); s[1] = (char)(0x80 | (cp & 0x3F)); s[2] = 0; }
    return s;
}

static char *concat(const char *a, const char *b, char sep)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 2);
    if (!s) return NULL;
    memcpy(s, a, la);
    size_t k = la;
    if (sep) s[k++] = sep;
    memcpy(s + k, b, lb + 1);
    return s;
}

/* Training words: runs of ASCII letters, each with its leading space if any (what
 * the GPT-2 pre-tokenizer makes of plain English). Symbols as token ids. */
typedef struct {
    int *sym;      /* all words' symbols back to back */
    int *start;    /* (n_words + 1) offsets into sym */
    int *len;      /* current length of each word after merges */
    int n_words;
} bpe_corpus;

static int corpus_build(bpe_corpus *c, const int *id_of_byte)
{
    size_t n = sizeof bpe_text - 1;
    c->sym = malloc(n * sizeof *c->sym);
    c->start = malloc((n + 1) * sizeof *c->start);
    c->len = malloc((n + 1) * sizeof *c->len);
    if (!c->sym || !c->start || !c->len) return -1;
    int k = 0;
    c->n_words = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i + (bpe_text[i] == ' ');
        size_t w = j;
        while (w < n && ((bpe_text[w] | 0x20) >= 'a' && (bpe_text[w] | 0x20) <= 'z')) w++;
        if (w == j) { i = j > i ? j : i + 1; continue; }
        c->start[c->n_words] = k;
        for (size_t b = i; b < w; b++) c->sym[k++] = id_of_byte[(unsigned char)bpe_text[b]];
        c->len[c->n_words] = (int)(w - i);
        c->n_words++;
        i = w;
    }
    return 0;
}

static void corpus_free(bpe_corpus *c)
{
    free(c->sym);
    free(c->start);
    free(c->len);
}

/* Replaces every (a, b) by t inside each word. */
static void corpus_merge(bpe_corpus *c, int a, int b, int t)
{
    for (int w = 0; w < c->n_words; w++) {
        int *s = c->sym + c->start[w], n = c->len[w], o = 0;
        for (int i = 0; i < n; i++) {
            if (i + 1 < n && s[i] == a && s[i + 1] == b) { s[o++] = t; i++; }
            else s[o++] = s[i];
        }
        c->len[w] = o;
    }
}

static int token_find(const bpe_vocab *v, const char *s)
{
    for (int i = 0; i < v->n_tok; i++)
        if (!strcmp(v->tok[i], s)) return i;
    return -1;
}

/* Greedy BPE: repeatedly merge the most frequent adjacent pair (lowest ids on
 * ties) until BPE_MAX_MERGES or no pair occurs twice. */
static int bpe_learn(bpe_vocab *v, bpe_corpus *c)
{
    int *count = calloc((size_t)BPE_MAX_TOKENS * BPE_MAX_TOKENS, sizeof *count);
    if (!count) return -1;
    while (v->n_merge < BPE_MAX_MERGES) {
        int best_a = -1, best_b = -1, best = 1;
        for (int w = 0; w < c->n_words; w++) {
            const int *s = c->sym + c->start[w];
            for (int i = 0; i + 1 < c->len[w]; i++) count[s[i] * BPE_MAX_TOKENS + s[i + 1]]++;
        }
        for (int w = 0; w < c->n_words; w++) {
            const int *s = c->sym + c->start[w];
            for (int i = 0; i + 1 < c->len[w]; i++) {
                int *cnt = &count[s[i] * BPE_MAX_TOKENS + s[i + 1]];
                if (*cnt > best || (*cnt == best && best > 1 &&
                                    (s[i] < best_a || (s[i] == best_a && s[i + 1] < best_b)))) {
                    best = *cnt; best_a = s[i]; best_b = s[i + 1];
                }
            }
        }
        for (int w = 0; w < c->n_words; w++) {
            const int *s = c->sym + c->start[w];
            for (int i = 0; i + 1 < c->len[w]; i++) count[s[i] * BPE_MAX_TOKENS + s[i + 1]] = 0;
        }
        if (best_a < 0) break;
        char *joined = concat(v->tok[best_a], v->tok[best_b], 0);
        char *merge = concat(v->tok[best_a], v->tok[best_b], ' ');
        if (!joined || !merge) { free(joined); free(merge); free(count); return -1; }
        v->merge[v->n_merge++] = merge;
        int t = token_find(v, joined);
        if (t < 0) { t = v->n_tok; v->tok[v->n_tok++] = joined; }
        else free(joined);
        corpus_merge(c, best_a, best_b, t);
    }
    free(count);
    return 0;
}

static int bpe_build(bpe_vocab *v)
{
    int cp_of_byte[256], byte_of_id[256], id_of_byte[256];
    memset(v, 0, sizeof *v);
    byte_codepoints(cp_of_byte, byte_of_id);
    for (int id = 0; id < 256; id++) {
        id_of_byte[byte_of_id[id]] = id;
        if (!(v->tok[id] = utf8_of(cp_of_byte[byte_of_id[id]]))) return -1;
        v->n_tok++;
    }
    bpe_corpus c;
    int rc = corpus_build(&c, id_of_byte);
    if (rc == 0) rc = bpe_learn(v, &c);
    corpus_free(&c);
    if (rc) return -1;
    if (!(v->tok[v->n_tok] = concat("<|endoftext|>", "", 0))) return -1;
    v->n_tok++;
    return 0;
}

static int bpe_write_kv(gguf_writer *w, const bpe_vocab *v)
{
    int32_t type[BPE_MAX_TOKENS];
    for (int i = 0; i < v->n_tok; i++) type[i] = 1;           /* normal */
    type[v->n_tok - 1] = 3;                                    /* control */
    uint32_t eot = (uint32_t)(v->n_tok - 1);
    int rc = 0;
    rc |= gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    rc |= gguf_writer_set_str(w, "tokenizer.ggml.pre", "default");
    rc |= gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tok,
                                  (uint64_t)v->n_tok);
    rc |= gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", type, (uint64_t)v->n_tok);
    rc |= gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merge,
                                  (uint64_t)v->n_merge);
    rc |= gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", eot);
    rc |= gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", eot);
    rc |= gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", 0);
    return rc ? -1 : 0;
}

/* Tokenizer from another GGUF: every tokenizer.* key, and its vocabulary size. */
static int vocab_copy(gguf_writer *w, const gguf_file *src, int *n_vocab, char *err, size_t errlen)
{
    gguf_type et;
    uint64_t n;
    if (gguf_get_arr_info(src, "tokenizer.ggml.tokens", &et, &n) || et != GGUF_TYPE_STRING) {
        snprintf(err, errlen, "no tokenizer.ggml.tokens string array");
        return -1;
    }
    if (n == 0 || n > (1u << 22)) {
        snprintf(err, errlen, "vocabulary of %llu tokens (want 1..%u)", (unsigned long long)n, 1u << 22);
        return -1;
    }
    *n_vocab = (int)n;
    for (int64_t i = 0; i < gguf_n_kv(src); i++) {
        gguf_str k = gguf_kv_key(src, i);
        char key[256];
        if (k.len < 10 || k.len >= sizeof key || memcmp(k.data, "tokenizer.", 10)) continue;
        memcpy(key, k.data, k.len);
        key[k.len] = 0;
        if (gguf_writer_copy_kv(w, src, key)) {
            snprintf(err, errlen, "cannot copy %.200s", key);
            return -1;
        }
    }
    return 0;
}

/* Metadata ------------------------------------------------------------------ */

static int hparams_write(gguf_writer *w, const moe_arch_info *a, moe_arch arch,
                         const synth_shape *s, const synth_params *p, int n_vocab)
{
    char key[96], name[96];
    int rc = 0;
#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", a->name, suffix), key)
    snprintf(name, sizeof name, "synth-%s-%s", a->name, p->preset);
    rc |= gguf_writer_set_str(w, "general.architecture", a->name);
    rc |= gguf_writer_set_str(w, "general.name", name);
    rc |= gguf_writer_set_u32(w, "general.file_type", file_type(p->wtype));
    rc |= gguf_writer_set_u64(w, "moeserve.synth.seed", p->seed);
    rc |= gguf_writer_set_u32(w, KEY("vocab_size"), (uint32_t)n_vocab);
    rc |= gguf_writer_set_u32(w, KEY("block_count"), (uint32_t)s->n_layer);
    rc |= gguf_writer_set_u32(w, KEY("context_length"), (uint32_t)s->n_ctx);
    rc |= gguf_writer_set_u32(w, KEY("embedding_length"), (uint32_t)s->n_embd);
    rc |= gguf_writer_set_u32(w, KEY("attention.head_count"), (uint32_t)s->n_head);
    rc |= gguf_writer_set_u32(w, KEY("attention.head_count_kv"), (uint32_t)s->n_head_kv);
    rc |= gguf_writer_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), 1e-5f);
    rc |= gguf_writer_set_f32(w, KEY("rope.freq_base"), arch == MOE_ARCH_LLAMA ? 10000.0f : 1000000.0f);
    if (arch == MOE_ARCH_LLAMA)
        rc |= gguf_writer_set_u32(w, KEY("rope.dimension_count"), (uint32_t)s->head_dim);
    if (arch == MOE_ARCH_QWEN3MOE) {
        rc |= gguf_writer_set_u32(w, KEY("attention.key_length"), (uint32_t)s->head_dim);
        rc |= gguf_writer_set_u32(w, KEY("attention.value_length"), (uint32_t)s->head_dim);
    }
    if (arch == MOE_ARCH_QWEN2MOE || arch == MOE_ARCH_QWEN3MOE) {
        /* the expert width has its own key; feed_forward_length is a dense width no
         * layer of these files uses */
        rc |= gguf_writer_set_u32(w, KEY("feed_forward_length"), (uint32_t)(4 * s->n_embd));
        rc |= gguf_writer_set_u32(w, KEY("expert_feed_forward_length"), (uint32_t)s->n_ff);
    } else {
        rc |= gguf_writer_set_u32(w, KEY("feed_forward_length"), (uint32_t)s->n_ff);
    }
    if (a->shared_expert)
        rc |= gguf_writer_set_u32(w, KEY("expert_shared_feed_forward_length"), (uint32_t)s->n_ff_shexp);
    if (s->n_expert > 0) {
        rc |= gguf_writer_set_u32(w, KEY("expert_count"), (uint32_t)s->n_expert);
        rc |= gguf_writer_set_u32(w, KEY("expert_used_count"), (uint32_t)s->n_expert_used);
    }
#undef KEY
    return rc ? -1 : 0;
}

/* Writing ------------------------------------------------------------------- */

/* Pass 1: the whole file with every tensor's data read from one zero region. */
static int skeleton_write(gguf_writer *w, const synth_list *l, ggml_type wtype, const char *path,
                          char *err, size_t errlen)
{
    size_t max_bytes = 0;
    for (int i = 0; i < l->n; i++) {
        ggml_type type = tensor_type(&l->t[i], wtype);
        size_t b = (size_t)tensor_elems(&l->t[i]) / ggml_block_size(type) * ggml_type_size(type);
        if (b > max_bytes) max_bytes = b;
    }
    void *zeros = mmap(NULL, max_bytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (zeros == MAP_FAILED) {
        snprintf(err, errlen, "cannot map %zu bytes: %s", max_bytes, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < l->n && rc == 0; i++) {
        const synth_tensor *t = &l->t[i];
        if (gguf_writer_add_tensor(w, t->name, tensor_type(t, wtype), t->n_dims, t->ne, zeros)) {
            snprintf(err, errlen, "cannot add tensor %s", t->name);
            rc = -1;
        }
    }
    if (rc == 0) rc = gguf_writer_write(w, path, err, errlen);
    munmap(zeros, max_bytes);
    return rc;
}

/* Writes a large file's pages out and drops them from the page cache. They were
 * cached in 4 KiB pages by the writes through small mappings; dropped, they are
 * read back at the first load into the 2 MiB folios models/gguf.c asks for,
 * which decode streams about twice as fast. Best effort: errors only cost speed. */
static void drop_cached(int fd)
{
    if (fdatasync(fd) == 0) (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

/* Pass 2: generate every tensor in place, mapping one tensor at a time so the
 * resident set stays at the largest tensor even for the bench preset. The header
 * is parsed from a read-only mapping only to learn where each tensor's data is. */
static int tensors_fill(const synth_list *l, const synth_params *p, const char *path,
                        char *err, size_t errlen)
{
    int fd = open(path, O_RDWR);
    if (fd < 0) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    struct stat st;
    if (fstat(fd, &st) || st.st_size <= 0) {
        snprintf(err, errlen, "%s: cannot stat", path);
        close(fd);
        return -1;
    }
    size_t size = (size_t)st.st_size, page = (size_t)sysconf(_SC_PAGESIZE);
    const char *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        snprintf(err, errlen, "%s: mmap: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    gguf_file *f = NULL;
    int rc = gguf_open_memory(map, size, &f, err, errlen);
    for (int i = 0; i < l->n && rc == 0; i++) {
        const synth_tensor *t = &l->t[i];
        const gguf_tensor *gt = gguf_find_tensor(f, t->name);
        ggml_type type = tensor_type(t, p->wtype);
        if (!gt || gt->type != type || gt->n_elements != tensor_elems(t)) {
            snprintf(err, errlen, "%s: tensor %s not as written", path, t->name);
            rc = -1;
            break;
        }
        size_t off = (size_t)((const char *)gt->data - map), skip = off % page;
        size_t len = skip + (size_t)gt->nbytes;
        char *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(off - skip));
        if (w == MAP_FAILED) {
            snprintf(err, errlen, "%s: mmap: %s", path, strerror(errno));
            rc = -1;
            break;
        }
        tensor_fill(t, p->seed, type, w + skip);
        munmap(w, len);
    }
    if (f) gguf_close(f);
    munmap((void *)map, size);
    if (rc == 0 && size >= ((size_t)64 << 20)) drop_cached(fd);
    close(fd);
    return rc;
}

static const struct { const char *name; ggml_type t; } synth_types[] = {
    {"f32", GGML_TYPE_F32}, {"f16", GGML_TYPE_F16}, {"bf16", GGML_TYPE_BF16}, {"q8_0", GGML_TYPE_Q8_0},
    {"q4_0", GGML_TYPE_Q4_0}, {"q4_1", GGML_TYPE_Q4_1}, {"q5_0", GGML_TYPE_Q5_0}, {"q5_1", GGML_TYPE_Q5_1},
    {"iq4_nl", GGML_TYPE_IQ4_NL}, {"q2_k", GGML_TYPE_Q2_K}, {"q3_k_m", GGML_TYPE_Q3_K},
    {"q4_k_m", GGML_TYPE_Q4_K}, {"q5_k_m", GGML_TYPE_Q5_K}, {"q6_k", GGML_TYPE_Q6_K}, {"iq4_xs", GGML_TYPE_IQ4_XS},
};

int synth_type_from_name(const char *name, ggml_type *t)
{
    for (size_t j = 0; name && j < sizeof synth_types / sizeof synth_types[0]; j++)
        if (!strcmp(name, synth_types[j].name)) {
            *t = synth_types[j].t;
            return 0;
        }
    return -1;
}

int synth_writes_type(ggml_type t)
{
    for (size_t j = 0; j < sizeof synth_types / sizeof synth_types[0]; j++)
        if (synth_types[j].t == t) return 1;
    return 0;
}

int synth_write(const synth_params *p, const char *out_path, char *err, size_t errlen)
{
    moe_arch arch = moe_arch_from_name(p->arch);
    if (arch == MOE_ARCH_COUNT) {
        snprintf(err, errlen, "unknown architecture '%s' (llama, qwen2moe, olmoe, qwen3moe)",
                 p->arch ? p->arch : "(null)");
        return -1;
    }
    if (!synth_writes_type(p->wtype)) {
        snprintf(err, errlen, "weight type %s is not one synth writes (%s)", ggml_type_name(p->wtype), SYNTH_TYPES);
        return -1;
    }
    const moe_arch_info *a = moe_arch_get(arch);
    synth_shape s;
    if (synth_shape_for(arch, p->preset ? p->preset : "(null)", &s, err, errlen)) return -1;

    gguf_writer *w = gguf_writer_create();
    gguf_file *vocab = NULL;
    bpe_vocab bpe;
    synth_list list = {0};
    int n_vocab = 0, rc = -1, wrote = 0;
    memset(&bpe, 0, sizeof bpe);
    if (!w) { snprintf(err, errlen, "out of memory"); return -1; }
    if (p->vocab_path) {
        char why[256];
        if (gguf_open(p->vocab_path, &vocab, why, sizeof why) ||
            vocab_copy(w, vocab, &n_vocab, why, sizeof why)) {
            snprintf(err, errlen, "vocabulary %s: %s", p->vocab_path, why);
            goto done;
        }
    } else {
        if (bpe_build(&bpe) || bpe_write_kv(w, &bpe)) { snprintf(err, errlen, "out of memory"); goto done; }
        n_vocab = bpe.n_tok;
    }
    if (hparams_write(w, a, arch, &s, p, n_vocab) || list_build(&list, a, &s, n_vocab, p->split_experts)) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    wrote = 1;
    if (skeleton_write(w, &list, p->wtype, out_path, err, errlen)) goto done;
    if (tensors_fill(&list, p, out_path, err, errlen)) goto done;
    rc = 0;
done:
    if (rc && wrote) unlink(out_path);
    free(list.t);
    bpe_vocab_free(&bpe);
    gguf_writer_free(w);
    if (vocab) gguf_close(vocab);
    return rc;
}
