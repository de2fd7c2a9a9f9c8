/* pages.h -- which page size backs a file mapping, and whether a copy would fit.
 *
 * Decode streams the selected experts' weights from the model file's mapping
 * every step, and with 4 KiB pages the TLB misses cost about half the memory
 * bandwidth (docs/PERFORMANCE.md). Whether the kernel maps a file in 2 MiB
 * pages depends on its version, the file system and how the page cache got the
 * file, so the loader asks the kernel instead of guessing (models/gguf.c,
 * GGUF_LOAD_AUTO). Linux only: elsewhere every answer is "unknown".
 */
#ifndef MOE_MODELS_PAGES_H
#define MOE_MODELS_PAGES_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { PAGES_UNKNOWN, PAGES_SMALL, PAGES_HUGE } pages_kind;

/* The value in kB of `field` (such as "FilePmdMapped") in the entry of the
 * mapping that starts at address `start`, read from a /proc/PID/smaps stream;
 * -1 when the mapping or the field is absent or the value is malformed. */
long pages_smaps_field_kb(FILE *smaps, uintptr_t start, const char *field);

/* Faults in the first 2 MiB of the read-only file mapping that starts at the
 * 2 MiB-aligned `base` (at least 2 MiB long) and tells whether the kernel
 * mapped it with one 2 MiB entry (HUGE) or in small pages (SMALL). */
pages_kind pages_probe_file(const void *base);

/* Bytes this process could still allocate: MemAvailable, capped by the room a
 * cgroup (v2 or v1) memory limit leaves, when there is one (containers). 0 when
 * unknown. */
size_t pages_mem_available(void);

/* Transparent huge pages for anonymous memory are not switched off ("never"). */
int pages_thp_enabled(void);

#endif
