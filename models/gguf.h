/* gguf.h -- read (mmap, fully validated) and write GGUF v3 files.
 *
 *   gguf_file *f; if (gguf_open(path, &f, err, sizeof err)) { puts(err); ... }
 *   uint32_t n; gguf_get_u32(f, "llama.block_count", &n);
 *   const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
 *   gguf_close(f);
 *
 * Everything in a file is hostile until checked: gguf_open validates magic, version,
 * every count, string and array length, key type, tensor dims, type, offset,
 * alignment and size against the file size (and that tensors do not overlap)
 * before any of it is used, so the accessors below never read out of bounds.
 * Strings returned point into the mapping and are NOT NUL-terminated.
 */
#ifndef MOE_MODELS_GGUF_H
#define MOE_MODELS_GGUF_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12, GGUF_TYPE_COUNT
} gguf_type;

/* Tensor element types we understand (ggml numbering). Q8_0 is ggml's block
 * format of 32 weights: an F16 scale d, then 32 int8 q, each weight d * q. */
typedef enum {
    GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q4_1 = 3, GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7, GGML_TYPE_Q8_0 = 8, GGML_TYPE_Q2_K = 10, GGML_TYPE_Q3_K = 11, GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13, GGML_TYPE_Q6_K = 14, GGML_TYPE_IQ4_NL = 20, GGML_TYPE_IQ4_XS = 23,
    GGML_TYPE_BF16 = 30
} ggml_type;

/* Block sizes and bytes of the quantized types (their layouts: core/model.h). */
#define GGML_Q8_0_BLOCK 32   /* weights a block of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL holds */
#define GGML_Q8_0_BYTES 34   /* Q8_0's bytes: the F16 scale, then 32 int8 */
#define GGML_Q4_0_BYTES 18
#define GGML_Q4_1_BYTES 20
#define GGML_Q5_0_BYTES 22
#define GGML_Q5_1_BYTES 24
#define GGML_IQ4_NL_BYTES 18
#define GGML_QK_K 256        /* weights a k-quant super-block holds */
#define GGML_Q2_K_BYTES 84
#define GGML_Q3_K_BYTES 110
#define GGML_Q4_K_BYTES 144
#define GGML_Q5_K_BYTES 176
#define GGML_Q6_K_BYTES 210
#define GGML_IQ4_XS_BYTES 136

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32

typedef struct {
    const char *data;   /* not NUL-terminated */
    uint64_t len;
} gguf_str;

typedef struct {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] innermost (row length); unused dims are 1 */
    ggml_type type;
    uint64_t n_elements;
    uint64_t nbytes;
    uint64_t offset;            /* from the start of the data section */
    const void *data;           /* into the mapping, aligned to the file's alignment */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Reading ---------------------------------------------------------------- */

int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen);
/* How the file's bytes reach memory: MMAP maps the file (instant, shared with the
 * page cache, huge pages where the kernel gives them to file mappings); COPY reads
 * it into anonymous huge pages (costs the copy, gets huge pages on any THP kernel);
 * AUTO maps it and, when the kernel maps it in 4 KiB pages, copies it if the copy
 * fits in free memory (models/pages.h). Either way the bytes are read-only and
 * validated the same. gguf_open is MMAP. */
typedef enum { GGUF_LOAD_MMAP, GGUF_LOAD_COPY, GGUF_LOAD_AUTO } gguf_load_mode;
int gguf_open_mode(const char *path, gguf_load_mode mode, gguf_file **out, char *err, size_t errlen);
/* Whether the bytes are a copy (COPY, or AUTO's fallback), and a phrase for logs
 * saying where they are ("mapped in 2 MiB pages", "copied into huge pages", ...). */
int gguf_copied(const gguf_file *f);
const char *gguf_placement(const gguf_file *f);
/* Reads bytes [off, off + len) of the file (clamped to its size) into memory,
 * one load a page, so that the first requests do not wait for the disk (a
 * mapped file is otherwise read on first use; a fault in the VM_HUGEPAGE
 * mapping reads 2 MiB at a time). Returns the bytes covered; a copy or a
 * memory buffer is already resident and costs only the loads. */
size_t gguf_page_in(const gguf_file *f, size_t off, size_t len);
/* "auto", "mmap" or "copy" (command-line flags) into *out; -1 for anything else. */
int gguf_load_mode_parse(const char *s, gguf_load_mode *out);
/* Parse a buffer the caller keeps alive (tests, fuzzing). */
int gguf_open_memory(const void *data, size_t size, gguf_file **out, char *err, size_t errlen);
void gguf_close(gguf_file *f);

uint32_t gguf_version(const gguf_file *f);
size_t gguf_file_size(const gguf_file *f);
uint64_t gguf_alignment(const gguf_file *f);

/* Key/values: index lookup and typed getters. Getters return 0 on success, -1 when
 * the key is absent, -2 when it has another type or the value does not fit. Integer
 * getters accept any integer type whose value fits. */
int64_t gguf_n_kv(const gguf_file *f);
int64_t gguf_find_key(const gguf_file *f, const char *key);       /* -1 absent */
gguf_str gguf_kv_key(const gguf_file *f, int64_t i);
gguf_type gguf_kv_type(const gguf_file *f, int64_t i);

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
int gguf_get_i32(const gguf_file *f, const char *key, int32_t *out);
int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out);
int gguf_get_f32(const gguf_file *f, const char *key, float *out);  /* f32 or f64 */
int gguf_get_bool(const gguf_file *f, const char *key, int *out);
int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out);
/* Copies a string value NUL-terminated into buf (truncation is an error: -2). */
int gguf_get_cstr(const gguf_file *f, const char *key, char *buf, size_t cap);

/* Arrays: element type and length; numeric element i copied out (no alignment
 * assumptions), string element i by reference. */
int gguf_get_arr_info(const gguf_file *f, const char *key, gguf_type *elem_type, uint64_t *n);
int gguf_get_arr_f32(const gguf_file *f, const char *key, float *out, uint64_t n);   /* exactly n elems */
int gguf_get_arr_i32(const gguf_file *f, const char *key, int32_t *out, uint64_t n); /* any int type that fits */
/* Fills out[0..n) with all string elements (n must equal the array length). */
int gguf_get_arr_strs(const gguf_file *f, const char *key, gguf_str *out, uint64_t n);

/* Tensors ---------------------------------------------------------------- */

int64_t gguf_n_tensors(const gguf_file *f);
const gguf_tensor *gguf_get_tensor(const gguf_file *f, int64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name); /* NULL absent */
const char *ggml_type_name(ggml_type t);
/* As ggml counts them: elements per block and bytes per block (1 and 4 for F32,
 * 32 and 34 for Q8_0), 0 for a type we do not read. A tensor's rows (ne[0]) hold
 * whole blocks. */
size_t ggml_block_size(ggml_type t);
size_t ggml_type_size(ggml_type t);

/* Writing ---------------------------------------------------------------- */

typedef struct gguf_writer gguf_writer;

gguf_writer *gguf_writer_create(void);
void gguf_writer_free(gguf_writer *w);

/* Keys are written in the order set; setting a key twice replaces it. Values are
 * copied. Return 0 or -1 (out of memory). */
int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v);
int gguf_writer_set_u64(gguf_writer *w, const char *key, uint64_t v);
int gguf_writer_set_f32(gguf_writer *w, const char *key, float v);
int gguf_writer_set_bool(gguf_writer *w, const char *key, int v);
int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v);
int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n);
int gguf_writer_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n);
int gguf_writer_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n);
/* Copy key `key` (any type) from an open file. -1 when absent there. */
int gguf_writer_copy_kv(gguf_writer *w, const gguf_file *src, const char *key);

/* The data is NOT copied: it must stay valid until gguf_writer_write returns.
 * ne[0] is the row length. */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, ggml_type type,
                           uint32_t n_dims, const uint64_t *ne, const void *data);
int gguf_writer_write(gguf_writer *w, const char *path, char *err, size_t errlen);

/* Q8_0 blocks for n finite floats (n a multiple of 32), as ggml's reference
 * quantizer makes them: d = max |x| / 127 stored as F16, q = round(x / d). */
void gguf_quantize_q8_0(const float *x, uint64_t n, void *blocks);

/* Q4_0 blocks for n finite floats (n a multiple of 32), like ggml's reference
 * quantizer: d = (the weight of largest magnitude) / -8 stored as F16,
 * q = clamp(round(x / d) + 8, 0, 15). */
void gguf_quantize_q4_0(const float *x, uint64_t n, void *blocks);

/* Q4_1 and Q5_1 blocks (n a multiple of 32), like ggml's reference quantizer:
 * m = min x, d = (max x - m) / 15 (31), q = round((x - m) / d). Q5_0: Q4_0 with
 * 5-bit q, d = (the weight of largest magnitude) / -16. IQ4_NL: d = (the weight
 * of largest magnitude) / -127, each q the nearest of the 16 levels. */
void gguf_quantize_q4_1(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q5_0(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q5_1(const float *x, uint64_t n, void *blocks);
void gguf_quantize_iq4_nl(const float *x, uint64_t n, void *blocks);

/* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS super-blocks for n finite floats (n a
 * multiple of 256): valid blocks of the format with plain per-sub-block scales
 * (ggml's quantizer searches its scales harder; any valid block is read the
 * same way). */
void gguf_quantize_q2_k(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q3_k(const float *x, uint64_t n, void *blocks);
void gguf_quantize_iq4_xs(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q4_k(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q5_k(const float *x, uint64_t n, void *blocks);
void gguf_quantize_q6_k(const float *x, uint64_t n, void *blocks);

/* F16 / BF16 <-> F32 conversion. */
float gguf_f16_to_f32(uint16_t h);
uint16_t gguf_f32_to_f16(float f);
float gguf_bf16_to_f32(uint16_t h);
uint16_t gguf_f32_to_bf16(float f);

#endif
