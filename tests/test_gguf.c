/* test_gguf.c -- GGUF writer -> reader round trips, the real vocabulary files, hostile
 * files (truncations at every byte, absurd counts, bad types, dims, offsets,
 * alignment, overlaps, duplicates) and the f16/bf16 conversions. */
#include <math.h>
#include <stdint.h>
#include <sys/stat.h>

#include "models/gguf.h"
#include "tests/testutil.h"
/* The libFuzzer target's body (LLVMFuzzerTestOneInput): it reads everything an
 * accepted file offers and aborts when an invariant fails. Built here, it runs on
 * every mutation below with each `make test` (and under ASan/UBSan with SAN=1),
 * and it cannot stop compiling unnoticed (tests/fuzz/run.sh is not part of CI). */
#include "tests/fuzz/fuzz_gguf.c"

static char err[512];

/* ------------------------------------------------------------ helpers ---- */

/* A growable byte buffer to hand-craft GGUF files. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} blob;

static void b_put(blob *b, const void *v, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    if (n) memcpy(b->p + b->n, v, n);
    b->n += n;
}
static void b_u8(blob *b, uint8_t v) { b_put(b, &v, 1); }
static void b_u16(blob *b, uint16_t v) { b_put(b, &v, 2); }
static void b_u32(blob *b, uint32_t v) { b_put(b, &v, 4); }
static void b_u64(blob *b, uint64_t v) { b_put(b, &v, 8); }
static void b_str(blob *b, const char *s)
{
    b_u64(b, strlen(s));
    b_put(b, s, strlen(s));
}
static void b_header(blob *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    b_put(b, "GGUF", 4);
    b_u32(b, version);
    b_u64(b, n_tensors);
    b_u64(b, n_kv);
}
static void b_key(blob *b, const char *key, uint32_t type)
{
    b_str(b, key);
    b_u32(b, type);
}
static void b_pad(blob *b, size_t align)
{
    while (b->n % align) b_u8(b, 0);
}
static void b_tensor(blob *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                     uint32_t type, uint64_t offset)
{
    b_str(b, name);
    b_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) b_u64(b, ne[d]);
    b_u32(b, type);
    b_u64(b, offset);
}
static void patch_u32(blob *b, size_t at, uint32_t v) { memcpy(b->p + at, &v, 4); }
static void patch_u64(blob *b, size_t at, uint64_t v) { memcpy(b->p + at, &v, 8); }

/* Opens an exact-size heap copy of the first len bytes (so ASan sees any read past
 * the end). Returns the rc; *out is closed by the caller when 0. */
static int open_copy(const uint8_t *p, size_t len, gguf_file **out)
{
    uint8_t *copy = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(copy);
    memcpy(copy, p, len);
    err[0] = '\0';
    int rc = gguf_open_memory(copy, len, out, err, sizeof err);
    if (rc == 0) {
        /* touch everything the accessors expose while the buffer is alive */
        for (int64_t i = 0; i < gguf_n_tensors(*out); i++) {
            const gguf_tensor *t = gguf_get_tensor(*out, i);
            volatile uint8_t x = ((const uint8_t *)t->data)[t->nbytes - 1];
            (void)x;
        }
        gguf_close(*out);
        *out = NULL;
    }
    free(copy);
    return rc;
}

/* The buffer must be rejected with an error containing `what`. */
static void expect_reject(const blob *b, const char *what)
{
    gguf_file *f = (gguf_file *)1;
    int rc = open_copy(b->p, b->n, &f);
    ck_assert_msg(rc == -1, "accepted, expected error with '%s'", what);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(err, what) != NULL, "error '%s' does not mention '%s'", err, what);
}

static void expect_accept(const blob *b)
{
    gguf_file *f = NULL;
    int rc = open_copy(b->p, b->n, &f);
    ck_assert_msg(rc == 0, "rejected: %s", err);
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    fseek(fp, 0, SEEK_END);
    *len = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *p = malloc(*len);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(fread(p, 1, *len, fp), *len);
    fclose(fp);
    return p;
}

static char tmp_path[128];
static char tmp_dir[64];

static const char *tmp_file(const char *name)
{
    snprintf(tmp_dir, sizeof tmp_dir, "%s", tu_tmpdir());
    snprintf(tmp_path, sizeof tmp_path, "%s/%s", tmp_dir, name);
    return tmp_path;
}

static void tmp_cleanup(void)
{
    unlink(tmp_path);
    rmdir(tmp_dir);
}

static int str_is(gguf_str s, const char *c)
{
    return s.len == strlen(c) && memcmp(s.data, c, s.len) == 0;
}

/* -------------------------------------------------------- round trips ---- */

START_TEST(writer_reader_round_trip)
{
    float f32[3 * 5];
    uint16_t f16[2 * 3 * 4], bf16[7];
    float f4[2 * 1 * 3 * 2];
    for (int i = 0; i < 15; i++) f32[i] = (float)i * 0.25f - 1.0f;
    for (int i = 0; i < 24; i++) f16[i] = gguf_f32_to_f16((float)i - 7.5f);
    for (int i = 0; i < 7; i++) bf16[i] = gguf_f32_to_bf16((float)i * 3.0f);
    for (int i = 0; i < 12; i++) f4[i] = (float)-i;
    const char *strs[] = {"a", "", "hello world", "\xe2\x96\x81tok"};
    const float af[] = {1.5f, -2.25f, 1e-30f};
    const int32_t ai[] = {-1, 0, 2147483647, -2147483647 - 1};

    gguf_writer *w = gguf_writer_create();
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    ck_assert_int_eq(gguf_writer_set_u32(w, "k.u32", 4000000000u), 0);
    ck_assert_int_eq(gguf_writer_set_i32(w, "k.i32", -5), 0);
    ck_assert_int_eq(gguf_writer_set_u64(w, "k.u64", 1ull << 40), 0);
    ck_assert_int_eq(gguf_writer_set_f32(w, "k.f32", 0.1f), 0);
    ck_assert_int_eq(gguf_writer_set_bool(w, "k.bool", 7), 0);
    ck_assert_int_eq(gguf_writer_set_u32(w, "k.replaced", 1), 0);
    ck_assert_int_eq(gguf_writer_set_str(w, "k.replaced", "now a string"), 0);
    ck_assert_int_eq(gguf_writer_set_arr_str(w, "k.arr_str", strs, 4), 0);
    ck_assert_int_eq(gguf_writer_set_arr_f32(w, "k.arr_f32", af, 3), 0);
    ck_assert_int_eq(gguf_writer_set_arr_i32(w, "k.arr_i32", ai, 4), 0);
    ck_assert_int_eq(gguf_writer_set_arr_i32(w, "k.arr_empty", NULL, 0), 0);
    const uint64_t ne2[] = {5, 3}, ne3[] = {4, 3, 2}, ne1[] = {7}, ne4[] = {2, 1, 3, 2};
    ck_assert_int_eq(gguf_writer_add_tensor(w, "t.f32", GGML_TYPE_F32, 2, ne2, f32), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "t.f16", GGML_TYPE_F16, 3, ne3, f16), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "t.bf16", GGML_TYPE_BF16, 1, ne1, bf16), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "t.4d", GGML_TYPE_F32, 4, ne4, f4), 0);
    unsigned char q8[3 * 34];
    for (int i = 0; i < 3 * 34; i++) q8[i] = (unsigned char)(i * 7);
    const uint64_t neq[] = {32, 3};
    ck_assert_int_eq(gguf_writer_add_tensor(w, "t.q8", GGML_TYPE_Q8_0, 2, neq, q8), 0);
    const char *path = tmp_file("rt.gguf");
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);

    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(gguf_version(f), 3);
    ck_assert_uint_eq(gguf_alignment(f), 32);
    ck_assert_int_eq(gguf_n_kv(f), 11);
    /* keys keep the order they were first set in */
    ck_assert(str_is(gguf_kv_key(f, 0), "general.architecture"));
    ck_assert(str_is(gguf_kv_key(f, 6), "k.replaced"));
    ck_assert_int_eq(gguf_kv_type(f, 6), GGUF_TYPE_STRING);
    ck_assert_int_eq(gguf_kv_type(f, 11), GGUF_TYPE_COUNT);
    ck_assert_int_eq(gguf_find_key(f, "k.arr_str"), 7);
    ck_assert_int_eq(gguf_find_key(f, "k.arr_st"), -1);

    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    float fl;
    int b;
    gguf_str s;
    char buf[16];
    ck_assert_int_eq(gguf_get_u32(f, "k.u32", &u32), 0);
    ck_assert_uint_eq(u32, 4000000000u);
    ck_assert_int_eq(gguf_get_i32(f, "k.u32", &i32), -2);   /* does not fit */
    ck_assert_int_eq(gguf_get_u64(f, "k.u32", &u64), 0);
    ck_assert_uint_eq(u64, 4000000000u);
    ck_assert_int_eq(gguf_get_i32(f, "k.i32", &i32), 0);
    ck_assert_int_eq(i32, -5);
    ck_assert_int_eq(gguf_get_u32(f, "k.i32", &u32), -2);   /* negative */
    ck_assert_int_eq(gguf_get_u64(f, "k.i32", &u64), -2);
    ck_assert_int_eq(gguf_get_u64(f, "k.u64", &u64), 0);
    ck_assert_uint_eq(u64, 1ull << 40);
    ck_assert_int_eq(gguf_get_u32(f, "k.u64", &u32), -2);
    ck_assert_int_eq(gguf_get_f32(f, "k.f32", &fl), 0);
    ck_assert(fl == 0.1f);
    ck_assert_int_eq(gguf_get_f32(f, "k.u32", &fl), -2);
    ck_assert_int_eq(gguf_get_bool(f, "k.bool", &b), 0);
    ck_assert_int_eq(b, 1);
    ck_assert_int_eq(gguf_get_bool(f, "k.u32", &b), -2);
    ck_assert_int_eq(gguf_get_u32(f, "k.bool", &u32), -2);
    ck_assert_int_eq(gguf_get_str(f, "general.architecture", &s), 0);
    ck_assert(str_is(s, "llama"));
    ck_assert_int_eq(gguf_get_cstr(f, "k.replaced", buf, sizeof buf), 0);
    ck_assert_str_eq(buf, "now a string");
    ck_assert_int_eq(gguf_get_cstr(f, "k.replaced", buf, 12), -2); /* needs 13 */
    ck_assert_int_eq(gguf_get_str(f, "k.u32", &s), -2);
    ck_assert_int_eq(gguf_get_u32(f, "absent", &u32), -1);
    ck_assert_int_eq(gguf_get_str(f, "absent", &s), -1);
    ck_assert_int_eq(gguf_get_cstr(f, "absent", buf, sizeof buf), -1);

    gguf_type et;
    uint64_t n;
    ck_assert_int_eq(gguf_get_arr_info(f, "k.arr_str", &et, &n), 0);
    ck_assert_int_eq(et, GGUF_TYPE_STRING);
    ck_assert_uint_eq(n, 4);
    gguf_str out[4];
    ck_assert_int_eq(gguf_get_arr_strs(f, "k.arr_str", out, 3), -2); /* wrong n */
    ck_assert_int_eq(gguf_get_arr_strs(f, "k.arr_str", out, 4), 0);
    for (int i = 0; i < 4; i++) ck_assert(str_is(out[i], strs[i]));
    ck_assert_int_eq(gguf_get_arr_strs(f, "k.arr_f32", out, 3), -2);
    float fo[3];
    ck_assert_int_eq(gguf_get_arr_f32(f, "k.arr_f32", fo, 3), 0);
    ck_assert(memcmp(fo, af, sizeof af) == 0);
    ck_assert_int_eq(gguf_get_arr_f32(f, "k.arr_i32", fo, 3), -2);
    int32_t io[4];
    ck_assert_int_eq(gguf_get_arr_i32(f, "k.arr_i32", io, 4), 0);
    ck_assert(memcmp(io, ai, sizeof ai) == 0);
    ck_assert_int_eq(gguf_get_arr_i32(f, "k.arr_f32", io, 3), -2);
    ck_assert_int_eq(gguf_get_arr_i32(f, "k.u32", io, 1), -2);
    ck_assert_int_eq(gguf_get_arr_info(f, "k.arr_empty", &et, &n), 0);
    ck_assert_int_eq(et, GGUF_TYPE_INT32);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(gguf_get_arr_info(f, "k.u32", &et, &n), -2);
    ck_assert_int_eq(gguf_get_arr_info(f, "absent", &et, &n), -1);

    ck_assert_int_eq(gguf_n_tensors(f), 5);
    ck_assert_ptr_null(gguf_get_tensor(f, 5));
    ck_assert_ptr_null(gguf_get_tensor(f, -1));
    ck_assert_ptr_null(gguf_find_tensor(f, "t.f3"));
    struct { const char *name; ggml_type type; uint32_t n_dims; const uint64_t *ne; const void *data;
             uint64_t nel; } want[] = {
        {"t.f32", GGML_TYPE_F32, 2, ne2, f32, 15}, {"t.f16", GGML_TYPE_F16, 3, ne3, f16, 24},
        {"t.bf16", GGML_TYPE_BF16, 1, ne1, bf16, 7}, {"t.4d", GGML_TYPE_F32, 4, ne4, f4, 12},
        {"t.q8", GGML_TYPE_Q8_0, 2, neq, q8, 96}};
    for (int i = 0; i < 5; i++) {
        const gguf_tensor *t = gguf_find_tensor(f, want[i].name);
        ck_assert_ptr_eq(t, gguf_get_tensor(f, i));
        ck_assert(str_is(t->name, want[i].name));
        ck_assert_int_eq(t->type, want[i].type);
        ck_assert_uint_eq(t->n_dims, want[i].n_dims);
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++)
            ck_assert_uint_eq(t->ne[d], d < t->n_dims ? want[i].ne[d] : 1);
        ck_assert_uint_eq(t->n_elements, want[i].nel);
        ck_assert_uint_eq(t->nbytes, want[i].nel / ggml_block_size(want[i].type) * ggml_type_size(want[i].type));
        ck_assert_uint_eq(t->offset % 32, 0);
        ck_assert_uint_eq((uintptr_t)t->data % 32, 0); /* mmap is page-aligned */
        ck_assert(memcmp(t->data, want[i].data, t->nbytes) == 0);
    }
    ck_assert_uint_eq(gguf_file_size(f) % 32, 0); /* the last tensor is padded too */
    gguf_close(f);
    tmp_cleanup();
}
END_TEST

/* One key of every scalar type and an array of every element type, hand-made; the
 * reader exposes them, and copy_kv carries them byte for byte into a new file. */
static const uint32_t elem_types[12] = {
    GGUF_TYPE_UINT8, GGUF_TYPE_INT8, GGUF_TYPE_UINT16, GGUF_TYPE_INT16, GGUF_TYPE_UINT32,
    GGUF_TYPE_INT32, GGUF_TYPE_FLOAT32, GGUF_TYPE_BOOL, GGUF_TYPE_STRING, GGUF_TYPE_UINT64,
    GGUF_TYPE_INT64, GGUF_TYPE_FLOAT64};

static void every_type_file(blob *b)
{
    const uint32_t *types = elem_types;
    b_header(b, 3, 0, 24);
    b_key(b, "u8", GGUF_TYPE_UINT8); b_u8(b, 200);
    b_key(b, "i8", GGUF_TYPE_INT8); b_u8(b, (uint8_t)-100);
    b_key(b, "u16", GGUF_TYPE_UINT16); b_u16(b, 60000);
    b_key(b, "i16", GGUF_TYPE_INT16); b_u16(b, (uint16_t)-30000);
    b_key(b, "u32", GGUF_TYPE_UINT32); b_u32(b, 4000000000u);
    b_key(b, "i32", GGUF_TYPE_INT32); b_u32(b, (uint32_t)-2000000000);
    b_key(b, "f32", GGUF_TYPE_FLOAT32); float f = -3.5f; b_put(b, &f, 4);
    b_key(b, "bool", GGUF_TYPE_BOOL); b_u8(b, 1);
    b_key(b, "str", GGUF_TYPE_STRING); b_str(b, "value");
    b_key(b, "u64", GGUF_TYPE_UINT64); b_u64(b, UINT64_MAX);
    b_key(b, "i64", GGUF_TYPE_INT64); b_u64(b, (uint64_t)-5);
    b_key(b, "f64", GGUF_TYPE_FLOAT64); double d = 0.125; b_put(b, &d, 8);
    /* arrays of every element type: {1, 2} (strings "x", "yz") */
    static const char *names[] = {"a.u8", "a.i8", "a.u16", "a.i16", "a.u32", "a.i32", "a.f32",
                                  "a.bool", "a.str", "a.u64", "a.i64", "a.f64"};
    for (int i = 0; i < 12; i++) {
        b_key(b, names[i], GGUF_TYPE_ARRAY);
        b_u32(b, types[i]);
        b_u64(b, 2);
        for (int k = 1; k <= 2; k++) {
            switch (types[i]) {
            case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL:
                b_u8(b, (uint8_t)(k - 1)); break;
            case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: b_u16(b, (uint16_t)k); break;
            case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: b_u32(b, (uint32_t)k); break;
            case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: b_u64(b, (uint64_t)k); break;
            case GGUF_TYPE_FLOAT32: { float v = (float)k; b_put(b, &v, 4); break; }
            case GGUF_TYPE_FLOAT64: { double v = k; b_put(b, &v, 8); break; }
            case GGUF_TYPE_STRING: b_str(b, k == 1 ? "x" : "yz"); break;
            }
        }
    }
    b_pad(b, 32); /* what the writer appends after the metadata */
}

START_TEST(every_value_type_round_trip)
{
    blob b = {0};
    every_type_file(&b);
    gguf_file *f;
    ck_assert_msg(gguf_open_memory(b.p, b.n, &f, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(gguf_n_kv(f), 24);
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    float fl;
    int bo;
    ck_assert_int_eq(gguf_get_u32(f, "u8", &u32), 0); ck_assert_uint_eq(u32, 200);
    ck_assert_int_eq(gguf_get_i32(f, "i8", &i32), 0); ck_assert_int_eq(i32, -100);
    ck_assert_int_eq(gguf_get_u32(f, "u16", &u32), 0); ck_assert_uint_eq(u32, 60000);
    ck_assert_int_eq(gguf_get_i32(f, "i16", &i32), 0); ck_assert_int_eq(i32, -30000);
    ck_assert_int_eq(gguf_get_u32(f, "u32", &u32), 0); ck_assert_uint_eq(u32, 4000000000u);
    ck_assert_int_eq(gguf_get_i32(f, "i32", &i32), 0); ck_assert_int_eq(i32, -2000000000);
    ck_assert_int_eq(gguf_get_f32(f, "f32", &fl), 0); ck_assert(fl == -3.5f);
    ck_assert_int_eq(gguf_get_bool(f, "bool", &bo), 0); ck_assert_int_eq(bo, 1);
    ck_assert_int_eq(gguf_get_u64(f, "u64", &u64), 0); ck_assert(u64 == UINT64_MAX);
    ck_assert_int_eq(gguf_get_u32(f, "u64", &u32), -2);
    ck_assert_int_eq(gguf_get_i32(f, "i64", &i32), 0); ck_assert_int_eq(i32, -5);
    ck_assert_int_eq(gguf_get_u64(f, "i64", &u64), -2);
    ck_assert_int_eq(gguf_get_f32(f, "f64", &fl), 0); ck_assert(fl == 0.125f);
    ck_assert_int_eq(gguf_get_i32(f, "f64", &i32), -2);
    int32_t ia[2];
    float fa[2];
    gguf_str sa[2];
    for (int64_t i = 12; i < 24; i++) {
        gguf_type et;
        uint64_t n;
        char key[16];
        gguf_str k = gguf_kv_key(f, i);
        ck_assert_uint_lt(k.len, sizeof key);
        memcpy(key, k.data, k.len);
        key[k.len] = '\0';
        ck_assert_int_eq(gguf_get_arr_info(f, key, &et, &n), 0);
        ck_assert_uint_eq(n, 2);
        ck_assert_int_eq(et, (gguf_type)elem_types[i - 12]);
        int is_int = et != GGUF_TYPE_FLOAT32 && et != GGUF_TYPE_FLOAT64 &&
                     et != GGUF_TYPE_BOOL && et != GGUF_TYPE_STRING;
        if (is_int) {
            ck_assert_int_eq(gguf_get_arr_i32(f, key, ia, 2), 0);
            ck_assert(ia[0] == (et == GGUF_TYPE_UINT8 || et == GGUF_TYPE_INT8 ? 0 : 1));
        } else {
            ck_assert_int_eq(gguf_get_arr_i32(f, key, ia, 2), -2);
        }
        if (et == GGUF_TYPE_FLOAT32 || et == GGUF_TYPE_FLOAT64) {
            ck_assert_int_eq(gguf_get_arr_f32(f, key, fa, 2), 0);
            ck_assert(fa[0] == 1.0f && fa[1] == 2.0f);
        } else {
            ck_assert_int_eq(gguf_get_arr_f32(f, key, fa, 2), -2);
        }
        ck_assert_int_eq(gguf_get_arr_strs(f, key, sa, 2), et == GGUF_TYPE_STRING ? 0 : -2);
    }
    ck_assert(str_is(sa[0], "x") && str_is(sa[1], "yz"));

    /* copy every key into a writer: the written file equals the hand-made one */
    gguf_writer *w = gguf_writer_create();
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        char key[16];
        gguf_str k = gguf_kv_key(f, i);
        memcpy(key, k.data, k.len);
        key[k.len] = '\0';
        ck_assert_int_eq(gguf_writer_copy_kv(w, f, key), 0);
    }
    ck_assert_int_eq(gguf_writer_copy_kv(w, f, "absent"), -1);
    const char *path = tmp_file("types.gguf");
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    size_t len;
    uint8_t *copy = read_file(path, &len);
    ck_assert_uint_eq(len, b.n);
    ck_assert(memcmp(copy, b.p, len) == 0);
    free(copy);
    gguf_close(f);
    free(b.p);
    tmp_cleanup();
}
END_TEST


/* The independent Python reader (tests/reference/gguf_read.py, numpy's float16)
 * reads what the writer wrote: keys, shapes, offsets, F32/F16/BF16 values, and
 * Q8_0 blocks as ggml defines them (d = max |x| / 127 in F16, q = round(x / d)). */
static const char *py_check =
    "import sys\n"
    "sys.path.insert(0, 'tests/reference')\n"
    "import gguf_read, numpy as np\n"
    "g = gguf_read.GGUF(sys.argv[1])\n"
    "assert g.version == 3\n"
    "assert g.kv['general.architecture'] == 'llama'\n"
    "assert g.kv['tokenizer.ggml.tokens'] == ['t%d' % i for i in range(100)]\n"
    "assert g.kv['k.u32'] == 7 and g.kv['k.i32'] == -7 and g.kv['k.u64'] == 2**40\n"
    "assert g.kv['k.f32'] == 0.5 and g.kv['k.bool'] is True\n"
    "assert g.kv['k.arr_f32'] == [i * 0.5 for i in range(9)]\n"
    "assert g.kv['k.arr_i32'] == list(range(-3, 4))\n"
    "assert g.tensors['a'][:2] == ([5, 3], 0) and g.tensors['h'][:2] == ([4, 2], 1)\n"
    "assert g.tensors['b'][:2] == ([6], 30)\n"
    "assert all(t[2] % 32 == 0 for t in g.tensors.values()) and g.data_start % 32 == 0\n"
    "assert (g.tensor('a') == np.arange(15).reshape(3, 5) * 0.25).all()\n"
    "assert (g.tensor('h') == np.arange(8).reshape(2, 4) - 3.5).all()\n"
    "assert (g.tensor('b') == np.arange(6) * 2.0).all()\n"
    "assert g.tensors['q'][:2] == ([64, 2], 8)\n"
    "x = np.array([(i % 37 - 18) / 8.0 for i in range(128)])\n"
    "d = np.array([np.float16(np.max(np.abs(x[32 * b:32 * b + 32])) / 127) for b in range(4)])\n"
    "assert np.allclose(g.tensor('q').ravel(), np.repeat(d, 32) * np.round(x / np.repeat(d, 32)), atol=1e-6)\n"
    "print('python reference reader: ok')\n";

START_TEST(reference_reader_reads_writer_output)
{
    float a[15];
    uint16_t h[8], bf[6];
    for (int i = 0; i < 15; i++) a[i] = (float)i * 0.25f;
    for (int i = 0; i < 8; i++) h[i] = gguf_f32_to_f16((float)i - 3.5f);
    for (int i = 0; i < 6; i++) bf[i] = gguf_f32_to_bf16((float)i * 2.0f);
    char tok[100][16];
    const char *toks[100];
    for (int i = 0; i < 100; i++) {
        snprintf(tok[i], sizeof tok[i], "t%d", i);
        toks[i] = tok[i];
    }
    float af[9];
    int32_t ai[7];
    for (int i = 0; i < 9; i++) af[i] = (float)i * 0.5f;
    for (int i = 0; i < 7; i++) ai[i] = i - 3;
    gguf_writer *w = gguf_writer_create();
    ck_assert_int_eq(gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    ck_assert_int_eq(gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, 100), 0);
    ck_assert_int_eq(gguf_writer_set_u32(w, "k.u32", 7), 0);
    ck_assert_int_eq(gguf_writer_set_i32(w, "k.i32", -7), 0);
    ck_assert_int_eq(gguf_writer_set_u64(w, "k.u64", 1ull << 40), 0);
    ck_assert_int_eq(gguf_writer_set_f32(w, "k.f32", 0.5f), 0);
    ck_assert_int_eq(gguf_writer_set_bool(w, "k.bool", 1), 0);
    ck_assert_int_eq(gguf_writer_set_arr_f32(w, "k.arr_f32", af, 9), 0);
    ck_assert_int_eq(gguf_writer_set_arr_i32(w, "k.arr_i32", ai, 7), 0);
    const uint64_t ne_a[] = {5, 3}, ne_h[] = {4, 2}, ne_b[] = {6};
    ck_assert_int_eq(gguf_writer_add_tensor(w, "a", GGML_TYPE_F32, 2, ne_a, a), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "h", GGML_TYPE_F16, 2, ne_h, h), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "b", GGML_TYPE_BF16, 1, ne_b, bf), 0);
    float xq[128];
    unsigned char q[4 * 34];
    for (int i = 0; i < 128; i++) xq[i] = (float)(i % 37 - 18) / 8.0f;
    gguf_quantize_q8_0(xq, 128, q);
    const uint64_t ne_q[] = {64, 2};
    ck_assert_int_eq(gguf_writer_add_tensor(w, "q", GGML_TYPE_Q8_0, 2, ne_q, q), 0);
    const char *path = tmp_file("py.gguf");
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);

    const char *py = getenv("PYTHON");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s - %s", py && *py ? py : "/usr/bin/python3", path);
    FILE *p = popen(cmd, "w");
    ck_assert_ptr_nonnull(p);
    fputs(py_check, p);
    int status = pclose(p);
    ck_assert_msg(status == 0, "the Python reference reader rejected the file (status %d)",
                  status);
    tmp_cleanup();
}
END_TEST

/* ---------------------------------------------------- real vocab files ---- */

static gguf_file *open_vocab(const char *name)
{
    const char *shared = tu_shared_dir();
    if (!shared) {
        printf("skip: ../shared absent, vocabulary file %s not tested\n", name);
        return NULL;
    }
    char path[512];
    snprintf(path, sizeof path, "%s/testdata/vocab/%s", shared, name);
    if (access(path, R_OK) != 0) {
        printf("skip: %s absent\n", path);
        return NULL;
    }
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s: %s", path, err);
    return f;
}

/* tokens, scores/merges and types agree in length and the tokens are readable */
static void check_tokens(gguf_file *f, uint64_t want_n, const char *first)
{
    gguf_type et;
    uint64_t n;
    ck_assert_int_eq(gguf_get_arr_info(f, "tokenizer.ggml.tokens", &et, &n), 0);
    ck_assert_int_eq(et, GGUF_TYPE_STRING);
    ck_assert_uint_eq(n, want_n);
    gguf_str *tok = malloc(n * sizeof *tok);
    int32_t *types = malloc(n * sizeof *types);
    ck_assert_int_eq(gguf_get_arr_strs(f, "tokenizer.ggml.tokens", tok, n), 0);
    ck_assert(str_is(tok[0], first));
    for (uint64_t i = 0; i < n; i++) ck_assert(tok[i].len > 0 && tok[i].len <= 256);
    ck_assert_int_eq(gguf_get_arr_i32(f, "tokenizer.ggml.token_type", types, n), 0);
    for (uint64_t i = 0; i < n; i++) ck_assert(types[i] >= 1 && types[i] <= 6);
    free(tok);
    free(types);
}

START_TEST(vocab_llama_spm)
{
    gguf_file *f = open_vocab("ggml-vocab-llama-spm.gguf");
    if (!f) return;
    uint32_t vocab_size;
    ck_assert_int_eq(gguf_get_u32(f, "llama.vocab_size", &vocab_size), 0);
    ck_assert_uint_eq(vocab_size, 32000);
    check_tokens(f, vocab_size, "<unk>");
    float *scores = malloc(vocab_size * sizeof *scores);
    ck_assert_int_eq(gguf_get_arr_f32(f, "tokenizer.ggml.scores", scores, vocab_size), 0);
    free(scores);
    char model[16];
    ck_assert_int_eq(gguf_get_cstr(f, "tokenizer.ggml.model", model, sizeof model), 0);
    ck_assert_str_eq(model, "llama");
    int add_bos;
    ck_assert_int_eq(gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &add_bos), 0);
    ck_assert_int_eq(add_bos, 1);
    ck_assert_int_eq(gguf_n_tensors(f), 0);
    gguf_close(f);
}
END_TEST

START_TEST(vocab_gpt2)
{
    gguf_file *f = open_vocab("ggml-vocab-gpt-2.gguf");
    if (!f) return;
    uint32_t eos;
    ck_assert_int_eq(gguf_get_u32(f, "tokenizer.ggml.eos_token_id", &eos), 0);
    check_tokens(f, (uint64_t)eos + 1, "!"); /* <|endoftext|> is the last token */
    gguf_type et;
    uint64_t n;
    ck_assert_int_eq(gguf_get_arr_info(f, "tokenizer.ggml.merges", &et, &n), 0);
    ck_assert_int_eq(et, GGUF_TYPE_STRING);
    ck_assert_uint_eq(n, 50000);

    /* copy_kv of a 50k-string array into a new file survives a round trip */
    gguf_writer *w = gguf_writer_create();
    ck_assert_int_eq(gguf_writer_copy_kv(w, f, "tokenizer.ggml.merges"), 0);
    ck_assert_int_eq(gguf_writer_copy_kv(w, f, "tokenizer.ggml.model"), 0);
    const char *path = tmp_file("merges.gguf");
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    gguf_file *g;
    ck_assert_msg(gguf_open(path, &g, err, sizeof err) == 0, "%s", err);
    gguf_str *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    ck_assert_int_eq(gguf_get_arr_strs(f, "tokenizer.ggml.merges", a, n), 0);
    ck_assert_int_eq(gguf_get_arr_strs(g, "tokenizer.ggml.merges", b, n), 0);
    for (uint64_t i = 0; i < n; i++)
        ck_assert(a[i].len == b[i].len && memcmp(a[i].data, b[i].data, a[i].len) == 0);
    free(a);
    free(b);
    gguf_close(g);
    gguf_close(f);
    tmp_cleanup();
}
END_TEST


/* -------------------------------------------------------- hostile files ---- */

/* A small valid file with two tensors, built by hand so single fields can be set
 * wrong; records where the fields it patches lie. */
typedef struct {
    uint32_t version;
    uint32_t a_n_dims;
    uint64_t a_ne[5];
    uint32_t a_type;
    uint64_t a_off, b_off;
    const char *key3;       /* name of the third key */
    const char *b_name;
    int has_align;
    uint32_t align_type, align;
    /* filled by build */
    size_t at_key0_len, at_type0, at_str0_len, at_elem_type, at_arr_len, meta_end, data_start;
} spec;

static spec default_spec(void)
{
    return (spec){.version = 3, .a_n_dims = 2, .a_ne = {4, 2}, .a_type = GGML_TYPE_F32,
                  .a_off = 0, .b_off = 32, .key3 = "n", .b_name = "b"};
}

static void build(blob *b, spec *s)
{
    b_header(b, s->version, 2, s->has_align ? 4 : 3);
    s->at_key0_len = b->n;
    b_str(b, "general.architecture");
    s->at_type0 = b->n;
    b_u32(b, GGUF_TYPE_STRING);
    s->at_str0_len = b->n;
    b_str(b, "llama");
    b_key(b, "tokenizer.ggml.tokens", GGUF_TYPE_ARRAY);
    s->at_elem_type = b->n;
    b_u32(b, GGUF_TYPE_STRING);
    s->at_arr_len = b->n;
    b_u64(b, 2);
    b_str(b, "a");
    b_str(b, "bc");
    b_key(b, s->key3, GGUF_TYPE_UINT32);
    b_u32(b, 7);
    if (s->has_align) {
        b_key(b, "general.alignment", s->align_type);
        if (s->align_type == GGUF_TYPE_STRING) b_str(b, "32");
        else b_u32(b, s->align);
    }
    b_tensor(b, "a", s->a_n_dims, s->a_ne, s->a_type, s->a_off);
    const uint64_t ne_b[] = {3};
    b_tensor(b, s->b_name, 1, ne_b, GGML_TYPE_F16, s->b_off);
    s->meta_end = b->n;
    uint32_t al = s->has_align && s->align && !(s->align & (s->align - 1)) && s->align <= 4096
                      ? s->align : 32;
    b_pad(b, al);
    s->data_start = b->n;
    /* data: a is 8 floats at a_off, b 3 halves at b_off (for the default shapes) */
    uint64_t a_bytes = 4;
    for (uint32_t d = 0; d < s->a_n_dims && d < 5; d++)
        a_bytes *= s->a_ne[d] < 4096 ? s->a_ne[d] : 4096;
    uint64_t end = s->b_off + 6 > s->a_off + a_bytes ? s->b_off + 6 : s->a_off + a_bytes;
    if (end > 4096) end = 64;
    for (uint64_t i = 0; i < end; i++) b_u8(b, (uint8_t)(i * 7 + 1));
}

static void reject_spec(spec s, const char *what)
{
    blob b = {0};
    build(&b, &s);
    expect_reject(&b, what);
    free(b.p);
}

START_TEST(hand_made_file_is_valid)
{
    spec s = default_spec();
    blob b = {0};
    build(&b, &s);
    gguf_file *f;
    ck_assert_msg(gguf_open_memory(b.p, b.n, &f, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(gguf_n_tensors(f), 2);
    const gguf_tensor *t = gguf_find_tensor(f, "b");
    ck_assert_ptr_eq((const uint8_t *)t->data, b.p + s.data_start + 32);
    gguf_close(f);
    free(b.p);
    s.has_align = 1;       /* a larger alignment moves the data section and offsets */
    s.align_type = GGUF_TYPE_UINT32;
    s.align = 64;
    s.b_off = 64;
    b = (blob){0};
    build(&b, &s);
    expect_accept(&b);
    ck_assert_uint_eq(s.data_start % 64, 0);
    free(b.p);
}
END_TEST

/* Cutting the file at every byte: a clean error each time; once the header, keys
 * and tensor infos are complete, the error is about the data range. */
START_TEST(truncation_at_every_byte)
{
    spec s = default_spec();
    blob b = {0};
    build(&b, &s);
    for (size_t len = 0; len < b.n; len++) {
        gguf_file *f = (gguf_file *)1;
        int rc = open_copy(b.p, len, &f);
        ck_assert_msg(rc == -1, "truncated at %zu of %zu: accepted", len, b.n);
        ck_assert_ptr_null(f);
        ck_assert_msg(strlen(err) > 0, "truncated at %zu: no message", len);
        if (len >= s.meta_end)
            ck_assert_msg(strstr(err, "beyond file size") != NULL, "at %zu: %s", len, err);
        else
            ck_assert_msg(strstr(err, "beyond file size") == NULL, "at %zu: %s", len, err);
    }
    expect_accept(&b);
    free(b.p);
}
END_TEST

/* Every truncation and every byte of the hand-made file set to 0x00, 0xFF and
 * its value + 1, each through the fuzz target: a clean error or a file whose every
 * key, array element and tensor byte reads inside the buffer. A copy of exactly
 * the input's size, so ASan sees a read one past it. */
START_TEST(fuzz_target_on_every_mutation)
{
    spec s = default_spec();
    s.has_align = 1;
    s.align_type = GGUF_TYPE_UINT32;
    s.align = 64;
    s.b_off = 64;
    blob b = {0};
    build(&b, &s);
    int accepted = 0;
    for (size_t len = 0; len <= b.n; len++) {
        uint8_t *c = malloc(len ? len : 1);
        ck_assert_ptr_nonnull(c);
        memcpy(c, b.p, len);
        ck_assert_int_eq(LLVMFuzzerTestOneInput(c, len), 0);
        free(c);
    }
    for (size_t at = 0; at < b.n; at++)
        for (int m = 0; m < 3; m++) {
            uint8_t *c = malloc(b.n);
            ck_assert_ptr_nonnull(c);
            memcpy(c, b.p, b.n);
            c[at] = m == 0 ? 0x00 : m == 1 ? 0xFF : (uint8_t)(c[at] + 1);
            ck_assert_int_eq(LLVMFuzzerTestOneInput(c, b.n), 0);
            gguf_file *f;
            if (gguf_open_memory(c, b.n, &f, err, sizeof err) == 0) {
                accepted++;
                gguf_close(f);
            }
            free(c);
        }
    /* the data bytes and some header bytes (values, padding) leave a valid file */
    ck_assert_int_gt(accepted, 0);
    free(b.p);
}
END_TEST

START_TEST(absurd_counts_and_lengths)
{
    spec s = default_spec();
    blob b = {0};
    build(&b, &s);
    blob c = {0};
    b_put(&c, b.p, b.n);
    patch_u64(&c, 16, 1ull << 60);
    expect_reject(&c, "key/value count 1152921504606846976");
    patch_u64(&c, 16, 4);                        /* one more than there is */
    gguf_file *f;
    ck_assert_int_eq(open_copy(c.p, c.n, &f), -1);
    memcpy(c.p, b.p, b.n);
    patch_u64(&c, 8, 1ull << 60);
    expect_reject(&c, "tensor count");
    patch_u64(&c, 8, UINT64_MAX);
    expect_reject(&c, "tensor count");
    memcpy(c.p, b.p, b.n);
    patch_u64(&c, s.at_key0_len, 1ull << 63);
    expect_reject(&c, "key length 9223372036854775808");
    memcpy(c.p, b.p, b.n);
    patch_u64(&c, s.at_str0_len, 1ull << 63);
    expect_reject(&c, "string value length");
    patch_u64(&c, s.at_str0_len, UINT64_MAX);
    expect_reject(&c, "string value length");
    memcpy(c.p, b.p, b.n);
    patch_u64(&c, s.at_arr_len, 1ull << 61);
    expect_reject(&c, "array of 2305843009213693952 strings");
    patch_u64(&c, s.at_arr_len, 3);              /* third string runs into other data */
    ck_assert_int_eq(open_copy(c.p, c.n, &f), -1);
    free(c.p);
    free(b.p);

    /* numeric arrays whose byte size would overflow 64 bits */
    static const uint32_t et[] = {GGUF_TYPE_UINT8, GGUF_TYPE_UINT32, GGUF_TYPE_UINT64,
                                  GGUF_TYPE_FLOAT64, GGUF_TYPE_BOOL};
    static const uint64_t lens[] = {1ull << 62, 1ull << 63, UINT64_MAX, 100};
    for (size_t i = 0; i < sizeof et / sizeof et[0]; i++) {
        for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
            blob a = {0};
            b_header(&a, 3, 0, 1);
            b_key(&a, "k", GGUF_TYPE_ARRAY);
            b_u32(&a, et[i]);
            b_u64(&a, lens[k]);
            b_u64(&a, 0);
            expect_reject(&a, "array of");
            free(a.p);
        }
    }
}
END_TEST

START_TEST(bad_magic_and_version)
{
    spec s = default_spec();
    blob b = {0};
    build(&b, &s);
    b.p[3] = 'G';
    expect_reject(&b, "bad magic");
    b.p[3] = 'F';
    static const uint32_t bad[] = {0, 1, 4, 0x03000000u, UINT32_MAX};
    static const char *msg[] = {"version 0", "version 1", "version 4", "big-endian",
                                "version 4294967295"};
    for (int i = 0; i < 5; i++) {
        patch_u32(&b, 4, bad[i]);
        expect_reject(&b, msg[i]);
    }
    patch_u32(&b, 4, 2); /* v2 has the same layout */
    expect_accept(&b);
    free(b.p);
}
END_TEST

START_TEST(bad_type_ids)
{
    spec s = default_spec();
    blob b = {0};
    build(&b, &s);
    patch_u32(&b, s.at_type0, GGUF_TYPE_COUNT);
    expect_reject(&b, "value type 13");
    patch_u32(&b, s.at_type0, UINT32_MAX);
    expect_reject(&b, "value type 4294967295");
    patch_u32(&b, s.at_type0, GGUF_TYPE_STRING);
    patch_u32(&b, s.at_elem_type, GGUF_TYPE_COUNT);
    expect_reject(&b, "element type 13");
    patch_u32(&b, s.at_elem_type, GGUF_TYPE_ARRAY);
    expect_reject(&b, "nested arrays");
    free(b.p);

    s.a_type = 16;
    reject_spec(s, "type 16 (iq2_xxs) is not supported");
    s.a_type = 12;
    reject_spec(s, "q4_K");
    s.a_type = 1000;
    reject_spec(s, "type 1000 (unknown)");

    blob c = {0}; /* a bool that is neither 0 nor 1 */
    b_header(&c, 3, 0, 1);
    b_key(&c, "flag", GGUF_TYPE_BOOL);
    b_u8(&c, 2);
    expect_reject(&c, "bool value 2");
    free(c.p);
}
END_TEST

START_TEST(bad_dims)
{
    spec s = default_spec();
    s.a_n_dims = 5;
    s.a_ne[2] = s.a_ne[3] = s.a_ne[4] = 1;
    reject_spec(s, "tensor 0 'a': n_dims 5");
    s = default_spec();
    s.a_n_dims = 0;
    reject_spec(s, "n_dims 0");
    s = default_spec();
    s.a_ne[1] = 0;
    reject_spec(s, "dimension 1 is 0");
    s.a_ne[1] = 1ull << 63;
    reject_spec(s, "dimension 1 is 9223372036854775808");
    s = default_spec();
    s.a_n_dims = 3;
    s.a_ne[0] = s.a_ne[1] = s.a_ne[2] = 1ull << 32;
    reject_spec(s, "element count overflows");
    s = default_spec();
    s.a_ne[0] = 1ull << 31;
    s.a_ne[1] = 1ull << 31;       /* 2^62 elements of 4 bytes: 2^64 bytes */
    reject_spec(s, "byte size overflows");
    s.a_ne[0] = 1ull << 30;       /* 2^61 elements: fits 64 bits, not the file */
    reject_spec(s, "tensor 'a': data [");
    s = default_spec();
    s.a_type = GGML_TYPE_Q8_0;    /* rows of 4: not whole blocks of 32 */
    reject_spec(s, "q8_0 row holds whole blocks of 32, but dimension 0 is 4");
    s.a_ne[0] = 1ull << 37;       /* 2^37 / 32 blocks of 34 bytes a row: beyond the file */
    reject_spec(s, "tensor 'a': data [");
    s = default_spec();
    s.a_type = GGML_TYPE_Q6_K;
    reject_spec(s, "q6_K row holds whole blocks of 256, but dimension 0 is 4");
    s.a_ne[0] = 256;              /* two super-blocks of 210 bytes: into tensor b's bytes */
    reject_spec(s, "overlaps tensor 'a'");
}
END_TEST

START_TEST(bad_offsets)
{
    spec s = default_spec();
    s.b_off = 40;
    reject_spec(s, "tensor 1 'b': data offset 40 is not a multiple of the alignment 32");
    s.b_off = 0;
    reject_spec(s, "overlaps");
    s = default_spec();
    s.a_ne[0] = 16;               /* a now 64 bytes: [0, 64) over b at 32 */
    reject_spec(s, "tensor 'b' data [");
    s = default_spec();
    s.b_off = 1ull << 40;
    reject_spec(s, "tensor 'b': data [");
    s.b_off = UINT64_MAX - 31;    /* aligned, and offset + size wraps around */
    reject_spec(s, "beyond file size");
    s = default_spec();
    s.a_off = 64;                 /* the last tensor in the file, one byte short */
    blob b = {0};
    build(&b, &s);
    b.n--;
    expect_reject(&b, "tensor 'a': data [");
    b.n++;
    expect_accept(&b);
    free(b.p);
}
END_TEST

START_TEST(bad_alignment)
{
    spec s = default_spec();
    s.has_align = 1;
    s.align_type = GGUF_TYPE_UINT32;
    s.align = 0;
    reject_spec(s, "general.alignment: 0 is not a power of two");
    s.align = 3;
    reject_spec(s, "3 is not a power of two");
    s.align = 1u << 31;           /* a power of two, but the data section cannot start there */
    s.b_off = 1u << 31;
    reject_spec(s, "data section starts at");
    s.b_off = 32;
    s.align = 64;                 /* offset 32 is no longer aligned */
    reject_spec(s, "alignment 64");
    s.align_type = GGUF_TYPE_STRING;
    reject_spec(s, "general.alignment: must be an unsigned 32-bit integer");
}
END_TEST

START_TEST(duplicates_and_empty_names)
{
    spec s = default_spec();
    s.key3 = "general.architecture";
    reject_spec(s, "duplicate key 'general.architecture'");
    s = default_spec();
    s.b_name = "a";
    reject_spec(s, "tensor 1: duplicate name 'a'");
    s = default_spec();
    s.key3 = "";
    reject_spec(s, "empty key");
    s = default_spec();
    s.b_name = "";
    reject_spec(s, "tensor 1: empty name");
    s = default_spec();           /* unprintable names are shown safely */
    s.b_name = "\x01\x02\xff";
    s.b_off = 8;
    reject_spec(s, "tensor 1 '?" "?" "?'");
}
END_TEST

START_TEST(open_errors)
{
    gguf_file *f = (gguf_file *)1;
    ck_assert_int_eq(gguf_open("/nonexistent/x.gguf", &f, err, sizeof err), -1);
    ck_assert_ptr_null(f);
    ck_assert(strstr(err, "cannot open") != NULL);
    const char *path = tmp_file("empty.gguf");
    FILE *fp = fopen(path, "wb");
    fclose(fp);
    ck_assert_int_eq(gguf_open(path, &f, err, sizeof err), -1);
    ck_assert(strstr(err, "empty") != NULL);
    tmp_cleanup();
    ck_assert_int_eq(gguf_open("/", &f, err, sizeof err), -1);
    ck_assert(strstr(err, "not a regular file") != NULL);
    ck_assert_int_eq(gguf_open_memory(NULL, 0, &f, err, sizeof err), -1);
    ck_assert_ptr_null(f);
}
END_TEST

START_TEST(writer_rejects_bad_tensors)
{
    float x[4] = {0};
    const uint64_t ne[] = {4}, zero[] = {0}, ne5[] = {1, 1, 1, 1, 4};
    gguf_writer *w = gguf_writer_create();
    ck_assert_int_eq(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 1, ne, x), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 1, ne, x), -1);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "y", GGML_TYPE_F32, 1, zero, x), -1);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "y", GGML_TYPE_F32, 5, ne5, x), -1);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "y", (ggml_type)16, 1, ne, x), -1);  /* iq2_xxs: not written */
    ck_assert_int_eq(gguf_writer_add_tensor(w, "y", GGML_TYPE_Q8_0, 1, ne, x), -1); /* 4 < a block */
    ck_assert_int_eq(gguf_writer_add_tensor(w, "y", GGML_TYPE_F32, 1, ne, NULL), -1);
    const char *path = tmp_file("bad.gguf");
    ck_assert_int_eq(gguf_writer_write(w, path, err, sizeof err), -1);
    ck_assert(strstr(err, "duplicate name") != NULL); /* the first failure is reported */
    ck_assert_int_eq(access(path, F_OK), -1);          /* nothing written */
    gguf_writer_free(w);

    w = gguf_writer_create();
    ck_assert_int_eq(gguf_writer_set_u32(w, "general.alignment", 48), 0);
    ck_assert_int_eq(gguf_writer_write(w, path, err, sizeof err), -1);
    ck_assert(strstr(err, "power of two") != NULL);
    ck_assert_int_eq(gguf_writer_set_u32(w, "general.alignment", 64), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 1, ne, x), 0);
    ck_assert_int_eq(gguf_writer_add_tensor(w, "z", GGML_TYPE_F32, 1, ne, x), 0);
    ck_assert_int_eq(gguf_writer_write(w, path, err, sizeof err), 0);
    gguf_writer_free(w);
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(gguf_alignment(f), 64);
    ck_assert_uint_eq(gguf_find_tensor(f, "z")->offset, 64);
    gguf_close(f);
    tmp_cleanup();
}
END_TEST

/* Thousands of keys and tensors: lookups go through the index, and every one is found. */
START_TEST(many_keys_and_tensors)
{
    enum { N = 5000 };
    gguf_writer *w = gguf_writer_create();
    float x = 1.0f;
    const uint64_t ne[] = {1};
    char name[32];
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "key.%d", i);
        ck_assert_int_eq(gguf_writer_set_u32(w, name, (uint32_t)i), 0);
        snprintf(name, sizeof name, "blk.%d.weight", i);
        ck_assert_int_eq(gguf_writer_add_tensor(w, name, GGML_TYPE_F32, 1, ne, &x), 0);
    }
    const char *path = tmp_file("many.gguf");
    ck_assert_msg(gguf_writer_write(w, path, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    gguf_file *f;
    ck_assert_msg(gguf_open(path, &f, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < N; i++) {
        uint32_t v;
        snprintf(name, sizeof name, "key.%d", i);
        ck_assert_int_eq(gguf_get_u32(f, name, &v), 0);
        ck_assert_uint_eq(v, (uint32_t)i);
        snprintf(name, sizeof name, "blk.%d.weight", i);
        const gguf_tensor *t = gguf_find_tensor(f, name);
        ck_assert_ptr_eq(t, gguf_get_tensor(f, i));
        ck_assert(*(const float *)t->data == 1.0f);
    }
    ck_assert_int_eq(gguf_find_key(f, "key.5000"), -1);
    gguf_close(f);
    tmp_cleanup();
}
END_TEST

/* ----------------------------------------------------- f16 and bf16 ---- */

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

START_TEST(f16_special_values)
{
    ck_assert_uint_eq(gguf_f32_to_f16(0.0f), 0x0000);
    ck_assert_uint_eq(gguf_f32_to_f16(-0.0f), 0x8000);
    ck_assert_uint_eq(gguf_f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(gguf_f32_to_f16(-2.0f), 0xc000);
    ck_assert_uint_eq(gguf_f32_to_f16(65504.0f), 0x7bff);   /* largest finite */
    ck_assert_uint_eq(gguf_f32_to_f16(65519.0f), 0x7bff);   /* below the halfway point */
    ck_assert_uint_eq(gguf_f32_to_f16(65520.0f), 0x7c00);   /* halfway: rounds to inf */
    ck_assert_uint_eq(gguf_f32_to_f16(1e10f), 0x7c00);
    ck_assert_uint_eq(gguf_f32_to_f16(INFINITY), 0x7c00);
    ck_assert_uint_eq(gguf_f32_to_f16(-INFINITY), 0xfc00);
    uint16_t hn = gguf_f32_to_f16(NAN);
    ck_assert((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0);
    ck_assert(isnan(gguf_f16_to_f32(hn)));
    ck_assert(isnan(gguf_f16_to_f32(0x7c01)));              /* signalling NaN stays NaN */
    ck_assert(isinf(gguf_f16_to_f32(0xfc00)) && gguf_f16_to_f32(0xfc00) < 0);
    /* subnormals: 2^-24 is the smallest, 2^-14 the smallest normal */
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1.0f, -24)), 0x0001);
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1.0f, -25)), 0x0000);      /* tie -> even 0 */
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1.5f, -25)), 0x0001);
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(3.0f, -25)), 0x0002);      /* 1.5 units: tie -> 2 */
    ck_assert_uint_eq(gguf_f32_to_f16(-ldexpf(1.0f, -26)), 0x8000);
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1.0f, -14)), 0x0400);
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1023.0f, -24)), 0x03ff);
    ck_assert_uint_eq(gguf_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);   /* tie -> even, normal */
    ck_assert(gguf_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    ck_assert(gguf_f16_to_f32(0x83ff) == -ldexpf(1023.0f, -24));
    ck_assert(gguf_f16_to_f32(0x7bff) == 65504.0f);
    /* rounding to nearest, ties to even, in the normal range */
    ck_assert_uint_eq(gguf_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3c00); /* tie, even down */
    ck_assert_uint_eq(gguf_f32_to_f16(1.0f + ldexpf(3.0f, -11)), 0x3c02); /* tie, even up */
    ck_assert_uint_eq(gguf_f32_to_f16(1.0f + ldexpf(1.0f, -11) + ldexpf(1.0f, -20)), 0x3c01);
    ck_assert_uint_eq(gguf_f32_to_f16(2.0f - ldexpf(1.0f, -12)), 0x4000); /* carries into exp */

    /* every half converts to f32 and back to itself (NaNs stay NaN) */
    for (uint32_t h = 0; h < 65536; h++) {
        float v = gguf_f16_to_f32((uint16_t)h);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            ck_assert(isnan(v));
            ck_assert(isnan(gguf_f16_to_f32(gguf_f32_to_f16(v))));
        } else {
            ck_assert_uint_eq(gguf_f32_to_f16(v), h);
        }
    }
    /* every value between two adjacent finite halves rounds to the nearer one */
    for (uint32_t h = 0; h < 0x7bff; h += 97) {
        float lo = gguf_f16_to_f32((uint16_t)h), hi = gguf_f16_to_f32((uint16_t)(h + 1));
        float mid = (lo + hi) / 2; /* exact in f32 */
        ck_assert_uint_eq(gguf_f32_to_f16(from_bits(bits(mid) - 1)), h);
        ck_assert_uint_eq(gguf_f32_to_f16(from_bits(bits(mid) + 1)), h + 1);
        ck_assert_uint_eq(gguf_f32_to_f16(mid), (h & 1) ? h + 1 : h);
    }
#ifdef __FLT16_MAX__
    /* the compiler's own conversion agrees on a spread of f32 bit patterns */
    for (uint64_t x = 0; x < 0x100000000ull; x += 65521) {
        float v = from_bits((uint32_t)x);
        if (isnan(v)) continue;
        _Float16 r = (_Float16)v;
        uint16_t want;
        memcpy(&want, &r, 2);
        ck_assert_msg(gguf_f32_to_f16(v) == want, "0x%08x -> 0x%04x, want 0x%04x",
                      (unsigned)x, gguf_f32_to_f16(v), want);
    }
#endif
}
END_TEST

START_TEST(bf16_special_values)
{
    ck_assert_uint_eq(gguf_f32_to_bf16(1.0f), 0x3f80);
    ck_assert_uint_eq(gguf_f32_to_bf16(-0.0f), 0x8000);
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x3f808000)), 0x3f80); /* tie, even down */
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x3f818000)), 0x3f82); /* tie, even up */
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x3f808001)), 0x3f81);
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x3f807fff)), 0x3f80);
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x7f7fffff)), 0x7f80); /* FLT_MAX -> inf */
    ck_assert_uint_eq(gguf_f32_to_bf16(INFINITY), 0x7f80);
    ck_assert_uint_eq(gguf_f32_to_bf16(-INFINITY), 0xff80);
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x00000001)), 0x0000);  /* tiny subnormal */
    ck_assert_uint_eq(gguf_f32_to_bf16(from_bits(0x00018000)), 0x0002);  /* subnormal tie */
    /* a NaN whose payload lies only in the low bits must not become infinity */
    ck_assert(isnan(gguf_bf16_to_f32(gguf_f32_to_bf16(from_bits(0x7f800001)))));
    ck_assert(isnan(gguf_bf16_to_f32(gguf_f32_to_bf16(NAN))));
    ck_assert(gguf_bf16_to_f32(0x3f80) == 1.0f);
    ck_assert(gguf_bf16_to_f32(0x0001) == from_bits(0x00010000));
    for (uint32_t h = 0; h < 65536; h++) {
        float v = gguf_bf16_to_f32((uint16_t)h);
        if (isnan(v)) ck_assert(isnan(gguf_bf16_to_f32(gguf_f32_to_bf16(v))));
        else ck_assert_uint_eq(gguf_f32_to_bf16(v), h);
    }
}
END_TEST

/* ------------------------------------------------------------- suite ---- */

Suite *gguf_suite(void);
Suite *gguf_suite(void)
{
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("round_trip");
    tcase_add_test(tc, writer_reader_round_trip);
    tcase_add_test(tc, every_value_type_round_trip);
    tcase_add_test(tc, vocab_llama_spm);
    tcase_add_test(tc, vocab_gpt2);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, many_keys_and_tensors);
    tcase_add_test(tc, reference_reader_reads_writer_output);
    TCase *bad = tcase_create("hostile");
    tcase_add_test(bad, hand_made_file_is_valid);
    tcase_add_test(bad, truncation_at_every_byte);
    tcase_add_test(bad, fuzz_target_on_every_mutation);
    tcase_add_test(bad, absurd_counts_and_lengths);
    tcase_add_test(bad, bad_magic_and_version);
    tcase_add_test(bad, bad_type_ids);
    tcase_add_test(bad, bad_dims);
    tcase_add_test(bad, bad_offsets);
    tcase_add_test(bad, bad_alignment);
    tcase_add_test(bad, duplicates_and_empty_names);
    tcase_add_test(bad, open_errors);
    tcase_add_test(bad, writer_rejects_bad_tensors);
    suite_add_tcase(s, bad);
    TCase *conv = tcase_create("conversions");
    tcase_add_test(conv, f16_special_values);
    tcase_add_test(conv, bf16_special_values);
    suite_add_tcase(s, conv);
    return s;
}

int main(void) { return tu_run_suite(gguf_suite()); }
