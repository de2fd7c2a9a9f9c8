/* fuzz_model.c -- libFuzzer target for what reads a GGUF file after the reader
 * (sh tests/fuzz/run.sh model; test_model_file.c also runs it on mutated models).
 *
 * An input the reader accepts goes through tokenizer_load and, when that
 * succeeds, encode / decode / streaming / piece lookups of a few awkward texts
 * and ids; then through moe_model_load (from a memfd, since the loader takes a
 * path) and, when the model loads, an engine with small limits and one forward of
 * three tokens over two sequences. Hostile metadata (vocabularies, merges,
 * hyperparameters, tensor shapes) must give an error, never a read ASan or UBSan
 * can see.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/engine.h"
#include "models/gguf.h"
#include "models/model_file.h"
#include "models/tokenizer.h"

static const char *const fuzz_texts[] = {
    "Hello world", " \n\t  x", "<s>a</s><unk> [INST] <|endoftext|>",
    "\xe2\x96\x81\xc3\xa9\xf0\x9f\x98\x80 12345", "", "\xff\xfe\x80 \xc3",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
};

static void fuzz_tokenizer(const moe_tokenizer *t)
{
    char err[256], out[4096];
    for (size_t i = 0; i < sizeof fuzz_texts / sizeof fuzz_texts[0]; i++)
        for (int flags = 0; flags < 4; flags++) {
            int32_t *ids = NULL;
            size_t n = 0;
            const char *s = fuzz_texts[i];
            if (tokenizer_encode(t, s, strlen(s), flags, &ids, &n, err, sizeof err) == 0) {
                char *text = NULL;
                size_t len = 0;
                if (tokenizer_decode(t, ids, n, flags & 1, &text, &len, err, sizeof err) == 0) free(text);
                tokenizer_stream st;
                tokenizer_stream_init(&st);
                for (size_t j = 0; j < n; j++) tokenizer_stream_push(t, &st, ids[j], out, sizeof out);
                tokenizer_stream_flush(t, &st, out, sizeof out);
            }
            free(ids);
        }
    int nv = tokenizer_n_vocab(t);
    int32_t probe[] = {-1, 0, 1, nv / 2, nv - 1, nv, tokenizer_bos(t), tokenizer_eos(t)};
    for (size_t i = 0; i < sizeof probe / sizeof probe[0]; i++) {
        tokenizer_token_to_piece(t, probe[i], 1, out, sizeof out);
        tokenizer_token_to_piece(t, probe[i], 0, out, 4);
        tokenizer_token_text(t, probe[i]);
        tokenizer_is_eog(t, probe[i]);
    }
    tokenizer_fingerprint(t);
}

static void fuzz_forward(const moe_model *m)
{
    char err[256];
    moe_engine_params p = moe_engine_default_params(&m->weights.hp);
    p.max_seqs = 2;
    p.max_batch_tokens = 4;
    p.max_seq_len = m->weights.hp.n_ctx_train < 8 ? m->weights.hp.n_ctx_train : 8;
    p.kv_block_size = 4;
    p.kv_n_blocks = 4;
    p.packed_projections = MOE_PACK_OFF;
    moe_engine *e = NULL;
    if (moe_engine_create(&m->weights, &p, &e, err, sizeof err)) return;
    int nv = m->weights.hp.n_vocab;
    int32_t tok[3] = {0, nv - 1, nv / 2}, pos[3] = {0, 1, 0}, seq[3] = {0, 0, 1};
    uint8_t want[3] = {1, 1, 1};
    moe_batch b = {.n_tokens = 3, .token = tok, .pos = pos, .seq = seq, .want_logits = want};
    float *logits = malloc(3 * (size_t)nv * sizeof *logits);
    if (logits && moe_engine_seq_reserve(e, 0, 2, err, sizeof err) == 0 &&
        moe_engine_seq_reserve(e, 1, 1, err, sizeof err) == 0)
        moe_engine_forward(e, &b, logits, err, sizeof err);
    free(logits);
    moe_engine_free(e);
}

static void fuzz_model(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz_model", 0);
    if (fd < 0) return;
    char path[64], err[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    moe_model *m = NULL;
    if (write(fd, data, size) == (ssize_t)size && moe_model_load(path, &m, err, sizeof err) == 0) {
        fuzz_forward(m);
        moe_model_free(m);
    }
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gguf_file *f = NULL;
    char err[256];
    if (gguf_open_memory(data, size, &f, err, sizeof err)) return 0;
    moe_tokenizer *t = NULL;
    if (tokenizer_load(f, &t, err, sizeof err) == 0) {
        fuzz_tokenizer(t);
        tokenizer_free(t);
    }
    gguf_close(f);
    fuzz_model(data, size);
    return 0;
}
