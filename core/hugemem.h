/* hugemem.h -- large anonymous buffers in 2 MiB pages.
 *
 *   float *kv = hugemem_alloc(bytes);   // zeroed, 2 MiB-aligned, huge pages asked for
 *   hugemem_free(kv, bytes);
 *
 * Weights, the KV cache and the benchmark's arrays are streamed at memory
 * bandwidth; with 4 KiB pages the TLB misses cost a large part of it (see
 * docs/PERFORMANCE.md). Huge pages are a request (MADV_HUGEPAGE): where the
 * kernel has none to give, the memory works in small pages.
 */
#ifndef MOE_CORE_HUGEMEM_H
#define MOE_CORE_HUGEMEM_H

#include <stddef.h>

/* Reserves size bytes at a 2 MiB-aligned address, PROT_NONE and uncommitted, for
 * the caller to map over (MAP_FIXED) or mprotect. NULL with errno on failure. */
void *hugemem_reserve(size_t size);

/* Asks for huge pages on [p, p + size). */
void hugemem_advise(void *p, size_t size);

/* Zeroed read-write memory, 2 MiB-aligned, huge pages requested. Accounted at
 * once (a size the machine cannot hold fails here), faulted in at first use, a
 * 2 MiB page at a time. NULL with errno on failure. */
void *hugemem_alloc(size_t size);

/* Frees what hugemem_alloc or hugemem_reserve returned (NULL is a no-op). */
void hugemem_free(void *p, size_t size);

#endif
