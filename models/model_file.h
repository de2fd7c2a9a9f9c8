/* model_file.h -- a model loaded from a GGUF file, ready for the engine.
 *
 *   moe_model *m; if (moe_model_load(path, &m, err, sizeof err)) ...
 *   moe_engine_create(&m->weights, ...);
 *   moe_model_free(m);
 *
 * F32 tensors are used in place from the mapping (no copy), and so are routed
 * experts in F16, BF16 or Q8_0 (the kernels widen them as they read them); other
 * F16/BF16/Q8_0 tensors are converted to F32 once at load (converted_bytes says
 * what that costs).
 */
#ifndef MOE_MODELS_MODEL_FILE_H
#define MOE_MODELS_MODEL_FILE_H

#include <stddef.h>

#include "core/model.h"
#include "models/gguf.h"
#include "models/tokenizer.h"

typedef struct {
    moe_weights weights;       /* points into the mapping or into converted buffers */
    gguf_file *gguf;           /* owned: the file, or the first part of a split model */
    gguf_file **parts;         /* owned: (n_parts) the parts, parts[0] == gguf */
    int n_parts;
    moe_tokenizer *tokenizer;  /* owned; NULL when the file has no tokenizer */
    int tied_output;           /* output.weight absent: token_embd used */
    size_t mapped_bytes;       /* file size, all parts (mapped, or copied) */
    int copied;                /* the file's bytes are an anonymous copy (gguf_copied) */
    float *converted;          /* owned: every tensor converted to F32, one buffer */
    size_t converted_bytes;    /* heap used for the conversions */
    int proj_f32;              /* narrow projections converted to F32 too (moe_proj_mode) */
    unsigned char *merged;     /* owned: per-expert tensors merged per matrix (old Mixtral files), or NULL */
    size_t merged_bytes;
    double load_ms;
    char name[128];            /* general.name, or the file stem */
} moe_model;

int moe_model_load(const char *path, moe_model **out, char *err, size_t errlen);
/* The same with the file's bytes mapped (GGUF_LOAD_MMAP, what moe_model_load does),
 * copied into anonymous huge pages (GGUF_LOAD_COPY), or copied only where the
 * kernel maps the file in 4 KiB pages (GGUF_LOAD_AUTO): see models/gguf.h.
 * gguf_placement(m->gguf) says which happened. */
int moe_model_load_mode(const char *path, gguf_load_mode mode, moe_model **out, char *err, size_t errlen);

/* The attention and output projections and the token embeddings a file keeps
 * in a narrower type: also converted to F32 (which the engine packs for its
 * fastest many-row kernel, 2x their F32 bytes in all on AVX-512), or read in
 * the file's type at every batch size (the same logits; 7-14% slower at batch
 * 16-64 on the bench model's Q4_K_M, and about 12 GB less for Mixtral's). AUTO
 * converts when the copies and the file take at most half the memory available
 * at load. */
typedef enum { MOE_PROJ_AUTO, MOE_PROJ_F32, MOE_PROJ_FILE } moe_proj_mode;
int moe_proj_mode_parse(const char *s, moe_proj_mode *out);   /* "auto", "f32", "file"; -1 else */

typedef struct {
    gguf_load_mode weights;
    moe_proj_mode projections;
} moe_load_opts;
int moe_model_load_opts(const char *path, const moe_load_opts *o, moe_model **out, char *err, size_t errlen);
void moe_model_free(moe_model *m);

#endif
