/* fuzz_gguf.c -- libFuzzer target for the GGUF reader (sh tests/fuzz/run.sh gguf; test_gguf.c
 * also runs it on every mutation of a hand-made file).
 *
 * Parses the input with gguf_open_memory; when it is accepted, reads every key with
 * every getter, every array element, the first and last byte of every tensor, and
 * copies every key into a writer, so ASan/UBSan see any read the validation missed.
 * Run with tests/fuzz/run.sh.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "models/gguf.h"

static void read_key(const gguf_file *f, const char *key, gguf_writer *w)
{
    uint32_t u32; int32_t i32; uint64_t u64; float fl; int b; gguf_str s; char buf[32];
    gguf_get_u32(f, key, &u32);
    gguf_get_i32(f, key, &i32);
    gguf_get_u64(f, key, &u64);
    gguf_get_f32(f, key, &fl);
    gguf_get_bool(f, key, &b);
    gguf_get_str(f, key, &s);
    gguf_get_cstr(f, key, buf, sizeof buf);
    gguf_type et;
    uint64_t n;
    if (gguf_get_arr_info(f, key, &et, &n) == 0 && n <= (1u << 20)) {
        size_t cap = n ? (size_t)n : 1;
        float *fa = malloc(cap * sizeof *fa);
        int32_t *ia = malloc(cap * sizeof *ia);
        gguf_str *sa = malloc(cap * sizeof *sa);
        if (fa && ia && sa) {
            gguf_get_arr_f32(f, key, fa, n);
            gguf_get_arr_i32(f, key, ia, n);
            if (gguf_get_arr_strs(f, key, sa, n) == 0) {
                volatile uint8_t sink = 0;
                for (uint64_t i = 0; i < n; i++)
                    if (sa[i].len) sink ^= (uint8_t)sa[i].data[sa[i].len - 1];
            }
        }
        free(fa); free(ia); free(sa);
    }
    gguf_writer_copy_kv(w, f, key);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    gguf_file *f;
    if (gguf_open_memory(data, size, &f, err, sizeof err)) {
        if (!memchr(err, '\0', sizeof err) || err[0] == '\0') abort(); /* every error says why */
        return 0;
    }
    gguf_writer *w = gguf_writer_create();
    char key[256];
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        gguf_str k = gguf_kv_key(f, i);
        if (k.len >= sizeof key) continue;
        memcpy(key, k.data, k.len);
        key[k.len] = '\0';
        if (gguf_find_key(f, key) != i && strlen(key) == k.len) abort(); /* index agrees */
        read_key(f, key, w);
    }
    volatile uint8_t sink = 0;
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_get_tensor(f, i);
        const uint8_t *p = t->data;
        if ((const uint8_t *)t->data < data || p + t->nbytes > data + size) abort();
        sink ^= p[0] ^ p[t->nbytes - 1];
        if (t->nbytes >= 2) {
            uint16_t h;
            memcpy(&h, p, 2);
            sink ^= (uint8_t)(gguf_f16_to_f32(h) > 0) ^ (uint8_t)(gguf_bf16_to_f32(h) > 0);
        }
        if (t->name.len < sizeof key) {
            memcpy(key, t->name.data, t->name.len);
            key[t->name.len] = '\0';
            if (strlen(key) == t->name.len && gguf_find_tensor(f, key) != t) abort();
        }
    }
    gguf_writer_free(w);
    gguf_close(f);
    return 0;
}
