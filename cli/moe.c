/* moe.c -- the offline command-line tool: build/moe COMMAND [options].
 *
 *   moe info FILE                       architecture, parameters, experts, memory
 *   moe generate -m FILE -p TEXT|--tokens IDS -n N [sampling] [--json]
 *   moe tokenize -m FILE [--ids-only] [--add-special] [--parse-special] TEXT
 *   moe synth --arch A --preset P --seed N [--vocab FILE] [--type T | --f16] -o FILE
 *   moe eval -m FILE --text FILE        bits per byte of a text file
 *   moe bench [-m FILE] [--threads N]   throughput against this machine's rooflines
 *
 * Every error prints a message and exits non-zero.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/bench.h"
#include "core/clock.h"
#include "core/engine.h"
#include "core/sampler.h"
#include "models/model_file.h"
#include "models/synth.h"
#include "models/tokenizer.h"
#include "models/unicode.h"

#define ERRLEN 512

static int usage(void)
{
    fprintf(stderr,
        "usage: moe COMMAND [options]\n"
        "  info FILE                                  describe a GGUF model\n"
        "  generate -m FILE (-p TEXT | --tokens IDS) [-n N] [--temp T] [--top-k K]\n"
        "           [--top-p P] [--min-p P] [--repeat-penalty R] [--seed S]\n"
        "           [--threads N] [--kv-type f32|f16] [--json]  generate a continuation\n"
        "  tokenize -m FILE [--ids-only] [--add-special] [--parse-special] TEXT\n"
        "  tokenize -m FILE --bench TEXTFILE           tokenizer throughput\n"
        "  synth --arch llama|qwen2moe|olmoe|qwen3moe --preset tiny|small|bench|dense|tiny256|tiny256odd\n"
        "        [--seed N] [--vocab FILE] [--type T | --f16] [--split-experts]  (T: " SYNTH_TYPES ")\n"
        "        -o FILE"
        "                                           write a synthetic model\n"
        "  eval -m FILE --text FILE [--ctx N] [--threads N]  bits per byte of a text\n"
        "  bench -m FILE [--threads N] [--quick] [--weights auto|mmap|copy] [--projections auto|f32|file]\n"
        "        [--kv-type f32|f16]                   throughput and rooflines\n");
    return 2;
}

static int die(const char *what, const char *msg)
{
    fprintf(stderr, "moe: %s: %s\n", what, msg);
    return 1;
}

/* Parses a whole decimal integer in [lo, hi]; 0 or -1. */
static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

/* info ------------------------------------------------------------------- */

static int cmd_info(int argc, char **argv)
{
    if (argc != 1) return usage();
    char err[ERRLEN];
    moe_model *m;
    if (moe_model_load(argv[0], &m, err, sizeof err)) return die(argv[0], err);
    const moe_hparams *hp = &m->weights.hp;
    const moe_arch_info *a = moe_arch_get(hp->arch);
    uint64_t total = moe_hparams_n_params(hp, m->tied_output);
    uint64_t active = moe_hparams_n_params_active(hp, m->tied_output);
    printf("file:           %s\n", argv[0]);
    printf("name:           %s\n", m->name);
    printf("architecture:   %s (rope %s, %s top-k)\n", a->name,
           a->rope == MOE_ROPE_NEOX ? "neox" : "normal",
           a->renorm_topk ? "renormalised" : "unnormalised");
    printf("parameters:     %" PRIu64 " total, %" PRIu64 " active per token\n", total, active);
    printf("layers:         %d, embedding %d, heads %d (kv %d, head dim %d)\n",
           hp->n_layer, hp->n_embd, hp->n_head, hp->n_head_kv, hp->head_dim);
    if (hp->n_expert)
        printf("experts:        %d, top-%d, width %d%s\n", hp->n_expert, hp->n_expert_used,
               hp->n_ff, a->shared_expert ? " + shared expert" : "");
    else
        printf("experts:        none (dense FFN width %d)\n", hp->n_ff);
    printf("vocabulary:     %d%s\n", hp->n_vocab, m->tokenizer ? "" : " (no tokenizer in file)");
    printf("context:        %d\n", hp->n_ctx_train);
    const moe_layer_weights *L0 = &m->weights.layers[0];
    char types[64];
    if (hp->n_expert && L0->exp_raw.type != MOE_WT_F32)
        printf("expert weights: %s, read where the file keeps them (widened as the kernels read them)\n",
               moe_ffn_raw_types(&L0->exp_raw, types, sizeof types));
    if (L0->shexp_raw.type != MOE_WT_F32)
        printf("shared expert:  %s, likewise\n", moe_ffn_raw_types(&L0->shexp_raw, types, sizeof types));
    if (L0->ffn_raw.type != MOE_WT_F32)
        printf("dense FFN:      %s, likewise\n", moe_ffn_raw_types(&L0->ffn_raw, types, sizeof types));
    const char *v_in = L0->wv_raw.raw && L0->wv_raw.type != L0->wq_raw.type ? ", v in " : "";
    const char *v_type = *v_in ? moe_wtype_name(L0->wv_raw.type) : "";
    if (L0->wq_raw.raw && m->proj_f32)
        printf("projections:    %s%s%s where the file keeps them for steps of up to %d rows (decode), their\n"
               "                F32 conversion for more (with this much free memory; --projections file\n"
               "                would keep them in the file's type only)\n",
               moe_wtype_name(L0->wq_raw.type), v_in, v_type, MOE_RAW_PROJ_MAX_ROWS);
    else if (L0->wq_raw.raw)
        printf("projections:    %s%s%s, read where the file keeps them at every batch size (not enough\n"
               "                free memory for F32 copies; --projections f32 would make them)\n",
               moe_wtype_name(L0->wq_raw.type), v_in, v_type);
    if (m->n_parts > 1) printf("parts:          %d files (a split model: gguf-split)\n", m->n_parts);
    printf("memory:         %.1f MiB %s, %.1f MiB converted to F32 at load\n",
           m->mapped_bytes / 1048576.0, gguf_placement(m->gguf),
           m->converted_bytes / 1048576.0);
    if (m->merged_bytes)
        printf("merged experts: %.1f MiB copied at load: the file keeps each expert's matrices as tensors of\n"
               "                their own (Mixtral files before April 2024)\n", m->merged_bytes / 1048576.0);
    size_t packed = moe_weights_f32_projections(&m->weights) ? moe_engine_packed_bytes_for(hp) : 0;
    if (packed)
        printf("packed copy:    %.1f MiB more when it runs: the attention and output projections packed\n"
               "                for the many-row kernel (core/packed.h)\n", packed / 1048576.0);
    printf("kv cache:       %.1f KiB per token (F32), %.1f with --kv-type f16\n",
           kv_position_bytes(hp->n_layer, hp->n_head_kv, hp->head_dim, KV_F32) / 1024.0,
           kv_position_bytes(hp->n_layer, hp->n_head_kv, hp->head_dim, KV_F16) / 1024.0);
    printf("load time:      %.1f ms\n", m->load_ms);
    moe_model_free(m);
    return 0;
}

/* generate --------------------------------------------------------------- */

typedef struct {
    const char *model, *prompt, *tokens;
    long n_predict, threads;
    sampler_params sp;
    int json;
    kv_type kv;
} gen_opts;

static int parse_ids(const char *s, int32_t **ids, size_t *n)
{
    size_t cap = 16, len = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) return -1;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (errno || end == p || x < 0 || x > INT32_MAX) { free(v); return -1; }
        if (len == cap) {
            int32_t *nv = realloc(v, 2 * cap * sizeof *v);
            if (!nv) { free(v); return -1; }
            v = nv; cap *= 2;
        }
        v[len++] = (int32_t)x;
        p = end;
        if (*p == ',') p++;
        else if (*p) { free(v); return -1; }
    }
    if (len == 0) { free(v); return -1; }
    *ids = v; *n = len;
    return 0;
}

static int parse_gen_opts(int argc, char **argv, gen_opts *o)
{
    o->n_predict = 32;
    o->threads = 2;
    o->sp = sampler_default_params();
    o->sp.temperature = 0.0f;  /* greedy unless --temp, as the server does */
    for (int i = 0; i < argc; i++) {
        const char *f = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long l;
        if (!strcmp(f, "--json")) { o->json = 1; continue; }
        if (!v) { fprintf(stderr, "moe: %s needs a value\n", f); return -1; }
        i++;
        if (!strcmp(f, "-m")) o->model = v;
        else if (!strcmp(f, "-p")) o->prompt = v;
        else if (!strcmp(f, "--tokens")) o->tokens = v;
        else if (!strcmp(f, "-n")) { if (parse_int(v, 0, 1 << 20, &o->n_predict)) goto bad; }
        else if (!strcmp(f, "--threads")) { if (parse_int(v, 1, 256, &o->threads)) goto bad; }
        else if (!strcmp(f, "--kv-type")) { if (kv_type_parse(v, &o->kv)) goto bad; }
        else if (!strcmp(f, "--top-k")) { if (parse_int(v, 0, INT_MAX, &l)) goto bad; o->sp.top_k = (int)l; }
        else if (!strcmp(f, "--seed")) { if (parse_int(v, 0, LONG_MAX, &l)) goto bad; o->sp.seed = (uint64_t)l; }
        else if (!strcmp(f, "--temp")) { if (parse_float(v, &o->sp.temperature)) goto bad; }
        else if (!strcmp(f, "--top-p")) { if (parse_float(v, &o->sp.top_p)) goto bad; }
        else if (!strcmp(f, "--min-p")) { if (parse_float(v, &o->sp.min_p)) goto bad; }
        else if (!strcmp(f, "--repeat-penalty")) { if (parse_float(v, &o->sp.repeat_penalty)) goto bad; }
        else { fprintf(stderr, "moe: unknown option %s\n", f); return -1; }
        continue;
    bad:
        fprintf(stderr, "moe: bad value for %s: '%s'\n", f, v);
        return -1;
    }
    if (!o->model || (!o->prompt == !o->tokens)) {
        fprintf(stderr, "moe: generate needs -m FILE and exactly one of -p TEXT or --tokens IDS\n");
        return -1;
    }
    return 0;
}

/* Prints a JSON string literal: valid UTF-8 passed through, controls escaped, and
 * each byte that is not part of a valid sequence as U+FFFD (a byte-level
 * tokenizer's tokens can end inside a character, and JSON must be UTF-8). */
static void json_string(FILE *out, const char *s, size_t n)
{
    fputc('"', out);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = unicode_utf8_decode(s + i, n - i, &cp);
        unsigned char c = (unsigned char)s[i];
        if (cp >= UNICODE_BAD_BYTE) fputs("\\ufffd", out);
        else if (c == '"' || c == '\\') fprintf(out, "\\%c", c);
        else if (c == '\n') fputs("\\n", out);
        else if (c == '\t') fputs("\\t", out);
        else if (c == '\r') fputs("\\r", out);
        else if (c < 0x20) fprintf(out, "\\u%04x", c);
        else fwrite(s + i, 1, len, out);
        i += len;
    }
    fputc('"', out);
}

static void json_ids(FILE *out, const int32_t *ids, size_t n)
{
    fputc('[', out);
    for (size_t i = 0; i < n; i++) fprintf(out, "%s%d", i ? ", " : "", ids[i]);
    fputc(']', out);
}

typedef struct {
    moe_model *model;
    moe_engine *engine;
    sampler *smp;
    int32_t *ids;       /* (n_ctx) prompt then generated */
    float *logits;      /* (n_vocab) */
    int n_ctx;
} gen_state;

static void gen_state_free(gen_state *g)
{
    sampler_free(g->smp);
    moe_engine_free(g->engine);
    moe_model_free(g->model);
    free(g->ids);
    free(g->logits);
}

/* Prompt ids from text (tokenizer) or from the --tokens list. */
static int gen_prompt(const gen_opts *o, const moe_model *m, int32_t **ids, size_t *n,
                      char *err, size_t errlen)
{
    if (o->tokens) {
        if (parse_ids(o->tokens, ids, n)) {
            snprintf(err, errlen, "--tokens wants comma-separated ids, e.g. 1,2,3");
            return -1;
        }
        return 0;
    }
    if (!m->tokenizer) {
        snprintf(err, errlen, "the model has no tokenizer: use --tokens");
        return -1;
    }
    if (tokenizer_encode(m->tokenizer, o->prompt, strlen(o->prompt), TOKENIZE_ADD_SPECIAL,
                         ids, n, err, errlen))
        return -1;
    if (*n == 0) {
        free(*ids);
        snprintf(err, errlen, "the prompt tokenizes to nothing");
        return -1;
    }
    return 0;
}

static int run_generate(const gen_opts *o, gen_state *g, char *err, size_t errlen)
{
    size_t n_prompt;
    int32_t *prompt;
    if (moe_model_load(o->model, &g->model, err, errlen)) return -1;
    if (gen_prompt(o, g->model, &prompt, &n_prompt, err, errlen)) return -1;
    const moe_hparams *hp = &g->model->weights.hp;
    size_t n_ctx = n_prompt + (size_t)o->n_predict;
    if (n_ctx > (size_t)hp->n_ctx_train) {
        snprintf(err, errlen, "prompt (%zu tokens) + -n %ld exceeds the context length %d",
                 n_prompt, o->n_predict, hp->n_ctx_train);
        free(prompt);
        return -1;
    }
    g->n_ctx = (int)n_ctx;
    g->ids = malloc(n_ctx * sizeof *g->ids);
    g->logits = malloc((size_t)hp->n_vocab * sizeof *g->logits);
    if (!g->ids || !g->logits) { free(prompt); snprintf(err, errlen, "out of memory"); return -1; }
    memcpy(g->ids, prompt, n_prompt * sizeof *prompt);
    free(prompt);

    moe_engine_params ep = moe_engine_default_params(hp);
    ep.n_threads = (int)o->threads;
    ep.max_seqs = 1;
    ep.max_seq_len = (int)n_ctx;
    ep.max_batch_tokens = (int)n_prompt;
    ep.kv_n_blocks = (int)((n_ctx + (size_t)ep.kv_block_size - 1) / (size_t)ep.kv_block_size);
    ep.kv_type = o->kv;
    if (moe_engine_create(&g->model->weights, &ep, &g->engine, err, errlen)) return -1;
    if (moe_engine_seq_reserve(g->engine, 0, (int)n_ctx, err, errlen)) return -1;
    if (sampler_create(hp->n_vocab, &o->sp, &g->smp, err, errlen)) return -1;
    return (int)n_prompt;
}

/* Runs the prompt as one batch, then decodes token by token. Returns tokens made. */
static int gen_decode(const gen_opts *o, gen_state *g, int n_prompt, int *eos_hit,
                      char *err, size_t errlen)
{
    int32_t *pos = malloc((size_t)n_prompt * sizeof *pos), *seq = calloc((size_t)n_prompt, sizeof *seq);
    uint8_t *want = calloc((size_t)n_prompt, 1);
    int n = 0, rc = -1;
    if (!pos || !seq || !want) { snprintf(err, errlen, "out of memory"); goto done; }
    for (int i = 0; i < n_prompt; i++) pos[i] = i;
    want[n_prompt - 1] = 1;
    moe_batch b = {.n_tokens = n_prompt, .token = g->ids, .pos = pos, .seq = seq, .want_logits = want};
    const moe_tokenizer *tok = g->model->tokenizer;
    tokenizer_stream ts;
    tokenizer_stream_init(&ts);
    ts.n_fed = 1;  /* the output continues the prompt: keep its first leading space */
    *eos_hit = 0;
    double t0 = clock_mono_s(), t_prefill = 0;   /* t_prefill, t_decode in ms */
    for (;;) {
        if (moe_engine_forward(g->engine, &b, g->logits, err, errlen)) goto done;
        if (n == 0) t_prefill = (clock_mono_s() - t0) * 1e3;
        if (n == o->n_predict) break;
        int32_t id = sampler_sample(g->smp, g->logits, g->ids, (size_t)(n_prompt + n));
        g->ids[n_prompt + n++] = id;
        if (!o->json && tok) {
            char piece[512];
            int len = tokenizer_stream_push(tok, &ts, id, piece, sizeof piece);
            if (len > 0) { fwrite(piece, 1, (size_t)len, stdout); fflush(stdout); }
        } else if (!o->json) {
            printf("%d ", id);
            fflush(stdout);
        }
        if (tok && tokenizer_is_eog(tok, id)) { *eos_hit = 1; break; }
        if (n == o->n_predict) break;
        static const uint8_t one = 1;
        b = (moe_batch){.n_tokens = 1, .token = &g->ids[n_prompt + n - 1], .pos = &pos[0],
                        .seq = seq, .want_logits = &one};
        pos[0] = n_prompt + n - 1;
    }
    if (!o->json && tok) {
        char tail[64];
        int len = tokenizer_stream_flush(tok, &ts, tail, sizeof tail);
        if (len > 0) fwrite(tail, 1, (size_t)len, stdout);
    }
    if (!o->json) putchar('\n');
    double t_decode = (clock_mono_s() - t0) * 1e3 - t_prefill;
    fprintf(stderr, "moe: prompt %d tokens in %.1f ms (%.1f tok/s), %d generated in %.1f ms (%.1f tok/s)\n",
            n_prompt, t_prefill, n_prompt / (t_prefill / 1e3 + 1e-9), n, t_decode,
            n > 1 ? (n - 1) / (t_decode / 1e3 + 1e-9) : 0.0);
    rc = n;
done:
    free(pos); free(seq); free(want);
    return rc;
}

/* The text the generated ids add to the prompt's text. Decoding them alone would
 * drop the first space (a SentencePiece decode removes the space prefix), so decode
 * prompt + continuation and skip the prompt's own text. */
static int continuation_text(const moe_tokenizer *t, const int32_t *ids, size_t n_prompt,
                             size_t n_gen, char **text, size_t *len, size_t *skip)
{
    char err[ERRLEN], *head = NULL;
    size_t head_len = 0;
    if (tokenizer_decode(t, ids, n_prompt + n_gen, 0, text, len, err, sizeof err)) return -1;
    if (tokenizer_decode(t, ids, n_prompt, 0, &head, &head_len, err, sizeof err)) {
        free(*text);
        return -1;
    }
    *skip = head_len <= *len && memcmp(head, *text, head_len) == 0 ? head_len : 0;
    free(head);
    return 0;
}

static int cmd_generate(int argc, char **argv)
{
    gen_opts o = {0};
    if (parse_gen_opts(argc, argv, &o)) return 2;
    char err[ERRLEN];
    if (sampler_params_validate(&o.sp, err, sizeof err)) return die("generate", err);
    gen_state g = {0};
    int eos = 0, n_prompt = run_generate(&o, &g, err, sizeof err);
    int n = n_prompt < 0 ? -1 : gen_decode(&o, &g, n_prompt, &eos, err, sizeof err);
    if (n < 0) { gen_state_free(&g); return die("generate", err); }
    if (o.json) {
        printf("{\"prompt_tokens\": ");
        json_ids(stdout, g.ids, (size_t)n_prompt);
        printf(", \"tokens\": ");
        json_ids(stdout, g.ids + n_prompt, (size_t)n);
        printf(", \"text\": ");
        char *text = NULL;
        size_t len = 0, skip = 0;
        if (g.model->tokenizer &&
            continuation_text(g.model->tokenizer, g.ids, (size_t)n_prompt, (size_t)n, &text, &len,
                              &skip) == 0)
            json_string(stdout, text + skip, len - skip);
        else
            printf("null");
        free(text);
        printf(", \"finish_reason\": \"%s\"}\n", eos ? "eos" : "length");
    }
    gen_state_free(&g);
    return 0;
}

/* tokenize --------------------------------------------------------------- */

/* Single-threaded throughput over a whole text file: best of three passes. */
static int tokenize_bench(const moe_tokenizer *t, const char *path, int flags,
                          char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    char *text = NULL;
    size_t len = 0, cap = 0, got;
    char buf[65536];
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        if (len + got > cap) {
            cap = 2 * (len + got);
            char *nt = realloc(text, cap);
            if (!nt) { free(text); fclose(f); snprintf(err, errlen, "out of memory"); return -1; }
            text = nt;
        }
        memcpy(text + len, buf, got);
        len += got;
    }
    fclose(f);
    double best = 1e30;
    size_t n = 0;
    for (int r = 0; r < 3; r++) {
        int32_t *ids;
        double t0 = clock_mono_s();
        if (tokenizer_encode(t, text ? text : "", len, flags, &ids, &n, err, errlen)) {
            free(text);
            return -1;
        }
        double dt = (clock_mono_s() - t0) * 1e3;
        free(ids);
        if (dt < best) best = dt;
    }
    free(text);
    printf("tokenize %s: %zu bytes -> %zu tokens (%.2f bytes/token) in %.1f ms: %.1f MB/s (%s, 1 thread)\n",
           path, len, n, n ? (double)len / n : 0.0, best, len / 1e6 / (best / 1e3 + 1e-12),
           tokenizer_get_kind(t) == TOKENIZER_SPM ? "sentencepiece" : "byte-level BPE");
    return 0;
}

static int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *text = NULL, *bench = NULL;
    int ids_only = 0, flags = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench = argv[++i];
        else if (!strcmp(argv[i], "--ids-only")) ids_only = 1;
        else if (!strcmp(argv[i], "--add-special")) flags |= TOKENIZE_ADD_SPECIAL;
        else if (!strcmp(argv[i], "--parse-special")) flags |= TOKENIZE_PARSE_SPECIAL;
        else if (!text && (argv[i][0] != '-' || !argv[i][1])) text = argv[i];
        else { fprintf(stderr, "moe: tokenize: unexpected argument %s\n", argv[i]); return 2; }
    }
    if (!model || (!text == !bench)) return usage();
    char err[ERRLEN];
    gguf_file *f;
    moe_tokenizer *t;
    if (gguf_open(model, &f, err, sizeof err)) return die(model, err);
    int rc = tokenizer_load(f, &t, err, sizeof err);
    gguf_close(f);
    if (rc) return die(model, err);
    if (bench) {
        rc = tokenize_bench(t, bench, flags, err, sizeof err);
        tokenizer_free(t);
        return rc ? die("tokenize", err) : 0;
    }
    int32_t *ids;
    size_t n;
    if (tokenizer_encode(t, text, strlen(text), flags, &ids, &n, err, sizeof err)) {
        tokenizer_free(t);
        return die("tokenize", err);
    }
    for (size_t i = 0; i < n; i++) {
        if (ids_only) { printf("%s%d", i ? " " : "", ids[i]); continue; }
        char piece[256];
        int len = tokenizer_token_to_piece(t, ids[i], 1, piece, sizeof piece);
        printf("%6d -> ", ids[i]);
        json_string(stdout, piece, len > 0 && (size_t)len < sizeof piece ? (size_t)len : 0);
        putchar('\n');
    }
    if (ids_only) putchar('\n');
    free(ids);
    tokenizer_free(t);
    return 0;
}

/* synth ------------------------------------------------------------------ */

static int cmd_synth(int argc, char **argv)
{
    synth_params p = {.arch = "llama", .preset = "tiny", .seed = 1};
    const char *out = NULL;
    for (int i = 0; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long l;
        if (!strcmp(argv[i], "--f16")) { p.wtype = GGML_TYPE_F16; continue; }
        if (!strcmp(argv[i], "--split-experts")) { p.split_experts = 1; continue; }
        if (!v) { fprintf(stderr, "moe: %s needs a value\n", argv[i]); return 2; }
        if (!strcmp(argv[i], "--arch")) p.arch = v;
        else if (!strcmp(argv[i], "--preset")) p.preset = v;
        else if (!strcmp(argv[i], "--vocab")) p.vocab_path = v;
        else if (!strcmp(argv[i], "--type")) {
            if (synth_type_from_name(v, &p.wtype)) {
                fprintf(stderr, "moe: bad --type '%s' (%s)\n", v, SYNTH_TYPES);
                return 2;
            }
        }
        else if (!strcmp(argv[i], "-o")) out = v;
        else if (!strcmp(argv[i], "--seed")) {
            if (parse_int(v, 0, LONG_MAX, &l)) { fprintf(stderr, "moe: bad --seed '%s'\n", v); return 2; }
            p.seed = (uint64_t)l;
        } else { fprintf(stderr, "moe: synth: unknown option %s\n", argv[i]); return 2; }
        i++;
    }
    if (!out) { fprintf(stderr, "moe: synth needs -o FILE\n"); return 2; }
    char err[ERRLEN];
    if (synth_write(&p, out, err, sizeof err)) return die("synth", err);
    return 0;
}

/* eval ------------------------------------------------------------------- */

static int cmd_eval(int argc, char **argv)
{
    eval_opts o = {.ctx = 0, .threads = 2};
    for (int i = 0; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long l;
        if (!v) { fprintf(stderr, "moe: %s needs a value\n", argv[i]); return 2; }
        if (!strcmp(argv[i], "-m")) o.model = v;
        else if (!strcmp(argv[i], "--text")) o.text = v;
        else if (!strcmp(argv[i], "--ctx")) { if (parse_int(v, 2, 1 << 20, &l)) return usage(); o.ctx = (int)l; }
        else if (!strcmp(argv[i], "--threads")) { if (parse_int(v, 1, 256, &l)) return usage(); o.threads = (int)l; }
        else { fprintf(stderr, "moe: eval: unknown option %s\n", argv[i]); return 2; }
        i++;
    }
    if (!o.model || !o.text) return usage();
    char err[ERRLEN];
    if (eval_run(&o, err, sizeof err)) return die("eval", err);
    return 0;
}

/* bench ------------------------------------------------------------------ */

static int cmd_bench(int argc, char **argv)
{
    bench_opts o = {.threads = 2, .weights = GGUF_LOAD_AUTO};
    for (int i = 0; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long l;
        if (!strcmp(argv[i], "--quick")) { o.quick = 1; continue; }
        if (!v) { fprintf(stderr, "moe: %s needs a value\n", argv[i]); return 2; }
        if (!strcmp(argv[i], "-m")) o.model = v;
        else if (!strcmp(argv[i], "--threads")) { if (parse_int(v, 1, 256, &l)) return usage(); o.threads = (int)l; }
        else if (!strcmp(argv[i], "--text")) o.text = v;
        else if (!strcmp(argv[i], "--weights")) {
            if (gguf_load_mode_parse(v, &o.weights)) {
                fprintf(stderr, "moe: bench: --weights %s: want auto, mmap or copy\n", v);
                return 2;
            }
        } else if (!strcmp(argv[i], "--projections")) {
            if (moe_proj_mode_parse(v, &o.projections)) {
                fprintf(stderr, "moe: bench: --projections %s: want auto, f32 or file\n", v);
                return 2;
            }
        } else if (!strcmp(argv[i], "--kv-type")) {
            if (kv_type_parse(v, &o.kv)) {
                fprintf(stderr, "moe: bench: --kv-type %s: want f32 or f16\n", v);
                return 2;
            }
        } else { fprintf(stderr, "moe: bench: unknown option %s %s\n", argv[i], v); return 2; }
        i++;
    }
    char err[ERRLEN];
    if (bench_run(&o, err, sizeof err)) return die("bench", err);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) return usage();
    const char *cmd = argv[1];
    argc -= 2;
    argv += 2;
    if (!strcmp(cmd, "info")) return cmd_info(argc, argv);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc, argv);
    if (!strcmp(cmd, "synth")) return cmd_synth(argc, argv);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc, argv);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc, argv);
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) { usage(); return 0; }
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    return usage();
}
