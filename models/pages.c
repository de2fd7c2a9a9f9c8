/* pages.c -- page sizes of mappings and free memory, from /proc and /sys (see pages.h). */
#include "models/pages.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#define HUGE_PAGE ((size_t)2 << 20)

/* A smaps entry starts with "START-END perms ...": hex digits and a '-'. Field
 * lines start with a name and a ':', which a hex parse stops short of. */
static int header_start(const char *line, uintptr_t *start)
{
    char *end;
    if (!isxdigit((unsigned char)line[0])) return 0;
    unsigned long long v = strtoull(line, &end, 16);
    if (*end != '-') return 0;
    *start = (uintptr_t)v;
    return 1;
}

long pages_smaps_field_kb(FILE *smaps, uintptr_t start, const char *field)
{
    char line[512];
    size_t flen = strlen(field);
    int in = 0, partial = 0;
    while (fgets(line, sizeof line, smaps)) {
        /* The rest of a line longer than the buffer (a long path) is not a line
         * of its own, though it may look like a header ("ab-cd"). */
        int rest = partial;
        size_t len = strlen(line);
        partial = len > 0 && line[len - 1] != '\n';
        if (rest) continue;
        uintptr_t s;
        if (header_start(line, &s)) {
            if (in) return -1; /* the entry ended without the field */
            in = s == start;
            continue;
        }
        if (!in || strncmp(line, field, flen) || line[flen] != ':') continue;
        char *end;
        long kb = strtol(line + flen + 1, &end, 10);
        while (*end == ' ') end++;
        if (kb < 0 || end == line + flen + 1 || strncmp(end, "kB", 2)) return -1;
        return kb;
    }
    return -1;
}

pages_kind pages_probe_file(const void *base)
{
    volatile const char *p = base;
    (void)p[0];
    (void)p[HUGE_PAGE - 1];
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return PAGES_UNKNOWN;
    long kb = pages_smaps_field_kb(f, (uintptr_t)base, "FilePmdMapped");
    fclose(f);
    if (kb < 0) return PAGES_UNKNOWN;
    return kb > 0 ? PAGES_HUGE : PAGES_SMALL;
}

/* The first number on the line of /proc/meminfo named `key`, in kB; -1 if absent. */
static long long meminfo_kb(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    size_t klen = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, klen) && line[klen] == ':') {
            kb = strtoll(line + klen + 1, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

/* One decimal number from a file such as /sys/fs/cgroup/memory.max; -1 when the
 * file is absent or says "max". */
static long long file_number(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char buf[64];
    long long v = -1;
    if (fgets(buf, sizeof buf, f) && isdigit((unsigned char)buf[0])) v = strtoll(buf, NULL, 10);
    fclose(f);
    return v;
}

/* avail capped by the room a cgroup limit leaves (limit - usage), when both
 * files are there: a container sees the host's MemAvailable. */
static unsigned long long cgroup_cap(unsigned long long avail, const char *limit, const char *usage)
{
    long long max = file_number(limit), cur = file_number(usage);
    if (max < 0 || cur < 0) return avail;
    unsigned long long room = max > cur ? (unsigned long long)(max - cur) : 0;
    return room < avail ? room : avail;
}

size_t pages_mem_available(void)
{
    long long kb = meminfo_kb("MemAvailable");
    if (kb <= 0) return 0;
    unsigned long long avail = (unsigned long long)kb * 1024;
    avail = cgroup_cap(avail, "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current");
    avail = cgroup_cap(avail, "/sys/fs/cgroup/memory/memory.limit_in_bytes", /* cgroup v1 */
                       "/sys/fs/cgroup/memory/memory.usage_in_bytes");
    return avail > SIZE_MAX ? SIZE_MAX : (size_t)avail;
}

int pages_thp_enabled(void)
{
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return 0;
    char buf[128];
    int on = fgets(buf, sizeof buf, f) && !strstr(buf, "[never]");
    fclose(f);
    return on;
}
