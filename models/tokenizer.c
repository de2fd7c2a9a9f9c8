/* tokenizer.c -- text <-> token ids from a GGUF file's tokenizer.ggml.* metadata.
 *
 * Two encoders, both llama.cpp-compatible token for token:
 *   SPM ("llama"):  the text (with a leading space when add_space_prefix, spaces as
 *                   U+2581) starts as one symbol per character; adjacent pairs whose
 *                   concatenation is a token are merged best score first (ties: the
 *                   leftmost) through a priority queue; characters that never became
 *                   a token fall back to their <0xNN> byte tokens (or unk).
 *   BPE ("gpt2"):   a pre-tokenizer (chosen by tokenizer.ggml.pre from pretok_table)
 *                   cuts the text into words; each word's bytes start as byte-level
 *                   tokens and merge lowest merge rank first (ties: the leftmost).
 *
 * Invalid UTF-8 in the input is kept byte for byte, never replaced: each invalid
 * byte is a character of its own that no token matches, so SPM encodes it with its
 * byte-fallback token <0xNN> and byte-level BPE with that byte's token (in the
 * pre-tokenizer it counts as neither letter, number nor space). decode() gives those
 * bytes back, so decode(encode(s)) == s holds for invalid input as well; the
 * streaming detokenizer, whose output goes to clients, turns them into U+FFFD.
 *
 * Special tokens: the text of user-defined tokens always becomes that token (as in
 * llama.cpp and HF "added tokens"); with TOKENIZE_PARSE_SPECIAL the text of control
 * and unknown tokens does too. The leftmost match wins, the longest at a position.
 * Each stretch of text between them is encoded on its own (SPM: with the space
 * prefix again, as llama.cpp does).
 *
 * Detokenizing: control and unknown tokens are silent unless render_special. With
 * add_space_prefix (SPM) the first piece that has any text loses one leading space,
 * in tokenizer_decode and in the stream alike (the stream counts such pieces in
 * n_fed: set n_fed = 1 after tokenizer_stream_init to stream a continuation, e.g.
 * generated tokens after a prompt, without that).
 *
 * Speed (no per-token malloc; scratch is per call, so one tokenizer serves many
 * threads): repeated words come from a per-call cache; SPM cuts the text where no
 * merge can cross (see spm_joinable), which leaves the result exactly as if the
 * whole text were merged at once but keeps the priority queues small. Long inputs
 * cost O(n log n): no quadratic rescans.
 */
#include "models/tokenizer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/unicode.h"

/* llama.cpp's token types (tokenizer.ggml.token_type). */
enum {
    TOKEN_UNDEFINED = 0, TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3,
    TOKEN_USER_DEFINED = 4, TOKEN_UNUSED = 5, TOKEN_BYTE = 6, TOKEN_TYPE_COUNT
};

#define TOKENIZER_MAX_VOCAB     (1 << 24)
#define TOKENIZER_MAX_TOKEN_LEN 65536
#define TOKENIZER_MAX_MERGES    (1 << 24)
#define TOKENIZER_MAX_TEXT      (1u << 28)  /* bytes of all token strings */

typedef struct moe_tokenizer_pretok pretok;

/* A pre-tokenizer: the end (byte offset, > i) of the word that starts at byte i < n
 * of the UTF-8 text s[0..n). */
typedef size_t (*pretok_word_fn)(const char *s, size_t n, size_t i);

struct moe_tokenizer_pretok {
    const char *name;        /* tokenizer.ggml.pre */
    pretok_word_fn word;
    int ignore_merges;       /* a word that is a token as a whole is that token (llama3) */
};

/* A slot of the token-text hash: the id and the hash's high bits (most mismatches
 * are rejected without touching the text). */
typedef struct {
    int32_t id;              /* -1: free */
    uint32_t tag;
} index_slot;

/* An edge of the special-token trie. */
typedef struct {
    uint64_t key;            /* parent node << 8 | byte; TRIE_EMPTY for a free slot */
    int32_t child;
} trie_edge;
#define TRIE_EMPTY UINT64_MAX

/* One merge: the pair (left id, right id) becomes `result` with priority `rank`. */
typedef struct {
    uint64_t key;            /* left << 32 | right; MERGE_EMPTY for a free slot */
    int32_t rank;
    int32_t result;
} merge_slot;
#define MERGE_EMPTY UINT64_MAX

struct moe_tokenizer {
    tokenizer_kind kind;
    int32_t n_vocab;
    char *text;              /* all token strings, each NUL-terminated */
    uint32_t *text_off;      /* (n_vocab + 1) offsets into text; length = off[i+1]-off[i]-1 */
    char *piece;             /* each token's output bytes (see token_piece_build) */
    uint32_t *piece_off;     /* (n_vocab + 1) */
    uint32_t *score_key;     /* SPM: per token, smaller = merged first */
    uint8_t *type;           /* TOKEN_* per token */
    uint8_t *eog;            /* 1 for end-of-generation tokens */

    index_slot *index;       /* open-addressing hash: token text -> id */
    uint32_t index_mask;

    merge_slot *merges;      /* BPE: open-addressing hash of merges */
    uint32_t merges_mask;
    int32_t n_merges;

    int32_t ascii_token[128]; /* SPM: token of each single ASCII character, -1 none */
    int spm_words;           /* SPM: no token has U+2581 after another character */
    int32_t space_token;     /* SPM: the token "\u2581", -1 none */
    uint8_t ascii_pair[128][16]; /* SPM: bit [a][b]: some token contains ASCII "ab" */
    int32_t byte_token[256]; /* SPM: <0xNN> token per byte; BPE: byte-level token; -1 none */
    uint8_t byte_char[256][2]; /* BPE: UTF-8 of the byte-level character of each byte */
    uint8_t byte_char_len[256];
    int16_t char_byte[512];  /* BPE: byte-level code point -> byte, -1 none */

    /* Trie of the texts matched in the input (control, user-defined, unknown tokens):
     * node 0 is the root; an edge (node, byte) -> child lives in a hash. */
    int32_t *trie_id;        /* per node: the token whose text ends here, -1 none */
    uint32_t trie_nodes;
    trie_edge *trie_edges;
    uint32_t trie_mask;
    uint8_t special_first[256]; /* 1 when some special text starts with that byte */

    int32_t bos, eos, unk, pad;
    int add_bos, add_eos, add_space_prefix;
    const pretok *pre;
    uint64_t fingerprint;
};

/* ---- Small helpers ------------------------------------------------------------ */

static int tok_fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static uint64_t tok_hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;  /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t tok_hash_pair(uint64_t key)
{
    key ^= key >> 29;
    key *= 0xBF58476D1CE4E5B9ull;
    key ^= key >> 32;
    return key;
}

static uint32_t tok_len(const moe_tokenizer *t, int32_t id)
{
    return t->text_off[id + 1] - t->text_off[id] - 1;
}

static const char *tok_str(const moe_tokenizer *t, int32_t id)
{
    return t->text + t->text_off[id];
}

/* Token id of exactly the bytes s[0..n), or -1. */
static int32_t tok_find(const moe_tokenizer *t, const char *s, size_t n)
{
    uint64_t h = tok_hash_bytes(s, n);
    uint32_t i = (uint32_t)h & t->index_mask, tag = (uint32_t)(h >> 32);
    for (;;) {
        const index_slot *e = &t->index[i];
        if (e->id < 0) return -1;
        if (e->tag == tag && tok_len(t, e->id) == n && memcmp(tok_str(t, e->id), s, n) == 0)
            return e->id;
        i = (i + 1) & t->index_mask;
    }
}

static const merge_slot *tok_find_merge(const moe_tokenizer *t, int32_t left, int32_t right)
{
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    uint32_t i = (uint32_t)tok_hash_pair(key) & t->merges_mask;
    for (;;) {
        const merge_slot *m = &t->merges[i];
        if (m->key == key) return m;
        if (m->key == MERGE_EMPTY) return NULL;
        i = (i + 1) & t->merges_mask;
    }
}

/* Float score -> unsigned key whose ascending order is descending score. */
static uint32_t tok_score_key(float f)
{
    uint32_t u;
    if (f == 0.0f) f = 0.0f;  /* -0 and +0 tie, as in a float compare */
    memcpy(&u, &f, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  /* ascending with f */
    return ~u;
}

/* ---- Growable output ------------------------------------------------------------ */

typedef struct {
    int32_t *v;
    size_t n, cap;
} id_vec;

static int id_vec_push(id_vec *a, int32_t id)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = id;
    return 0;
}

/* ---- Pre-tokenizers ------------------------------------------------------------- */

/* Character classes of the pre-tokenizer regexes, as unicode_flags masks. */
#define CLS_L  UNICODE_LETTER
#define CLS_N  UNICODE_NUMBER
#define CLS_S  UNICODE_WHITESPACE

/* The code point at byte i < n (invalid bytes: UNICODE_BAD_BYTE + b) and its class
 * flags; returns its length in bytes. ASCII stays inline. */
static inline size_t char_at(const char *s, size_t n, size_t i, uint8_t *fl)
{
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) { *fl = unicode__latin1_flags[c]; return 1; }
    uint32_t cp;
    size_t k = unicode_utf8_decode(s + i, n - i, &cp);
    *fl = (uint8_t)unicode_flags(cp);
    return k;
}

/* Does a character with flags fl belong to the class? CLS_L, CLS_N, CLS_S, or 0 for
 * [^\s\p{L}\p{N}] (anything else, invalid bytes included). */
static inline int in_class(uint8_t fl, uint8_t cls)
{
    return cls ? (fl & cls) != 0 : (fl & (CLS_L | CLS_N | CLS_S)) == 0;
}

static uint8_t class_of(uint8_t fl)
{
    if (fl & CLS_L) return CLS_L;
    if (fl & CLS_N) return CLS_N;
    if (fl & CLS_S) return CLS_S;
    return 0;
}

/* End of the run of class cls starting at byte i. */
static size_t run_of(const char *s, size_t n, size_t i, uint8_t cls)
{
    while (i < n) {
        uint8_t fl;
        size_t k = char_at(s, n, i, &fl);
        if (!in_class(fl, cls)) break;
        i += k;
    }
    return i;
}

/* \s+(?!\S)|\s+ at byte i (a whitespace character): the whole run when it ends the
 * text, else all but its last character (which then prefixes the next word), but
 * at least one character. */
static size_t match_spaces(const char *s, size_t n, size_t i)
{
    size_t last = i, j = i, count = 0;
    while (j < n) {
        uint8_t fl;
        size_t k = char_at(s, n, j, &fl);
        if (!(fl & CLS_S)) break;
        last = j;
        j += k;
        count++;
    }
    return (j < n && count >= 2) ? last : j;
}

/* GPT-2's 's|'t|'re|'ve|'m|'ll|'d (case-sensitive): the end of the match at i, or 0. */
static size_t gpt2_contraction(const char *s, size_t n, size_t i)
{
    if (s[i] != '\'' || i + 1 >= n) return 0;
    char c1 = s[i + 1];
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 < n) {
        char c2 = s[i + 2];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
            return i + 3;
    }
    return 0;
}

/* GPT-2's regex, hand-written:
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t gpt2_word(const char *s, size_t n, size_t i)
{
    size_t j = gpt2_contraction(s, n, i);
    if (j) return j;
    size_t k = (s[i] == ' ' && i + 1 < n) ? i + 1 : i;  /* the optional leading space */
    uint8_t fl;
    char_at(s, n, k, &fl);
    uint8_t cls = class_of(fl);
    if (cls != CLS_S) return run_of(s, n, k, cls);
    return match_spaces(s, n, i);
}

static int is_newline(const char *s, size_t i) { return s[i] == '\r' || s[i] == '\n'; }

/* (?i:'s|'t|'re|'ve|'m|'ll|'d): the end of the match at i, or 0. */
static size_t contraction_nocase(const char *s, size_t n, size_t i)
{
    if (s[i] != '\'' || i + 1 >= n) return 0;
    char c1 = (char)(s[i + 1] | 0x20);  /* ASCII lower case (only letters compared) */
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 < n) {
        char c2 = (char)(s[i + 2] | 0x20);
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
            return i + 3;
    }
    return 0;
}

/* Llama 3 / Qwen2 regexes, hand-written; max_digits is 3 for llama3, 1 for qwen2:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}
 *   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t llama3_like_word(const char *s, size_t n, size_t i, int max_digits)
{
    size_t j = contraction_nocase(s, n, i);
    if (j) return j;
    uint8_t fl, fl1 = 0;
    size_t k = char_at(s, n, i, &fl);
    if (i + k < n) char_at(s, n, i + k, &fl1);
    uint8_t cls = class_of(fl);
    if (cls == CLS_L) return run_of(s, n, i, CLS_L);
    if (cls != CLS_N && !is_newline(s, i) && (fl1 & CLS_L)) return run_of(s, n, i + k, CLS_L);
    if (cls == CLS_N) {
        j = i;
        for (int d = 0; d < max_digits && j < n; d++) {
            size_t m = char_at(s, n, j, &fl);
            if (!(fl & CLS_N)) break;
            j += m;
        }
        return j;
    }
    size_t p = (s[i] == ' ' && i + 1 < n) ? i + 1 : i;  /* the optional leading space */
    if (p == i + 1) char_at(s, n, p, &fl);
    if (class_of(fl) == 0) {  /* punctuation/symbols, then any newlines */
        j = run_of(s, n, p, 0);
        while (j < n && is_newline(s, j)) j++;
        return j;
    }
    /* whitespace: up to the last newline of the run if it has one */
    size_t end = run_of(s, n, i, CLS_S), last_nl = 0;
    for (j = i; j < end; j++)
        if (is_newline(s, j)) last_nl = j + 1;
    if (last_nl) return last_nl;
    return match_spaces(s, n, i);
}

static size_t llama3_word(const char *s, size_t n, size_t i) { return llama3_like_word(s, n, i, 3); }
static size_t qwen2_word(const char *s, size_t n, size_t i) { return llama3_like_word(s, n, i, 1); }

/* tokenizer.ggml.pre -> pre-tokenizer. A new one (deepseek, starcoder, ...) is a row
 * here plus its word function. Names as llama.cpp's convert script writes them. */
static const pretok pretok_table[] = {
    {"default", gpt2_word, 0},
    {"gpt-2", gpt2_word, 0},
    {"gpt2", gpt2_word, 0},
    {"olmo", gpt2_word, 0},       /* OLMoE: GPT-2's regex */
    {"mpt", gpt2_word, 0},
    {"jais", gpt2_word, 0},
    {"llama3", llama3_word, 1},
    {"llama-v3", llama3_word, 1},
    {"llama-bpe", llama3_word, 1},
    {"falcon3", llama3_word, 1},
    {"qwen2", qwen2_word, 0},     /* Qwen1.5/2/3 MoE */
    {"deepseek-r1-qwen", qwen2_word, 0},
};

static const pretok *pretok_find(const char *name)
{
    for (size_t i = 0; i < sizeof pretok_table / sizeof pretok_table[0]; i++)
        if (strcmp(pretok_table[i].name, name) == 0) return &pretok_table[i];
    return NULL;
}

/* ---- Merge engine (shared by SPM and BPE) ---------------------------------------- */

/* A symbol: bytes [start, start+n) of the text being merged, in a linked list. */
typedef struct {
    int32_t prev, next;
    uint32_t start, n;       /* n == 0: merged into its left neighbour */
    int32_t id;              /* token of these bytes, -1 when none */
} symbol;

/* A candidate merge of symbol `left` with the symbol after it into token id. 16
 * bytes, as heaps over a whole long word are large. */
typedef struct {
    uint64_t order;          /* priority << 32 | left: smaller merges first, ties leftmost */
    uint32_t size;           /* bytes of the merged text, to detect stale entries */
    int32_t id;
} bigram;

/* 4-ary min-heap on order (shallower than binary: fewer cache misses on the big
 * heaps of long words). */
typedef struct {
    bigram *v;
    size_t n;
} bigram_heap;

static void heap_push(bigram_heap *h, bigram b)
{
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 4;
        if (h->v[p].order <= b.order) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = b;
}

static bigram heap_pop(bigram_heap *h)
{
    bigram top = h->v[0], last = h->v[--h->n];
    size_t i = 0, n = h->n;
    for (;;) {
        size_t c = 4 * i + 1;
        if (c >= n) break;
        size_t end = c + 4 < n ? c + 4 : n;
        for (size_t j = c + 1; j < end; j++)
            if (h->v[j].order < h->v[c].order) c = j;
        if (h->v[c].order >= last.order) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (n) h->v[i] = last;
    return top;
}

static void push_bigram(bigram_heap *h, uint32_t priority, int32_t left, uint32_t size, int32_t id)
{
    bigram b = {(uint64_t)priority << 32 | (uint32_t)left, size, id};
    heap_push(h, b);
}

/* Applies merge b unless it went stale (either symbol changed since it was queued:
 * symbols only grow, so the sizes tell). Returns the merged symbol's index or -1. */
static int32_t apply_bigram(symbol *sym, bigram b)
{
    int32_t left = (int32_t)(uint32_t)b.order;
    symbol *l = &sym[left];
    if (l->n == 0 || l->next < 0) return -1;
    symbol *r = &sym[l->next];
    if (l->n + r->n != b.size) return -1;
    l->n += r->n;
    l->id = b.id;
    r->n = 0;
    l->next = r->next;
    if (r->next >= 0) sym[r->next].prev = left;
    return left;
}

/* Words already encoded in this call: repeated words (most of running text) skip
 * the merging. Keys point into the text being encoded; gen invalidates entries when
 * that text buffer is reused (SPM: per fragment). */
typedef struct {
    uint64_t hash;
    uint32_t word;           /* offset from scratch.cache_base */
    uint32_t gen;            /* != scratch.gen: free */
    uint32_t ids_off;        /* into scratch.cache_ids */
    uint16_t len, n_ids;
} cache_slot;

#define CACHE_MAX_WORD 64    /* longer words are not cached */

/* Scratch for one encode call (no per-token malloc): the SPM escaped text is sized
 * for the input once; symbol and heap arrays grow to the longest word. */
typedef struct {
    char *buf;               /* SPM: escaped text of the current fragment */
    symbol *sym;
    size_t sym_cap;
    bigram_heap heap;        /* room for 2 * sym_cap entries */
    cache_slot *cache;
    const char *cache_base;  /* the text the cached words are in */
    uint32_t cache_mask, cache_used, gen;
    id_vec cache_ids;
} scratch;

static void scratch_free(scratch *s)
{
    free(s->buf);
    free(s->sym);
    free(s->heap.v);
    free(s->cache);
    free(s->cache_ids.v);
}

static int scratch_init(scratch *s, const moe_tokenizer *t, const char *text, size_t len)
{
    memset(s, 0, sizeof *s);
    s->cache_base = text;  /* BPE words are in the input; SPM resets per fragment */
    if (t->kind == TOKENIZER_SPM && !(s->buf = malloc(3 * len + 3))) return -1;
    uint32_t cap = 64;  /* about one slot per 8 bytes of input, at most 64K */
    while (cap < len / 8 && cap < 65536) cap *= 2;
    s->cache = calloc(cap, sizeof *s->cache);
    if (!s->cache) {
        scratch_free(s);
        return -1;
    }
    s->cache_mask = cap - 1;
    s->gen = 1;
    return 0;
}

/* The cached tokens of word w[0..n) (hash h), or NULL. */
static const cache_slot *cache_find(const scratch *s, const char *w, uint32_t n, uint64_t h)
{
    for (uint32_t i = (uint32_t)h & s->cache_mask;; i = (i + 1) & s->cache_mask) {
        const cache_slot *e = &s->cache[i];
        if (e->gen != s->gen) return NULL;  /* free (or stale, which is free too) */
        if (e->hash == h && e->len == n && memcmp(s->cache_base + e->word, w, n) == 0) return e;
    }
}

/* Remembers that word w encodes as ids[0..k) (best effort: a full table is left as is). */
static void cache_add(scratch *s, const char *w, uint32_t n, uint64_t h, const int32_t *ids,
                      size_t k)
{
    if (4 * (s->cache_used + 1) > 3 * (s->cache_mask + 1) || k > UINT16_MAX) return;
    uint32_t off = (uint32_t)s->cache_ids.n;
    for (size_t j = 0; j < k; j++)
        if (id_vec_push(&s->cache_ids, ids[j])) { s->cache_ids.n = off; return; }
    uint32_t i = (uint32_t)h & s->cache_mask;
    while (s->cache[i].gen == s->gen) i = (i + 1) & s->cache_mask;
    cache_slot e = {h, (uint32_t)(w - s->cache_base), s->gen, off, (uint16_t)n, (uint16_t)k};
    s->cache[i] = e;
    s->cache_used++;
}

/* Forgets every cached word: the words to come are in text `base`. */
static void cache_reset(scratch *s, const char *base)
{
    s->cache_base = base;
    s->gen++;
    s->cache_used = 0;
    s->cache_ids.n = 0;
    if (s->gen == 0) {  /* wrapped: clear for real */
        memset(s->cache, 0, (s->cache_mask + 1) * sizeof *s->cache);
        s->gen = 1;
    }
}

typedef int (*word_encode_fn)(const moe_tokenizer *t, scratch *s, const char *w, size_t n,
                              id_vec *out);

/* Appends the tokens of word w[0..n) through the cache. */
static int encode_cached(const moe_tokenizer *t, scratch *s, const char *w, size_t n,
                         word_encode_fn encode, id_vec *out)
{
    if (n > CACHE_MAX_WORD) return encode(t, s, w, n, out);
    uint64_t h = tok_hash_bytes(w, n);
    const cache_slot *e = cache_find(s, w, (uint32_t)n, h);
    if (e) {
        for (uint32_t j = 0; j < e->n_ids; j++)
            if (id_vec_push(out, s->cache_ids.v[e->ids_off + j])) return -1;
        return 0;
    }
    size_t start = out->n;
    if (encode(t, s, w, n, out)) return -1;
    cache_add(s, w, (uint32_t)n, h, out->v + start, out->n - start);
    return 0;
}

/* Room for n symbols and the candidate merges waiting at any time: n - 1 at the
 * start, then each merge pops one and pushes at most two, and there are < n merges. */
static int scratch_reserve(scratch *s, size_t n)
{
    if (n <= s->sym_cap) return 0;
    size_t cap = s->sym_cap ? s->sym_cap : 64;
    while (cap < n) cap *= 2;
    symbol *sym = realloc(s->sym, cap * sizeof *sym);
    if (!sym) return -1;
    s->sym = sym;
    bigram *v = realloc(s->heap.v, 2 * cap * sizeof *v);
    if (!v) return -1;
    s->heap.v = v;
    s->sym_cap = cap;
    return 0;
}

/* ---- SPM ----------------------------------------------------------------------- */

#define SPM_SPACE "\xE2\x96\x81"  /* U+2581, SentencePiece's visible space */

static inline int is_spm_space(const char *s)
{
    return s[0] == '\xE2' && s[1] == '\x96' && s[2] == '\x81';
}

static void spm_try_bigram(const moe_tokenizer *t, scratch *s, const char *text,
                           int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    const symbol *l = &s->sym[left], *r = &s->sym[right];
    uint32_t size = l->n + r->n;
    int32_t id = tok_find(t, text + l->start, size);
    if (id < 0) return;
    push_bigram(&s->heap, t->score_key[id], left, size, id);
}

/* Merges the characters of text[0..n) best score first (ties: leftmost), as
 * llama.cpp does; the symbols are left in s->sym from index 0. */
static int spm_merge(const moe_tokenizer *t, scratch *s, const char *text, size_t n)
{
    if (scratch_reserve(s, n)) return -1;
    int32_t nsym = 0;
    for (size_t off = 0; off < n;) {
        uint32_t cp;
        size_t k = unicode_utf8_decode(text + off, n - off, &cp);
        symbol *y = &s->sym[nsym];
        y->prev = nsym - 1;
        y->next = (off + k < n) ? nsym + 1 : -1;
        y->start = (uint32_t)off;
        y->n = (uint32_t)k;
        y->id = cp < 128 ? t->ascii_token[cp]
              : (k == 3 && is_spm_space(text + off)) ? t->space_token : tok_find(t, text + off, k);
        nsym++;
        off += k;
    }
    s->heap.n = 0;
    for (int32_t i = 1; i < nsym; i++) spm_try_bigram(t, s, text, i - 1, i);
    while (s->heap.n) {
        int32_t m = apply_bigram(s->sym, heap_pop(&s->heap));
        if (m < 0) continue;
        spm_try_bigram(t, s, text, s->sym[m].prev, m);
        spm_try_bigram(t, s, text, m, s->sym[m].next);
    }
    return 0;
}

/* Tokens of the merged symbols of text (see spm_merge). */
static int spm_emit(const moe_tokenizer *t, const scratch *s, const char *text, id_vec *out)
{
    for (int32_t i = 0; i >= 0; i = s->sym[i].next) {
        const symbol *y = &s->sym[i];
        if (y->id >= 0) {
            if (id_vec_push(out, y->id)) return -1;
            continue;
        }
        /* A character no token covers: its bytes' <0xNN> tokens, else unk. */
        for (uint32_t j = 0; j < y->n; j++) {
            int32_t id = t->byte_token[(unsigned char)text[y->start + j]];
            if (id < 0) id = t->unk;
            if (id >= 0 && id_vec_push(out, id)) return -1;
        }
    }
    return 0;
}

static int spm_encode_chunk(const moe_tokenizer *t, scratch *s, const char *w, size_t n,
                            id_vec *out)
{
    return spm_merge(t, s, w, n) || spm_emit(t, s, w, out) ? -1 : 0;
}

/* Can a merge join the character ending at p - 1 to the one starting at p? Only if
 * some token contains the two next to each other. Checked for two ASCII characters
 * (t->ascii_pair) and for U+2581 after another character (t->spm_words: no token
 * has that, as in SentencePiece vocabularies split on whitespace); anything else
 * counts as joinable. */
static int spm_joinable(const moe_tokenizer *t, const char *text, size_t n, size_t p)
{
    unsigned char a = (unsigned char)text[p - 1], b = (unsigned char)text[p];
    if (a < 0x80 && b < 0x80) return (t->ascii_pair[a][b >> 3] >> (b & 7)) & 1;
    if (t->spm_words && p + 3 <= n && is_spm_space(text + p))
        return p >= 3 && is_spm_space(text + p - 3);
    return 1;
}

/* End of the chunk of escaped text starting at c0 that merges independently of the
 * rest: no merge can cross a boundary that is not joinable, so cutting the text
 * there leaves each chunk's merges (and their order) as the whole text would give. */
static size_t spm_chunk_end(const moe_tokenizer *t, const char *text, size_t n, size_t c0)
{
    for (size_t p = c0 + 1; p < n; p++)
        if (!spm_joinable(t, text, n, p)) return p;
    return n;
}

/* Appends the tokens of one raw-text fragment. */
static int spm_encode_fragment(const moe_tokenizer *t, scratch *s, const char *raw,
                               size_t len, int space_prefix, id_vec *out)
{
    /* Escape: optional leading space, every ' ' as U+2581. */
    size_t n = 0;
    if (space_prefix) { memcpy(s->buf, SPM_SPACE, 3); n = 3; }
    for (size_t i = 0; i < len; i++) {
        if (raw[i] == ' ') { memcpy(s->buf + n, SPM_SPACE, 3); n += 3; }
        else s->buf[n++] = raw[i];
    }
    cache_reset(s, s->buf);  /* the cached words were in the previous fragment's text */
    for (size_t c0 = 0; c0 < n;) {
        size_t c1 = spm_chunk_end(t, s->buf, n, c0);
        if (encode_cached(t, s, s->buf + c0, c1 - c0, spm_encode_chunk, out)) return -1;
        c0 = c1;
    }
    return 0;
}

/* ---- BPE ----------------------------------------------------------------------- */

static void bpe_try_bigram(const moe_tokenizer *t, scratch *s, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    const symbol *l = &s->sym[left], *r = &s->sym[right];
    if (l->id < 0 || r->id < 0) return;
    const merge_slot *m = tok_find_merge(t, l->id, r->id);
    if (!m) return;
    push_bigram(&s->heap, (uint32_t)m->rank, left, l->n + r->n, m->result);
}

/* Appends the tokens of one pre-tokenized word (raw bytes). */
/* The token whose byte-level text is exactly word w[0..n), or -1. */
static int32_t bpe_whole_word(const moe_tokenizer *t, const char *w, size_t n)
{
    char buf[256];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)w[i];
        if (k + 2 > sizeof buf) return -1;
        memcpy(buf + k, t->byte_char[b], t->byte_char_len[b]);
        k += t->byte_char_len[b];
    }
    return tok_find(t, buf, k);
}

static int bpe_encode_word(const moe_tokenizer *t, scratch *s, const char *w, size_t n,
                           id_vec *out)
{
    if (t->pre->ignore_merges) {
        int32_t id = bpe_whole_word(t, w, n);
        if (id >= 0) return id_vec_push(out, id);
    }
    if (scratch_reserve(s, n)) return -1;
    for (size_t i = 0; i < n; i++) {
        symbol *y = &s->sym[i];
        y->prev = (int32_t)i - 1;
        y->next = (i + 1 < n) ? (int32_t)i + 1 : -1;
        y->start = (uint32_t)i;
        y->n = 1;
        y->id = t->byte_token[(unsigned char)w[i]];
    }
    s->heap.n = 0;
    for (size_t i = 1; i < n; i++) bpe_try_bigram(t, s, (int32_t)i - 1, (int32_t)i);
    while (s->heap.n) {
        int32_t m = apply_bigram(s->sym, heap_pop(&s->heap));
        if (m < 0) continue;
        bpe_try_bigram(t, s, s->sym[m].prev, m);
        bpe_try_bigram(t, s, m, s->sym[m].next);
    }
    for (int32_t i = 0; i >= 0; i = s->sym[i].next) {
        int32_t id = s->sym[i].id >= 0 ? s->sym[i].id : t->unk;
        if (id >= 0 && id_vec_push(out, id)) return -1;
    }
    return 0;
}

static int bpe_encode_fragment(const moe_tokenizer *t, scratch *s, const char *raw,
                               size_t len, id_vec *out)
{
    for (size_t i = 0; i < len;) {
        size_t j = t->pre->word(raw, len, i);
        if (encode_cached(t, s, raw + i, j - i, bpe_encode_word, out)) return -1;
        i = j;
    }
    return 0;
}

/* ---- Encode ---------------------------------------------------------------------- */

static int tok_is_parsed_special(const moe_tokenizer *t, int32_t id, int parse_special)
{
    return t->type[id] == TOKEN_USER_DEFINED || parse_special;
}

static int32_t trie_child(const moe_tokenizer *t, int32_t node, unsigned char b)
{
    uint64_t key = (uint64_t)(uint32_t)node << 8 | b;
    for (uint32_t i = (uint32_t)tok_hash_pair(key) & t->trie_mask;; i = (i + 1) & t->trie_mask) {
        if (t->trie_edges[i].key == key) return t->trie_edges[i].child;
        if (t->trie_edges[i].key == TRIE_EMPTY) return -1;
    }
}

/* The special token whose text starts at text[i] (the longest allowed), or -1. The
 * walk is at most as deep as the longest special text. */
static int32_t special_at(const moe_tokenizer *t, const char *text, size_t len, size_t i,
                          int parse_special)
{
    int32_t node = 0, best = -1;
    for (size_t j = i; j < len; j++) {
        node = trie_child(t, node, (unsigned char)text[j]);
        if (node < 0) break;
        int32_t id = t->trie_id[node];
        if (id >= 0 && tok_is_parsed_special(t, id, parse_special)) best = id;
    }
    return best;
}

/* One stretch of raw text. It starts the input or follows a special token, so for
 * SPM it gets the space prefix either way (as in llama.cpp). */
static int encode_fragment(const moe_tokenizer *t, scratch *s, const char *raw, size_t len,
                           id_vec *out)
{
    if (t->kind == TOKENIZER_SPM)
        return spm_encode_fragment(t, s, raw, len, t->add_space_prefix, out);
    return bpe_encode_fragment(t, s, raw, len, out);
}

int tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len, int flags,
                     int32_t **ids, size_t *n_ids, char *err, size_t errlen)
{
    *ids = NULL;
    *n_ids = 0;
    if (!text && len) return tok_fail(err, errlen, "tokenize: NULL text");
    if (len > UINT32_MAX / 4) return tok_fail(err, errlen, "tokenize: text too long (%zu bytes)", len);
    int add_special = flags & TOKENIZE_ADD_SPECIAL;
    int parse_special = (flags & TOKENIZE_PARSE_SPECIAL) != 0;
    id_vec out = {0};
    scratch s;
    if (scratch_init(&s, t, text, len)) return tok_fail(err, errlen, "tokenize: out of memory");
    int rc = 0;
    if (add_special && t->add_bos && t->bos >= 0) rc |= id_vec_push(&out, t->bos);

    /* Raw fragments between special-token matches (leftmost, longest). */
    size_t frag = 0;
    for (size_t i = 0; i < len && !rc;) {
        int32_t id = -1;
        if (t->special_first[(unsigned char)text[i]]) id = special_at(t, text, len, i, parse_special);
        if (id < 0) { i++; continue; }
        if (i > frag) rc |= encode_fragment(t, &s, text + frag, i - frag, &out);
        rc |= id_vec_push(&out, id);
        i += tok_len(t, id);
        frag = i;
    }
    if (!rc && len > frag) rc |= encode_fragment(t, &s, text + frag, len - frag, &out);
    if (!rc && add_special && t->add_eos && t->eos >= 0) rc |= id_vec_push(&out, t->eos);
    scratch_free(&s);
    if (rc) {
        free(out.v);
        return tok_fail(err, errlen, "tokenize: out of memory");
    }
    if (!out.v) out.v = malloc(sizeof *out.v);  /* a valid pointer even for no tokens */
    if (!out.v) return tok_fail(err, errlen, "tokenize: out of memory");
    *ids = out.v;
    *n_ids = out.n;
    return 0;
}

/* ---- Loading ------------------------------------------------------------------- */

/* GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map
 * to themselves, the others to U+0100.. in byte order. */
static void bpe_byte_map(moe_tokenizer *t)
{
    int next = 0;
    for (int i = 0; i < 512; i++) t->char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        uint32_t cp = keep ? (uint32_t)b : 256u + (uint32_t)next++;
        char u[4];
        size_t k = unicode_utf8_encode(cp, u);
        memcpy(t->byte_char[b], u, k);
        t->byte_char_len[b] = (uint8_t)k;
        t->char_byte[cp] = (int16_t)b;
    }
}

static int load_tokens(moe_tokenizer *t, const gguf_file *f, char *err, size_t errlen)
{
    const char *key = "tokenizer.ggml.tokens";
    gguf_type et;
    uint64_t n;
    if (gguf_get_arr_info(f, key, &et, &n))
        return tok_fail(err, errlen, "%s: missing or not an array", key);
    if (et != GGUF_TYPE_STRING) return tok_fail(err, errlen, "%s: not an array of strings", key);
    if (n == 0 || n > TOKENIZER_MAX_VOCAB)
        return tok_fail(err, errlen, "%s: %llu tokens (need 1..%d)", key,
                        (unsigned long long)n, TOKENIZER_MAX_VOCAB);
    gguf_str *strs = malloc(n * sizeof *strs);
    if (!strs) return tok_fail(err, errlen, "%s: out of memory", key);
    if (gguf_get_arr_strs(f, key, strs, n)) {
        free(strs);
        return tok_fail(err, errlen, "%s: cannot read the strings", key);
    }
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (strs[i].len > TOKENIZER_MAX_TOKEN_LEN) {
            unsigned long long len = (unsigned long long)strs[i].len;
            free(strs);
            return tok_fail(err, errlen, "%s: token %llu is %llu bytes (max %d)", key,
                            (unsigned long long)i, len, TOKENIZER_MAX_TOKEN_LEN);
        }
        total += strs[i].len + 1;
    }
    if (total > TOKENIZER_MAX_TEXT) {
        free(strs);
        return tok_fail(err, errlen, "%s: %llu bytes of token text (too much)", key,
                        (unsigned long long)total);
    }
    t->n_vocab = (int32_t)n;
    t->text = malloc(total);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    if (!t->text || !t->text_off) {
        free(strs);
        return tok_fail(err, errlen, "%s: out of memory", key);
    }
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        t->text_off[i] = off;
        if (strs[i].len) memcpy(t->text + off, strs[i].data, strs[i].len);
        off += (uint32_t)strs[i].len;
        t->text[off++] = '\0';
    }
    t->text_off[n] = off;
    free(strs);
    return 0;
}

static int load_scores(moe_tokenizer *t, const gguf_file *f, char *err, size_t errlen)
{
    const char *key = "tokenizer.ggml.scores";
    size_t n = (size_t)t->n_vocab;
    t->score_key = malloc(n * sizeof *t->score_key);
    float *score = calloc(n, sizeof *score);
    if (!t->score_key || !score) {
        free(score);
        return tok_fail(err, errlen, "%s: out of memory", key);
    }
    gguf_type et;
    uint64_t len;
    int r = gguf_get_arr_info(f, key, &et, &len);
    if (r == 0) {
        if (len != n || gguf_get_arr_f32(f, key, score, len)) {
            free(score);
            return tok_fail(err, errlen, "%s: need %zu float32 values (one per token)", key, n);
        }
    } else if (r != -1) {
        free(score);
        return tok_fail(err, errlen, "%s: not an array", key);
    }
    for (size_t i = 0; i < n; i++) {
        if (score[i] != score[i]) {
            free(score);
            return tok_fail(err, errlen, "%s: score of token %zu is NaN", key, i);
        }
        t->score_key[i] = tok_score_key(score[i]);
    }
    free(score);
    return 0;
}

static int load_types(moe_tokenizer *t, const gguf_file *f, char *err, size_t errlen)
{
    const char *key = "tokenizer.ggml.token_type";
    size_t n = (size_t)t->n_vocab;
    t->type = malloc(n);
    t->eog = calloc(n, 1);
    int32_t *v = malloc(n * sizeof *v);
    if (!t->type || !t->eog || !v) {
        free(v);
        return tok_fail(err, errlen, "%s: out of memory", key);
    }
    gguf_type et;
    uint64_t len;
    int r = gguf_get_arr_info(f, key, &et, &len);
    if (r == -1) {
        for (size_t i = 0; i < n; i++) v[i] = TOKEN_NORMAL;
    } else if (r != 0 || len != n || gguf_get_arr_i32(f, key, v, len)) {
        free(v);
        return tok_fail(err, errlen, "%s: need %zu integers (one per token)", key, n);
    }
    for (size_t i = 0; i < n; i++) {
        if (v[i] < 0 || v[i] >= TOKEN_TYPE_COUNT) {
            int32_t bad = v[i];
            free(v);
            return tok_fail(err, errlen, "%s: token %zu has unknown type %d", key, i, (int)bad);
        }
        t->type[i] = (uint8_t)v[i];
    }
    free(v);
    return 0;
}

/* An optional token id key: absent keeps *id; present must be a valid id. */
static int load_id(const moe_tokenizer *t, const gguf_file *f, const char *key, int32_t *id,
                   char *err, size_t errlen)
{
    int32_t v;
    int r = gguf_get_i32(f, key, &v);
    if (r == -1) return 0;
    if (r != 0) return tok_fail(err, errlen, "%s: not an integer token id", key);
    if (v < 0 || v >= t->n_vocab)
        return tok_fail(err, errlen, "%s: id %d out of range (vocabulary of %d)", key, (int)v,
                        (int)t->n_vocab);
    *id = v;
    return 0;
}

static int load_bool(const gguf_file *f, const char *key, int *dst, char *err, size_t errlen)
{
    int v;
    int r = gguf_get_bool(f, key, &v);
    if (r == -1) return 0;
    if (r != 0) return tok_fail(err, errlen, "%s: not a bool", key);
    *dst = v != 0;
    return 0;
}

static int load_special_ids(moe_tokenizer *t, const gguf_file *f, char *err, size_t errlen)
{
    /* Defaults as llama.cpp's, kept only when they exist in this vocabulary. */
    int spm = t->kind == TOKENIZER_SPM;
    t->bos = spm && t->n_vocab > 1 ? 1 : -1;
    t->eos = spm && t->n_vocab > 2 ? 2 : -1;
    t->unk = spm ? 0 : -1;
    t->pad = -1;
    t->add_bos = spm;
    t->add_eos = 0;
    t->add_space_prefix = spm;
    int32_t eot = -1, eom = -1;
    if (load_id(t, f, "tokenizer.ggml.bos_token_id", &t->bos, err, errlen)
        || load_id(t, f, "tokenizer.ggml.eos_token_id", &t->eos, err, errlen)
        || load_id(t, f, "tokenizer.ggml.unknown_token_id", &t->unk, err, errlen)
        || load_id(t, f, "tokenizer.ggml.padding_token_id", &t->pad, err, errlen)
        || load_id(t, f, "tokenizer.ggml.eot_token_id", &eot, err, errlen)
        || load_id(t, f, "tokenizer.ggml.eom_token_id", &eom, err, errlen)
        || load_bool(f, "tokenizer.ggml.add_bos_token", &t->add_bos, err, errlen)
        || load_bool(f, "tokenizer.ggml.add_eos_token", &t->add_eos, err, errlen)
        || load_bool(f, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err, errlen))
        return -1;
    if (!spm) t->add_space_prefix = 0;  /* byte-level BPE has no space prefix */

    /* End of generation: eos, eot, eom and the usual end-of-turn control texts. */
    static const char *const eog_text[] = {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>",
    };
    if (t->eos >= 0) t->eog[t->eos] = 1;
    if (eot >= 0) t->eog[eot] = 1;
    if (eom >= 0) t->eog[eom] = 1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (t->type[id] != TOKEN_CONTROL && t->type[id] != TOKEN_USER_DEFINED) continue;
        for (size_t k = 0; k < sizeof eog_text / sizeof eog_text[0]; k++)
            if (strcmp(tok_str(t, id), eog_text[k]) == 0) t->eog[id] = 1;
    }
    return 0;
}

/* The text -> id hash. For duplicate strings the last id wins (as in llama.cpp). */
static int build_index(moe_tokenizer *t, char *err, size_t errlen)
{
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)t->n_vocab) cap *= 2;
    t->index = malloc(cap * sizeof *t->index);
    if (!t->index) return tok_fail(err, errlen, "tokenizer: out of memory");
    for (uint32_t i = 0; i < cap; i++) t->index[i].id = -1;
    t->index_mask = cap - 1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = tok_str(t, id);
        uint32_t n = tok_len(t, id);
        uint64_t h = tok_hash_bytes(s, n);
        uint32_t i = (uint32_t)h & t->index_mask;
        while (t->index[i].id >= 0) {
            int32_t o = t->index[i].id;
            if (tok_len(t, o) == n && memcmp(tok_str(t, o), s, n) == 0) break;
            i = (i + 1) & t->index_mask;
        }
        t->index[i].id = id;
        t->index[i].tag = (uint32_t)(h >> 32);
    }
    return 0;
}

/* Whether every U+2581 in every token is at its start or follows another U+2581. */
static int spm_vocab_splits_on_space(const moe_tokenizer *t)
{
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = tok_str(t, id);
        uint32_t n = tok_len(t, id);
        for (uint32_t p = 1; p + 3 <= n; p++)
            if (is_spm_space(s + p) && !(p >= 3 && is_spm_space(s + p - 3))) return 0;
    }
    return 1;
}

static void build_byte_tokens(moe_tokenizer *t)
{
    for (int c = 0; c < 128; c++) {
        char ch = (char)c;
        t->ascii_token[c] = tok_find(t, &ch, 1);
    }
    if (t->kind == TOKENIZER_SPM) {
        for (int32_t id = 0; id < t->n_vocab; id++) {
            const unsigned char *u = (const unsigned char *)tok_str(t, id);
            for (uint32_t i = 1; i < tok_len(t, id); i++)
                if (u[i - 1] < 0x80 && u[i] < 0x80)
                    t->ascii_pair[u[i - 1]][u[i] >> 3] |= (uint8_t)(1u << (u[i] & 7));
        }
        t->spm_words = spm_vocab_splits_on_space(t);
        t->space_token = tok_find(t, SPM_SPACE, 3);
    }
    for (int b = 0; b < 256; b++) {
        if (t->kind == TOKENIZER_SPM) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            t->byte_token[b] = tok_find(t, name, 6);
        } else {
            t->byte_token[b] = tok_find(t, (const char *)t->byte_char[b], t->byte_char_len[b]);
        }
    }
}

/* tokenizer.ggml.merges: "left right" strings in rank order; left, right and their
 * concatenation must all be tokens. A repeated pair keeps its first rank. */
static int load_merges(moe_tokenizer *t, const gguf_file *f, char *err, size_t errlen)
{
    const char *key = "tokenizer.ggml.merges";
    gguf_type et;
    uint64_t n;
    int r = gguf_get_arr_info(f, key, &et, &n);
    if (r == -1) return tok_fail(err, errlen, "%s: missing (needed by a gpt2 tokenizer)", key);
    if (r != 0 || et != GGUF_TYPE_STRING) return tok_fail(err, errlen, "%s: not an array of strings", key);
    if (n > TOKENIZER_MAX_MERGES)
        return tok_fail(err, errlen, "%s: %llu merges (max %d)", key, (unsigned long long)n,
                        TOKENIZER_MAX_MERGES);
    uint32_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    gguf_str *strs = malloc((n ? n : 1) * sizeof *strs);
    char *cat = malloc(2 * TOKENIZER_MAX_TOKEN_LEN + 2);
    t->merges = malloc(cap * sizeof *t->merges);
    int rc = -1;
    if (!strs || !cat || !t->merges) {
        tok_fail(err, errlen, "%s: out of memory", key);
        goto done;
    }
    for (uint32_t i = 0; i < cap; i++) t->merges[i].key = MERGE_EMPTY;
    t->merges_mask = cap - 1;
    if (gguf_get_arr_strs(f, key, strs, n)) {
        tok_fail(err, errlen, "%s: cannot read the strings", key);
        goto done;
    }
    for (uint64_t k = 0; k < n; k++) {
        const char *s = strs[k].data;
        uint64_t len = strs[k].len;
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        if (!sp || sp + 1 == s + len || len > 2 * TOKENIZER_MAX_TOKEN_LEN + 1) {
            tok_fail(err, errlen, "%s: entry %llu is not \"left right\"", key, (unsigned long long)k);
            goto done;
        }
        size_t nl = (size_t)(sp - s), nr = (size_t)len - nl - 1;
        memcpy(cat, s, nl);
        memcpy(cat + nl, sp + 1, nr);
        int32_t left = tok_find(t, s, nl), right = tok_find(t, sp + 1, nr);
        int32_t result = tok_find(t, cat, nl + nr);
        if (left < 0 || right < 0 || result < 0) {
            tok_fail(err, errlen, "%s: entry %llu \"%.*s\" uses or makes a string that is not a token",
                     key, (unsigned long long)k, (int)(len > 64 ? 64 : len), s);
            goto done;
        }
        uint64_t pk = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
        uint32_t i = (uint32_t)tok_hash_pair(pk) & t->merges_mask;
        while (t->merges[i].key != MERGE_EMPTY && t->merges[i].key != pk)
            i = (i + 1) & t->merges_mask;
        if (t->merges[i].key == pk) continue;
        t->merges[i].key = pk;
        t->merges[i].rank = (int32_t)k;
        t->merges[i].result = result;
    }
    t->n_merges = (int32_t)n;
    rc = 0;
done:
    free(strs);
    free(cat);
    return rc;
}

/* "<0xNN>" -> NN, or -1. */
static int parse_byte_token(const char *s, uint32_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
              : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Output bytes of token id into dst (room for its text length); returns the length.
 * Control, unknown and unused tokens have none (their text shows with render_special). */
static uint32_t token_piece_build(const moe_tokenizer *t, int32_t id, char *dst)
{
    const char *s = tok_str(t, id);
    uint32_t n = tok_len(t, id), k = 0;
    switch (t->type[id]) {
    case TOKEN_CONTROL: case TOKEN_UNKNOWN: case TOKEN_UNUSED:
        return 0;
    case TOKEN_USER_DEFINED:
        memcpy(dst, s, n);
        return n;
    case TOKEN_BYTE: {
        int b = parse_byte_token(s, n);
        if (b >= 0) { dst[0] = (char)b; return 1; }
        break;
    }
    default:
        break;
    }
    if (t->kind == TOKENIZER_SPM) {
        for (uint32_t i = 0; i < n;) {
            if (n - i >= 3 && memcmp(s + i, "\xE2\x96\x81", 3) == 0) { dst[k++] = ' '; i += 3; }
            else dst[k++] = s[i++];
        }
        return k;
    }
    for (uint32_t i = 0; i < n;) {  /* byte-level: each character back to its byte */
        uint32_t cp;
        size_t m = unicode_utf8_decode(s + i, n - i, &cp);
        if (cp < 512 && t->char_byte[cp] >= 0) dst[k++] = (char)t->char_byte[cp];
        else { memcpy(dst + k, s + i, m); k += (uint32_t)m; }
        i += (uint32_t)m;
    }
    return k;
}

static int build_pieces(moe_tokenizer *t, char *err, size_t errlen)
{
    t->piece = malloc(t->text_off[t->n_vocab] + 1);
    t->piece_off = malloc(((size_t)t->n_vocab + 1) * sizeof *t->piece_off);
    if (!t->piece || !t->piece_off) return tok_fail(err, errlen, "tokenizer: out of memory");
    uint32_t off = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        t->piece_off[id] = off;
        uint32_t k = token_piece_build(t, id, t->piece + off);
        off += k;
    }
    t->piece_off[t->n_vocab] = off;
    return 0;
}

static int is_special_text(const moe_tokenizer *t, int32_t id)
{
    uint8_t ty = t->type[id];
    return (ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED || ty == TOKEN_UNKNOWN) && tok_len(t, id);
}

/* The trie of control, user-defined and unknown token texts (a repeated text keeps
 * the last id, as the text index does). */
static int build_specials(moe_tokenizer *t, char *err, size_t errlen)
{
    uint64_t total = 1;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (is_special_text(t, id)) total += tok_len(t, id);
    uint32_t cap = 16;
    while (cap < 2 * total) cap *= 2;
    t->trie_id = malloc(total * sizeof *t->trie_id);
    t->trie_edges = malloc(cap * sizeof *t->trie_edges);
    if (!t->trie_id || !t->trie_edges) return tok_fail(err, errlen, "tokenizer: out of memory");
    for (uint32_t i = 0; i < cap; i++) t->trie_edges[i].key = TRIE_EMPTY;
    t->trie_mask = cap - 1;
    t->trie_id[0] = -1;
    t->trie_nodes = 1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (!is_special_text(t, id)) continue;
        const unsigned char *s = (const unsigned char *)tok_str(t, id);
        int32_t node = 0;
        for (uint32_t j = 0; j < tok_len(t, id); j++) {
            int32_t child = trie_child(t, node, s[j]);
            if (child < 0) {
                child = (int32_t)t->trie_nodes++;
                t->trie_id[child] = -1;
                uint64_t key = (uint64_t)(uint32_t)node << 8 | s[j];
                uint32_t i = (uint32_t)tok_hash_pair(key) & t->trie_mask;
                while (t->trie_edges[i].key != TRIE_EMPTY) i = (i + 1) & t->trie_mask;
                t->trie_edges[i].key = key;
                t->trie_edges[i].child = child;
            }
            node = child;
        }
        t->trie_id[node] = id;
        t->special_first[s[0]] = 1;
    }
    return 0;
}

static void build_fingerprint(moe_tokenizer *t)
{
    /* FNV-1a over each token's bytes followed by a 0 byte (so "ab","c" != "a","bc"). */
    uint64_t h = 1469598103934665603ull;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = tok_str(t, id);
        for (uint32_t i = 0; i <= tok_len(t, id); i++) {
            h ^= (unsigned char)s[i];
            h *= 1099511628211ull;
        }
    }
    t->fingerprint = h;
}

int tokenizer_load(const gguf_file *f, moe_tokenizer **out, char *err, size_t errlen)
{
    *out = NULL;
    char model[64], pre[64] = "default";
    int r = gguf_get_cstr(f, "tokenizer.ggml.model", model, sizeof model);
    if (r == -1) return tok_fail(err, errlen, "no tokenizer in the file (tokenizer.ggml.model missing)");
    if (r != 0) return tok_fail(err, errlen, "tokenizer.ggml.model: not a short string");
    moe_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return tok_fail(err, errlen, "tokenizer: out of memory");
    if (strcmp(model, "llama") == 0) {
        t->kind = TOKENIZER_SPM;
    } else if (strcmp(model, "gpt2") == 0) {
        t->kind = TOKENIZER_BPE;
        r = gguf_get_cstr(f, "tokenizer.ggml.pre", pre, sizeof pre);
        if (r == -2) { tok_fail(err, errlen, "tokenizer.ggml.pre: not a short string"); goto fail; }
        t->pre = pretok_find(pre);
        if (!t->pre) {
            tok_fail(err, errlen, "tokenizer.ggml.pre: unsupported pre-tokenizer '%s'", pre);
            goto fail;
        }
        bpe_byte_map(t);
    } else {
        tok_fail(err, errlen, "tokenizer.ggml.model: unsupported tokenizer '%s' (llama, gpt2)", model);
        goto fail;
    }
    if (load_tokens(t, f, err, errlen) || load_scores(t, f, err, errlen)
        || load_types(t, f, err, errlen) || load_special_ids(t, f, err, errlen)
        || build_index(t, err, errlen))
        goto fail;
    build_byte_tokens(t);
    if (t->kind == TOKENIZER_BPE && load_merges(t, f, err, errlen)) goto fail;
    if (build_pieces(t, err, errlen) || build_specials(t, err, errlen)) goto fail;
    build_fingerprint(t);
    *out = t;
    return 0;
fail:
    tokenizer_free(t);
    return -1;
}

void tokenizer_free(moe_tokenizer *t)
{
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->score_key);
    free(t->type);
    free(t->eog);
    free(t->index);
    free(t->merges);
    free(t->trie_id);
    free(t->trie_edges);
    free(t);
}

/* ---- Detokenize ------------------------------------------------------------------ */

/* The bytes token id outputs (render_special shows control/unknown token text). */
static const char *token_out(const moe_tokenizer *t, int32_t id, int render_special, uint32_t *n)
{
    uint8_t ty = t->type[id];
    if (render_special && (ty == TOKEN_CONTROL || ty == TOKEN_UNKNOWN)) {
        *n = tok_len(t, id);
        return tok_str(t, id);
    }
    *n = t->piece_off[id + 1] - t->piece_off[id];
    return t->piece + t->piece_off[id];
}

int tokenizer_token_to_piece(const moe_tokenizer *t, int32_t id, int render_special,
                             char *buf, size_t cap)
{
    if (id < 0 || id >= t->n_vocab) return -1;
    uint32_t n;
    const char *p = token_out(t, id, render_special, &n);
    if (n <= cap && n) memcpy(buf, p, n);
    return (int)n;
}

int tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, int render_special,
                     char **text, size_t *len, char *err, size_t errlen)
{
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return tok_fail(err, errlen, "detokenize: token id %d at position %zu out of range "
                            "(vocabulary of %d)", (int)ids[i], i, (int)t->n_vocab);
        uint32_t k;
        token_out(t, ids[i], render_special, &k);
        total += k;
    }
    char *out = malloc(total + 1);
    if (!out) return tok_fail(err, errlen, "detokenize: out of memory");
    size_t pos = 0;
    int strip = t->add_space_prefix;  /* the first piece loses the space prefix */
    for (size_t i = 0; i < n; i++) {
        uint32_t k;
        const char *p = token_out(t, ids[i], render_special, &k);
        if (k == 0) continue;
        if (strip && p[0] == ' ') { p++; k--; }
        strip = 0;
        memcpy(out + pos, p, k);
        pos += k;
    }
    out[pos] = '\0';
    *text = out;
    *len = pos;
    return 0;
}

/* ---- Streaming detokenizer ------------------------------------------------------- */

void tokenizer_stream_init(tokenizer_stream *s)
{
    memset(s, 0, sizeof *s);
}

/* May byte b follow the valid prefix pending[0..m) of a UTF-8 character? The second
 * byte's range depends on the lead (no overlongs, surrogates or > U+10FFFF). */
static int utf8_continues(unsigned char lead, int m, unsigned char b)
{
    unsigned char lo = 0x80, hi = 0xBF;
    if (m == 1) {
        if (lead == 0xE0) lo = 0xA0;
        else if (lead == 0xED) hi = 0x9F;
        else if (lead == 0xF0) lo = 0x90;
        else if (lead == 0xF4) hi = 0x8F;
    }
    return b >= lo && b <= hi;
}

/* Feeds bytes p[0..n) through the UTF-8 assembler in s, writing whole characters to
 * out (when not NULL) and U+FFFD for each maximal invalid subpart (as Python's
 * errors="replace"); returns the bytes produced. s->pending keeps the valid prefix
 * of an unfinished character. */
static size_t stream_feed(tokenizer_stream *s, const char *p, size_t n, char *out)
{
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)p[i];
        if (s->n_pending > 0) {
            unsigned char lead = (unsigned char)s->pending[0];
            if (utf8_continues(lead, s->n_pending, b)) {
                s->pending[s->n_pending++] = (char)b;
                if (s->n_pending == unicode_utf8_seq_len(lead)) {
                    if (out) memcpy(out + w, s->pending, (size_t)s->n_pending);
                    w += (size_t)s->n_pending;
                    s->n_pending = 0;
                }
                continue;
            }
            if (out) memcpy(out + w, "\xEF\xBF\xBD", 3);  /* the unfinished character */
            w += 3;
            s->n_pending = 0;
        }
        int need = unicode_utf8_seq_len(b);
        if (need == 1) {
            if (out) out[w] = (char)b;
            w++;
        } else if (need == 0) {
            if (out) memcpy(out + w, "\xEF\xBF\xBD", 3);
            w += 3;
        } else {
            s->pending[0] = (char)b;
            s->n_pending = 1;
        }
    }
    return w;
}

/* n_fed counts the tokens that had output so far: the first such piece loses the
 * space prefix, as in tokenizer_decode. Set n_fed = 1 after init to continue text
 * mid-sentence without that. */
int tokenizer_stream_push(const moe_tokenizer *t, tokenizer_stream *s, int32_t id,
                          char *out, size_t cap)
{
    if (id < 0 || id >= t->n_vocab) return -1;
    if (s->n_pending < 0 || s->n_pending > 3) return -1;  /* not from tokenizer_stream_init */
    uint32_t n;
    const char *p = token_out(t, id, 0, &n);
    if (n == 0) return 0;
    if (s->n_fed == 0 && t->add_space_prefix && p[0] == ' ') { p++; n--; }
    tokenizer_stream dry = *s;
    if (stream_feed(&dry, p, n, NULL) > cap) return -1;  /* state untouched */
    s->n_fed++;
    return (int)stream_feed(s, p, n, out);
}

int tokenizer_stream_flush(const moe_tokenizer *t, tokenizer_stream *s, char *out, size_t cap)
{
    (void)t;
    if (s->n_pending <= 0) {
        s->n_pending = 0;
        return 0;
    }
    if (cap < 3) return -1;
    memcpy(out, "\xEF\xBF\xBD", 3);
    s->n_pending = 0;
    return 3;
}

/* ---- Accessors ------------------------------------------------------------------- */

tokenizer_kind tokenizer_get_kind(const moe_tokenizer *t) { return t->kind; }
int tokenizer_n_vocab(const moe_tokenizer *t) { return t->n_vocab; }
int32_t tokenizer_bos(const moe_tokenizer *t) { return t->bos; }
int32_t tokenizer_eos(const moe_tokenizer *t) { return t->eos; }

int tokenizer_is_eog(const moe_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->eog[id];
}

const char *tokenizer_token_text(const moe_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_vocab) return NULL;
    return tok_str(t, id);
}

uint64_t tokenizer_fingerprint(const moe_tokenizer *t) { return t->fingerprint; }
