/* kv_cache.c -- a fixed pool of F32 KV blocks handed to sequences.
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

#include "core/hugemem.h"

struct kv_cache {
    int n_layer;
    int kv_dim;           /* n_head_kv * head_dim: floats per position per layer, K or V */
    int n_head_kv, head_dim;
    int block_size;       /* positions per block */
    int n_blocks;
    int max_seqs;
    int max_seq_len;
    int blocks_per_seq;   /* ceil(max_seq_len / block_size): length of each block table */
    size_t block_floats;  /* 2 * n_layer * block_size * kv_dim */
    float *data;          /* (n_blocks, block_floats) */
    int32_t *free_stack;  /* (n_blocks) ids of free blocks; top at n_free - 1 */
    int n_free;
    int32_t *table;       /* (max_seqs, blocks_per_seq) block ids of each sequence */
    int32_t *n_held;      /* (max_seqs) blocks each sequence holds */
};

int kv_cache_create(int n_layer, int n_head_kv, int head_dim, int block_size, int n_blocks,
                    int max_seqs, int max_seq_len, kv_cache **out, char *err, size_t errlen)
{
    *out = NULL;
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
    if (per_block > SIZE_MAX / sizeof(float) / kv_dim ||
        per_block * kv_dim > SIZE_MAX / sizeof(float) / (size_t)n_blocks) {
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
    kv->block_floats = per_block * kv_dim;
    kv->data = hugemem_alloc((size_t)n_blocks * kv->block_floats * sizeof(float));
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
             "%zu floats per position)", n_blocks, block_size, n_layer, 2 * kv_dim);
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

/* The block_size * head_dim floats of head `head` of (layer, K or V) in the
 * block holding seq's pos: K as a tile (head_dim rows of block_size), V as
 * block_size rows of head_dim. */
static float *kv_head_block(kv_cache *kv, int layer, int is_v, int seq, int pos, int head)
{
    int32_t block = kv->table[(size_t)seq * (size_t)kv->blocks_per_seq + (size_t)(pos / kv->block_size)];
    size_t layer_part = (size_t)layer * 2 + (size_t)is_v;                    /* block_size * kv_dim each */
    size_t head_part = layer_part * (size_t)kv->n_head_kv + (size_t)head;
    size_t off = (size_t)block * kv->block_floats + head_part * (size_t)kv->block_size * (size_t)kv->head_dim;
    return kv->data + off;
}

float *kv_cache_k_tile(kv_cache *kv, int layer, int seq, int pos, int head)
{
    return kv_head_block(kv, layer, 0, seq, pos, head);
}

void kv_cache_k_store(kv_cache *kv, int layer, int seq, int pos, int head, const float *k)
{
    float *t = kv_head_block(kv, layer, 0, seq, pos, head) + pos % kv->block_size;
    size_t bs = (size_t)kv->block_size;
    for (int d = 0; d < kv->head_dim; d++) t[(size_t)d * bs] = k[d];
}

float *kv_cache_v(kv_cache *kv, int layer, int seq, int pos, int head)
{
    return kv_head_block(kv, layer, 1, seq, pos, head) + (size_t)(pos % kv->block_size) * (size_t)kv->head_dim;
}

int kv_cache_blocks_total(const kv_cache *kv) { return kv->n_blocks; }
int kv_cache_blocks_free(const kv_cache *kv) { return kv->n_free; }
int kv_cache_block_size(const kv_cache *kv) { return kv->block_size; }

size_t kv_cache_bytes(const kv_cache *kv)
{
    return (size_t)kv->n_blocks * kv->block_floats * sizeof(float);
}
