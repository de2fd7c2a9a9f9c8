/* tokenizer.h -- text <-> token ids, exactly as the model's own tokenizer does it.
 *
 * Read from the GGUF metadata (tokenizer.ggml.*). Two kinds:
 *   "llama": SentencePiece-style, score-based merges, byte fallback <0xNN>, space
 *            prefix and U+2581 for spaces.
 *   "gpt2":  byte-level BPE, ranked merges, a pre-tokenizer chosen by
 *            tokenizer.ggml.pre (a table of splitters).
 * Invalid UTF-8 in the input is handled as documented in tokenizer.c and stays
 * consistent: never a crash.
 */
#ifndef MOE_MODELS_TOKENIZER_H
#define MOE_MODELS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "models/gguf.h"

typedef struct moe_tokenizer moe_tokenizer;

typedef enum { TOKENIZER_SPM = 0, TOKENIZER_BPE = 1 } tokenizer_kind;

/* Copies all it needs: the gguf_file may be closed afterwards. */
int tokenizer_load(const gguf_file *f, moe_tokenizer **out, char *err, size_t errlen);
void tokenizer_free(moe_tokenizer *t);

#define TOKENIZE_ADD_SPECIAL   1  /* add BOS/EOS as the metadata says */
#define TOKENIZE_PARSE_SPECIAL 2  /* text of control/user-defined tokens becomes that token */

/* *ids is malloc'd (caller frees with free()), *n_ids its length. 0 or -1. */
int tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len, int flags,
                     int32_t **ids, size_t *n_ids, char *err, size_t errlen);

/* Bytes of one token's text as output text (U+2581 -> space, <0xNN> -> that byte,
 * byte-level BPE mapped back to bytes; control tokens -> "" unless render_special).
 * Returns the length (may exceed cap: then nothing useful was written) or -1 for an
 * id out of range. */
int tokenizer_token_to_piece(const moe_tokenizer *t, int32_t id, int render_special,
                             char *buf, size_t cap);

/* Whole sequence to text (SentencePiece: the leading space of the space prefix is
 * removed). *text malloc'd, NUL-terminated. -1 with a message for a bad id. */
int tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, int render_special,
                     char **text, size_t *len, char *err, size_t errlen);

/* Streaming detokenizer: feed ids one by one; only whole UTF-8 characters come out. */
typedef struct {
    char pending[8];
    int n_pending;
    int n_fed;       /* tokens fed so far (the first loses the space prefix) */
} tokenizer_stream;

void tokenizer_stream_init(tokenizer_stream *s);
/* Appends completed text to out (cap bytes); returns bytes written, or -1 for a bad
 * id or too small a buffer (cap >= 64 + longest piece is always enough). */
int tokenizer_stream_push(const moe_tokenizer *t, tokenizer_stream *s, int32_t id,
                          char *out, size_t cap);
/* Whatever is still pending (an incomplete character at the end), as U+FFFD. */
int tokenizer_stream_flush(const moe_tokenizer *t, tokenizer_stream *s, char *out, size_t cap);

tokenizer_kind tokenizer_get_kind(const moe_tokenizer *t);
int tokenizer_n_vocab(const moe_tokenizer *t);
int32_t tokenizer_bos(const moe_tokenizer *t);   /* -1 none */
int32_t tokenizer_eos(const moe_tokenizer *t);   /* -1 none */
/* End of generation: eos, or another end token the vocabulary marks. */
int tokenizer_is_eog(const moe_tokenizer *t, int32_t id);
/* The vocabulary's raw string for id (NUL-terminated), NULL when out of range. */
const char *tokenizer_token_text(const moe_tokenizer *t, int32_t id);
/* 64-bit FNV-1a over the token strings in order: equal for equal vocabularies. */
uint64_t tokenizer_fingerprint(const moe_tokenizer *t);

#endif
