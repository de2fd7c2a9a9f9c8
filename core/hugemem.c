/* hugemem.c -- large anonymous buffers in 2 MiB pages (see hugemem.h). */
#include "core/hugemem.h"

#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)

static size_t page_size(void)
{
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* Maps size bytes at a 2 MiB-aligned address: over-maps by one huge page and
 * gives back the slack on both sides (the kernel backs a range with a 2 MiB page
 * only where the virtual address is 2 MiB-aligned). */
static void *map_aligned(size_t size, int prot, int flags)
{
    if (size == 0 || size > SIZE_MAX - 2 * HUGE_PAGE) {
        errno = size == 0 ? EINVAL : ENOMEM;
        return NULL;
    }
    char *res = mmap(NULL, size + HUGE_PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
    if (res == MAP_FAILED) return NULL;
    char *at = (char *)(((uintptr_t)res + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (at > res) munmap(res, (size_t)(at - res));
    size_t page = page_size();
    char *end = at + (size + page - 1) / page * page;
    if (res + size + HUGE_PAGE > end) munmap(end, (size_t)(res + size + HUGE_PAGE - end));
    return at;
}

void *hugemem_reserve(size_t size)
{
    return map_aligned(size, PROT_NONE, MAP_NORESERVE);
}

void hugemem_advise(void *p, size_t size)
{
#ifdef MADV_HUGEPAGE
    (void)madvise(p, size, MADV_HUGEPAGE);
#else
    (void)p; (void)size;
#endif
}

/* Mapped writable (and so accounted) from the start: a size the machine cannot
 * hold fails here with ENOMEM under the kernel's overcommit check. Not touched:
 * on a virtual machine the first write of each page also makes the host back it,
 * and committing a 1 GiB KV pool that way took 2.4 s of a server's start (to
 * /ready: 0.1 s without). A 2 MiB page faults in at its first write instead,
 * once, 512 times fewer faults than small pages. */
void *hugemem_alloc(size_t size)
{
    char *p = map_aligned(size, PROT_READ | PROT_WRITE, 0);
    if (!p) return NULL;
    hugemem_advise(p, size);
    return p;
}

void hugemem_free(void *p, size_t size)
{
    if (p) munmap(p, size);
}
