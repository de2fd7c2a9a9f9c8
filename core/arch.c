/* arch.c -- the architecture table and weight/hyperparameter checks. */
#include "core/model.h"

#include <stdio.h>
#include <string.h>

/* Router semantics per architecture (see ../shared/guides/GGUF-MOE-FACTS.md):
 * llama (Mixtral): softmax, top-k, renormalised over the k chosen.
 * qwen2moe: softmax, top-k, not renormalised, plus a sigmoid-gated shared expert.
 * olmoe: softmax, top-k, not renormalised; RMS norm over whole q and k.
 * qwen3moe: softmax, top-k, renormalised; RMS norm per head on q and k. */
static const moe_arch_info arch_table[MOE_ARCH_COUNT] = {
    [MOE_ARCH_LLAMA]    = {"llama",    MOE_ROPE_NORMAL, MOE_QK_NORM_NONE, 0, MOE_SCORE_SOFTMAX, 1, 1.0f, 0},
    [MOE_ARCH_QWEN2MOE] = {"qwen2moe", MOE_ROPE_NEOX,   MOE_QK_NORM_NONE, 1, MOE_SCORE_SOFTMAX, 0, 1.0f, 1},
    [MOE_ARCH_OLMOE]    = {"olmoe",    MOE_ROPE_NEOX,   MOE_QK_NORM_FULL, 0, MOE_SCORE_SOFTMAX, 0, 1.0f, 0},
    [MOE_ARCH_QWEN3MOE] = {"qwen3moe", MOE_ROPE_NEOX,   MOE_QK_NORM_HEAD, 0, MOE_SCORE_SOFTMAX, 1, 1.0f, 0},
};

const moe_arch_info *moe_arch_get(moe_arch arch)
{
    if ((int)arch < 0 || arch >= MOE_ARCH_COUNT) return NULL;
    return &arch_table[arch];
}

moe_arch moe_arch_from_name(const char *name)
{
    for (int a = 0; a < MOE_ARCH_COUNT; a++)
        if (name && strcmp(name, arch_table[a].name) == 0) return (moe_arch)a;
    return MOE_ARCH_COUNT;
}

static int fail(char *err, size_t errlen, const char *msg, int layer)
{
    if (layer >= 0) snprintf(err, errlen, "layer %d: %s", layer, msg);
    else snprintf(err, errlen, "%s", msg);
    return -1;
}

static int hparams_validate(const moe_hparams *hp, char *err, size_t errlen)
{
    const moe_arch_info *a = moe_arch_get(hp->arch);
    if (!a) return fail(err, errlen, "unknown architecture", -1);
    if (hp->n_vocab <= 0 || hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 ||
        hp->n_head_kv <= 0 || hp->head_dim <= 0 || hp->n_ff <= 0)
        return fail(err, errlen, "hyperparameters must be positive (vocab, embd, layers, heads, head_dim, ff)", -1);
    if (hp->n_head % hp->n_head_kv != 0)
        return fail(err, errlen, "head_count must be a multiple of head_count_kv", -1);
    if (hp->rope_dim <= 0 || hp->rope_dim > hp->head_dim || hp->rope_dim % 2)
        return fail(err, errlen, "rope dimension must be even and at most the head size", -1);
    if (hp->n_expert < 0 || hp->n_expert_used < 0 || hp->n_expert_used > hp->n_expert)
        return fail(err, errlen, "expert_used_count must be between 0 and expert_count", -1);
    if (hp->n_expert > 0 && hp->n_expert_used == 0)
        return fail(err, errlen, "expert_used_count must be > 0 when expert_count > 0", -1);
    if (hp->n_expert == 0 && hp->arch != MOE_ARCH_LLAMA)
        return fail(err, errlen, "only llama may be dense (expert_count 0)", -1);
    if (a->shared_expert && hp->n_ff_shexp <= 0)
        return fail(err, errlen, "shared expert width must be positive", -1);
    if (!(hp->rms_eps > 0.0f) || !(hp->rope_base > 0.0f))
        return fail(err, errlen, "rms epsilon and rope base must be positive", -1);
    return 0;
}

/* An FFN's three matrices are there: in F32, or all three in types the kernels
 * read, with rows of whole blocks (gate and up rows of n_embd, down of n_ff). */
static int ffn_present(const float *g, const float *u, const float *d, const moe_ffn_raw *r, int n_embd, int n_ff)
{
    if (r->type == MOE_WT_F32) return g && u && d;
    if (!moe_wtype_narrow(r->type) || !moe_wtype_narrow(r->up_type) || !moe_wtype_narrow(r->down_type)) return 0;
    if ((size_t)n_embd % moe_wtype_block(r->type) || (size_t)n_embd % moe_wtype_block(r->up_type) ||
        (size_t)n_ff % moe_wtype_block(r->down_type))
        return 0;
    return r->gate && r->up && r->down;
}

/* An optional projection copy (moe_wraw): absent, or of a type the kernels read
 * with rows of k whole blocks. */
static int raw_ok(const moe_wraw *r, int k)
{
    if (!r->raw) return 1;
    return moe_wtype_narrow(r->type) && (size_t)k % moe_wtype_block(r->type) == 0;
}

int moe_weights_validate(const moe_weights *w, char *err, size_t errlen)
{
    const moe_hparams *hp = &w->hp;
    if (hparams_validate(hp, err, errlen)) return -1;
    const moe_arch_info *a = moe_arch_get(hp->arch);
    if (!(w->tok_embd || w->tok_embd_raw.raw) || !w->output_norm || !(w->output || w->output_raw.raw) || !w->layers)
        return fail(err, errlen, "missing token embedding, output norm or output", -1);
    if (!raw_ok(&w->tok_embd_raw, hp->n_embd))
        return fail(err, errlen, "token embedding in a type or shape the kernels cannot read", -1);
    if (!raw_ok(&w->output_raw, hp->n_embd))
        return fail(err, errlen, "output weights in a type or shape the kernels cannot read", -1);
    for (int l = 0; l < hp->n_layer; l++) {
        const moe_layer_weights *L = &w->layers[l];
        if (!L->attn_norm || !(L->wq || L->wq_raw.raw) || !(L->wk || L->wk_raw.raw) || !(L->wv || L->wv_raw.raw) ||
            !(L->wo || L->wo_raw.raw) || !L->ffn_norm)
            return fail(err, errlen, "missing attention or norm weights", l);
        if (!raw_ok(&L->wq_raw, hp->n_embd) || !raw_ok(&L->wk_raw, hp->n_embd) || !raw_ok(&L->wv_raw, hp->n_embd) ||
            !raw_ok(&L->wo_raw, hp->n_head * hp->head_dim))
            return fail(err, errlen, "attention weights in a type or shape the kernels cannot read", l);
        if (a->qkv_bias && (!L->bq || !L->bk || !L->bv))
            return fail(err, errlen, "missing q/k/v biases", l);
        if (a->qk_norm != MOE_QK_NORM_NONE && (!L->q_norm || !L->k_norm))
            return fail(err, errlen, "missing q/k norm weights", l);
        if (hp->n_expert == 0) {
            if (!ffn_present(L->ffn_gate, L->ffn_up, L->ffn_down, &L->ffn_raw, hp->n_embd, hp->n_ff))
                return fail(err, errlen, "missing dense FFN weights", l);
        } else if (!L->router ||
                   !ffn_present(L->exp_gate, L->exp_up, L->exp_down, &L->exp_raw, hp->n_embd, hp->n_ff)) {
            return fail(err, errlen, "missing router or expert weights (or of an unknown type)", l);
        }
        if (a->shared_expert && (!L->shexp_gate_inp ||
                                 !ffn_present(L->shexp_gate, L->shexp_up, L->shexp_down, &L->shexp_raw,
                                              hp->n_embd, hp->n_ff_shexp)))
            return fail(err, errlen, "missing shared expert weights", l);
    }
    return 0;
}

static uint64_t layer_params(const moe_hparams *hp, int experts_counted)
{
    const moe_arch_info *a = moe_arch_get(hp->arch);
    uint64_t e = (uint64_t)hp->n_embd, hd = (uint64_t)hp->head_dim;
    uint64_t q = (uint64_t)hp->n_head * hd, kv = (uint64_t)hp->n_head_kv * hd;
    uint64_t n = 2 * e;                          /* attn_norm, ffn_norm */
    n += q * e + 2 * kv * e + e * q;             /* wq wk wv wo */
    if (a->qkv_bias) n += q + 2 * kv;
    if (a->qk_norm == MOE_QK_NORM_FULL) n += q + kv;
    if (a->qk_norm == MOE_QK_NORM_HEAD) n += 2 * hd;
    uint64_t ffn = 3 * (uint64_t)hp->n_ff * e;
    if (hp->n_expert == 0) return n + ffn;
    n += (uint64_t)hp->n_expert * e;             /* router */
    n += (uint64_t)experts_counted * ffn;
    if (a->shared_expert) n += e + 3 * (uint64_t)hp->n_ff_shexp * e;
    return n;
}

static uint64_t params(const moe_hparams *hp, int tied_output, int experts_counted)
{
    uint64_t e = (uint64_t)hp->n_embd, v = (uint64_t)hp->n_vocab;
    uint64_t n = v * e + e + (tied_output ? 0 : v * e);
    return n + (uint64_t)hp->n_layer * layer_params(hp, experts_counted);
}

int moe_weights_f32_projections(const moe_weights *w)
{
    if (!w->output) return 0;
    for (int l = 0; l < w->hp.n_layer; l++) {
        const moe_layer_weights *L = &w->layers[l];
        if (!L->wq || !L->wk || !L->wv || !L->wo) return 0;
    }
    return 1;
}

const char *moe_ffn_raw_types(const moe_ffn_raw *r, char *buf, size_t cap)
{
    if (r->up_type == r->type && r->down_type == r->type) snprintf(buf, cap, "%s", moe_wtype_name(r->type));
    else if (r->up_type == r->type) snprintf(buf, cap, "%s (down %s)", moe_wtype_name(r->type), moe_wtype_name(r->down_type));
    else
        snprintf(buf, cap, "gate %s, up %s, down %s", moe_wtype_name(r->type), moe_wtype_name(r->up_type),
                 moe_wtype_name(r->down_type));
    return buf;
}

uint64_t moe_hparams_n_params(const moe_hparams *hp, int tied_output)
{
    return params(hp, tied_output, hp->n_expert);
}

uint64_t moe_hparams_n_params_active(const moe_hparams *hp, int tied_output)
{
    return params(hp, tied_output, hp->n_expert_used);
}
