/* kv_cache.h -- a fixed pool of KV memory handed to sequences in blocks.
 *
 * Sized once at create (n_blocks of block_size positions, every layer); nothing is
 * allocated per token. A sequence slot (0..max_seqs-1) reserves blocks for the
 * positions it will write, and releases them when it leaves. Memory per block:
 * 2 * n_layer * n_head_kv * head_dim * block_size elements (K and V), each an F32
 * or, in an F16 cache, an F16 (half the memory and half the bytes attention
 * reads; values are rounded to nearest on the way in, see kv_cache_k_store).
 */
#ifndef MOE_CORE_KV_CACHE_H
#define MOE_CORE_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kv_cache kv_cache;

/* The type of the cache's elements. */
typedef enum { KV_F32 = 0, KV_F16 = 1 } kv_type;

/* Bytes of one element of type t. */
static inline size_t kv_type_size(kv_type t) { return t == KV_F16 ? 2 : 4; }
/* Bytes one position takes: its key and value in every layer. */
static inline size_t kv_position_bytes(int n_layer, int n_head_kv, int head_dim, kv_type t)
{
    return 2 * (size_t)n_layer * (size_t)n_head_kv * (size_t)head_dim * kv_type_size(t);
}
/* "f32" or "f16". */
const char *kv_type_name(kv_type t);
/* The type named s ("f32", "f16"); 0, or -1 for another name. */
int kv_type_parse(const char *s, kv_type *out);

int kv_cache_create(int n_layer, int n_head_kv, int head_dim, int block_size, int n_blocks,
                    int max_seqs, int max_seq_len, kv_type type, kv_cache **out,
                    char *err, size_t errlen);
void kv_cache_free(kv_cache *kv);

/* Make positions [0, n_pos) of seq writable; 0, or -1 (pool exhausted, bad seq,
 * n_pos > max_seq_len) with a message and nothing changed. */
int kv_cache_seq_reserve(kv_cache *kv, int seq, int n_pos, char *err, size_t errlen);
/* Give all of seq's blocks back. */
void kv_cache_seq_release(kv_cache *kv, int seq);
/* Positions reserved for seq. */
int kv_cache_seq_capacity(const kv_cache *kv, int seq);

/* Keys are stored transposed, a tile per (block, layer, KV head): head_dim rows
 * of block_size positions, so element d of the key at pos is
 * tile[d * block_size + pos % block_size]. Attention then reads the scores of
 * 16 positions as one vector per d straight from the cache, with no transpose.
 * The tile of the block holding pos (pos must be reserved), elements of the
 * cache's type: */
const void *kv_cache_k_tile(const kv_cache *kv, int layer, int seq, int pos, int head);
/* Writes the key (head_dim floats) of KV head `head` of seq at pos into its tile.
 * An F16 cache stores each float rounded to the nearest F16, ties to even, with
 * magnitudes beyond the largest finite F16 (65504) stored as +-65504, so one
 * outlier cannot turn a sequence's scores into infinities and NaN. */
void kv_cache_k_store(kv_cache *kv, int layer, int seq, int pos, int head, const float *k);
/* The V vector (head_dim elements) of KV head `head` of seq at pos in layer; pos
 * must be reserved. A head's vectors of consecutive positions are contiguous
 * within a block. */
const void *kv_cache_v(const kv_cache *kv, int layer, int seq, int pos, int head);
/* Writes that vector from head_dim floats, rounded as kv_cache_k_store does. */
void kv_cache_v_store(kv_cache *kv, int layer, int seq, int pos, int head, const float *v);

int kv_cache_blocks_total(const kv_cache *kv);
int kv_cache_blocks_free(const kv_cache *kv);
int kv_cache_block_size(const kv_cache *kv);
kv_type kv_cache_type(const kv_cache *kv);
size_t kv_cache_bytes(const kv_cache *kv);

#endif
