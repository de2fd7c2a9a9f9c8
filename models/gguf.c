/* gguf.c -- GGUF v2/v3 reader (memory-mapped, validated before use) and writer.
 *
 * File layout (little-endian):
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv
 *   n_kv x    { str key, u32 type, value }
 *   n_tensors x { str name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset }
 *   padding to the alignment (general.alignment, default 32), then the data section;
 *   each tensor's offset is relative to the data section and aligned.
 * str = u64 length + bytes (no NUL). An array value = u32 element type, u64 count,
 * elements.
 *
 * The reader walks the whole header once with a bounds-checked cursor, recording
 * where every key's value and every tensor lies; nothing is used before all of it
 * has been checked, so the accessors can read the mapping without further checks.
 * Keys and tensor names are found through a sorted index (binary search).
 */
#include "models/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/hugemem.h"
#include "core/wconv.h"
#include "models/pages.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c reads and writes little-endian GGUF with memcpy: port it for big-endian hosts"
#endif

#define GGUF_MAGIC        "GGUF"
#define GGUF_VERSION      3
#define GGUF_KEY_ALIGN    "general.alignment"
/* Smallest encodings, used to bound counts by the bytes left in the file:
 * a key/value is at least key length (8) + type (4) + a 1-byte value; a tensor
 * info at least name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8). */
#define GGUF_MIN_KV_BYTES     13
#define GGUF_MIN_TENSOR_BYTES 32

/* ---------------------------------------------------------------- types ---- */

typedef struct {
    gguf_str key;           /* first member: the name index reads it */
    gguf_type type;
    gguf_type elem_type;    /* arrays: element type */
    uint64_t n;             /* arrays: element count */
    const uint8_t *val;     /* the value's encoding (for arrays: from the element type on) */
    uint64_t val_len;       /* bytes of that encoding */
    const uint8_t *payload; /* arrays: first element; scalars and strings: == val */
} gguf_kv;

/* Names sorted bytewise, for binary search: O(n log n) to build and O(log n) per
 * lookup whatever names a hostile file holds (a hash table could be flooded with
 * colliding names). */
typedef struct {
    const char *data;
    uint64_t len;
    int64_t i;              /* entry index */
} name_ref;

typedef struct {
    name_ref *refs;         /* (n) sorted by name */
    int64_t n;
} name_index;

struct gguf_file {
    const uint8_t *base;
    size_t size;
    int mapped;             /* base came from mmap: munmap at close */
    int copied;             /* base is an anonymous copy of the file */
    const char *placement;  /* how the bytes reached memory, for logs (static string) */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_start;    /* file offset of the data section */
    gguf_kv *kv;            /* (n_kv) */
    int64_t n_kv;
    gguf_tensor *tensors;   /* (n_tensors) */
    int64_t n_tensors;
    name_index kv_index;
    name_index tensor_index;
};

static const uint64_t scalar_size[GGUF_TYPE_COUNT] = {
    [GGUF_TYPE_UINT8] = 1, [GGUF_TYPE_INT8] = 1, [GGUF_TYPE_UINT16] = 2,
    [GGUF_TYPE_INT16] = 2, [GGUF_TYPE_UINT32] = 4, [GGUF_TYPE_INT32] = 4,
    [GGUF_TYPE_FLOAT32] = 4, [GGUF_TYPE_BOOL] = 1, [GGUF_TYPE_UINT64] = 8,
    [GGUF_TYPE_INT64] = 8, [GGUF_TYPE_FLOAT64] = 8,
};

static const char *const gguf_type_names[GGUF_TYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool",
    "string", "array", "uint64", "int64", "float64",
};

static const char *type_name(uint32_t t)
{
    return t < GGUF_TYPE_COUNT ? gguf_type_names[t] : "unknown";
}

const char *ggml_type_name(ggml_type t)
{
    /* ggml's numbering, so an unsupported type is named in errors */
    static const char *const names[] = {
        "f32", "f16", "q4_0", "q4_1", "type 4 (removed)", "type 5 (removed)", "q5_0", "q5_1",
        "q8_0", "q8_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs",
        "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64",
        "f64", "iq1_m", "bf16", "type 31 (removed)", "type 32 (removed)", "type 33 (removed)",
        "tq1_0", "tq2_0",
    };
    unsigned u = (unsigned)t;
    return u < sizeof names / sizeof names[0] ? names[u] : "unknown";
}

size_t ggml_block_size(ggml_type t)
{
    switch (t) {
    case GGML_TYPE_F32:
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16: return 1;
    case GGML_TYPE_Q4_0:
    case GGML_TYPE_Q4_1:
    case GGML_TYPE_Q5_0:
    case GGML_TYPE_Q5_1:
    case GGML_TYPE_IQ4_NL:
    case GGML_TYPE_Q8_0: return GGML_Q8_0_BLOCK;
    case GGML_TYPE_Q2_K:
    case GGML_TYPE_Q3_K:
    case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q5_K:
    case GGML_TYPE_Q6_K:
    case GGML_TYPE_IQ4_XS: return GGML_QK_K;
    }
    return 0;
}

size_t ggml_type_size(ggml_type t)
{
    switch (t) {
    case GGML_TYPE_F32: return 4;
    case GGML_TYPE_F16: return 2;
    case GGML_TYPE_BF16: return 2;
    case GGML_TYPE_Q4_0: return GGML_Q4_0_BYTES;
    case GGML_TYPE_Q4_1: return GGML_Q4_1_BYTES;
    case GGML_TYPE_Q5_0: return GGML_Q5_0_BYTES;
    case GGML_TYPE_Q5_1: return GGML_Q5_1_BYTES;
    case GGML_TYPE_IQ4_NL: return GGML_IQ4_NL_BYTES;
    case GGML_TYPE_Q2_K: return GGML_Q2_K_BYTES;
    case GGML_TYPE_Q3_K: return GGML_Q3_K_BYTES;
    case GGML_TYPE_IQ4_XS: return GGML_IQ4_XS_BYTES;
    case GGML_TYPE_Q8_0: return GGML_Q8_0_BYTES;
    case GGML_TYPE_Q4_K: return GGML_Q4_K_BYTES;
    case GGML_TYPE_Q5_K: return GGML_Q5_K_BYTES;
    case GGML_TYPE_Q6_K: return GGML_Q6_K_BYTES;
    }
    return 0;
}

static uint64_t align_up(uint64_t x, uint64_t a) /* a a power of two; caller checks overflow */
{
    return (x + a - 1) & ~(a - 1);
}

/* ------------------------------------------------------- name index ---- */

static int name_cmp(const char *a, uint64_t alen, const char *b, uint64_t blen)
{
    uint64_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, (size_t)n) : 0;
    if (c) return c;
    return alen < blen ? -1 : alen > blen;
}

static int ref_cmp(const void *x, const void *y)
{
    const name_ref *a = x, *b = y;
    int c = name_cmp(a->data, a->len, b->data, b->len);
    if (c) return c;
    return a->i < b->i ? -1 : a->i > b->i; /* equal names: file order */
}

static int64_t index_find(const name_index *ix, const char *s, uint64_t n)
{
    int64_t lo = 0, hi = ix->n; /* search [lo, hi) */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = name_cmp(ix->refs[mid].data, ix->refs[mid].len, s, n);
        if (c == 0) return ix->refs[mid].i;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

/* Builds the index over n entries whose first member is a gguf_str (stride bytes
 * apart). Returns 0, -1 out of memory, or 1 with *dup = an entry whose name
 * repeats an earlier one. */
static int index_build(name_index *ix, const void *entries, size_t stride, int64_t n,
                       int64_t *dup)
{
    ix->refs = malloc((size_t)(n ? n : 1) * sizeof *ix->refs);
    if (!ix->refs) return -1;
    ix->n = n;
    for (int64_t i = 0; i < n; i++) {
        const gguf_str *name = (const gguf_str *)((const char *)entries + (size_t)i * stride);
        ix->refs[i] = (name_ref){name->data, name->len, i};
    }
    qsort(ix->refs, (size_t)n, sizeof *ix->refs, ref_cmp);
    for (int64_t k = 1; k < n; k++) {
        if (name_cmp(ix->refs[k - 1].data, ix->refs[k - 1].len, ix->refs[k].data,
                     ix->refs[k].len) == 0) {
            *dup = ix->refs[k].i;
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ parsing ---- */

/* A bounds-checked read position in the file. */
typedef struct {
    const uint8_t *p;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t errlen;
} cursor;

static int fail(cursor *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(cursor *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (c->errlen) vsnprintf(c->err, c->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static uint64_t left(const cursor *c) { return c->size - c->pos; }

static int need(cursor *c, uint64_t n, const char *where, const char *what)
{
    if (n <= left(c)) return 0;
    return fail(c, "%s: %s at offset %llu needs %llu bytes, only %llu left (file size %llu)",
                where, what, (unsigned long long)c->pos, (unsigned long long)n,
                (unsigned long long)left(c), (unsigned long long)c->size);
}

static int rd_u32(cursor *c, const char *where, const char *what, uint32_t *v)
{
    if (need(c, 4, where, what)) return -1;
    memcpy(v, c->p + c->pos, 4);
    c->pos += 4;
    return 0;
}

static int rd_u64(cursor *c, const char *where, const char *what, uint64_t *v)
{
    if (need(c, 8, where, what)) return -1;
    memcpy(v, c->p + c->pos, 8);
    c->pos += 8;
    return 0;
}

static int rd_str(cursor *c, const char *where, const char *what, gguf_str *s)
{
    uint64_t len;
    if (rd_u64(c, where, what, &len)) return -1;
    if (len > left(c))
        return fail(c, "%s: %s length %llu at offset %llu exceeds the %llu bytes left in the file",
                    where, what, (unsigned long long)len, (unsigned long long)(c->pos - 8),
                    (unsigned long long)left(c));
    s->data = (const char *)c->p + c->pos;
    s->len = len;
    c->pos += len;
    return 0;
}

/* A hostile name made printable and short, for error messages. */
static const char *printable(gguf_str s, char *buf, size_t cap)
{
    size_t n = 0;
    for (uint64_t i = 0; i < s.len && n + 4 < cap; i++) {
        unsigned char ch = (unsigned char)s.data[i];
        buf[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    if (n + 4 >= cap && s.len > n) { memcpy(buf + n, "...", 3); n += 3; }
    buf[n] = '\0';
    return buf;
}

static int check_bools(cursor *c, const char *where, const uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (p[i] > 1)
            return fail(c, "%s: bool value %u at offset %llu is neither 0 nor 1", where, p[i],
                        (unsigned long long)(p + i - c->p));
    return 0;
}

static int parse_array(cursor *c, const char *where, gguf_kv *kv)
{
    uint32_t et;
    if (rd_u32(c, where, "array element type", &et)) return -1;
    if (et >= GGUF_TYPE_COUNT)
        return fail(c, "%s: array element type %u at offset %llu is not a GGUF type", where, et,
                    (unsigned long long)(c->pos - 4));
    if (et == GGUF_TYPE_ARRAY)
        return fail(c, "%s: nested arrays (at offset %llu) are not supported", where,
                    (unsigned long long)(c->pos - 4));
    if (rd_u64(c, where, "array length", &kv->n)) return -1;
    kv->elem_type = (gguf_type)et;
    kv->payload = c->p + c->pos;
    uint64_t n = kv->n;
    if (et == GGUF_TYPE_STRING) {
        if (n > left(c) / 8)
            return fail(c, "%s: array of %llu strings at offset %llu cannot fit in the %llu bytes "
                        "left in the file", where, (unsigned long long)n,
                        (unsigned long long)(c->pos - 8), (unsigned long long)left(c));
        for (uint64_t i = 0; i < n; i++) { /* inline: tokenizer arrays hold 100k+ strings */
            uint64_t len;
            if (left(c) < 8)
                return fail(c, "%s: string %llu of %llu: length at offset %llu runs past the "
                            "end of the file (size %llu)", where, (unsigned long long)i,
                            (unsigned long long)n, (unsigned long long)c->pos,
                            (unsigned long long)c->size);
            memcpy(&len, c->p + c->pos, 8);
            c->pos += 8;
            if (len > left(c))
                return fail(c, "%s: string %llu of %llu: length %llu at offset %llu exceeds "
                            "the %llu bytes left in the file", where, (unsigned long long)i,
                            (unsigned long long)n, (unsigned long long)len,
                            (unsigned long long)(c->pos - 8), (unsigned long long)left(c));
            c->pos += len;
        }
        return 0;
    }
    uint64_t sz = scalar_size[et];
    if (n > left(c) / sz)
        return fail(c, "%s: array of %llu %s at offset %llu needs more than the %llu bytes left "
                    "in the file", where, (unsigned long long)n, type_name(et),
                    (unsigned long long)(c->pos - 8), (unsigned long long)left(c));
    if (et == GGUF_TYPE_BOOL && check_bools(c, where, kv->payload, n)) return -1;
    c->pos += n * sz;
    return 0;
}

static int parse_value(cursor *c, const char *where, gguf_kv *kv)
{
    uint64_t start = c->pos;
    kv->val = kv->payload = c->p + c->pos;
    if (kv->type == GGUF_TYPE_STRING) {
        gguf_str s;
        if (rd_str(c, where, "string value", &s)) return -1;
    } else if (kv->type == GGUF_TYPE_ARRAY) {
        if (parse_array(c, where, kv)) return -1;
    } else {
        if (need(c, scalar_size[kv->type], where, type_name(kv->type))) return -1;
        if (kv->type == GGUF_TYPE_BOOL && check_bools(c, where, kv->val, 1)) return -1;
        c->pos += scalar_size[kv->type];
    }
    kv->val_len = c->pos - start;
    return 0;
}

/* Grows *arr (of elements of size elem) to hold at least n+1; doubling keeps
 * memory proportional to what the file really contains, not to its claims. */
static int grow(void **arr, int64_t *cap, int64_t n, size_t elem)
{
    if (n < *cap) return 0;
    int64_t nc = *cap ? *cap * 2 : 64;
    void *p = realloc(*arr, (size_t)nc * elem);
    if (!p) return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

static int parse_kvs(cursor *c, gguf_file *f, uint64_t n_kv)
{
    int64_t cap = 0;
    char where[160], name[80];
    for (uint64_t i = 0; i < n_kv; i++) {
        if (grow((void **)&f->kv, &cap, f->n_kv, sizeof *f->kv))
            return fail(c, "out of memory reading key/value %llu", (unsigned long long)i);
        gguf_kv *kv = &f->kv[f->n_kv];
        memset(kv, 0, sizeof *kv);
        snprintf(where, sizeof where, "key/value %llu", (unsigned long long)i);
        if (rd_str(c, where, "key", &kv->key)) return -1;
        if (kv->key.len == 0) return fail(c, "%s: empty key", where);
        snprintf(where, sizeof where, "key/value %llu '%s'", (unsigned long long)i,
                 printable(kv->key, name, sizeof name));
        uint32_t t;
        if (rd_u32(c, where, "value type", &t)) return -1;
        if (t >= GGUF_TYPE_COUNT)
            return fail(c, "%s: value type %u at offset %llu is not a GGUF type", where, t,
                        (unsigned long long)(c->pos - 4));
        kv->type = (gguf_type)t;
        if (parse_value(c, where, kv)) return -1;
        f->n_kv++;
    }
    int64_t dup = -1;
    int rc = index_build(&f->kv_index, f->kv, sizeof *f->kv, f->n_kv, &dup);
    if (rc < 0) return fail(c, "out of memory indexing %lld keys", (long long)f->n_kv);
    if (rc > 0)
        return fail(c, "key/value %lld: duplicate key '%s'", (long long)dup,
                    printable(f->kv[dup].key, name, sizeof name));
    return 0;
}

static int read_alignment(cursor *c, gguf_file *f)
{
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    uint32_t a;
    int rc = gguf_get_u32(f, GGUF_KEY_ALIGN, &a);
    if (rc == -1) return 0;
    if (rc == -2)
        return fail(c, "%s: must be an unsigned 32-bit integer (type is %s)", GGUF_KEY_ALIGN,
                    type_name(f->kv[gguf_find_key(f, GGUF_KEY_ALIGN)].type));
    if (a == 0 || (a & (a - 1)) != 0)
        return fail(c, "%s: %u is not a power of two", GGUF_KEY_ALIGN, a);
    f->alignment = a;
    return 0;
}

static int parse_tensor_info(cursor *c, const gguf_file *f, int64_t i, gguf_tensor *t)
{
    char where[160], name[80];
    snprintf(where, sizeof where, "tensor %lld", (long long)i);
    if (rd_str(c, where, "name", &t->name)) return -1;
    if (t->name.len == 0) return fail(c, "%s: empty name", where);
    snprintf(where, sizeof where, "tensor %lld '%s'", (long long)i,
             printable(t->name, name, sizeof name));
    if (rd_u32(c, where, "n_dims", &t->n_dims)) return -1;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return fail(c, "%s: n_dims %u at offset %llu (must be 1..%d)", where, t->n_dims,
                    (unsigned long long)(c->pos - 4), GGUF_MAX_DIMS);
    uint64_t n_el = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (rd_u64(c, where, "dimension", &t->ne[d])) return -1;
        if (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT64_MAX)
            return fail(c, "%s: dimension %u is %llu (must be 1..2^63-1)", where, d,
                        (unsigned long long)t->ne[d]);
        if (n_el > (uint64_t)INT64_MAX / t->ne[d])
            return fail(c, "%s: element count overflows (dimension %u = %llu)", where, d,
                        (unsigned long long)t->ne[d]);
        n_el *= t->ne[d];
    }
    uint32_t type;
    if (rd_u32(c, where, "type", &type)) return -1;
    t->type = (ggml_type)type;
    size_t esz = ggml_type_size(t->type), blk = ggml_block_size(t->type);
    if (esz == 0)
        return fail(c, "%s: tensor type %u (%s) is not supported (only f32, f16, bf16, q8_0, "
                    "q4_0, q4_1, q5_0, q5_1, iq4_nl, q2_K, q3_K, q4_K, q5_K, q6_K and iq4_xs are)", where, type, ggml_type_name(t->type));
    if (t->ne[0] % blk)
        return fail(c, "%s: a %s row holds whole blocks of %zu, but dimension 0 is %llu", where,
                    ggml_type_name(t->type), blk, (unsigned long long)t->ne[0]);
    if (n_el / blk > UINT64_MAX / esz)
        return fail(c, "%s: byte size overflows (%llu elements)", where,
                    (unsigned long long)n_el);
    t->n_elements = n_el;
    t->nbytes = n_el / blk * esz;
    if (rd_u64(c, where, "data offset", &t->offset)) return -1;
    if (t->offset % f->alignment)
        return fail(c, "%s: data offset %llu is not a multiple of the alignment %llu", where,
                    (unsigned long long)t->offset, (unsigned long long)f->alignment);
    return 0;
}

typedef struct { uint64_t begin, end; int64_t i; } extent;

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

static int extent_cmp(const void *a, const void *b)
{
    const extent *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* Every tensor's bytes lie inside the file and no two tensors share a byte. */
static int check_data_ranges(cursor *c, gguf_file *f)
{
    char a[80], b[80];
    uint64_t room = c->size - f->data_start; /* data_start <= size checked by the caller */
    extent *ex = malloc((size_t)f->n_tensors * sizeof *ex);
    if (!ex) return fail(c, "out of memory checking %lld tensors", (long long)f->n_tensors);
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        if (t->offset > room || t->nbytes > room - t->offset) {
            uint64_t begin = sat_add(f->data_start, t->offset), end = sat_add(begin, t->nbytes);
            free(ex);
            return fail(c, "tensor '%s': data [%llu, %llu) beyond file size %llu",
                        printable(t->name, a, sizeof a), (unsigned long long)begin,
                        (unsigned long long)end, (unsigned long long)c->size);
        }
        ex[i] = (extent){t->offset, t->offset + t->nbytes, i};
    }
    qsort(ex, (size_t)f->n_tensors, sizeof *ex, extent_cmp);
    for (int64_t k = 1; k < f->n_tensors; k++) {
        if (ex[k].begin < ex[k - 1].end) {
            const gguf_tensor *p = &f->tensors[ex[k - 1].i], *q = &f->tensors[ex[k].i];
            int rc = fail(c, "tensor '%s' data [%llu, %llu) overlaps tensor '%s' [%llu, %llu)",
                          printable(q->name, a, sizeof a),
                          (unsigned long long)(f->data_start + ex[k].begin),
                          (unsigned long long)(f->data_start + ex[k].end),
                          printable(p->name, b, sizeof b),
                          (unsigned long long)(f->data_start + ex[k - 1].begin),
                          (unsigned long long)(f->data_start + ex[k - 1].end));
            free(ex);
            return rc;
        }
    }
    free(ex);
    return 0;
}

static int parse_tensors(cursor *c, gguf_file *f, uint64_t n_tensors)
{
    int64_t cap = 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        if (grow((void **)&f->tensors, &cap, f->n_tensors, sizeof *f->tensors))
            return fail(c, "out of memory reading tensor %llu", (unsigned long long)i);
        gguf_tensor *t = &f->tensors[f->n_tensors];
        memset(t, 0, sizeof *t);
        if (parse_tensor_info(c, f, (int64_t)i, t)) return -1;
        f->n_tensors++;
    }
    char name[80];
    int64_t dup = -1;
    int rc = index_build(&f->tensor_index, f->tensors, sizeof *f->tensors, f->n_tensors, &dup);
    if (rc < 0) return fail(c, "out of memory indexing %lld tensors", (long long)f->n_tensors);
    if (rc > 0)
        return fail(c, "tensor %lld: duplicate name '%s'", (long long)dup,
                    printable(f->tensors[dup].name, name, sizeof name));

    /* The data section starts at the next multiple of the alignment. A file
     * without tensors may end right after its metadata. */
    if (c->pos > UINT64_MAX - f->alignment)
        return fail(c, "data section offset overflows");
    f->data_start = align_up(c->pos, f->alignment);
    if (f->n_tensors == 0) return 0;
    if (f->data_start > c->size)
        return fail(c, "data section starts at %llu (tensor infos end at %llu, alignment %llu), "
                    "beyond file size %llu", (unsigned long long)f->data_start,
                    (unsigned long long)c->pos, (unsigned long long)f->alignment,
                    (unsigned long long)c->size);
    if (check_data_ranges(c, f)) return -1;
    for (int64_t i = 0; i < f->n_tensors; i++)
        f->tensors[i].data = f->base + f->data_start + f->tensors[i].offset;
    return 0;
}

static int parse_header(cursor *c, gguf_file *f, uint64_t *n_tensors, uint64_t *n_kv)
{
    if (c->size < 4 || memcmp(c->p, GGUF_MAGIC, 4) != 0)
        return fail(c, "not a GGUF file (bad magic at offset 0)");
    c->pos = 4;
    if (rd_u32(c, "header", "version", &f->version)) return -1;
    if (f->version == 0x03000000u || f->version == 0x02000000u)
        return fail(c, "header: big-endian GGUF is not supported");
    if (f->version != 2 && f->version != 3)
        return fail(c, "header: GGUF version %u is not supported (2 and 3 are)", f->version);
    if (rd_u64(c, "header", "tensor count", n_tensors)) return -1;
    if (rd_u64(c, "header", "key/value count", n_kv)) return -1;
    if (*n_kv > left(c) / GGUF_MIN_KV_BYTES)
        return fail(c, "header: key/value count %llu cannot fit in the %llu bytes after the "
                    "header", (unsigned long long)*n_kv, (unsigned long long)left(c));
    if (*n_tensors > left(c) / GGUF_MIN_TENSOR_BYTES)
        return fail(c, "header: tensor count %llu cannot fit in the %llu bytes after the "
                    "header", (unsigned long long)*n_tensors, (unsigned long long)left(c));
    return 0;
}

static int parse(gguf_file *f, char *err, size_t errlen)
{
    cursor c = {f->base, f->size, 0, err, errlen};
    uint64_t n_tensors = 0, n_kv = 0;
    if (parse_header(&c, f, &n_tensors, &n_kv)) return -1;
    if (parse_kvs(&c, f, n_kv)) return -1;
    if (read_alignment(&c, f)) return -1;
    return parse_tensors(&c, f, n_tensors);
}

/* ------------------------------------------------------ open / close ---- */

static void release(gguf_file *f)
{
    if (!f) return;
    if (f->mapped && f->base) munmap((void *)f->base, f->size);
    free(f->kv);
    free(f->tensors);
    free(f->kv_index.refs);
    free(f->tensor_index.refs);
    free(f);
}

int gguf_open_memory(const void *data, size_t size, gguf_file **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!data || size == 0) {
        snprintf(err, errlen, "empty GGUF buffer");
        return -1;
    }
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    f->base = data;
    f->size = size;
    if (parse(f, err, errlen)) {
        release(f);
        return -1;
    }
    *out = f;
    return 0;
}

/* Maps the file read-only at a 2 MiB-aligned address and asks for huge pages.
 * Decode streams every selected expert's weights from this mapping each step;
 * with 4 KiB pages the TLB misses cost bandwidth (measured on the bench model, 2
 * threads, on Zen 4: batch-1 decode 36 -> 53 tok/s; on Zen 5 a few percent, and
 * the first pass, which faults the pages in, 26 against 79 GB/s).
 * The kernel maps a page-cache folio with one PMD entry only when the virtual
 * address is aligned, and reads a VM_HUGEPAGE mapping's faults into PMD-sized
 * folios (kernels with large page-cache folios for the file system; elsewhere
 * the mapping works in small pages, and GGUF_LOAD_AUTO copies it: place_file). */
static void *map_huge_aligned(int fd, size_t size)
{
    char *at = hugemem_reserve(size);
    if (!at) return mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    void *base = mmap(at, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        munmap(at, size);
        errno = e;
        return MAP_FAILED;
    }
    hugemem_advise(base, size);
    return base;
}

/* Reads the whole file into anonymous memory in huge pages, then makes it
 * read-only. Anonymous transparent huge pages work on every THP kernel, where
 * page-cache huge folios need a recent one; the price is the copy at load
 * (about 1-4 s for 4 GB) and memory the page cache cannot share. */
static void *copy_huge_aligned(int fd, size_t size, char *err, size_t errlen)
{
    char *at = hugemem_alloc(size);
    if (!at) {
        snprintf(err, errlen, "cannot allocate %zu bytes for the weights: %s", size, strerror(errno));
        return MAP_FAILED;
    }
    size_t done = 0;
    while (done < size) {
        size_t want = size - done > ((size_t)1 << 30) ? ((size_t)1 << 30) : size - done;
        ssize_t n = pread(fd, at + done, want, (off_t)done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n < 0) snprintf(err, errlen, "read failed at byte %zu: %s", done, strerror(errno));
            else snprintf(err, errlen, "file shrank while reading it (%zu of %zu bytes)", done, size);
            munmap(at, size);
            return MAP_FAILED;
        }
        done += (size_t)n;
    }
    if (mprotect(at, size, PROT_READ) != 0) {  /* weights are never written */
        snprintf(err, errlen, "mprotect: %s", strerror(errno));
        munmap(at, size);
        return MAP_FAILED;
    }
    return at;
}

/* Placements, as logs and `moe info` print them. */
static const char PLACED_COPY[] = "copied into huge pages";
static const char PLACED_COPY_AUTO[] = "copied into huge pages (the kernel maps this file in 4 KiB pages)";
static const char PLACED_HUGE[] = "mapped in 2 MiB pages";
static const char PLACED_SMALL[] = "mapped in 4 KiB pages (slower to stream than 2 MiB pages; --weights copy)";
static const char PLACED_SMALL_READ_ONCE[] = "mapped in 4 KiB pages (read once: most of it is converted to F32 at load)";
static const char PLACED_SMALL_NOTHP[] = "mapped in 4 KiB pages (transparent huge pages are off)";
static const char PLACED_SMALL_NOMEM[] = "mapped in 4 KiB pages (a copy into huge pages would take more than half the free memory)";
static const char PLACED_MAPPED[] = "mapped";

/* Maps the file and asks the kernel which page size it got. A file the page
 * cache holds in 4 KiB folios (just written, or read before through small
 * mappings) is mapped in 4 KiB pages; with AUTO its clean, unmapped pages are
 * dropped from the cache (after unmapping the probe) and read again, which
 * brings them back in 2 MiB folios where the kernel has them for this file
 * system. */
static void *map_probed(int fd, size_t size, gguf_load_mode mode, pages_kind *kind, char *err, size_t errlen)
{
    *kind = PAGES_UNKNOWN;
    void *base = map_huge_aligned(fd, size);
    if (base == MAP_FAILED) {
        snprintf(err, errlen, "cannot map %zu bytes: %s", size, strerror(errno));
        return MAP_FAILED;
    }
    if (size < ((size_t)2 << 20) || ((uintptr_t)base & (((uintptr_t)2 << 20) - 1))) return base;
    *kind = pages_probe_file(base);
    if (*kind == PAGES_SMALL && mode == GGUF_LOAD_AUTO) {
        (void)madvise(base, (size_t)2 << 20, MADV_DONTNEED);
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        *kind = pages_probe_file(base);
    }
    return base;
}

/* Bytes the engine reads in place from the file's bytes: F32 tensors, and the
 * routed experts (llama.cpp's "*_exps.weight") in F16 or BF16, which the
 * loader keeps 16-bit (models/model_file.c); other F16 and BF16 tensors are
 * converted to F32 buffers at load. */
static uint64_t in_place_bytes(const gguf_file *f)
{
    uint64_t n = 0;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        int experts = t->name.len > 12 && !memcmp(t->name.data + t->name.len - 12, "_exps.weight", 12);
        if (t->type == GGML_TYPE_F32 || (experts && (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_BF16)))
            n += t->nbytes;
    }
    return n;
}

/* For a parsed file mapped in 4 KiB pages: a copy into huge pages pays when
 * most of the file is weights streamed in place and transparent huge pages are
 * on. Unlike the page cache the copy cannot be reclaimed, so it is made only
 * when it takes at most half the free memory: the rest is left for the KV
 * cache, the packed projections and everything else on the machine. Returns
 * whether it would copy, and sets the placement that says why not (AUTO copies
 * when it would). */
static int want_copy(const gguf_file *f, const char **placement)
{
    *placement = PLACED_SMALL;
    if (in_place_bytes(f) < f->size / 2) {
        *placement = PLACED_SMALL_READ_ONCE;
        return 0;
    }
    if (!pages_thp_enabled()) {
        *placement = PLACED_SMALL_NOTHP;
        return 0;
    }
    if (pages_mem_available() / 2 < f->size) {
        *placement = PLACED_SMALL_NOMEM;
        return 0;
    }
    return 1;
}

static gguf_file *file_new(void *base, size_t size, int copied, const char *placement)
{
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->base = base;
    f->size = size;
    f->mapped = 1;
    f->copied = copied;
    f->placement = placement;
    return f;
}

/* Opens the file's bytes placed as `mode` says (see gguf.h) and parses them.
 * The descriptor stays open for AUTO's copy after the parse. */
static gguf_file *open_placed(int fd, size_t size, gguf_load_mode mode, char *err, size_t errlen)
{
    pages_kind kind = PAGES_UNKNOWN;
    void *base = mode == GGUF_LOAD_COPY ? copy_huge_aligned(fd, size, err, errlen)
                                        : map_probed(fd, size, mode, &kind, err, errlen);
    if (base == MAP_FAILED) return NULL;
    const char *placement = mode == GGUF_LOAD_COPY ? PLACED_COPY
                            : kind == PAGES_HUGE   ? PLACED_HUGE
                            : kind == PAGES_SMALL  ? PLACED_SMALL
                                                   : PLACED_MAPPED;
    gguf_file *f = file_new(base, size, mode == GGUF_LOAD_COPY, placement);
    if (!f) {
        munmap(base, size);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (parse(f, err, errlen)) {
        release(f);
        return NULL;
    }
    if (kind != PAGES_SMALL || !want_copy(f, &f->placement) || mode != GGUF_LOAD_AUTO) return f;
    /* The copy is parsed again rather than re-pointed: every pointer the parse
     * made into the mapping is then one the checks have seen. */
    char cerr[160];
    void *copy = copy_huge_aligned(fd, size, cerr, sizeof cerr);
    if (copy == MAP_FAILED) return f; /* the mapping works: keep it */
    gguf_file *g = file_new(copy, size, 1, PLACED_COPY_AUTO);
    if (!g) {
        munmap(copy, size);
        return f;
    }
    if (parse(g, err, errlen)) { /* the file changed under us since the first parse */
        release(g);
        release(f);
        return NULL;
    }
    release(f);
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); /* the copy replaces the cached file */
    return g;
}

int gguf_open_mode(const char *path, gguf_load_mode mode, gguf_file **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open: %s", strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        snprintf(err, errlen, "cannot stat: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "not a regular file");
        close(fd);
        return -1;
    }
    if (st.st_size == 0) {
        snprintf(err, errlen, "empty file (not a GGUF file)");
        close(fd);
        return -1;
    }
    gguf_file *f = open_placed(fd, (size_t)st.st_size, mode, err, errlen);
    close(fd); /* a mapping keeps the file */
    if (!f) return -1;
    *out = f;
    return 0;
}

int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen)
{
    return gguf_open_mode(path, GGUF_LOAD_MMAP, out, err, errlen);
}

void gguf_close(gguf_file *f) { release(f); }

uint32_t gguf_version(const gguf_file *f) { return f->version; }
size_t gguf_file_size(const gguf_file *f) { return f->size; }
int gguf_copied(const gguf_file *f) { return f->copied; }
const char *gguf_placement(const gguf_file *f) { return f->placement ? f->placement : "in memory"; }
uint64_t gguf_alignment(const gguf_file *f) { return f->alignment; }

size_t gguf_page_in(const gguf_file *f, size_t off, size_t len)
{
    if (off >= f->size || len == 0) return 0;
    if (len > f->size - off) len = f->size - off;
    long page_l = sysconf(_SC_PAGESIZE);
    size_t page = page_l > 0 ? (size_t)page_l : 4096;
    volatile const uint8_t *p = f->base;
    uint8_t sink = 0;
    for (size_t at = off; at < off + len; at += page) sink ^= p[at];
    sink ^= p[off + len - 1];
    (void)sink;
    return len;
}

int gguf_load_mode_parse(const char *s, gguf_load_mode *out)
{
    if (!strcmp(s, "auto")) *out = GGUF_LOAD_AUTO;
    else if (!strcmp(s, "mmap")) *out = GGUF_LOAD_MMAP;
    else if (!strcmp(s, "copy")) *out = GGUF_LOAD_COPY;
    else return -1;
    return 0;
}

/* ---------------------------------------------------------- key/values ---- */

int64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }

int64_t gguf_find_key(const gguf_file *f, const char *key)
{
    return index_find(&f->kv_index, key, strlen(key));
}

gguf_str gguf_kv_key(const gguf_file *f, int64_t i)
{
    if (i < 0 || i >= f->n_kv) return (gguf_str){NULL, 0};
    return f->kv[i].key;
}

gguf_type gguf_kv_type(const gguf_file *f, int64_t i)
{
    if (i < 0 || i >= f->n_kv) return GGUF_TYPE_COUNT;
    return f->kv[i].type;
}

static const gguf_kv *kv_lookup(const gguf_file *f, const char *key)
{
    int64_t i = gguf_find_key(f, key);
    return i < 0 ? NULL : &f->kv[i];
}

/* An integer of any GGUF integer type, as sign + magnitude-safe parts. */
typedef struct { int neg; int64_t s; uint64_t u; } int_val;

static int read_int(gguf_type t, const uint8_t *p, int_val *v)
{
    int64_t s = 0;
    uint64_t u = 0;
    int is_signed = 1;
    switch (t) {
    case GGUF_TYPE_UINT8: { uint8_t x; memcpy(&x, p, 1); u = x; is_signed = 0; break; }
    case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); u = x; is_signed = 0; break; }
    case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); u = x; is_signed = 0; break; }
    case GGUF_TYPE_UINT64: { memcpy(&u, p, 8); is_signed = 0; break; }
    case GGUF_TYPE_INT8: { int8_t x; memcpy(&x, p, 1); s = x; break; }
    case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); s = x; break; }
    case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); s = x; break; }
    case GGUF_TYPE_INT64: { memcpy(&s, p, 8); break; }
    default: return -1;
    }
    v->neg = is_signed && s < 0;
    v->s = s;
    v->u = is_signed ? (s < 0 ? 0 : (uint64_t)s) : u;
    return 0;
}

static int int_to_i32(const int_val *v, int32_t *out)
{
    if (v->neg ? v->s < INT32_MIN : v->u > INT32_MAX) return -2;
    *out = v->neg ? (int32_t)v->s : (int32_t)v->u;
    return 0;
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    int_val v = {0, 0, 0};
    if (read_int(kv->type, kv->val, &v) || v.neg || v.u > UINT32_MAX) return -2;
    *out = (uint32_t)v.u;
    return 0;
}

int gguf_get_i32(const gguf_file *f, const char *key, int32_t *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    int_val v = {0, 0, 0};
    if (read_int(kv->type, kv->val, &v)) return -2;
    return int_to_i32(&v, out);
}

int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    int_val v = {0, 0, 0};
    if (read_int(kv->type, kv->val, &v) || v.neg) return -2;
    *out = v.u;
    return 0;
}

/* f32, or f64 within float range (NaN and infinities pass as they are). */
static int read_float(gguf_type t, const uint8_t *p, float *out)
{
    if (t == GGUF_TYPE_FLOAT32) {
        memcpy(out, p, 4);
        return 0;
    }
    if (t == GGUF_TYPE_FLOAT64) {
        double d;
        memcpy(&d, p, 8);
        if (!isinf(d) && (d > FLT_MAX || d < -FLT_MAX)) return -2;
        *out = (float)d;
        return 0;
    }
    return -2;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    return read_float(kv->type, kv->val, out);
}

int gguf_get_bool(const gguf_file *f, const char *key, int *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    if (kv->type != GGUF_TYPE_BOOL) return -2;
    *out = kv->val[0] != 0;
    return 0;
}

static gguf_str str_at(const uint8_t *p) /* p: a validated u64 length + bytes */
{
    gguf_str s;
    memcpy(&s.len, p, 8);
    s.data = (const char *)p + 8;
    return s;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    if (kv->type != GGUF_TYPE_STRING) return -2;
    *out = str_at(kv->val);
    return 0;
}

int gguf_get_cstr(const gguf_file *f, const char *key, char *buf, size_t cap)
{
    gguf_str s;
    int rc = gguf_get_str(f, key, &s);
    if (rc) return rc;
    /* an embedded NUL would silently shorten the string: refuse it too */
    if (s.len >= cap || memchr(s.data, '\0', s.len)) return -2;
    memcpy(buf, s.data, s.len);
    buf[s.len] = '\0';
    return 0;
}

int gguf_get_arr_info(const gguf_file *f, const char *key, gguf_type *elem_type, uint64_t *n)
{
    const gguf_kv *kv = kv_lookup(f, key);
    if (!kv) return -1;
    if (kv->type != GGUF_TYPE_ARRAY) return -2;
    *elem_type = kv->elem_type;
    *n = kv->n;
    return 0;
}

static const gguf_kv *array_lookup(const gguf_file *f, const char *key, uint64_t n, int *rc)
{
    const gguf_kv *kv = kv_lookup(f, key);
    *rc = !kv ? -1 : (kv->type != GGUF_TYPE_ARRAY || kv->n != n) ? -2 : 0;
    return *rc ? NULL : kv;
}

int gguf_get_arr_f32(const gguf_file *f, const char *key, float *out, uint64_t n)
{
    int rc;
    const gguf_kv *kv = array_lookup(f, key, n, &rc);
    if (!kv) return rc;
    if (kv->elem_type != GGUF_TYPE_FLOAT32 && kv->elem_type != GGUF_TYPE_FLOAT64) return -2;
    uint64_t sz = scalar_size[kv->elem_type];
    for (uint64_t i = 0; i < n; i++)
        if (read_float(kv->elem_type, kv->payload + i * sz, &out[i])) return -2;
    return 0;
}

int gguf_get_arr_i32(const gguf_file *f, const char *key, int32_t *out, uint64_t n)
{
    int rc;
    const gguf_kv *kv = array_lookup(f, key, n, &rc);
    if (!kv) return rc;
    if (kv->elem_type == GGUF_TYPE_STRING || kv->elem_type == GGUF_TYPE_BOOL ||
        kv->elem_type == GGUF_TYPE_FLOAT32 || kv->elem_type == GGUF_TYPE_FLOAT64)
        return -2;
    uint64_t sz = scalar_size[kv->elem_type];
    for (uint64_t i = 0; i < n; i++) {
        int_val v = {0, 0, 0};
        read_int(kv->elem_type, kv->payload + i * sz, &v);
        if (int_to_i32(&v, &out[i])) return -2;
    }
    return 0;
}

int gguf_get_arr_strs(const gguf_file *f, const char *key, gguf_str *out, uint64_t n)
{
    int rc;
    const gguf_kv *kv = array_lookup(f, key, n, &rc);
    if (!kv) return rc;
    if (kv->elem_type != GGUF_TYPE_STRING) return -2;
    const uint8_t *p = kv->payload;
    for (uint64_t i = 0; i < n; i++) {
        out[i] = str_at(p);
        p += 8 + out[i].len;
    }
    return 0;
}

/* ------------------------------------------------------------- tensors ---- */

int64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }

const gguf_tensor *gguf_get_tensor(const gguf_file *f, int64_t i)
{
    return i < 0 || i >= f->n_tensors ? NULL : &f->tensors[i];
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    int64_t i = index_find(&f->tensor_index, name, strlen(name));
    return i < 0 ? NULL : &f->tensors[i];
}

/* -------------------------------------------------------------- writer ---- */

typedef struct {
    char *key;
    gguf_type type;
    uint8_t *val;           /* the value's encoding, as in the file */
    size_t len;
} writer_kv;

typedef struct {
    char *name;
    ggml_type type;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    const void *data;       /* borrowed until gguf_writer_write returns */
    uint64_t nbytes;
} writer_tensor;

struct gguf_writer {
    writer_kv *kv;
    int64_t n_kv, cap_kv;
    writer_tensor *tensors;
    int64_t n_tensors, cap_tensors;
    char err[256];          /* first add_tensor failure, reported by gguf_writer_write */
};

gguf_writer *gguf_writer_create(void) { return calloc(1, sizeof(gguf_writer)); }

void gguf_writer_free(gguf_writer *w)
{
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val);
    }
    for (int64_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
    free(w->kv);
    free(w->tensors);
    free(w);
}

/* Adopts val (malloc'd, len bytes) as the value of key; replaces an earlier one. */
static int set_value(gguf_writer *w, const char *key, gguf_type type, uint8_t *val, size_t len)
{
    if (!val || !key || !*key) {
        free(val);
        return -1;
    }
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key) == 0) {
            free(w->kv[i].val);
            w->kv[i].type = type;
            w->kv[i].val = val;
            w->kv[i].len = len;
            return 0;
        }
    }
    char *k = strdup(key);
    if (!k || grow((void **)&w->kv, &w->cap_kv, w->n_kv, sizeof *w->kv)) {
        free(k);
        free(val);
        return -1;
    }
    w->kv[w->n_kv++] = (writer_kv){k, type, val, len};
    return 0;
}

static int set_scalar(gguf_writer *w, const char *key, gguf_type type, const void *v)
{
    size_t n = (size_t)scalar_size[type];
    uint8_t *val = malloc(n);
    if (val) memcpy(val, v, n);
    return set_value(w, key, type, val, n);
}

int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v)
{
    return set_scalar(w, key, GGUF_TYPE_UINT32, &v);
}

int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v)
{
    return set_scalar(w, key, GGUF_TYPE_INT32, &v);
}

int gguf_writer_set_u64(gguf_writer *w, const char *key, uint64_t v)
{
    return set_scalar(w, key, GGUF_TYPE_UINT64, &v);
}

int gguf_writer_set_f32(gguf_writer *w, const char *key, float v)
{
    return set_scalar(w, key, GGUF_TYPE_FLOAT32, &v);
}

int gguf_writer_set_bool(gguf_writer *w, const char *key, int v)
{
    uint8_t b = v != 0;
    return set_scalar(w, key, GGUF_TYPE_BOOL, &b);
}

int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v)
{
    uint64_t n = strlen(v);
    uint8_t *val = malloc(8 + n);
    if (val) {
        memcpy(val, &n, 8);
        memcpy(val + 8, v, n);
    }
    return set_value(w, key, GGUF_TYPE_STRING, val, 8 + n);
}

/* An array value's encoding: element type, count, then payload bytes. */
static uint8_t *array_head(gguf_type et, uint64_t n, size_t payload, size_t *len)
{
    if (payload > SIZE_MAX - 12) return NULL;
    *len = 12 + payload;
    uint8_t *val = malloc(*len);
    if (!val) return NULL;
    uint32_t t = et;
    memcpy(val, &t, 4);
    memcpy(val + 4, &n, 8);
    return val;
}

int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n)
{
    size_t payload = 0;
    for (uint64_t i = 0; i < n; i++) {
        size_t l = strlen(v[i]);
        if (l > SIZE_MAX - 8 - payload) return -1;
        payload += 8 + l;
    }
    size_t len = 0;
    uint8_t *val = array_head(GGUF_TYPE_STRING, n, payload, &len);
    if (val) {
        uint8_t *p = val + 12;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t l = strlen(v[i]);
            memcpy(p, &l, 8);
            memcpy(p + 8, v[i], l);
            p += 8 + l;
        }
    }
    return set_value(w, key, GGUF_TYPE_ARRAY, val, len);
}

static int set_arr_scalar(gguf_writer *w, const char *key, gguf_type et, const void *v,
                          uint64_t n)
{
    if (n > SIZE_MAX / 8) return -1;
    size_t bytes = (size_t)n * (size_t)scalar_size[et], len = 0;
    uint8_t *val = array_head(et, n, bytes, &len);
    if (val && bytes) memcpy(val + 12, v, bytes);
    return set_value(w, key, GGUF_TYPE_ARRAY, val, len);
}

int gguf_writer_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n)
{
    return set_arr_scalar(w, key, GGUF_TYPE_FLOAT32, v, n);
}

int gguf_writer_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n)
{
    return set_arr_scalar(w, key, GGUF_TYPE_INT32, v, n);
}

int gguf_writer_copy_kv(gguf_writer *w, const gguf_file *src, const char *key)
{
    const gguf_kv *kv = kv_lookup(src, key);
    if (!kv) return -1;
    uint8_t *val = malloc(kv->val_len ? (size_t)kv->val_len : 1);
    if (val) memcpy(val, kv->val, (size_t)kv->val_len);
    return set_value(w, key, kv->type, val, (size_t)kv->val_len);
}

static int writer_fail(gguf_writer *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int writer_fail(gguf_writer *w, const char *fmt, ...)
{
    if (w->err[0]) return -1; /* keep the first */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err, sizeof w->err, fmt, ap);
    va_end(ap);
    return -1;
}

int gguf_writer_add_tensor(gguf_writer *w, const char *name, ggml_type type,
                           uint32_t n_dims, const uint64_t *ne, const void *data)
{
    if (!name || !*name) return writer_fail(w, "add_tensor: empty name");
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return writer_fail(w, "add_tensor '%s': n_dims %u (must be 1..%d)", name, n_dims,
                           GGUF_MAX_DIMS);
    size_t esz = ggml_type_size(type), blk = ggml_block_size(type);
    if (esz == 0)
        return writer_fail(w, "add_tensor '%s': type %s not supported", name,
                           ggml_type_name(type));
    if (!data) return writer_fail(w, "add_tensor '%s': no data", name);
    if (ne[0] % blk)
        return writer_fail(w, "add_tensor '%s': %s rows are whole blocks of %zu, not %llu", name,
                           ggml_type_name(type), blk, (unsigned long long)ne[0]);
    writer_tensor t = {NULL, type, n_dims, {1, 1, 1, 1}, data, esz};
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t units = d == 0 ? ne[0] / blk : ne[d];
        if (ne[d] == 0 || t.nbytes > (uint64_t)INT64_MAX / units)
            return writer_fail(w, "add_tensor '%s': dimension %u = %llu is zero or too large",
                               name, d, (unsigned long long)ne[d]);
        t.ne[d] = ne[d];
        t.nbytes *= units;
    }
    for (int64_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return writer_fail(w, "add_tensor '%s': duplicate name", name);
    t.name = strdup(name);
    if (!t.name || grow((void **)&w->tensors, &w->cap_tensors, w->n_tensors, sizeof *w->tensors)) {
        free(t.name);
        return writer_fail(w, "add_tensor '%s': out of memory", name);
    }
    w->tensors[w->n_tensors++] = t;
    return 0;
}

/* --- serialising --- */

typedef struct {
    FILE *fp;
    int failed;
} sink;

static void put(sink *s, const void *p, size_t n)
{
    if (!s->failed && n && fwrite(p, 1, n, s->fp) != n) s->failed = 1;
}

static void put_u32(sink *s, uint32_t v) { put(s, &v, 4); }
static void put_u64(sink *s, uint64_t v) { put(s, &v, 8); }

static void put_str(sink *s, const char *str)
{
    uint64_t n = strlen(str);
    put_u64(s, n);
    put(s, str, n);
}

static void put_zeros(sink *s, uint64_t n)
{
    static const uint8_t zeros[64];
    while (n > 0) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        put(s, zeros, k);
        n -= k;
    }
}

/* The alignment the file will declare: general.alignment when set (u32, a power
 * of two), else the default. */
static int writer_alignment(const gguf_writer *w, uint64_t *align, char *err, size_t errlen)
{
    *align = GGUF_DEFAULT_ALIGNMENT;
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, GGUF_KEY_ALIGN) != 0) continue;
        uint32_t a = 0;
        if (w->kv[i].type == GGUF_TYPE_UINT32) memcpy(&a, w->kv[i].val, 4);
        if (a == 0 || (a & (a - 1))) {
            snprintf(err, errlen, "%s must be a power of two stored as uint32", GGUF_KEY_ALIGN);
            return -1;
        }
        *align = a;
    }
    return 0;
}

static void write_all(const gguf_writer *w, sink *s, uint64_t align)
{
    put(s, GGUF_MAGIC, 4);
    put_u32(s, GGUF_VERSION);
    put_u64(s, (uint64_t)w->n_tensors);
    put_u64(s, (uint64_t)w->n_kv);
    uint64_t pos = 24;
    for (int64_t i = 0; i < w->n_kv; i++) {
        put_str(s, w->kv[i].key);
        put_u32(s, w->kv[i].type);
        put(s, w->kv[i].val, w->kv[i].len);
        pos += 8 + strlen(w->kv[i].key) + 4 + w->kv[i].len;
    }
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n_tensors; i++) {
        const writer_tensor *t = &w->tensors[i];
        put_str(s, t->name);
        put_u32(s, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) put_u64(s, t->ne[d]);
        put_u32(s, (uint32_t)t->type);
        put_u64(s, off);
        pos += 8 + strlen(t->name) + 4 + 8 * t->n_dims + 4 + 8;
        off += align_up(t->nbytes, align);
    }
    put_zeros(s, align_up(pos, align) - pos);
    for (int64_t i = 0; i < w->n_tensors; i++) {
        const writer_tensor *t = &w->tensors[i];
        put(s, t->data, (size_t)t->nbytes);
        put_zeros(s, align_up(t->nbytes, align) - t->nbytes);
    }
}

/* Writes to "<path>.tmp" and renames, so a failed write never leaves a
 * half-written file under the final name. */
int gguf_writer_write(gguf_writer *w, const char *path, char *err, size_t errlen)
{
    if (w->err[0]) {
        snprintf(err, errlen, "%s", w->err);
        return -1;
    }
    uint64_t align;
    if (writer_alignment(w, &align, err, errlen)) return -1;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    sink s = {fopen(tmp, "wb"), 0};
    if (!s.fp) {
        snprintf(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    write_all(w, &s, align);
    int saved = errno;
    if (fclose(s.fp) != 0 && !s.failed) {
        s.failed = 1;
        saved = errno;
    }
    if (!s.failed && rename(tmp, path) != 0) {
        s.failed = 1;
        saved = errno;
    }
    if (s.failed) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(saved));
        unlink(tmp);
    }
    free(tmp);
    return s.failed ? -1 : 0;
}

/* ---------------------------------------------------- f16 / bf16 ---- */

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float gguf_f16_to_f32(uint16_t h) { return wconv_f16(h); }

uint16_t gguf_f32_to_f16(float f) { return wconv_to_f16(f); }

static void put_f16(unsigned char *at, float f)
{
    uint16_t h = gguf_f32_to_f16(f);
    memcpy(at, &h, 2);
}

/* The element of x[0, n) of largest magnitude (the first of equals). */
static float signed_max(const float *x, int n)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    return max;
}

void gguf_quantize_q8_0(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_Q8_0_BLOCK, b += GGML_Q8_0_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < GGML_Q8_0_BLOCK; j++) amax = fmaxf(amax, fabsf(x[i + j]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = gguf_f32_to_f16(d);
        memcpy(b, &h, 2);
        for (int j = 0; j < GGML_Q8_0_BLOCK; j++) b[2 + j] = (unsigned char)(int8_t)roundf(x[i + j] * id);
    }
}

static int clamp_int(float v, int lo, int hi)
{
    int i = (int)lroundf(v);
    return i < lo ? lo : i > hi ? hi : i;
}

void gguf_quantize_q4_0(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_Q8_0_BLOCK, x += GGML_Q8_0_BLOCK, b += GGML_Q4_0_BYTES) {
        float d = signed_max(x, 32) / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(b, d);
        for (int j = 0; j < 16; j++) {
            int lo = clamp_int(x[j] * id + 8.0f, 0, 15), hi = clamp_int(x[16 + j] * id + 8.0f, 0, 15);
            b[2 + j] = (unsigned char)(lo | (hi << 4));
        }
    }
}

/* Q4_1 (levels 15) and Q5_1 (31): d and m, then (Q5_1) the fifth bits, then
 * the nibbles. q is taken against the stored (F16) d and m. */
static void quantize_b32_min(const float *x, uint64_t n, unsigned char *b, int levels)
{
    size_t bytes = levels == 15 ? GGML_Q4_1_BYTES : GGML_Q5_1_BYTES;
    for (uint64_t i = 0; i < n; i += GGML_Q8_0_BLOCK, x += GGML_Q8_0_BLOCK, b += bytes) {
        float lo = x[0], hi = x[0];
        for (int j = 1; j < 32; j++) {
            lo = fminf(lo, x[j]);
            hi = fmaxf(hi, x[j]);
        }
        memset(b, 0, bytes);
        put_f16(b, (hi - lo) / (float)levels);
        put_f16(b + 2, lo);
        float d = gguf_f16_to_f32(gguf_f32_to_f16((hi - lo) / (float)levels));
        float m = gguf_f16_to_f32(gguf_f32_to_f16(lo));
        uint32_t qh = 0;
        unsigned char *qs = b + (levels == 15 ? 4 : 8);
        for (int j = 0; j < 32; j++) {
            int q = d > 0.0f ? clamp_int((x[j] - m) / d, 0, levels) : 0;
            qs[j % 16] |= (uint8_t)(j < 16 ? q & 15 : (q & 15) << 4);
            qh |= (uint32_t)(q >> 4) << j;
        }
        if (levels == 31) memcpy(b + 4, &qh, 4);
    }
}

void gguf_quantize_q4_1(const float *x, uint64_t n, void *blocks) { quantize_b32_min(x, n, blocks, 15); }

void gguf_quantize_q5_1(const float *x, uint64_t n, void *blocks) { quantize_b32_min(x, n, blocks, 31); }

void gguf_quantize_q5_0(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_Q8_0_BLOCK, x += GGML_Q8_0_BLOCK, b += GGML_Q5_0_BYTES) {
        float d = signed_max(x, 32) / -16.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        memset(b, 0, GGML_Q5_0_BYTES);
        put_f16(b, d);
        uint32_t qh = 0;
        for (int j = 0; j < 32; j++) {
            int q = clamp_int(x[j] * id + 16.0f, 0, 31);
            b[6 + j % 16] |= (uint8_t)(j < 16 ? q & 15 : (q & 15) << 4);
            qh |= (uint32_t)(q >> 4) << j;
        }
        memcpy(b + 2, &qh, 4);
    }
}

/* The IQ4_NL level nearest to v (the lower of two equally near). */
static int iq4_nearest(float v)
{
    int best = 0;
    for (int k = 1; k < 16; k++)
        if (fabsf(v - (float)wconv_iq4nl_levels[k]) < fabsf(v - (float)wconv_iq4nl_levels[best])) best = k;
    return best;
}

/* 32 weights as IQ4_NL indices against scale d: nibbles at qs, as both IQ4
 * types store them. */
static void iq4_pack(const float *x, float d, unsigned char *qs)
{
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 16; j++)
        qs[j] = (uint8_t)(iq4_nearest(x[j] * id) | iq4_nearest(x[16 + j] * id) << 4);
}

void gguf_quantize_iq4_nl(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_Q8_0_BLOCK, x += GGML_Q8_0_BLOCK, b += GGML_IQ4_NL_BYTES) {
        put_f16(b, signed_max(x, 32) / -127.0f);
        iq4_pack(x, gguf_f16_to_f32(gguf_f32_to_f16(signed_max(x, 32) / -127.0f)), b + 2);
    }
}

/* The scales (max - min) / levels and mins -min (min <= 0) of the sub-blocks of
 * `sub` weights of a super-block, as multiples sc and m (0..top) of d = the
 * largest scale / top and dmin = the largest min / top, both stored as F16 at
 * d_at and dmin_at; *d and *dmin as stored. */
static void min_scales(const float *x, int sub, int levels, int top, uint8_t *sc, uint8_t *m,
                       unsigned char *d_at, unsigned char *dmin_at, float *d, float *dmin)
{
    float scale[16], mn[16], smax = 0.0f, mmax = 0.0f;
    int n = GGML_QK_K / sub;
    for (int j = 0; j < n; j++) {
        float lo = 0.0f, hi = 0.0f;
        for (int l = 0; l < sub; l++) {
            lo = fminf(lo, x[sub * j + l]);
            hi = fmaxf(hi, x[sub * j + l]);
        }
        scale[j] = (hi - lo) / (float)levels;
        mn[j] = -lo;
        smax = fmaxf(smax, scale[j]);
        mmax = fmaxf(mmax, mn[j]);
    }
    put_f16(d_at, smax / (float)top);
    put_f16(dmin_at, mmax / (float)top);
    *d = gguf_f16_to_f32(gguf_f32_to_f16(smax / (float)top));
    *dmin = gguf_f16_to_f32(gguf_f32_to_f16(mmax / (float)top));
    for (int j = 0; j < n; j++) {
        sc[j] = (uint8_t)(*d > 0.0f ? clamp_int(scale[j] / *d, 0, top) : 0);
        m[j] = (uint8_t)(*dmin > 0.0f ? clamp_int(mn[j] / *dmin, 0, top) : 0);
    }
}

/* Q2_K: per sub-block of 16 a scale (max - min) / 3 and a min <= 0, as 4-bit
 * multiples of the super-block's d and dmin; q = round((x - min) / scale). */
void gguf_quantize_q2_k(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_QK_K, x += GGML_QK_K, b += GGML_Q2_K_BYTES) {
        uint8_t sc[16], m[16];
        float d, dmin;
        memset(b, 0, GGML_Q2_K_BYTES);
        min_scales(x, 16, 3, 15, sc, m, b + 80, b + 82, &d, &dmin);
        for (int j = 0; j < 16; j++) {
            b[j] = (uint8_t)(sc[j] | m[j] << 4);
            float dj = d * (float)sc[j], mj = dmin * (float)m[j];
            for (int l = 0; l < 16; l++) {
                int e = 16 * j + l, q = dj > 0.0f ? clamp_int((x[e] + mj) / dj, 0, 3) : 0;
                b[16 + 32 * (e / 128) + e % 32] |= (uint8_t)(q << (2 * ((e % 128) / 32)));
            }
        }
    }
}

/* The signed scales of the sub-blocks of `sub` weights of a super-block (the
 * weight of largest magnitude / -levels, so it is exactly -levels steps) as
 * 6-bit multiples sc (-32..31) of d = the largest magnitude / 31, d stored as
 * F16 at d_at; returns d as stored. */
static float signed_scales(const float *x, int sub, float levels, int *sc, unsigned char *d_at)
{
    float scale[16], smax = 0.0f;
    int n = GGML_QK_K / sub;
    for (int j = 0; j < n; j++) {
        scale[j] = signed_max(x + sub * j, sub) / -levels;
        smax = fmaxf(smax, fabsf(scale[j]));
    }
    put_f16(d_at, smax / 31.0f);
    float d = gguf_f16_to_f32(gguf_f32_to_f16(smax / 31.0f));
    for (int j = 0; j < n; j++) sc[j] = d > 0.0f ? clamp_int(scale[j] / d, -32, 31) : 0;
    return d;
}

/* Q3_K: per sub-block of 16 a signed scale (the weight of largest magnitude) /
 * -4 as a 6-bit multiple (-32..31) of the super-block's d; q = round(x / scale)
 * in -4..3, stored as q + 4: its low 2 bits in qs, the third in hmask. */
void gguf_quantize_q3_k(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_QK_K, x += GGML_QK_K, b += GGML_Q3_K_BYTES) {
        int sc[16];
        memset(b, 0, GGML_Q3_K_BYTES);
        float d = signed_scales(x, 16, 4.0f, sc, b + 108);
        unsigned char *s = b + 96;
        for (int j = 0; j < 16; j++) {
            int u = sc[j] + 32;
            s[j % 8] |= (uint8_t)(j < 8 ? u & 15 : (u & 15) << 4);
            s[8 + j % 4] |= (uint8_t)((u >> 4) << (2 * (j / 4)));
            float dj = d * (float)sc[j];
            for (int l = 0; l < 16; l++) {
                int e = 16 * j + l, q = (dj != 0.0f ? clamp_int(x[e] / dj, -4, 3) : 0) + 4;
                if (q > 3) b[e % 32] |= (uint8_t)(1u << (e / 32));
                b[32 + 32 * (e / 128) + e % 32] |= (uint8_t)((q & 3) << (2 * ((e % 128) / 32)));
            }
        }
    }
}

/* IQ4_XS: per sub-block of 32 a signed scale (the weight of largest magnitude)
 * / -127 as a 6-bit multiple (-32..31) of the super-block's d; IQ4_NL's
 * indices against it. */
void gguf_quantize_iq4_xs(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_QK_K, x += GGML_QK_K, b += GGML_IQ4_XS_BYTES) {
        int sc[8];
        memset(b, 0, GGML_IQ4_XS_BYTES);
        float d = signed_scales(x, 32, 127.0f, sc, b);
        unsigned sh = 0;
        for (int j = 0; j < 8; j++) {
            int u = sc[j] + 32;
            b[4 + j / 2] |= (uint8_t)((u & 15) << (4 * (j % 2)));
            sh |= (unsigned)(u >> 4) << (2 * j);
            iq4_pack(x + 32 * j, d * (float)sc[j], b + 8 + 16 * j);
        }
        b[2] = (uint8_t)(sh & 255);
        b[3] = (uint8_t)(sh >> 8);
    }
}

/* Q4_K (levels 15) and Q5_K (31): per sub-block of 32 a scale (max - min) /
 * levels and a min <= 0, both as 6-bit multiples of the super-block's d and
 * dmin; q = round((x - min) / scale), its fifth bit (Q5_K) in qh. */
static void quantize_k_min(const float *x, uint64_t n, unsigned char *b, int levels)
{
    size_t bytes = levels == 15 ? GGML_Q4_K_BYTES : GGML_Q5_K_BYTES;
    for (uint64_t i = 0; i < n; i += GGML_QK_K, x += GGML_QK_K, b += bytes) {
        uint8_t sc[8], m[8];
        float d, dmin;
        memset(b, 0, bytes);
        min_scales(x, 32, levels, 63, sc, m, b, b + 2, &d, &dmin);
        unsigned char *s = b + 4, *qh = b + 16, *qs = b + (levels == 15 ? 16 : 48);
        for (int j = 0; j < 4; j++) {
            s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
            s[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
            s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
        }
        for (int j = 0; j < 8; j++) {
            float dj = d * (float)sc[j], mj = dmin * (float)m[j];
            for (int l = 0; l < 32; l++) {
                int q = dj > 0.0f ? clamp_int((x[32 * j + l] + mj) / dj, 0, levels) : 0;
                unsigned char *at = qs + 32 * (j / 2) + l;
                *at |= (uint8_t)(j % 2 ? (q & 15) << 4 : q & 15);
                if (q > 15) qh[l] |= (uint8_t)(1u << j);
            }
        }
    }
}

void gguf_quantize_q4_k(const float *x, uint64_t n, void *blocks) { quantize_k_min(x, n, blocks, 15); }

void gguf_quantize_q5_k(const float *x, uint64_t n, void *blocks) { quantize_k_min(x, n, blocks, 31); }

/* Q6_K: per sub-block of 16 a signed scale max|x| / 31 as an int8 multiple of
 * the super-block's d; q = round(x / scale) + 32 in 6 bits. */
void gguf_quantize_q6_k(const float *x, uint64_t n, void *blocks)
{
    unsigned char *b = blocks;
    for (uint64_t i = 0; i < n; i += GGML_QK_K, x += GGML_QK_K, b += GGML_Q6_K_BYTES) {
        float scale[16], smax = 0.0f;
        for (int j = 0; j < 16; j++) {
            float amax = 0.0f;
            for (int l = 0; l < 16; l++) amax = fmaxf(amax, fabsf(x[16 * j + l]));
            scale[j] = amax / 31.0f;
            smax = fmaxf(smax, scale[j]);
        }
        uint16_t hd = gguf_f32_to_f16(smax / 127.0f);
        float d = gguf_f16_to_f32(hd);
        unsigned char *ql = b, *qh = b + 128;
        int8_t *sc = (int8_t *)(b + 192);
        memset(b, 0, 192);
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)(d > 0.0f ? clamp_int(scale[j] / d, -127, 127) : 0);
        memcpy(b + 208, &hd, 2);
        for (int e = 0; e < GGML_QK_K; e++) {
            float s = d * (float)sc[e / 16];
            int q = (s != 0.0f ? clamp_int(x[e] / s, -32, 31) : 0) + 32;
            int h = e / 128, l = e % 128, part = l / 32, at = l % 32;
            unsigned char *lo = ql + 64 * h + 32 * (part & 1) + at;
            *lo = (uint8_t)(part < 2 ? (*lo & 0xF0) | (q & 15) : (*lo & 0x0F) | ((q & 15) << 4));
            qh[32 * h + at] |= (uint8_t)((q >> 4) << (2 * part));
        }
    }
}

float gguf_bf16_to_f32(uint16_t h) { return wconv_bf16(h); }

uint16_t gguf_f32_to_bf16(float f)
{
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}
