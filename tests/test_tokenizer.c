/* test_tokenizer.c -- the shared llama.cpp test vectors (llama-spm, gpt-2), round
 * trips, streaming, invalid UTF-8, special tokens, long inputs, hostile metadata and
 * the Unicode tables. */
#include <pthread.h>
#include <stdint.h>

#include "core/clock.h"
#include "models/gguf.h"
#include "models/tokenizer.h"
#include "models/unicode.h"
#include "tests/testutil.h"

static char err[512];

/* ------------------------------------------------------------ helpers ---- */

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0, len = 0, k;
    do {
        if (len + 65536 + 1 > cap) {
            cap = (len + 65536 + 1) * 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
        k = fread(buf + len, 1, cap - len - 1, f);
        len += k;
    } while (k > 0);
    fclose(f);
    buf[len] = '\0';
    *n = len;
    return buf;
}

/* Path of a file under ../shared/testdata/vocab, or NULL (with a message) if absent. */
static const char *vocab_path(const char *file)
{
    static char path[1024];
    const char *shared = tu_shared_dir();
    if (!shared) {
        printf("skip: ../shared missing (no vocabulary files)\n");
        return NULL;
    }
    snprintf(path, sizeof path, "%s/testdata/vocab/%s", shared, file);
    if (access(path, R_OK) != 0) {
        printf("skip: %s missing\n", path);
        return NULL;
    }
    return path;
}

static moe_tokenizer *load_vocab(const char *name)
{
    char file[256];
    snprintf(file, sizeof file, "ggml-vocab-%s.gguf", name);
    const char *path = vocab_path(file);
    if (!path) return NULL;
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    moe_tokenizer *t;
    ck_assert_msg(tokenizer_load(f, &t, err, sizeof err) == 0, "%s", err);
    gguf_close(f);  /* the tokenizer must not need it any more */
    return t;
}

/* The vector inputs: the .inp file is every input followed by
 * "\n__ggml_vocab_test__\n" (so an input may be empty or end in newlines of its own),
 * the .out file one line of space-separated ids per input. */
typedef struct {
    char *inp, *out;         /* file contents (inputs are cut in place) */
    const char *text[128];
    size_t len[128];
    char *ids_line[128];
    int n;
} vectors;

static int vectors_load(vectors *v, const char *name)
{
    memset(v, 0, sizeof *v);
    char file[256];
    snprintf(file, sizeof file, "ggml-vocab-%s.gguf.inp", name);
    const char *path = vocab_path(file);
    if (!path) return -1;
    size_t n_inp, n_out;
    v->inp = slurp(path, &n_inp);
    ck_assert_ptr_nonnull(v->inp);
    snprintf(file, sizeof file, "ggml-vocab-%s.gguf.out", name);
    path = vocab_path(file);
    ck_assert_ptr_nonnull(path);
    v->out = slurp(path, &n_out);
    ck_assert_ptr_nonnull(v->out);

    const char *sep = "\n__ggml_vocab_test__\n";
    char *p = v->inp, *end = v->inp + n_inp;
    while (p < end) {
        char *q = strstr(p, sep);
        ck_assert_msg(q != NULL, "%s: text after the last separator", name);
        ck_assert_int_lt(v->n, 128);
        *q = '\0';
        v->text[v->n] = p;
        v->len[v->n] = (size_t)(q - p);
        v->n++;
        p = q + strlen(sep);
    }
    char *line = v->out;
    for (int i = 0; i < v->n; i++) {
        char *nl = strchr(line, '\n');
        ck_assert_msg(nl != NULL, "%s.out: %d lines for %d inputs", name, i, v->n);
        *nl = '\0';
        v->ids_line[i] = line;
        line = nl + 1;
    }
    ck_assert_msg(*line == '\0', "%s.out: more lines than inputs", name);
    return 0;
}

static void vectors_free(vectors *v)
{
    free(v->inp);
    free(v->out);
}

/* Parses a line of ids; returns how many. */
static size_t parse_ids(const char *line, int32_t *ids, size_t cap)
{
    size_t n = 0;
    char *e;
    for (;;) {
        long v = strtol(line, &e, 10);
        if (e == line) break;
        ck_assert_uint_lt(n, cap);
        ids[n++] = (int32_t)v;
        line = e;
    }
    return n;
}

static void encode_ok(const moe_tokenizer *t, const char *s, size_t n, int flags, int32_t **ids,
                      size_t *n_ids)
{
    ck_assert_msg(tokenizer_encode(t, s, n, flags, ids, n_ids, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_nonnull(*ids);
}

static char *decode_ok(const moe_tokenizer *t, const int32_t *ids, size_t n, int render,
                       size_t *len)
{
    char *text;
    ck_assert_msg(tokenizer_decode(t, ids, n, render, &text, len, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(text[*len], '\0');
    return text;
}

/* Streams ids through tokenizer_stream_*; returns the malloc'd text. */
static char *stream_all(const moe_tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
    size_t cap = 64, used = 0;
    char *text = malloc(cap);
    ck_assert_ptr_nonnull(text);
    tokenizer_stream st;
    tokenizer_stream_init(&st);
    char buf[512];
    for (size_t i = 0; i <= n; i++) {
        int k = i < n ? tokenizer_stream_push(t, &st, ids[i], buf, sizeof buf)
                      : tokenizer_stream_flush(t, &st, buf, sizeof buf);
        ck_assert_int_ge(k, 0);
        if (used + (size_t)k + 1 > cap) {
            cap = (used + (size_t)k + 1) * 2;
            text = realloc(text, cap);
            ck_assert_ptr_nonnull(text);
        }
        memcpy(text + used, buf, (size_t)k);
        used += (size_t)k;
    }
    text[used] = '\0';
    *len = used;
    return text;
}

/* Is s[0..n) valid UTF-8? */
static int utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += unicode_utf8_decode(s + i, n - i, &cp);
        if (cp >= UNICODE_BAD_BYTE) return 0;
    }
    return 1;
}

/* ------------------------------------------------------------ vectors ---- */

static void check_vectors(const char *name)
{
    moe_tokenizer *t = load_vocab(name);
    if (!t) return;
    vectors v;
    ck_assert_int_eq(vectors_load(&v, name), 0);
    ck_assert_int_ge(v.n, 46);
    int passed = 0;
    for (int i = 0; i < v.n; i++) {
        int32_t want[4096], *ids;
        size_t n_want = parse_ids(v.ids_line[i], want, 4096), n;
        encode_ok(t, v.text[i], v.len[i], 0, &ids, &n);
        int same = n == n_want && (n == 0 || memcmp(ids, want, n * sizeof *ids) == 0);
        if (same) passed++;
        else {
            printf("%s vector %d mismatch: \"%.*s\"\n  got ", name, i, (int)v.len[i], v.text[i]);
            for (size_t k = 0; k < n; k++) printf(" %d", (int)ids[k]);
            printf("\n  want %s\n", v.ids_line[i]);
        }
        free(ids);
    }
    printf("%s: %d/%d vectors match\n", name, passed, v.n);
    ck_assert_int_eq(passed, v.n);
    vectors_free(&v);
    tokenizer_free(t);
}

START_TEST(vectors_llama_spm) { check_vectors("llama-spm"); }
END_TEST

START_TEST(vectors_gpt2) { check_vectors("gpt-2"); }
END_TEST

/* decode(encode(s)) == s for every vector input, and streaming gives the same. */
static void check_round_trips(const char *name)
{
    moe_tokenizer *t = load_vocab(name);
    if (!t) return;
    vectors v;
    ck_assert_int_eq(vectors_load(&v, name), 0);
    for (int i = 0; i < v.n; i++) {
        int32_t *ids;
        size_t n, len, slen;
        encode_ok(t, v.text[i], v.len[i], 0, &ids, &n);
        char *text = decode_ok(t, ids, n, 0, &len);
        ck_assert_msg(len == v.len[i] && memcmp(text, v.text[i], len) == 0,
                      "%s vector %d: decode gave \"%s\"", name, i, text);
        char *streamed = stream_all(t, ids, n, &slen);
        ck_assert_msg(slen == len && memcmp(streamed, text, len) == 0,
                      "%s vector %d: stream gave \"%s\"", name, i, streamed);
        free(streamed);
        free(text);
        free(ids);
    }
    vectors_free(&v);
    tokenizer_free(t);
}

START_TEST(round_trip_llama_spm) { check_round_trips("llama-spm"); }
END_TEST

START_TEST(round_trip_gpt2) { check_round_trips("gpt-2"); }
END_TEST

/* Streaming never emits half a character: every push's output is valid UTF-8 on
 * its own, even when the tokens split characters into bytes. */
START_TEST(stream_whole_characters)
{
    moe_tokenizer *t = load_vocab("llama-spm");
    if (!t) return;
    const char *s = "日本語 ßþ 🦙🦙 emoji 😁 done";
    int32_t *ids;
    size_t n;
    encode_ok(t, s, strlen(s), 0, &ids, &n);
    int byte_tokens = 0;
    for (size_t i = 0; i < n; i++) {
        char piece[64];
        if (tokenizer_token_to_piece(t, ids[i], 0, piece, sizeof piece) == 1
            && (unsigned char)piece[0] >= 0x80)
            byte_tokens++;
    }
    ck_assert_int_gt(byte_tokens, 0);  /* the emoji go through <0xNN> byte tokens */
    tokenizer_stream st;
    tokenizer_stream_init(&st);
    char out[4096];
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        int k = tokenizer_stream_push(t, &st, ids[i], out + used, sizeof out - used);
        ck_assert_int_ge(k, 0);
        ck_assert_msg(utf8_valid(out + used, (size_t)k), "push %zu emitted a partial character", i);
        used += (size_t)k;
    }
    ck_assert_int_eq(tokenizer_stream_flush(t, &st, out + used, sizeof out - used), 0);
    ck_assert_uint_eq(used, strlen(s));
    ck_assert(memcmp(out, s, used) == 0);
    /* A buffer too small is an error that leaves the stream as it was. */
    tokenizer_stream_init(&st);
    ck_assert_int_eq(tokenizer_stream_push(t, &st, 15043, out, 4), -1);  /* "Hello" */
    ck_assert_int_eq(tokenizer_stream_push(t, &st, 15043, out, 5), 5);
    ck_assert(memcmp(out, "Hello", 5) == 0);
    ck_assert_int_eq(tokenizer_stream_push(t, &st, 15043, out, sizeof out), 6);  /* " Hello" */
    free(ids);
    tokenizer_free(t);
}
END_TEST

/* --------------------------------------------------------- edge inputs ---- */

START_TEST(empty_input)
{
    const char *names[] = {"llama-spm", "gpt-2"};
    for (int k = 0; k < 2; k++) {
        moe_tokenizer *t = load_vocab(names[k]);
        if (!t) return;
        int32_t *ids;
        size_t n;
        encode_ok(t, "", 0, 0, &ids, &n);
        ck_assert_uint_eq(n, 0);
        free(ids);
        encode_ok(t, NULL, 0, TOKENIZE_PARSE_SPECIAL, &ids, &n);
        ck_assert_uint_eq(n, 0);
        free(ids);
        /* llama: add_bos_token true -> [bos]; gpt-2 has no add_bos_token -> nothing */
        encode_ok(t, "", 0, TOKENIZE_ADD_SPECIAL, &ids, &n);
        if (k == 0) {
            ck_assert_uint_eq(n, 1);
            ck_assert_int_eq(ids[0], tokenizer_bos(t));
        } else {
            ck_assert_uint_eq(n, 0);
        }
        free(ids);
        size_t len;
        char *text = decode_ok(t, NULL, 0, 0, &len);
        ck_assert_uint_eq(len, 0);
        free(text);
        tokenizer_free(t);
    }
}
END_TEST

/* Documented behaviour: invalid bytes are kept (SPM: <0xNN> byte tokens; BPE: byte
 * tokens), so decode gives the input back byte for byte; the stream shows each
 * maximal invalid sequence as U+FFFD. */
START_TEST(invalid_utf8)
{
    static const struct { const char *in, *streamed; } cases[] = {
        {"a\xFF" "b", "a\xEF\xBF\xBD" "b"},
        {"\xC3\x28 x", "\xEF\xBF\xBD( x"},
        {"end \xE2\x82", "end \xEF\xBF\xBD"},                   /* truncated at the end */
        {"\xE2\x82 mid", "\xEF\xBF\xBD mid"},
        {"\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD"},               /* overlong */
        {"\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* surrogate */
        {"\xF4\x90\x80\x80!", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD!"},
        {"\x80\x80 x \xF0\x9F\x98", "\xEF\xBF\xBD\xEF\xBF\xBD x \xEF\xBF\xBD"},
        {"ok \xF0\x9F\x98\x81 ok", "ok \xF0\x9F\x98\x81 ok"},   /* valid, for contrast */
    };
    const char *names[] = {"llama-spm", "gpt-2"};
    for (int k = 0; k < 2; k++) {
        moe_tokenizer *t = load_vocab(names[k]);
        if (!t) return;
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            const char *in = cases[c].in;
            int32_t *ids, *ids2;
            size_t n, n2, len, slen;
            encode_ok(t, in, strlen(in), 0, &ids, &n);
            encode_ok(t, in, strlen(in), 0, &ids2, &n2);  /* consistent */
            ck_assert_uint_eq(n, n2);
            ck_assert(memcmp(ids, ids2, n * sizeof *ids) == 0);
            char *text = decode_ok(t, ids, n, 0, &len);
            ck_assert_msg(len == strlen(in) && memcmp(text, in, len) == 0,
                          "%s case %zu: decode is not the input", names[k], c);
            char *streamed = stream_all(t, ids, n, &slen);
            ck_assert_msg(slen == strlen(cases[c].streamed)
                          && memcmp(streamed, cases[c].streamed, slen) == 0,
                          "%s case %zu: stream gave \"%s\"", names[k], c, streamed);
            ck_assert(utf8_valid(streamed, slen));
            free(streamed);
            free(text);
            free(ids);
            free(ids2);
        }
        tokenizer_free(t);
    }
}
END_TEST

START_TEST(out_of_range_ids)
{
    const char *names[] = {"llama-spm", "gpt-2"};
    for (int k = 0; k < 2; k++) {
        moe_tokenizer *t = load_vocab(names[k]);
        if (!t) return;
        int32_t nv = tokenizer_n_vocab(t);
        int32_t bad[] = {-1, nv, nv + 1000, INT32_MIN, INT32_MAX};
        char buf[64];
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            int32_t ids[3] = {10, bad[i], 11};
            char *text = (char *)1;
            size_t len = 7;
            err[0] = '\0';
            ck_assert_int_eq(tokenizer_decode(t, ids, 3, 0, &text, &len, err, sizeof err), -1);
            ck_assert_ptr_null(text);
            ck_assert_msg(strstr(err, "out of range") != NULL, "message: %s", err);
            ck_assert_int_eq(tokenizer_token_to_piece(t, bad[i], 0, buf, sizeof buf), -1);
            ck_assert_int_eq(tokenizer_token_to_piece(t, bad[i], 1, buf, sizeof buf), -1);
            ck_assert_ptr_null(tokenizer_token_text(t, bad[i]));
            ck_assert_int_eq(tokenizer_is_eog(t, bad[i]), 0);
            tokenizer_stream st;
            tokenizer_stream_init(&st);
            ck_assert_int_eq(tokenizer_stream_push(t, &st, bad[i], buf, sizeof buf), -1);
        }
        /* the last valid id still works */
        ck_assert_int_ge(tokenizer_token_to_piece(t, nv - 1, 1, buf, sizeof buf), 0);
        ck_assert_ptr_nonnull(tokenizer_token_text(t, nv - 1));
        tokenizer_free(t);
    }
}
END_TEST

/* token_to_piece: the length even when it does not fit (nothing useful written). */
START_TEST(piece_lengths)
{
    moe_tokenizer *t = load_vocab("llama-spm");
    if (!t) return;
    char buf[64];
    int32_t hello = 15043;  /* "▁Hello" in the llama vocabulary */
    ck_assert_str_eq(tokenizer_token_text(t, hello), "\xE2\x96\x81Hello");
    ck_assert_int_eq(tokenizer_token_to_piece(t, hello, 0, buf, sizeof buf), 6);
    ck_assert(memcmp(buf, " Hello", 6) == 0);
    ck_assert_int_eq(tokenizer_token_to_piece(t, hello, 0, buf, 2), 6);
    /* byte token <0x0A> is a newline; control tokens show only with render_special */
    ck_assert_int_eq(tokenizer_token_to_piece(t, 13, 0, buf, sizeof buf), 1);
    ck_assert_int_eq(buf[0], '\n');
    ck_assert_int_eq(tokenizer_token_to_piece(t, tokenizer_bos(t), 0, buf, sizeof buf), 0);
    ck_assert_int_eq(tokenizer_token_to_piece(t, tokenizer_bos(t), 1, buf, sizeof buf), 3);
    ck_assert(memcmp(buf, "<s>", 3) == 0);
    tokenizer_free(t);
}
END_TEST

/* ----------------------------------------------------- special tokens ---- */

static int contains_id(const int32_t *ids, size_t n, int32_t id)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] == id) return 1;
    return 0;
}

START_TEST(special_tokens_spm)
{
    moe_tokenizer *t = load_vocab("llama-spm");
    if (!t) return;
    ck_assert_int_eq(tokenizer_get_kind(t), TOKENIZER_SPM);
    ck_assert_int_eq(tokenizer_bos(t), 1);
    ck_assert_int_eq(tokenizer_eos(t), 2);
    ck_assert(tokenizer_is_eog(t, 2));
    ck_assert(!tokenizer_is_eog(t, 1));
    const char *s = "<s>Hello</s> world";
    int32_t *ids;
    size_t n;
    /* Without parsing, the texts are ordinary characters. */
    encode_ok(t, s, strlen(s), 0, &ids, &n);
    ck_assert(!contains_id(ids, n, 1) && !contains_id(ids, n, 2));
    free(ids);
    /* With parsing they become the tokens; the text after each special token gets
     * the space prefix again (llama.cpp). */
    encode_ok(t, s, strlen(s), TOKENIZE_PARSE_SPECIAL, &ids, &n);
    ck_assert_uint_eq(n, 5);
    ck_assert_int_eq(ids[0], 1);
    ck_assert_int_eq(ids[1], 15043);  /* ▁Hello */
    ck_assert_int_eq(ids[2], 2);
    ck_assert_int_eq(ids[3], 29871);  /* "▁▁world": ▁ then ▁world */
    ck_assert_int_eq(ids[4], 3186);
    free(ids);
    /* ADD_SPECIAL: BOS first (add_bos_token), no EOS (add_eos_token false). */
    encode_ok(t, "Hello world", 11, TOKENIZE_ADD_SPECIAL, &ids, &n);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(ids[0], 1);
    ck_assert_int_eq(ids[1], 15043);
    ck_assert_int_eq(ids[2], 3186);
    size_t len;
    char *text = decode_ok(t, ids, n, 0, &len);
    ck_assert_str_eq(text, "Hello world");  /* BOS is silent, the space prefix removed */
    free(text);
    text = decode_ok(t, ids, n, 1, &len);
    ck_assert_str_eq(text, "<s> Hello world");
    free(text);
    free(ids);
    tokenizer_free(t);
}
END_TEST

START_TEST(special_tokens_gpt2)
{
    moe_tokenizer *t = load_vocab("gpt-2");
    if (!t) return;
    ck_assert_int_eq(tokenizer_get_kind(t), TOKENIZER_BPE);
    ck_assert_int_eq(tokenizer_eos(t), 50256);
    ck_assert(tokenizer_is_eog(t, 50256));
    const char *s = "Hi<|endoftext|><|endoftext|> there<|endof";
    int32_t *ids;
    size_t n;
    encode_ok(t, s, strlen(s), 0, &ids, &n);
    ck_assert(!contains_id(ids, n, 50256));
    free(ids);
    encode_ok(t, s, strlen(s), TOKENIZE_PARSE_SPECIAL, &ids, &n);
    int count = 0;
    for (size_t i = 0; i < n; i++) count += ids[i] == 50256;
    ck_assert_int_eq(count, 2);
    ck_assert_int_eq(ids[1], 50256);
    ck_assert_int_eq(ids[2], 50256);
    size_t len;
    char *text = decode_ok(t, ids, n, 1, &len);
    ck_assert_str_eq(text, s);  /* rendered specials give the text back */
    free(text);
    text = decode_ok(t, ids, n, 0, &len);
    ck_assert_str_eq(text, "Hi there<|endof");
    free(text);
    free(ids);
    /* no add_bos_token/add_eos_token in the file: ADD_SPECIAL adds nothing */
    encode_ok(t, "Hi", 2, TOKENIZE_ADD_SPECIAL, &ids, &n);
    ck_assert_uint_eq(n, 1);
    free(ids);
    tokenizer_free(t);
}
END_TEST

/* ------------------------------------------------------- long inputs ---- */

/* Encodes, checks the round trip, prints the speed (asserts nothing about time). */
static void encode_timed(const moe_tokenizer *t, const char *what, const char *s, size_t n)
{
    int32_t *ids;
    size_t n_ids, len;
    double t0 = clock_mono_s();
    encode_ok(t, s, n, 0, &ids, &n_ids);
    double dt = clock_mono_s() - t0;
    printf("  %-34s %8zu bytes -> %7zu tokens in %.3f s (%.1f MB/s)\n", what, n, n_ids, dt,
           n / (dt > 0 ? dt : 1e-9) / 1e6);
    char *text = decode_ok(t, ids, n_ids, 0, &len);
    ck_assert_msg(len == n && memcmp(text, s, n) == 0, "%s: round trip differs", what);
    free(text);
    free(ids);
}

static void check_long_inputs(const char *name)
{
    moe_tokenizer *t = load_vocab(name);
    if (!t) return;
    printf("%s:\n", name);
    size_t mb = 1 << 20;
    char *s = malloc(mb + 1);
    ck_assert_ptr_nonnull(s);

    /* English text: the corpus (or the vector inputs repeated) up to 1 MB. */
    const char *shared = tu_shared_dir();
    char path[1024];
    snprintf(path, sizeof path, "%s/corpus/tinyshakespeare.txt", shared);
    size_t n_corpus = 0;
    char *corpus = slurp(path, &n_corpus);
    if (corpus && n_corpus) {
        for (size_t i = 0; i < mb; i++) s[i] = corpus[i % n_corpus];
        encode_timed(t, "1 MB of English (tinyshakespeare)", s, mb);
        /* 1 MB without spaces: the corpus with every whitespace removed */
        size_t k = 0;
        for (size_t i = 0; k < mb; i++) {
            char c = corpus[i % n_corpus];
            if (c != ' ' && c != '\n' && c != '\t' && c != '\r') s[k++] = c;
        }
        encode_timed(t, "1 MB of it without whitespace", s, mb);
    }
    free(corpus);
    /* 1 MB of letters and no space at all (one pre-token for BPE) */
    for (size_t i = 0; i < mb; i++) s[i] = (char)('a' + (i * 7 + i / 13) % 26);
    encode_timed(t, "1 MB of letters, one word", s, mb);
    /* 100 KB of one repeated character, ASCII and multi-byte */
    memset(s, 'a', 100000);
    encode_timed(t, "100 KB of 'a'", s, 100000);
    memset(s, ' ', 100000);
    encode_timed(t, "100 KB of spaces", s, 100000);
    for (size_t i = 0; i + 3 <= 99999; i += 3) memcpy(s + i, "\xE6\x97\xA5", 3);  /* 日 */
    encode_timed(t, "100 KB of one CJK character", s, 99999);
    /* 1 MB of random bytes (mostly invalid UTF-8) */
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < mb; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s[i] = (char)(x >> 24);
    }
    encode_timed(t, "1 MB of random bytes", s, mb);
    free(s);
    tokenizer_free(t);
}

START_TEST(long_inputs_llama_spm) { check_long_inputs("llama-spm"); }
END_TEST

START_TEST(long_inputs_gpt2) { check_long_inputs("gpt-2"); }
END_TEST

/* ------------------------------------------------- hostile metadata ---- */

/* Writes w to a temporary file, opens it and tries tokenizer_load. Returns its rc
 * (the error is in err); on success the tokenizer is returned in *out. */
static int load_written(gguf_writer *w, moe_tokenizer **out)
{
    char path[256];
    snprintf(path, sizeof path, "%s/vocab.gguf", tu_tmpdir());
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    moe_tokenizer *t = (moe_tokenizer *)1;
    err[0] = '\0';
    int rc = tokenizer_load(f, &t, err, sizeof err);
    gguf_close(f);
    unlink(path);
    *(strrchr(path, '/')) = '\0';
    rmdir(path);
    if (rc == 0) {
        ck_assert_ptr_nonnull(t);
        *out = t;
    } else {
        ck_assert_int_eq(rc, -1);
        ck_assert_ptr_null(t);
        ck_assert_msg(err[0] != '\0', "failure without a message");
    }
    return rc;
}

/* A tiny byte-level BPE vocabulary: the 256 byte tokens, merges "h e" -> "he",
 * "he l" -> "hel", and an end token. */
static const char *tiny_tokens[260];
static char tiny_text[260][8];

static int tiny_n_tokens(void)
{
    /* GPT-2's byte map: printable Latin-1 bytes are themselves, the rest U+0100+. */
    int next = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        uint32_t cp = keep ? (uint32_t)b : 256u + (uint32_t)next++;
        size_t k = unicode_utf8_encode(cp, tiny_text[b]);
        tiny_text[b][k] = '\0';
        tiny_tokens[b] = tiny_text[b];
    }
    tiny_tokens[256] = "he";
    tiny_tokens[257] = "hel";
    tiny_tokens[258] = "<|end|>";
    return 259;
}

static gguf_writer *tiny_bpe(void)
{
    int n = tiny_n_tokens();
    static const char *merges[] = {"h e", "he l"};
    int32_t types[259];
    for (int i = 0; i < n; i++) types[i] = 1;
    types[258] = 3;
    gguf_writer *w = gguf_writer_create();
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2"), 0);
    ck_assert_int_eq(gguf_writer_set_str(w, "tokenizer.ggml.pre", "gpt-2"), 0);
    ck_assert_int_eq(gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tiny_tokens, (uint64_t)n), 0);
    ck_assert_int_eq(gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n), 0);
    ck_assert_int_eq(gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", merges, 2), 0);
    ck_assert_int_eq(gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 258), 0);
    return w;
}

START_TEST(tiny_vocab_loads)
{
    moe_tokenizer *t = NULL;
    ck_assert_msg(load_written(tiny_bpe(), &t) == 0, "%s", err);
    int32_t *ids;
    size_t n;
    encode_ok(t, "hello", 5, 0, &ids, &n);
    ck_assert_uint_eq(n, 3);  /* hel l o */
    ck_assert_int_eq(ids[0], 257);
    ck_assert_int_eq(ids[1], 'l');
    ck_assert_int_eq(ids[2], 'o');
    free(ids);
    ck_assert(tokenizer_is_eog(t, 258));  /* eos, and "<|end|>" is an end-of-turn text */
    tokenizer_free(t);
}
END_TEST

/* Special texts: user-defined tokens always match, control tokens only with
 * TOKENIZE_PARSE_SPECIAL; the longest match at the leftmost position wins. */
START_TEST(special_text_matching)
{
    int n = tiny_n_tokens();
    const char *tokens[262];
    int32_t types[262];
    for (int i = 0; i < n; i++) { tokens[i] = tiny_tokens[i]; types[i] = 1; }
    tokens[258] = "<|end|>"; types[258] = 3;
    tokens[259] = "<u>";     types[259] = 4;
    tokens[260] = "<u>long"; types[260] = 4;
    tokens[261] = "<|end";   types[261] = 3;
    gguf_writer *w = tiny_bpe();
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, 262);
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, 262);
    moe_tokenizer *t;
    ck_assert_msg(load_written(w, &t) == 0, "%s", err);
    const char *s = "a<u>long<u>b<|end|><|en";
    int32_t *ids;
    size_t n_ids;
    encode_ok(t, s, strlen(s), 0, &ids, &n_ids);
    ck_assert_uint_eq(n_ids, 4 + 7 + 4);
    ck_assert_int_eq(ids[0], 'a');
    ck_assert_int_eq(ids[1], 260);  /* the longer user-defined text */
    ck_assert_int_eq(ids[2], 259);
    ck_assert_int_eq(ids[3], 'b');
    ck_assert(!contains_id(ids, n_ids, 258) && !contains_id(ids, n_ids, 261));
    free(ids);
    encode_ok(t, s, strlen(s), TOKENIZE_PARSE_SPECIAL, &ids, &n_ids);
    ck_assert_uint_eq(n_ids, 5 + 4);
    ck_assert_int_eq(ids[4], 258);  /* "<|end|>" beats its prefix "<|end" */
    ck_assert_int_eq(ids[5], '<');  /* "<|en" is no token text */
    free(ids);
    size_t len;
    encode_ok(t, s, strlen(s), TOKENIZE_PARSE_SPECIAL, &ids, &n_ids);
    char *text = decode_ok(t, ids, n_ids, 1, &len);
    ck_assert_str_eq(text, s);
    free(text);
    text = decode_ok(t, ids, n_ids, 0, &len);
    ck_assert_str_eq(text, "a<u>long<u>b<|en");  /* user-defined text shows, control not */
    free(text);
    free(ids);
    tokenizer_free(t);
}
END_TEST

/* add_space_prefix = false: no "▁" in front, and decode keeps a leading space. */
START_TEST(spm_without_space_prefix)
{
    const char *path = vocab_path("ggml-vocab-llama-spm.gguf");
    if (!path) return;
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    gguf_writer *w = gguf_writer_create();
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        gguf_str k = gguf_kv_key(f, i);
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)k.len, k.data);
        ck_assert_int_eq(gguf_writer_copy_kv(w, f, key), 0);
    }
    gguf_close(f);
    gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", 0);
    moe_tokenizer *t, *ref = load_vocab("llama-spm");
    ck_assert_msg(load_written(w, &t) == 0, "%s", err);
    int32_t *a, *b;
    size_t na, nb, len;
    encode_ok(t, "Hello world", 11, 0, &a, &na);
    encode_ok(ref, " Hello world", 12, 0, &b, &nb);
    ck_assert_uint_eq(na + 1, nb);  /* the reference has "▁" + "▁Hello" + ... */
    ck_assert(memcmp(a + 1, b + 2, (na - 1) * sizeof *a) == 0);
    char piece[64];
    ck_assert_int_gt(tokenizer_token_to_piece(t, a[0], 0, piece, sizeof piece), 0);
    ck_assert_int_ne(piece[0], ' ');
    free(a);
    free(b);
    encode_ok(t, " x", 2, 0, &a, &na);
    char *text = decode_ok(t, a, na, 0, &len);
    ck_assert_str_eq(text, " x");
    free(text);
    free(a);
    tokenizer_free(t);
    tokenizer_free(ref);
}
END_TEST

START_TEST(hostile_metadata)
{
    static const char *bad_merges[][2] = {
        {"h zz", "right part unknown"}, {"q e", "result unknown"}, {"he", "no space"},
        {"h ", "empty right"}, {" ", "only a space"},
    };
    moe_tokenizer *t = NULL;
    gguf_writer *w;
    int n = tiny_n_tokens();
    int32_t types[259], ids_bad[2] = {0, 1};
    float scores[259] = {0};
    for (int i = 0; i < n; i++) types[i] = 1;

    for (size_t i = 0; i < sizeof bad_merges / sizeof bad_merges[0]; i++) {
        w = tiny_bpe();
        const char *m[] = {"h e", bad_merges[i][0]};
        gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", m, 2);
        ck_assert_msg(load_written(w, &t) == -1, "merge with %s loaded", bad_merges[i][1]);
        ck_assert_msg(strstr(err, "merges") != NULL, "%s", err);
    }
    w = tiny_bpe();  /* merges missing */
    gguf_writer_free(w);
    w = gguf_writer_create();
    gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tiny_tokens, (uint64_t)n);
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "merges") != NULL, "%s", err);

    w = tiny_bpe();  /* merges of the wrong type */
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.merges", ids_bad, 2);
    ck_assert_int_eq(load_written(w, &t), -1);

    w = tiny_bpe();  /* token types: too few, unknown value */
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n - 1);
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "token_type") != NULL, "%s", err);
    w = tiny_bpe();
    types[5] = 42;
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n);
    ck_assert_int_eq(load_written(w, &t), -1);
    types[5] = 1;

    w = tiny_bpe();  /* scores: too many, wrong type */
    float many[300] = {0};
    gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", many, 300);
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "scores") != NULL, "%s", err);
    w = tiny_bpe();
    gguf_writer_set_str(w, "tokenizer.ggml.scores", "nope");
    ck_assert_int_eq(load_written(w, &t), -1);
    w = tiny_bpe();  /* one score per token is fine */
    gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)n);
    ck_assert_msg(load_written(w, &t) == 0, "%s", err);
    tokenizer_free(t);

    /* ids out of range or of the wrong type */
    const char *id_keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
    for (size_t i = 0; i < 4; i++) {
        w = tiny_bpe();
        gguf_writer_set_u32(w, id_keys[i], 259);
        ck_assert_int_eq(load_written(w, &t), -1);
        ck_assert_msg(strstr(err, id_keys[i]) != NULL, "%s", err);
        w = tiny_bpe();
        gguf_writer_set_i32(w, id_keys[i], -5);
        ck_assert_int_eq(load_written(w, &t), -1);
        w = tiny_bpe();
        gguf_writer_set_u32(w, id_keys[i], 0xFFFFFFFFu);
        ck_assert_int_eq(load_written(w, &t), -1);
        w = tiny_bpe();
        gguf_writer_set_str(w, id_keys[i], "1");
        ck_assert_int_eq(load_written(w, &t), -1);
    }
    w = tiny_bpe();  /* flags of the wrong type */
    gguf_writer_set_u32(w, "tokenizer.ggml.add_bos_token", 1);
    ck_assert_int_eq(load_written(w, &t), -1);

    w = tiny_bpe();  /* unknown model and pre-tokenizer */
    gguf_writer_set_str(w, "tokenizer.ggml.model", "wordpiece-ish");
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "wordpiece-ish") != NULL, "%s", err);
    w = tiny_bpe();
    gguf_writer_set_str(w, "tokenizer.ggml.pre", "no-such-pre");
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "no-such-pre") != NULL, "%s", err);
    w = tiny_bpe();
    gguf_writer_set_u32(w, "tokenizer.ggml.model", 7);
    ck_assert_int_eq(load_written(w, &t), -1);

    /* tokens: absent, empty, not strings */
    w = gguf_writer_create();
    gguf_writer_set_str(w, "general.architecture", "llama");
    ck_assert_int_eq(load_written(w, &t), -1);
    ck_assert_msg(strstr(err, "tokenizer") != NULL, "%s", err);
    w = gguf_writer_create();
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tiny_tokens, 0);
    ck_assert_int_eq(load_written(w, &t), -1);
    w = gguf_writer_create();
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.tokens", types, (uint64_t)n);
    ck_assert_int_eq(load_written(w, &t), -1);
    w = gguf_writer_create();  /* a bare SPM vocabulary without extras loads */
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tiny_tokens, (uint64_t)n);
    ck_assert_msg(load_written(w, &t) == 0, "%s", err);
    int32_t *ids;
    size_t n_ids;
    encode_ok(t, "hello \xFF", 7, TOKENIZE_ADD_SPECIAL | TOKENIZE_PARSE_SPECIAL, &ids, &n_ids);
    ck_assert_uint_gt(n_ids, 0);  /* no byte tokens: unknown characters become unk */
    free(ids);
    tokenizer_free(t);
}
END_TEST

/* Random byte flips in a small vocabulary file: whatever gguf_open_memory accepts,
 * tokenizer_load either rejects with a message or gives a tokenizer that encodes,
 * decodes and streams without a crash (the sanitizers watch). */
static void mutate_and_use(gguf_writer *w, const char *type_name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/fuzz.gguf", tu_tmpdir());
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    size_t size;
    char *orig = slurp(path, &size);
    ck_assert_ptr_nonnull(orig);
    unlink(path);
    *(strrchr(path, '/')) = '\0';
    rmdir(path);
    char *buf = malloc(size);
    ck_assert_ptr_nonnull(buf);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    int opened = 0, loaded = 0;
    const char *text = "hello <|end|> w\xC3\xB6rld \xFF\xE2\x82 <0x41>  x";
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, size);
        int flips = 1 + iter % 4;
        for (int k = 0; k < flips; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[(x >> 8) % size] = (char)(x >> 40);
        }
        gguf_file *f;
        if (gguf_open_memory(buf, size, &f, err, sizeof err)) continue;
        opened++;
        moe_tokenizer *t;
        int rc = tokenizer_load(f, &t, err, sizeof err);
        gguf_close(f);
        if (rc) {
            ck_assert_int_eq(rc, -1);
            ck_assert(err[0] != '\0');
            continue;
        }
        loaded++;
        int32_t *ids;
        size_t n, len, slen;
        encode_ok(t, text, strlen(text), TOKENIZE_ADD_SPECIAL | TOKENIZE_PARSE_SPECIAL, &ids, &n);
        char *out = decode_ok(t, ids, n, 1, &len);
        free(out);
        out = stream_all(t, ids, n, &slen);
        free(out);
        free(ids);
        tokenizer_free(t);
    }
    printf("  %s: 400 mutated files, %d opened, %d loaded as tokenizers\n", type_name, opened, loaded);
    free(buf);
    free(orig);
}

START_TEST(mutated_files)
{
    mutate_and_use(tiny_bpe(), "gpt2");
    int n = tiny_n_tokens();
    float scores[259];
    int32_t types[259];
    const char *tokens[259];
    for (int i = 0; i < n; i++) {
        tokens[i] = tiny_tokens[i];
        scores[i] = -(float)i;
        types[i] = 1;
    }
    tokens[3] = "<0x41>"; types[3] = 6;
    tokens[4] = "\xE2\x96\x81h"; types[4] = 1;
    types[258] = 3;
    gguf_writer *w = gguf_writer_create();
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, (uint64_t)n);
    gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)n);
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n);
    gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 258);
    mutate_and_use(w, "llama");
}
END_TEST

/* ----------------------------------------- SPM cutting is exact ---- */

/* The SPM encoder cuts the text where no token can span (see spm_chunk_end). A copy
 * of the llama vocabulary with one extra token that contains every pair of ASCII
 * characters and "x▁" allows no cut at all; it never matches real text, so both
 * must give the same ids on the corpus. */
START_TEST(spm_cuts_are_exact)
{
    const char *path = vocab_path("ggml-vocab-llama-spm.gguf");
    const char *shared = tu_shared_dir();
    if (!path || !shared) return;
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    moe_tokenizer *cut;
    ck_assert_msg(tokenizer_load(f, &cut, err, sizeof err) == 0, "%s", err);

    uint64_t n;
    gguf_type et;
    ck_assert_int_eq(gguf_get_arr_info(f, "tokenizer.ggml.tokens", &et, &n), 0);
    gguf_str *strs = malloc(n * sizeof *strs);
    char **tokens = malloc((n + 1) * sizeof *tokens);
    float *scores = malloc((n + 1) * sizeof *scores);
    int32_t *types = malloc((n + 1) * sizeof *types);
    ck_assert(strs && tokens && scores && types);
    ck_assert_int_eq(gguf_get_arr_strs(f, "tokenizer.ggml.tokens", strs, n), 0);
    ck_assert_int_eq(gguf_get_arr_f32(f, "tokenizer.ggml.scores", scores, n), 0);
    ck_assert_int_eq(gguf_get_arr_i32(f, "tokenizer.ggml.token_type", types, n), 0);
    for (uint64_t i = 0; i < n; i++) {
        tokens[i] = malloc(strs[i].len + 1);
        memcpy(tokens[i], strs[i].data, strs[i].len);
        tokens[i][strs[i].len] = '\0';
    }
    char *all = malloc(2 * 127 * 127 + 8);
    size_t k = 0;
    for (int a = 1; a < 128; a++)
        for (int b = 1; b < 128; b++) { all[k++] = (char)a; all[k++] = (char)b; }
    memcpy(all + k, "x\xE2\x96\x81", 5);
    tokens[n] = all;
    scores[n] = -1e9f;
    types[n] = 1;
    gguf_writer *w = gguf_writer_create();
    gguf_writer_copy_kv(w, f, "tokenizer.ggml.model");
    gguf_writer_copy_kv(w, f, "tokenizer.ggml.bos_token_id");
    gguf_writer_copy_kv(w, f, "tokenizer.ggml.eos_token_id");
    gguf_writer_copy_kv(w, f, "tokenizer.ggml.unknown_token_id");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tokens, n + 1);
    gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, n + 1);
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, n + 1);
    gguf_close(f);
    moe_tokenizer *whole;
    ck_assert_msg(load_written(w, &whole) == 0, "%s", err);
    ck_assert(tokenizer_fingerprint(whole) != tokenizer_fingerprint(cut));
    for (uint64_t i = 0; i <= n; i++) free(tokens[i]);
    free(tokens);
    free(strs);
    free(scores);
    free(types);

    char cpath[1024];
    snprintf(cpath, sizeof cpath, "%s/corpus/tinyshakespeare.txt", shared);
    size_t len;
    char *corpus = slurp(cpath, &len);
    if (!corpus) {
        printf("skip: %s missing\n", cpath);
    } else {
        if (len > 60000) len = 60000;
        /* plus the vector inputs' hard cases: spaces, emoji, byte fallback */
        const char *extra = "  Hello\n\n \t  3333 ' era 🦙.cpp Führer ½ \xFF\xFE  end ";
        char *text = malloc(len + strlen(extra) + 1);
        memcpy(text, corpus, len);
        memcpy(text + len, extra, strlen(extra) + 1);
        len += strlen(extra);
        int32_t *a, *b;
        size_t na, nb;
        encode_ok(cut, text, len, 0, &a, &na);
        encode_ok(whole, text, len, 0, &b, &nb);
        ck_assert_uint_eq(na, nb);
        ck_assert(memcmp(a, b, na * sizeof *a) == 0);
        free(a);
        free(b);
        free(text);
        free(corpus);
    }
    tokenizer_free(cut);
    tokenizer_free(whole);
}
END_TEST

/* The GPT-2 vocabulary with another pre-tokenizer (tokenizer.ggml.pre = pre). */
static moe_tokenizer *gpt2_with_pre(const char *pre)
{
    const char *path = vocab_path("ggml-vocab-gpt-2.gguf");
    if (!path) return NULL;
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    gguf_writer *w = gguf_writer_create();
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        gguf_str k = gguf_kv_key(f, i);
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)k.len, k.data);
        ck_assert_int_eq(gguf_writer_copy_kv(w, f, key), 0);
    }
    gguf_close(f);
    gguf_writer_set_str(w, "tokenizer.ggml.pre", pre);
    moe_tokenizer *t;
    ck_assert_msg(load_written(w, &t) == 0, "%s", err);
    return t;
}

/* Most digits in one token of text; sets bounds[o] = 1 for each token boundary at
 * byte o (and checks the pieces concatenate to the text). */
static void digit_groups(const moe_tokenizer *t, const char *text, int *max_digits,
                         char *bounds)
{
    int32_t *ids;
    size_t n, used = 0;
    encode_ok(t, text, strlen(text), 0, &ids, &n);
    *max_digits = 0;
    for (size_t i = 0; i < n; i++) {
        char piece[64];
        int k = tokenizer_token_to_piece(t, ids[i], 0, piece, sizeof piece);
        ck_assert_int_gt(k, 0);
        ck_assert(memcmp(piece, text + used, (size_t)k) == 0);
        used += (size_t)k;
        bounds[used] = 1;
        int d = 0;
        for (int j = 0; j < k; j++) d += piece[j] >= '0' && piece[j] <= '9';
        if (d > *max_digits) *max_digits = d;
    }
    ck_assert_uint_eq(used, strlen(text));
    free(ids);
}

/* llama3 and qwen2 pre-tokenizers (checked against Python's regex module during
 * development): numbers split in groups of at most 3 (llama3) or 1 (qwen2) digits
 * where GPT-2 keeps them whole, and every vector input still round-trips. */
START_TEST(other_pre_tokenizers)
{
    moe_tokenizer *gpt2 = load_vocab("gpt-2");
    if (!gpt2) return;
    moe_tokenizer *llama3 = gpt2_with_pre("llama-bpe"), *qwen2 = gpt2_with_pre("qwen2");
    const char *num = "year 1234567 and 89";  /* digits at bytes 5..11 */
    int d_llama3, d_qwen2;
    char b_llama3[64] = {0}, b_qwen2[64] = {0};
    digit_groups(llama3, num, &d_llama3, b_llama3);
    digit_groups(qwen2, num, &d_qwen2, b_qwen2);
    ck_assert_int_le(d_llama3, 3);
    ck_assert(b_llama3[5] && b_llama3[8] && b_llama3[11] && b_llama3[12]);  /* 123|456|7 */
    ck_assert_int_eq(d_qwen2, 1);
    for (int o = 5; o <= 12; o++) ck_assert(b_qwen2[o]);
    /* the same vocabulary, so the same fingerprint */
    ck_assert(tokenizer_fingerprint(llama3) == tokenizer_fingerprint(gpt2));
    vectors v;
    ck_assert_int_eq(vectors_load(&v, "gpt-2"), 0);
    moe_tokenizer *ts[2] = {llama3, qwen2};
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < v.n; i++) {
            int32_t *ids;
            size_t n, len;
            encode_ok(ts[k], v.text[i], v.len[i], 0, &ids, &n);
            char *text = decode_ok(ts[k], ids, n, 0, &len);
            ck_assert(len == v.len[i] && memcmp(text, v.text[i], len) == 0);
            free(text);
            free(ids);
        }
    }
    vectors_free(&v);
    tokenizer_free(gpt2);
    tokenizer_free(llama3);
    tokenizer_free(qwen2);
}
END_TEST

/* One tokenizer, several threads encoding at once (the server shares it): every
 * thread gets the single-threaded ids. */
typedef struct {
    const moe_tokenizer *t;
    const vectors *v;
    int32_t **want;
    size_t *n_want;
    int mismatches;
} encode_job;

static void *encode_worker(void *arg)
{
    encode_job *job = arg;
    char e[256];
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < job->v->n; i++) {
            int32_t *ids;
            size_t n;
            if (tokenizer_encode(job->t, job->v->text[i], job->v->len[i], 0, &ids, &n, e, sizeof e)) {
                job->mismatches++;
                continue;
            }
            if (n != job->n_want[i] || (n && memcmp(ids, job->want[i], n * sizeof *ids) != 0))
                job->mismatches++;
            free(ids);
        }
    }
    return NULL;
}

START_TEST(concurrent_encoders)
{
    moe_tokenizer *t = load_vocab("llama-spm");
    if (!t) return;
    vectors v;
    ck_assert_int_eq(vectors_load(&v, "llama-spm"), 0);
    int32_t *want[128];
    size_t n_want[128];
    for (int i = 0; i < v.n; i++) encode_ok(t, v.text[i], v.len[i], 0, &want[i], &n_want[i]);
    encode_job jobs[4];
    pthread_t th[4];
    for (int k = 0; k < 4; k++) {
        jobs[k] = (encode_job){t, &v, want, n_want, 0};
        ck_assert_int_eq(pthread_create(&th[k], NULL, encode_worker, &jobs[k]), 0);
    }
    for (int k = 0; k < 4; k++) {
        pthread_join(th[k], NULL);
        ck_assert_int_eq(jobs[k].mismatches, 0);
    }
    for (int i = 0; i < v.n; i++) free(want[i]);
    vectors_free(&v);
    tokenizer_free(t);
}
END_TEST

START_TEST(fingerprints)
{
    moe_tokenizer *a = load_vocab("llama-spm");
    if (!a) return;
    moe_tokenizer *b = load_vocab("llama-spm"), *c = load_vocab("gpt-2");
    ck_assert(tokenizer_fingerprint(a) == tokenizer_fingerprint(b));
    ck_assert(tokenizer_fingerprint(a) != tokenizer_fingerprint(c));
    ck_assert_int_eq(tokenizer_n_vocab(a), 32000);
    ck_assert_int_eq(tokenizer_n_vocab(c), 50257);
    tokenizer_free(a);
    tokenizer_free(b);
    tokenizer_free(c);
}
END_TEST

/* ------------------------------------------------------------ unicode ---- */

START_TEST(utf8_every_code_point)
{
    /* (one assertion at the end: Check's per-assertion bookkeeping is slow) */
    char buf[4];
    uint32_t bad_cp = 0;
    int n_bad = 0;
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp++) {
        size_t k = unicode_utf8_encode(cp, buf);
        uint32_t back;
        size_t used = unicode_utf8_decode(buf, k, &back);
        int ok = (cp >= 0xD800 && cp <= 0xDFFF)  /* surrogates encode as U+FFFD */
                     ? back == UNICODE_REPLACEMENT
                     : used == k && back == cp
                           && k == (cp < 0x80 ? 1u : cp < 0x800 ? 2u : cp < 0x10000 ? 3u : 4u);
        if (!ok && n_bad++ == 0) bad_cp = cp;
    }
    ck_assert_msg(n_bad == 0, "%d code points do not round-trip, first U+%04X", n_bad,
                  (unsigned)bad_cp);
    /* invalid: overlong, surrogate, > U+10FFFF, truncated, stray continuation */
    static const char *bad[] = {"\xC0\xAF", "\xE0\x80\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80",
                                "\xF8\x88\x80\x80\x80", "\xE2\x82", "\x80", "\xFF"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint32_t cp;
        ck_assert_uint_eq(unicode_utf8_decode(bad[i], strlen(bad[i]), &cp), 1);
        ck_assert_uint_eq(cp, UNICODE_BAD_BYTE + (unsigned char)bad[i][0]);
        ck_assert_uint_eq(unicode_utf8_encode(cp, buf), 1);
        ck_assert_int_eq(buf[0], bad[i][0]);
        ck_assert_uint_eq(unicode_flags(cp), 0);
    }
}
END_TEST

START_TEST(unicode_classes)
{
    static const struct { uint32_t cp; unsigned flags; } cases[] = {
        {'A', UNICODE_LETTER}, {'z', UNICODE_LETTER}, {'5', UNICODE_NUMBER},
        {' ', UNICODE_SEPARATOR | UNICODE_WHITESPACE}, {'\n', UNICODE_OTHER | UNICODE_WHITESPACE},
        {'!', UNICODE_PUNCT}, {'$', UNICODE_SYMBOL}, {0x00E9, UNICODE_LETTER} /* é */,
        {0x00A0, UNICODE_SEPARATOR | UNICODE_WHITESPACE}, {0x00BD, UNICODE_NUMBER} /* ½ */,
        {0x0301, UNICODE_MARK}, {0x0416, UNICODE_LETTER} /* Ж */, {0x05D0, UNICODE_LETTER},
        {0x0661, UNICODE_NUMBER} /* Arabic-Indic one */, {0x0E01, UNICODE_LETTER} /* Thai */,
        {0x1780, UNICODE_LETTER} /* Khmer */, {0x17D2, UNICODE_MARK},
        {0x2028, UNICODE_SEPARATOR | UNICODE_WHITESPACE}, {0x3000, UNICODE_SEPARATOR | UNICODE_WHITESPACE},
        {0x200B, UNICODE_OTHER} /* zero width space: Cf, not White_Space */,
        {0x3042, UNICODE_LETTER} /* あ */, {0x65E5, UNICODE_LETTER} /* 日 */,
        {0x4E00, UNICODE_LETTER}, {0xAC00, UNICODE_LETTER} /* 가 */, {0x2160, UNICODE_NUMBER} /* Ⅰ */,
        {0x1F600, UNICODE_SYMBOL}, {0x1F999, UNICODE_SYMBOL}, {0xFF10, UNICODE_NUMBER},
        {0x20000, UNICODE_LETTER}, {0xE000, UNICODE_OTHER}, {0x10FFFF, UNICODE_OTHER},
        {0xFFFD, UNICODE_SYMBOL}, {0x1D7CE, UNICODE_NUMBER} /* mathematical bold zero */,
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(unicode_flags(cases[i].cp) == cases[i].flags, "U+%04X: flags %#x, want %#x",
                      (unsigned)cases[i].cp, unicode_flags(cases[i].cp), cases[i].flags);
    ck_assert_int_eq(unicode_category('A'), UNICODE_GC_LU);
    ck_assert_int_eq(unicode_category(0x65E5), UNICODE_GC_LO);
    ck_assert_int_eq(unicode_category(0x0378), UNICODE_GC_CN);  /* unassigned */
    ck_assert_int_eq(unicode_category(0xD800), UNICODE_GC_CS);
    /* every code point has exactly one of the seven classes */
    int n_bad = 0;
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp++) {
        unsigned f = unicode_flags(cp) & 0x7F;
        n_bad += !f || (f & (f - 1));
    }
    ck_assert_int_eq(n_bad, 0);
    ck_assert_ptr_nonnull(unicode_version());
}
END_TEST

int main(void)
{
    Suite *s = suite_create("tokenizer");
    TCase *vec = tcase_create("vectors");
    tcase_set_timeout(vec, 120);
    tcase_add_test(vec, vectors_llama_spm);
    tcase_add_test(vec, vectors_gpt2);
    tcase_add_test(vec, round_trip_llama_spm);
    tcase_add_test(vec, round_trip_gpt2);
    tcase_add_test(vec, stream_whole_characters);
    tcase_add_test(vec, fingerprints);
    tcase_add_test(vec, concurrent_encoders);
    suite_add_tcase(s, vec);

    TCase *edge = tcase_create("edges");
    tcase_set_timeout(edge, 120);
    tcase_add_test(edge, empty_input);
    tcase_add_test(edge, invalid_utf8);
    tcase_add_test(edge, out_of_range_ids);
    tcase_add_test(edge, piece_lengths);
    tcase_add_test(edge, special_tokens_spm);
    tcase_add_test(edge, special_tokens_gpt2);
    tcase_add_test(edge, long_inputs_llama_spm);
    tcase_add_test(edge, long_inputs_gpt2);
    tcase_add_test(edge, spm_cuts_are_exact);
    tcase_add_test(edge, other_pre_tokenizers);
    suite_add_tcase(s, edge);

    TCase *meta = tcase_create("metadata");
    tcase_set_timeout(meta, 60);
    tcase_add_test(meta, tiny_vocab_loads);
    tcase_add_test(meta, hostile_metadata);
    tcase_add_test(meta, special_text_matching);
    tcase_add_test(meta, spm_without_space_prefix);
    tcase_add_test(meta, mutated_files);
    suite_add_tcase(s, meta);

    TCase *uni = tcase_create("unicode");
    tcase_set_timeout(uni, 60);
    tcase_add_test(uni, utf8_every_code_point);
    tcase_add_test(uni, unicode_classes);
    suite_add_tcase(s, uni);
    return tu_run_suite(s);
}
