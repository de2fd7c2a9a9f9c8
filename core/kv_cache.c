/* kv_cache.c -- a fixed pool of KV blocks (F32 or F16) handed to sequences.
 *
 * One block holds block_size consecutive positions of one sequence for every layer:
 *   block b: [layer][K|V][KV head] then, for K, [head_dim][position in block]
 *   (transposed), for V, [position in block][head_dim]
 * so one head's keys (or values) of a block's positions are contiguous: attention
 * reads a head over many positions, and it then reads whole lines in order
 * rather than a head_dim slice of every n_head_kv * head_dim row. The keys are
 * transposed because attention computes 16 positions' scores as one vector: a
 * line of the tile is element d of 16 keys (block_size 16). Each sequence
 * slot keeps a table of its blocks in position order; free blocks sit on a stack.
 * All memory is allocated at create, in huge pages (core/hugemem.h): accounted
 * there, so a pool the machine cannot hold fails at start; faulted in a 2 MiB
 * page at a time at first use (512 times fewer faults than calloc's small pages;
 * prefaulting it all cost a server 2.4 s of start-up on a VM); and attention
 * reads the blocks without TLB misses. Reserve and release only move block ids.
 */
#include "core/kv_cache.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hugemem.h"
#include "core/wconv.h"

struct kv_cache {
    int n_layer;
    int kv_dim;           /* n_head_kv * head_dim: elements per position per layer, K or V */
    int n_head_kv, head_dim;
    int block_size;       /* positions per block */
    int n_blocks;
    int max_seqs;
    int max_seq_len;
    int blocks_per_seq;   /* ceil(max_seq_len / block_size): length of each block table */
    kv_type type;
    size_t block_elems;   /* 2 * n_layer * block_size * kv_dim */
    unsigned char *data;  /* (n_blocks, block_elems) elements */
    int32_t *free_stack;  /* (n_blocks) ids of free blocks; top at n_free - 1 */
    int n_free;
    int32_t *table;       /* (max_seqs, blocks_per_seq) block ids of each sequence */
    int32_t *n_held;      /* (max_seqs) blocks each sequence holds */
};

const char *kv_type_name(kv_type t) { return t == KV_F16 ? "f16" : "f32"; }

int kv_type_parse(const char *s, kv_type *out)
{
    if (strcmp(s, "f32") == 0) *out = KV_F32;
    else if (strcmp(s, "f16") == 0) *out = KV_F16;
    else return -1;
    return 0;
}

int kv_cache_create(int n_layer, int n_head_kv, int head_dim, int block_size, int n_blocks,
                    int max_seqs, int max_seq_len, kv_type type, kv_cache **out,
                    char *err, size_t errlen)
{
    *out = NULL;
    if (type != KV_F32 && type != KV_F16) {
        snprintf(err, errlen, "kv cache: unknown element type %d", (int)type);
        return -1;
    }
    if (n_layer <= 0 || n_head_kv <= 0 || head_dim <= 0 || block_size <= 0 || n_blocks <= 0 ||
        max_seqs <= 0 || max_seq_len <= 0) {
        snprintf(err, errlen, "kv cache: layers, heads, head size, block size, blocks, "
                 "sequences and sequence length must all be positive");
        return -1;
    }
    if ((int64_t)n_head_kv * head_dim > INT32_MAX) {
        snprintf(err, errlen, "kv cache: n_head_kv * head_dim too large");
        return -1;
    }
    size_t kv_dim = (size_t)n_head_kv * (size_t)head_dim;
    size_t per_block = 2 * (size_t)n_layer * (size_t)block_size;
    size_t elem = kv_type_size(type);
    if (per_block > SIZE_MAX / elem / kv_dim || per_block * kv_dim > SIZE_MAX / elem / (size_t)n_blocks) {
        snprintf(err, errlen, "kv cache: %d blocks of %d positions overflow the address space",
                 n_blocks, block_size);
        return -1;
    }
    kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) goto oom;
    kv->n_layer = n_layer;
    kv->kv_dim = (int)kv_dim;
    kv->n_head_kv = n_head_kv;
    kv->head_dim = head_dim;
    kv->block_size = block_size;
    kv->n_blocks = n_blocks;
    kv->max_seqs = max_seqs;
    kv->max_seq_len = max_seq_len;
    kv->blocks_per_seq = (int)(((int64_t)max_seq_len + block_size - 1) / block_size);
    kv->type = type;
    kv->block_elems = per_block * kv_dim;
    kv->data = hugemem_alloc((size_t)n_blocks * kv->block_elems * elem);
    kv->free_stack = malloc((size_t)n_blocks * sizeof *kv->free_stack);
    kv->table = malloc((size_t)max_seqs * (size_t)kv->blocks_per_seq * sizeof *kv->table);
    kv->n_held = calloc((size_t)max_seqs, sizeof *kv->n_held);
    if (!kv->data || !kv->free_stack || !kv->table || !kv->n_held) goto oom;
    /* Lowest ids on top so a fresh cache hands out blocks in address order. */
    for (int i = 0; i < n_blocks; i++) kv->free_stack[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    *out = kv;
    return 0;
oom:
    kv_cache_free(kv);
    snprintf(err, errlen, "kv cache: out of memory (%d blocks of %d positions, %d layers, "
             "%zu %s elements per position)", n_blocks, block_size, n_layer, 2 * kv_dim,
             kv_type_name(type));
    return -1;
}

void kv_cache_free(kv_cache *kv)
{
    if (!kv) return;
    hugemem_free(kv->data, kv_cache_bytes(kv));
    free(kv->free_stack);
    free(kv->table);
    free(kv->n_held);
    free(kv);
}

int kv_cache_seq_reserve(kv_cache *kv, int seq, int n_pos, char *err, size_t errlen)
{
    if (seq < 0 || seq >= kv->max_seqs) {
        snprintf(err, errlen, "kv cache: sequence slot %d out of range [0, %d)", seq, kv->max_seqs);
        return -1;
    }
    if (n_pos < 0 || n_pos > kv->max_seq_len) {
        snprintf(err, errlen, "kv cache: %d positions requested, sequences hold at most %d",
                 n_pos, kv->max_seq_len);
        return -1;
    }
    int need = (int)(((int64_t)n_pos + kv->block_size - 1) / kv->block_size);
    int more = need - kv->n_held[seq];
    if (more <= 0) return 0;
    if (more > kv->n_free) {
        snprintf(err, errlen, "kv cache exhausted: sequence %d needs %d more blocks, %d of %d free",
                 seq, more, kv->n_free, kv->n_blocks);
        return -1;
    }
    int32_t *t = kv->table + (size_t)seq * (size_t)kv->blocks_per_seq;
    for (int i = 0; i < more; i++) t[kv->n_held[seq]++] = kv->free_stack[--kv->n_free];
    return 0;
}

void kv_cache_seq_release(kv_cache *kv, int seq)
{
    if (seq < 0 || seq >= kv->max_seqs) return;
    int32_t *t = kv->table + (size_t)seq * (size_t)kv->blocks_per_seq;
    /* Push back in reverse so a release followed by the same reserve gets the same blocks. */
    while (kv->n_held[seq] > 0) kv->free_stack[kv->n_free++] = t[--kv->n_held[seq]];
}

int kv_cache_seq_capacity(const kv_cache *kv, int seq)
{
    if (seq < 0 || seq >= kv->max_seqs) return 0;
    int64_t cap = (int64_t)kv->n_held[seq] * kv->block_size;
    return cap > kv->max_seq_len ? kv->max_seq_len : (int)cap;
}

/* The block_size * head_dim elements of head `head` of (layer, K or V) in the
 * block holding seq's pos: K as a tile (head_dim rows of block_size), V as
 * block_size rows of head_dim; as an element offset into data. */
static size_t kv_head_block(const kv_cache *kv, int layer, int is_v, int seq, int pos, int head)
{
    int32_t block = kv->table[(size_t)seq * (size_t)kv->blocks_per_seq + (size_t)(pos / kv->block_size)];
    size_t layer_part = (size_t)layer * 2 + (size_t)is_v;                    /* block_size * kv_dim each */
    size_t head_part = layer_part * (size_t)kv->n_head_kv + (size_t)head;
    return (size_t)block * kv->block_elems + head_part * (size_t)kv->block_size * (size_t)kv->head_dim;
}

/* Stores x as element i of data in the cache's type. */
static inline void kv_put(kv_cache *kv, size_t i, float x)
{
    if (kv->type == KV_F32) {
        ((float *)(void *)kv->data)[i] = x;
        return;
    }
    if (x > 65504.0f) x = 65504.0f;          /* NaN fails both tests and stays NaN */
    else if (x < -65504.0f) x = -65504.0f;
    ((uint16_t *)(void *)kv->data)[i] = wconv_to_f16(x);
}

const void *kv_cache_k_tile(const kv_cache *kv, int layer, int seq, int pos, int head)
{
    return kv->data + kv_head_block(kv, layer, 0, seq, pos, head) * kv_type_size(kv->type);
}

void kv_cache_k_store(kv_cache *kv, int layer, int seq, int pos, int head, const float *k)
{
    size_t t = kv_head_block(kv, layer, 0, seq, pos, head) + (size_t)(pos % kv->block_size);
    size_t bs = (size_t)kv->block_size;
    for (int d = 0; d < kv->head_dim; d++) kv_put(kv, t + (size_t)d * bs, k[d]);
}

static size_t kv_v_at(const kv_cache *kv, int layer, int seq, int pos, int head)
{
    return kv_head_block(kv, layer, 1, seq, pos, head) + (size_t)(pos % kv->block_size) * (size_t)kv->head_dim;
}

const void *kv_cache_v(const kv_cache *kv, int layer, int seq, int pos, int head)
{
    return kv->data + kv_v_at(kv, layer, seq, pos, head) * kv_type_size(kv->type);
}

void kv_cache_v_store(kv_cache *kv, int layer, int seq, int pos, int head, const float *v)
{
    size_t at = kv_v_at(kv, layer, seq, pos, head);
    for (int d = 0; d < kv->head_dim; d++) kv_put(kv, at + (size_t)d, v[d]);
}

int kv_cache_blocks_total(const kv_cache *kv) { return kv->n_blocks; }
int kv_cache_blocks_free(const kv_cache *kv) { return kv->n_free; }
int kv_cache_block_size(const kv_cache *kv) { return kv->block_size; }
kv_type kv_cache_type(const kv_cache *kv) { return kv->type; }

size_t kv_cache_bytes(const kv_cache *kv)
{
    return (size_t)kv->n_blocks * kv->block_elems * kv_type_size(kv->type);
}
