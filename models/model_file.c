/* model_file.c -- a GGUF file mapped, checked and turned into moe_weights.
 *
 * Loading is three steps: read and range-check the hyperparameters of the file's
 * architecture (so a hostile header fails with the name of the bad key before any
 * size is trusted), locate every tensor the architecture needs and check its type
 * and exact shape, then point the weights at the mapping (F32, and the FFNs and
 * projections the kernels read in the file's type) or at one buffer of tensors
 * converted to F32. moe_weights_validate has the last word.
 */
#include "models/model_file.h"
#include "models/pages.h"

#include "core/clock.h"
#include "core/hugemem.h"
#include "core/wconv.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Limits far above any real model, so absurd values are rejected before they are
 * multiplied into sizes. */
#define MAX_LAYERS   1024
#define MAX_EMBD     65536
#define MAX_HEADS    4096
#define MAX_HEAD_DIM 8192
#define MAX_FF       (1 << 20)
#define MAX_EXPERTS  4096
#define MAX_PARTS    1024   /* files of a split model */
#define MAX_CTX      (1 << 24)
#define MAX_VOCAB    (1 << 24)

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* Hyperparameters --------------------------------------------------------- */

typedef struct {
    const gguf_file *f;
    const char *arch;  /* key prefix */
    char *err;
    size_t errlen;
    gguf_file *const *parts;   /* every part of the model's file(s), for width_from_tensor */
    int n_parts;
} kv_reader;

/* A tensor from whichever part of a split model holds it (the first that does). */
static const gguf_tensor *parts_find(gguf_file *const *parts, int n_parts, const char *name)
{
    for (int i = 0; i < n_parts; i++) {
        const gguf_tensor *t = gguf_find_tensor(parts[i], name);
        if (t) return t;
    }
    return NULL;
}

/* "<arch>.<suffix>" as an integer in [lo, hi]; def when absent and not required.
 * Returns 0, or -1 with a message naming the key. */
static int kv_int(const kv_reader *r, const char *suffix, int required, long def,
                  long lo, long hi, int *out)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", r->arch, suffix);
    uint64_t v;
    int rc = gguf_get_u64(r->f, key, &v);
    if (rc == -1) {
        if (required) return fail(r->err, r->errlen, "missing key %s", key);
        *out = (int)def;
        return 0;
    }
    if (rc != 0) return fail(r->err, r->errlen, "%s is not a non-negative integer", key);
    if (v < (uint64_t)lo || v > (uint64_t)hi)
        return fail(r->err, r->errlen, "%s = %llu is out of range [%ld, %ld]", key,
                    (unsigned long long)v, lo, hi);
    *out = (int)v;
    return 0;
}

static int kv_float(const kv_reader *r, const char *suffix, int required, float def,
                    float lo, float hi, float *out)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", r->arch, suffix);
    float v;
    int rc = gguf_get_f32(r->f, key, &v);
    if (rc == -1) {
        if (required) return fail(r->err, r->errlen, "missing key %s", key);
        *out = def;
        return 0;
    }
    if (rc != 0) return fail(r->err, r->errlen, "%s is not a float", key);
    if (!(v >= lo && v <= hi))
        return fail(r->err, r->errlen, "%s = %g is out of range [%g, %g]", key, (double)v,
                    (double)lo, (double)hi);
    *out = v;
    return 0;
}

/* The attention geometry: heads, KV heads, head size, rotated dims. */
static int hparams_attention(const kv_reader *r, moe_hparams *hp)
{
    if (kv_int(r, "attention.head_count", 1, 0, 1, MAX_HEADS, &hp->n_head)) return -1;
    if (kv_int(r, "attention.head_count_kv", 0, hp->n_head, 1, MAX_HEADS, &hp->n_head_kv)) return -1;
    if (hp->n_head % hp->n_head_kv)
        return fail(r->err, r->errlen, "%s.attention.head_count (%d) is not a multiple of "
                    "head_count_kv (%d)", r->arch, hp->n_head, hp->n_head_kv);
    int def_hd = hp->n_embd / hp->n_head, vdim;
    if (kv_int(r, "attention.key_length", 0, 0, 1, MAX_HEAD_DIM, &hp->head_dim)) return -1;
    if (hp->head_dim == 0) {
        if (hp->n_embd % hp->n_head)
            return fail(r->err, r->errlen, "%s.embedding_length (%d) is not a multiple of "
                        "attention.head_count (%d) and no key_length is given",
                        r->arch, hp->n_embd, hp->n_head);
        hp->head_dim = def_hd;
    }
    if (kv_int(r, "attention.value_length", 0, hp->head_dim, 1, MAX_HEAD_DIM, &vdim)) return -1;
    if (vdim != hp->head_dim)
        return fail(r->err, r->errlen, "%s.attention.value_length (%d) differs from key_length (%d)",
                    r->arch, vdim, hp->head_dim);
    if (kv_int(r, "rope.dimension_count", 0, hp->head_dim, 2, hp->head_dim, &hp->rope_dim)) return -1;
    if (hp->rope_dim % 2)
        return fail(r->err, r->errlen, "%s.rope.dimension_count (%d) must be even", r->arch, hp->rope_dim);
    return 0;
}

/* An FFN width the file gives only as the rows of a gate tensor (name, or alt):
 * its dimension 1, in 1..MAX_FF. `key` names what is missing in the error. */
static int width_from_tensor(const kv_reader *r, const char *name, const char *alt, const char *key, int *out)
{
    const gguf_tensor *t = parts_find(r->parts, r->n_parts, name);
    if (!t && alt) t = parts_find(r->parts, r->n_parts, alt);
    if (!t)
        return fail(r->err, r->errlen, "missing key %s.%s (and no %s to take the width from)", r->arch, key, name);
    if (t->n_dims < 2 || t->ne[1] < 1 || t->ne[1] > MAX_FF)
        return fail(r->err, r->errlen, "missing key %s.%s, and %s has no width in 1..%d to take instead", r->arch,
                    key, name, MAX_FF);
    *out = (int)t->ne[1];
    return 0;
}

/* The FFN: dense width or expert count, k and expert width per architecture. */
static int hparams_ffn(const kv_reader *r, const moe_arch_info *a, moe_hparams *hp)
{
    if (kv_int(r, "expert_count", 0, 0, 0, MAX_EXPERTS, &hp->n_expert)) return -1;
    if (hp->n_expert == 0 && hp->arch != MOE_ARCH_LLAMA)
        return fail(r->err, r->errlen, "%s.expert_count is missing or 0: only llama may be dense", r->arch);
    if (kv_int(r, "expert_used_count", hp->n_expert > 0, 0, 0, MAX_EXPERTS, &hp->n_expert_used)) return -1;
    if (hp->n_expert > 0 && (hp->n_expert_used < 1 || hp->n_expert_used > hp->n_expert))
        return fail(r->err, r->errlen, "%s.expert_used_count (%d) must be in [1, expert_count = %d]",
                    r->arch, hp->n_expert_used, hp->n_expert);
    if (hp->n_expert == 0 && hp->n_expert_used != 0)
        return fail(r->err, r->errlen, "%s.expert_used_count (%d) without experts", r->arch,
                    hp->n_expert_used);
    /* Qwen MoE files give the expert width its own key; feed_forward_length there
     * is a dense width no layer uses. llama (Mixtral) and OLMoE use the plain key.
     * Qwen1.5-MoE files converted before those keys existed (spring 2024) have
     * neither: the widths are then the gate tensors' (the loader checks every
     * other tensor against them). */
    int own_key = hp->arch == MOE_ARCH_QWEN2MOE || hp->arch == MOE_ARCH_QWEN3MOE;
    if (kv_int(r, own_key ? "expert_feed_forward_length" : "feed_forward_length", !own_key, 0, 0, MAX_FF,
               &hp->n_ff))
        return -1;
    if (hp->n_ff == 0 && width_from_tensor(r, "blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.0.weight",
                                           "expert_feed_forward_length", &hp->n_ff))
        return -1;
    if (a->shared_expert) {
        if (kv_int(r, "expert_shared_feed_forward_length", 0, 0, 0, MAX_FF, &hp->n_ff_shexp)) return -1;
        if (hp->n_ff_shexp == 0 && width_from_tensor(r, "blk.0.ffn_gate_shexp.weight", NULL,
                                                     "expert_shared_feed_forward_length", &hp->n_ff_shexp))
            return -1;
    }
    return 0;
}

static int hparams_read(gguf_file *const *parts, int n_parts, moe_hparams *hp, char *err, size_t errlen)
{
    const gguf_file *f = parts[0];
    char arch[64];
    int rc = gguf_get_cstr(f, "general.architecture", arch, sizeof arch);
    if (rc == -1) return fail(err, errlen, "missing key general.architecture");
    if (rc != 0) return fail(err, errlen, "general.architecture is not a short string");
    memset(hp, 0, sizeof *hp);
    hp->arch = moe_arch_from_name(arch);
    if (hp->arch == MOE_ARCH_COUNT) {
        char list[128] = "";
        for (int i = 0; i < MOE_ARCH_COUNT; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                     moe_arch_get((moe_arch)i)->name);
        return fail(err, errlen, "unsupported architecture '%s' (supported: %s)", arch, list);
    }
    const moe_arch_info *a = moe_arch_get(hp->arch);
    kv_reader r = {f, a->name, err, errlen, parts, n_parts};
    if (kv_int(&r, "block_count", 1, 0, 1, MAX_LAYERS, &hp->n_layer)) return -1;
    if (kv_int(&r, "embedding_length", 1, 0, 1, MAX_EMBD, &hp->n_embd)) return -1;
    if (kv_int(&r, "context_length", 1, 0, 1, MAX_CTX, &hp->n_ctx_train)) return -1;
    if (hparams_attention(&r, hp) || hparams_ffn(&r, a, hp)) return -1;
    if (kv_float(&r, "attention.layer_norm_rms_epsilon", 1, 0.0f, 1e-12f, 1.0f, &hp->rms_eps)) return -1;
    if (kv_float(&r, "rope.freq_base", 0, 10000.0f, 1.0f, 1e12f, &hp->rope_base)) return -1;
    return 0;
}

/* Tensors ------------------------------------------------------------------ */

/* Each weight the model needs: where its pointer goes and the file's tensor. */
typedef struct {
    const float **slot;
    const gguf_tensor *t;
} tensor_ref;

typedef struct {
    gguf_file *const *parts;   /* the model's file, or the parts of a split one */
    int n_parts;
    int proj_f32;              /* narrow projections converted to F32 as well */
    tensor_ref *refs;
    int n_refs, cap_refs;
    size_t convert_floats;  /* F32 floats needed for conversions (64-byte padded) */
    gguf_tensor *merged;    /* the routed experts merged from per-expert tensors (experts_merge): */
    int n_merged;           /* 3 a layer (gate, up, down), or none */
    char (*merged_names)[40];
    char *err;
    size_t errlen;
} tensor_loader;

static const char *const ffn_matrix[3] = {"gate", "up", "down"};

/* Tensor `name` in the file, or merged by experts_merge under its 3-D name. */
static const gguf_tensor *find_tensor(const tensor_loader *L, const char *name)
{
    const gguf_tensor *t = parts_find(L->parts, L->n_parts, name);
    if (t || !L->n_merged) return t;
    int il, end = 0;
    char kind[8];
    if (sscanf(name, "blk.%d.ffn_%7[a-z]_exps.weight%n", &il, kind, &end) != 2 || name[end] || il < 0 ||
        il >= L->n_merged / 3)
        return NULL;
    for (int i = 0; i < 3; i++)
        if (!strcmp(kind, ffn_matrix[i])) return &L->merged[3 * il + i];
    return NULL;
}

static void shape_str(char *buf, size_t cap, uint32_t n_dims, const uint64_t *ne)
{
    size_t k = 0;
    k += (size_t)snprintf(buf + k, cap - k, "[");
    for (uint32_t d = 0; d < n_dims && k < cap; d++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%llu", d ? ", " : "", (unsigned long long)ne[d]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* F32 used in place needs float alignment; anything else is converted. */
static int needs_copy(const gguf_tensor *t)
{
    return t->type != GGML_TYPE_F32 || ((uintptr_t)t->data % sizeof(float)) != 0;
}

/* Checks tensor t (named name) for a supported type and the exact shape n_dims
 * dims from ne. */
static int tensor_check(tensor_loader *L, const char *name, const gguf_tensor *t, uint32_t n_dims,
                        uint64_t ne0, uint64_t ne1, uint64_t ne2)
{
    /* the reader refuses other types; this keeps the loader safe on its own,
     * from the same table (ggml_block_size) rather than a list to keep in step */
    if (ggml_block_size(t->type) == 0)
        return fail(L->err, L->errlen, "tensor %s has type %s (%d), which the loader does not read", name,
                    ggml_type_name(t->type) ? ggml_type_name(t->type) : "?", (int)t->type);
    uint64_t want[3] = {ne0, ne1, ne2};
    int same = t->n_dims == n_dims;
    for (uint32_t d = 0; same && d < n_dims; d++) same = t->ne[d] == want[d];
    if (!same) {
        char a[96], b[96];
        shape_str(a, sizeof a, n_dims, want);
        shape_str(b, sizeof b, t->n_dims, t->ne);
        return fail(L->err, L->errlen, "tensor %s: expected shape %s, found %s", name, a, b);
    }
    return 0;
}

/* Finds tensor `name`, checks its type and exact shape (n_dims dims from ne) and
 * queues it for *slot. Absent: error when required, else *slot stays NULL. */
static int tensor_want(tensor_loader *L, const char *name, int required, const float **slot,
                       uint32_t n_dims, uint64_t ne0, uint64_t ne1, uint64_t ne2)
{
    const gguf_tensor *t = find_tensor(L, name);
    if (!t) {
        if (required) return fail(L->err, L->errlen, "missing tensor %s", name);
        return 0;
    }
    if (tensor_check(L, name, t, n_dims, ne0, ne1, ne2)) return -1;
    if (L->n_refs == L->cap_refs) {
        int cap = L->cap_refs ? 2 * L->cap_refs : 64;
        tensor_ref *r = realloc(L->refs, (size_t)cap * sizeof *r);
        if (!r) return fail(L->err, L->errlen, "out of memory");
        L->refs = r;
        L->cap_refs = cap;
    }
    L->refs[L->n_refs++] = (tensor_ref){slot, t};
    if (needs_copy(t)) L->convert_floats += (size_t)((t->n_elements + 15) / 16 * 16);
    return 0;
}

/* The file's type as the kernels know it: F16/BF16 at 2-byte-aligned addresses,
 * the quantized types (bytes) anywhere; F32 when the tensor must be converted
 * instead. */
static moe_wtype kept_type(const gguf_tensor *t)
{
    static const struct { ggml_type g; moe_wtype m; } quantized[] = {
        {GGML_TYPE_Q8_0, MOE_WT_Q8_0}, {GGML_TYPE_Q4_0, MOE_WT_Q4_0}, {GGML_TYPE_Q4_1, MOE_WT_Q4_1},
        {GGML_TYPE_Q5_0, MOE_WT_Q5_0}, {GGML_TYPE_Q5_1, MOE_WT_Q5_1}, {GGML_TYPE_IQ4_NL, MOE_WT_IQ4_NL},
        {GGML_TYPE_Q2_K, MOE_WT_Q2_K}, {GGML_TYPE_Q3_K, MOE_WT_Q3_K}, {GGML_TYPE_Q4_K, MOE_WT_Q4_K},
        {GGML_TYPE_Q5_K, MOE_WT_Q5_K}, {GGML_TYPE_Q6_K, MOE_WT_Q6_K}, {GGML_TYPE_IQ4_XS, MOE_WT_IQ4_XS},
    };
    for (size_t i = 0; i < sizeof quantized / sizeof quantized[0]; i++)
        if (t->type == quantized[i].g) return quantized[i].m;
    if ((uintptr_t)t->data % 2 != 0) return MOE_WT_F32;
    if (t->type == GGML_TYPE_F16) return MOE_WT_F16;
    if (t->type == GGML_TYPE_BF16) return MOE_WT_BF16;
    return MOE_WT_F32;
}

/* An FFN's gate, up and down matrices (blk.<il>.ffn_{gate,up,down}<name>.weight)
 * stay in the file when each is of a kept type (moe_wtype in core/model.h; they
 * may differ): from half (16-bit) to a seventh (Q4_K) of the memory of
 * converting them, and of the bytes decode streams. n_dims 3 for the routed
 * experts (ne2 experts), 2 for the shared expert and the dense FFN. Returns 1
 * when kept (shapes checked), 0 to load them as F32, -1 on a bad shape. */
static int ffn_keep_raw(tensor_loader *L, int il, const char *name, uint32_t n_dims, uint64_t e, uint64_t ff,
                        uint64_t ne2, moe_ffn_raw *out)
{
    const gguf_tensor *t[3];
    char nm[3][96];
    for (int i = 0; i < 3; i++) {
        snprintf(nm[i], sizeof nm[i], "blk.%d.ffn_%s%s.weight", il, ffn_matrix[i], name);
        t[i] = find_tensor(L, nm[i]);
        if (!t[i] || kept_type(t[i]) == MOE_WT_F32) return 0;
    }
    for (int i = 0; i < 3; i++) {
        int down = i == 2;
        if (tensor_check(L, nm[i], t[i], n_dims, down ? ff : e, down ? e : ff, ne2)) return -1;
    }
    *out = (moe_ffn_raw){kept_type(t[0]), kept_type(t[1]), kept_type(t[2]), t[0]->data, t[1]->data, t[2]->data};
    return 1;
}

/* An FFN's three matrices: kept where the file has them (ffn_keep_raw), else
 * required and queued for F32 into *f32[0..2] (gate, up, down). */
static int ffn_want(tensor_loader *L, int il, const char *name, uint32_t n_dims, uint64_t e, uint64_t ff,
                    uint64_t ne2, moe_ffn_raw *raw, const float **f32[3])
{
    int kept = ffn_keep_raw(L, il, name, n_dims, e, ff, ne2, raw);
    if (kept) return kept < 0 ? -1 : 0;
    for (int i = 0; i < 3; i++) {
        int down = i == 2;
        char nm[96];
        snprintf(nm, sizeof nm, "blk.%d.ffn_%s%s.weight", il, ffn_matrix[i], name);
        if (tensor_want(L, nm, 1, f32[i], n_dims, down ? ff : e, down ? e : ff, ne2)) return -1;
    }
    return 0;
}

/* A projection the file keeps in a type the kernels read (shape checked by
 * tensor_want): decode reads it there, the F32 conversion serves many rows. */
static void raw_want(const tensor_loader *L, const char *name, moe_wraw *r)
{
    const gguf_tensor *t = parts_find(L->parts, L->n_parts, name);
    if (t && kept_type(t) != MOE_WT_F32) *r = (moe_wraw){t->data, kept_type(t)};
}

/* An attention or output projection: where the file keeps it in a type the
 * kernels read, its raw copy, and unless L->proj_f32 only that (*slot stays
 * NULL: read there at every batch size; an F32 copy of a quantized model's
 * projections, and the packed copy the engine makes of it, cost 12 GB more
 * than the file for Mixtral's Q4_K_M). Else wanted in F32 as tensor_want does. */
static int proj_want(tensor_loader *L, const char *name, int required, const float **slot, moe_wraw *raw,
                     uint64_t ne0, uint64_t ne1)
{
    const gguf_tensor *t = find_tensor(L, name);
    if (t && kept_type(t) != MOE_WT_F32) {
        *raw = (moe_wraw){t->data, kept_type(t)};
        if (!L->proj_f32) return tensor_check(L, name, t, 2, ne0, ne1, 1) ? -1 : 0;
    }
    return tensor_want(L, name, required, slot, 2, ne0, ne1, 1);
}

static int layer_want(tensor_loader *L, const moe_hparams *hp, int il, moe_layer_weights *w)
{
    const moe_arch_info *a = moe_arch_get(hp->arch);
    uint64_t e = (uint64_t)hp->n_embd, hd = (uint64_t)hp->head_dim;
    uint64_t q = (uint64_t)hp->n_head * hd, kv = (uint64_t)hp->n_head_kv * hd;
    uint64_t ff = (uint64_t)hp->n_ff, ne = (uint64_t)hp->n_expert, sh = (uint64_t)hp->n_ff_shexp;
    char nm[96];
    int rc = 0;
#define WANT(suffix, slot, nd, a0, a1, a2) \
    (snprintf(nm, sizeof nm, "blk.%d.%s", il, suffix), rc = rc ? rc : tensor_want(L, nm, 1, slot, nd, a0, a1, a2))
    WANT("attn_norm.weight", &w->attn_norm, 1, e, 1, 1);
#define PROJ(suffix, slot, raw, a0, a1) \
    (snprintf(nm, sizeof nm, "blk.%d.%s", il, suffix), rc = rc ? rc : proj_want(L, nm, 1, slot, raw, a0, a1))
    PROJ("attn_q.weight", &w->wq, &w->wq_raw, e, q);
    PROJ("attn_k.weight", &w->wk, &w->wk_raw, e, kv);
    PROJ("attn_v.weight", &w->wv, &w->wv_raw, e, kv);
    PROJ("attn_output.weight", &w->wo, &w->wo_raw, q, e);
#undef PROJ
    if (a->qkv_bias) {
        WANT("attn_q.bias", &w->bq, 1, q, 1, 1);
        WANT("attn_k.bias", &w->bk, 1, kv, 1, 1);
        WANT("attn_v.bias", &w->bv, 1, kv, 1, 1);
    }
    if (a->qk_norm != MOE_QK_NORM_NONE) {
        int full = a->qk_norm == MOE_QK_NORM_FULL;
        WANT("attn_q_norm.weight", &w->q_norm, 1, full ? q : hd, 1, 1);
        WANT("attn_k_norm.weight", &w->k_norm, 1, full ? kv : hd, 1, 1);
    }
    WANT("ffn_norm.weight", &w->ffn_norm, 1, e, 1, 1);
    if (hp->n_expert == 0) {
        const float **f32[3] = {&w->ffn_gate, &w->ffn_up, &w->ffn_down};
        rc = rc ? rc : ffn_want(L, il, "", 2, e, ff, 1, &w->ffn_raw, f32);
    } else {
        WANT("ffn_gate_inp.weight", &w->router, 2, e, ne, 1);
        const float **f32[3] = {&w->exp_gate, &w->exp_up, &w->exp_down};
        rc = rc ? rc : ffn_want(L, il, "_exps", 3, e, ff, ne, &w->exp_raw, f32);
    }
    if (a->shared_expert) {
        WANT("ffn_gate_inp_shexp.weight", &w->shexp_gate_inp, 1, e, 1, 1);
        const float **f32[3] = {&w->shexp_gate, &w->shexp_up, &w->shexp_down};
        rc = rc ? rc : ffn_want(L, il, "_shexp", 2, e, sh, 1, &w->shexp_raw, f32);
    }
#undef WANT
    return rc;
}

/* Mixtral files written before llama.cpp merged the experts (April 2024) keep
 * each expert's matrices as tensors of their own, blk.<il>.ffn_<m>.<x>.weight.
 * The kernels read the experts of a matrix at a fixed stride, so these are
 * copied, in the file's type, into one block per layer and matrix (64-byte
 * aligned, m->merged), which find_tensor gives under the merged name: the rest
 * of the loader sees the merged format. The experts of one matrix must share
 * type and shape; the copy costs their bytes in memory (moe info says how many).
 * No bytes are amplified: the reader has refused overlapping tensors. */
static int experts_merge(tensor_loader *L, moe_model *m)
{
    const moe_hparams *hp = &m->weights.hp;
    if (hp->n_expert == 0 || parts_find(L->parts, L->n_parts, "blk.0.ffn_gate_exps.weight") ||
        !parts_find(L->parts, L->n_parts, "blk.0.ffn_gate.0.weight"))
        return 0;
    int n = 3 * hp->n_layer;
    uint64_t e = (uint64_t)hp->n_embd, ff = (uint64_t)hp->n_ff, ne = (uint64_t)hp->n_expert;
    L->merged = calloc((size_t)n, sizeof *L->merged);
    L->merged_names = calloc((size_t)n, sizeof *L->merged_names);
    if (!L->merged || !L->merged_names) return fail(L->err, L->errlen, "out of memory");
    size_t total = 0;
    for (int j = 0; j < n; j++) {
        int il = j / 3, i = j % 3, down = i == 2;
        const gguf_tensor *t0 = NULL;
        for (uint64_t x = 0; x < ne; x++) {
            char nm[96];
            snprintf(nm, sizeof nm, "blk.%d.ffn_%s.%llu.weight", il, ffn_matrix[i], (unsigned long long)x);
            const gguf_tensor *t = parts_find(L->parts, L->n_parts, nm);
            if (!t)
                return fail(L->err, L->errlen, "missing tensor %s (the file keeps its experts as tensors of "
                            "their own, and has no blk.%d.ffn_%s_exps.weight)", nm, il, ffn_matrix[i]);
            if (tensor_check(L, nm, t, 2, down ? ff : e, down ? e : ff, 1)) return -1;
            if (t0 && t->type != t0->type)
                return fail(L->err, L->errlen, "tensor %s is %s but blk.%d.ffn_%s.0.weight is %s: the experts "
                            "of one matrix must share a type", nm, ggml_type_name(t->type), il, ffn_matrix[i],
                            ggml_type_name(t0->type));
            if (!t0) t0 = t;
        }
        gguf_tensor *mt = &L->merged[j];
        int len = snprintf(L->merged_names[j], sizeof L->merged_names[j], "blk.%d.ffn_%s_exps.weight", il,
                           ffn_matrix[i]);
        *mt = *t0;
        mt->name = (gguf_str){L->merged_names[j], (uint64_t)len};
        mt->n_dims = 3;
        mt->ne[2] = ne;
        mt->n_elements = t0->n_elements * ne;
        mt->nbytes = t0->nbytes * ne;
        mt->offset = total;   /* into m->merged until the copy below */
        total += (size_t)(mt->nbytes + 63) / 64 * 64;
    }
    m->merged = hugemem_alloc(total);
    if (!m->merged)
        return fail(L->err, L->errlen, "out of memory merging %.1f MiB of per-expert tensors", total / 1048576.0);
    m->merged_bytes = total;
    for (int j = 0; j < n; j++) {
        gguf_tensor *mt = &L->merged[j];
        unsigned char *dst = m->merged + mt->offset;
        size_t per = (size_t)(mt->nbytes / ne);
        for (uint64_t x = 0; x < ne; x++) {
            char nm[96];
            snprintf(nm, sizeof nm, "blk.%d.ffn_%s.%llu.weight", j / 3, ffn_matrix[j % 3], (unsigned long long)x);
            memcpy(dst + x * per, parts_find(L->parts, L->n_parts, nm)->data, per);
        }
        mt->data = dst;
    }
    L->n_merged = n;
    return 0;
}

/* Every tensor of the model; n_vocab comes from token_embd's shape. */
static int tensors_want(tensor_loader *L, moe_model *m)
{
    moe_weights *w = &m->weights;
    moe_hparams *hp = &w->hp;
    uint64_t e = (uint64_t)hp->n_embd;
    const gguf_tensor *te = parts_find(L->parts, L->n_parts, "token_embd.weight");
    if (!te) return fail(L->err, L->errlen, "missing tensor token_embd.weight");
    if (te->n_dims != 2 || te->ne[0] != e || te->ne[1] < 1 || te->ne[1] > MAX_VOCAB) {
        char b[96];
        shape_str(b, sizeof b, te->n_dims, te->ne);
        return fail(L->err, L->errlen, "tensor token_embd.weight: expected shape [%llu, n_vocab "
                    "in 1..%d], found %s", (unsigned long long)e, MAX_VOCAB, b);
    }
    hp->n_vocab = (int)te->ne[1];
    uint64_t v = (uint64_t)hp->n_vocab;
    /* the embeddings, like the projections: in the file's type only unless
     * L->proj_f32 (the rows a batch uses are widened as it looks them up) */
    if (proj_want(L, "token_embd.weight", 1, &w->tok_embd, &w->tok_embd_raw, e, v)) return -1;
    if (tensor_want(L, "output_norm.weight", 1, &w->output_norm, 1, e, 1, 1)) return -1;
    if (proj_want(L, "output.weight", 0, &w->output, &w->output_raw, e, v)) return -1;
    m->tied_output = parts_find(L->parts, L->n_parts, "output.weight") == NULL;
    /* tied: the embedding rows are looked up in F32, and the logits read the file's type */
    if (m->tied_output) raw_want(L, "token_embd.weight", &w->output_raw);
    w->layers = calloc((size_t)hp->n_layer, sizeof *w->layers);
    if (!w->layers) return fail(L->err, L->errlen, "out of memory");
    if (experts_merge(L, m)) return -1;
    for (int il = 0; il < hp->n_layer; il++)
        if (layer_want(L, hp, il, &w->layers[il])) return -1;
    return 0;
}

/* Converts one tensor to F32. F16 goes through a 65536-entry table (one load per
 * element: ~15x faster than decoding the bits, which matters for GB-sized files);
 * the table and the shift read 16-bit values at any address, which wconv_rows'
 * vector loads of uint16_t may not. The quantized types read bytes: wconv_rows. */
static void tensor_convert(const gguf_tensor *t, const float *f16_table, float *dst)
{
    const unsigned char *src = t->data;
    uint64_t n = t->n_elements;
    if (t->type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));  /* unaligned in the file */
        return;
    }
    moe_wtype kt = kept_type(t);
    if (kt != MOE_WT_F32 && kt != MOE_WT_F16 && kt != MOE_WT_BF16) {
        wconv_rows(dst, src, (size_t)n, kt);  /* the quantized types: bytes, any address */
        return;
    }
    for (uint64_t j = 0; j < n; j++) {
        uint16_t h;
        memcpy(&h, src + 2 * j, 2);
        if (t->type == GGML_TYPE_F16) {
            dst[j] = f16_table[h];
        } else {
            uint32_t bits = (uint32_t)h << 16;  /* BF16 is the high half of an F32 */
            memcpy(&dst[j], &bits, 4);
        }
    }
}

/* Points every slot at its data: in place for F32, else converted into one buffer. */
static int tensors_resolve(tensor_loader *L, moe_model *m)
{
    float *f16_table = NULL;
    if (L->convert_floats) {
        m->converted = aligned_alloc(64, L->convert_floats * sizeof(float));
        f16_table = malloc(65536 * sizeof *f16_table);
        if (!m->converted || !f16_table) {
            free(f16_table);
            return fail(L->err, L->errlen, "out of memory converting %zu MiB of tensors to F32",
                        L->convert_floats * sizeof(float) >> 20);
        }
        m->converted_bytes = L->convert_floats * sizeof(float);
        for (uint32_t h = 0; h < 65536; h++) f16_table[h] = gguf_f16_to_f32((uint16_t)h);
    }
    size_t at = 0;
    for (int i = 0; i < L->n_refs; i++) {
        const gguf_tensor *t = L->refs[i].t;
        if (!needs_copy(t)) { *L->refs[i].slot = t->data; continue; }
        float *dst = m->converted + at;
        tensor_convert(t, f16_table, dst);
        *L->refs[i].slot = dst;
        at += (size_t)((t->n_elements + 15) / 16 * 16);
    }
    free(f16_table);
    if (m->tied_output) m->weights.output = m->weights.tok_embd;
    return 0;
}

/* Name, tokenizer ----------------------------------------------------------- */

/* general.name (truncated at a character boundary, control bytes replaced), else
 * the file name without directory and .gguf. */
static void model_name(const gguf_file *f, const char *path, char *out, size_t cap)
{
    gguf_str s;
    size_t n = 0;
    if (gguf_get_str(f, "general.name", &s) == 0 && s.len > 0) {
        n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
        while (n > 0 && n < s.len && ((unsigned char)s.data[n] & 0xC0) == 0x80) n--;
        memcpy(out, s.data, n);
    } else {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        n = strlen(base);
        if (n > 5 && !strcmp(base + n - 5, ".gguf")) n -= 5;
        if (n > cap - 1) n = cap - 1;
        memcpy(out, base, n);
    }
    out[n] = 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)out[i] < 0x20 || out[i] == 0x7f) out[i] = '?';
}

static int model_tokenizer(moe_model *m, char *err, size_t errlen)
{
    if (gguf_find_key(m->gguf, "tokenizer.ggml.model") < 0) return 0;
    char why[256];
    if (tokenizer_load(m->gguf, &m->tokenizer, why, sizeof why))
        return fail(err, errlen, "tokenizer: %s", why);
    int nt = tokenizer_n_vocab(m->tokenizer);
    if (nt > m->weights.hp.n_vocab)
        return fail(err, errlen, "the tokenizer has %d tokens but token_embd.weight only %d rows",
                    nt, m->weights.hp.n_vocab);
    return 0;
}

/* Loading ------------------------------------------------------------------- */

/* Whether to convert the narrow projections to F32 as well (moe_proj_mode):
 * AUTO when those copies (F32 and packed) and the file itself take at most
 * half the memory available. */
static int proj_f32_wanted(const moe_model *m, moe_proj_mode mode)
{
    if (mode != MOE_PROJ_AUTO) return mode == MOE_PROJ_F32;
    const moe_hparams *hp = &m->weights.hp;
    double e = hp->n_embd, q = (double)hp->n_head * hp->head_dim, kv = (double)hp->n_head_kv * hp->head_dim;
    double proj = hp->n_layer * (2 * q * e + 2 * kv * e) + (double)hp->n_vocab * e;   /* and the output */
    double copies = 4 * (2 * proj + (double)hp->n_vocab * e);   /* F32 and packed; F32 embeddings */
    double avail = (double)pages_mem_available();
    return avail > 0 && copies + (double)m->mapped_bytes <= avail / 2;
}

static int model_fill(moe_model *m, const char *path, moe_proj_mode proj, char *err, size_t errlen)
{
    if (hparams_read(m->parts, m->n_parts, &m->weights.hp, err, errlen)) return -1;
    tensor_loader L = {.parts = m->parts, .n_parts = m->n_parts, .err = err, .errlen = errlen};
    /* n_vocab is known only from token_embd's shape: estimated from it here */
    const gguf_tensor *te = parts_find(m->parts, m->n_parts, "token_embd.weight");
    m->weights.hp.n_vocab = te && te->n_dims == 2 && te->ne[1] <= MAX_VOCAB ? (int)te->ne[1] : 0;
    m->proj_f32 = L.proj_f32 = proj_f32_wanted(m, proj);
    int rc = tensors_want(&L, m);
    if (rc == 0) rc = tensors_resolve(&L, m);
    free(L.refs);
    free(L.merged);
    free(L.merged_names);
    if (rc) return -1;
    int vocab_key;
    char key[96];
    snprintf(key, sizeof key, "%s.vocab_size", moe_arch_get(m->weights.hp.arch)->name);
    kv_reader r = {m->gguf, moe_arch_get(m->weights.hp.arch)->name, err, errlen, m->parts, m->n_parts};
    if (kv_int(&r, "vocab_size", 0, m->weights.hp.n_vocab, 1, MAX_VOCAB, &vocab_key)) return -1;
    if (vocab_key != m->weights.hp.n_vocab)
        return fail(err, errlen, "%s = %d but token_embd.weight has %d rows", key, vocab_key,
                    m->weights.hp.n_vocab);
    if (moe_weights_validate(&m->weights, err, errlen)) return -1;
    if (model_tokenizer(m, err, errlen)) return -1;
    model_name(m->gguf, path, m->name, sizeof m->name);
    return 0;
}

/* A model split by llama.cpp's gguf-split comes as PREFIX-00001-of-0000N.gguf
 * to ...-0000N-of-0000N.gguf: each a whole GGUF file holding some of the
 * tensors, the first also the metadata, all with split.no (0-based) and
 * split.count. Given the first, the others are opened in the same mode and
 * checked to be the parts they are named as; the tensors are then looked up in
 * every part. A file without split.count (or 1) is its own single part. */
static int parts_open(moe_model *m, const char *path, gguf_load_mode mode, char *err, size_t errlen)
{
    uint32_t count = 1, no = 0;
    int rc = gguf_get_u32(m->gguf, "split.count", &count);
    if (rc == -2) return fail(err, errlen, "split.count is not a 32-bit unsigned integer");
    if (rc == -1 || count <= 1) count = 1;
    if (count > MAX_PARTS) return fail(err, errlen, "split.count = %u is more than %d parts", count, MAX_PARTS);
    m->parts = calloc(count, sizeof *m->parts);
    if (!m->parts) return fail(err, errlen, "out of memory");
    m->parts[0] = m->gguf;
    m->n_parts = 1;
    if (count == 1) return 0;
    if (gguf_get_u32(m->gguf, "split.no", &no) || no != 0)
        return fail(err, errlen, "%s is part %u of a model split in %u (split.no): load its first part, "
                    "-00001-of-%05u.gguf", path, no + 1, count, count);
    char suffix[40];
    snprintf(suffix, sizeof suffix, "-00001-of-%05u.gguf", count);
    size_t pl = strlen(path), sl = strlen(suffix);
    if (pl < sl || strcmp(path + pl - sl, suffix))
        return fail(err, errlen, "%s is the first of %u parts of a split model, but its name does not end in %s, "
                    "so the other parts cannot be found", path, count, suffix);
    for (uint32_t i = 1; i < count; i++) {
        char part[4096], why[256];
        if ((size_t)snprintf(part, sizeof part, "%.*s-%05u-of-%05u.gguf", (int)(pl - sl), path, i + 1, count) >=
            sizeof part)
            return fail(err, errlen, "path too long: %s", path);
        if (gguf_open_mode(part, mode, &m->parts[i], why, sizeof why))
            return fail(err, errlen, "part %u of %u of a split model: %s", i + 1, count, why);
        m->n_parts++;
        uint32_t c2 = 0, n2 = 0;
        if (gguf_get_u32(m->parts[i], "split.count", &c2) || c2 != count || gguf_get_u32(m->parts[i], "split.no", &n2) ||
            n2 != i)
            return fail(err, errlen, "%s: not part %u of %u of this model (its split.no and split.count say "
                        "otherwise)", part, i + 1, count);
        m->mapped_bytes += gguf_file_size(m->parts[i]);
    }
    return 0;
}

int moe_proj_mode_parse(const char *s, moe_proj_mode *out)
{
    static const char *const names[] = {"auto", "f32", "file"};
    for (int i = 0; i < 3; i++)
        if (s && !strcmp(s, names[i])) {
            *out = (moe_proj_mode)i;
            return 0;
        }
    return -1;
}

int moe_model_load_mode(const char *path, gguf_load_mode mode, moe_model **out, char *err, size_t errlen)
{
    moe_load_opts o = {mode, MOE_PROJ_AUTO};
    return moe_model_load_opts(path, &o, out, err, errlen);
}

int moe_model_load_opts(const char *path, const moe_load_opts *o, moe_model **out, char *err, size_t errlen)
{
    gguf_load_mode mode = o->weights;
    double t0 = clock_mono_s();
    *out = NULL;
    moe_model *m = calloc(1, sizeof *m);
    if (!m) return fail(err, errlen, "out of memory");
    if (gguf_open_mode(path, mode, &m->gguf, err, errlen)) {
        free(m);
        return -1;
    }
    m->mapped_bytes = gguf_file_size(m->gguf);
    m->copied = gguf_copied(m->gguf);
    if (parts_open(m, path, mode, err, errlen) || model_fill(m, path, o->projections, err, errlen)) {
        moe_model_free(m);
        return -1;
    }
    m->load_ms = (clock_mono_s() - t0) * 1e3;
    *out = m;
    return 0;
}

int moe_model_load(const char *path, moe_model **out, char *err, size_t errlen)
{
    return moe_model_load_mode(path, GGUF_LOAD_MMAP, out, err, errlen);
}

void moe_model_free(moe_model *m)
{
    if (!m) return;
    if (m->tokenizer) tokenizer_free(m->tokenizer);
    free(m->weights.layers);
    free(m->converted);
    hugemem_free(m->merged, m->merged_bytes);
    for (int i = 1; i < m->n_parts; i++) gguf_close(m->parts[i]);
    free(m->parts);
    if (m->gguf) gguf_close(m->gguf);
    free(m);
}
