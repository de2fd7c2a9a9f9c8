/* unicode.c -- UTF-8 and category lookups over the generated range tables. */
#include "models/unicode.h"

/* Tables in unicode_data.c (generated). */
extern const char unicode__version[];
extern const uint8_t unicode__latin1_gc[256];
extern const uint8_t unicode__latin1_flags[256];
extern const size_t unicode__n_gc_ranges;
extern const uint32_t unicode__gc_start[];
extern const uint8_t unicode__gc_value[];
extern const size_t unicode__n_ws_ranges;
extern const uint32_t unicode__ws_ranges[][2];

/* ---- UTF-8 ------------------------------------------------------------------ */

int unicode_utf8_seq_len(unsigned char lead)
{
    if (lead < 0x80) return 1;
    if (lead < 0xC2) return 0;  /* continuation byte or overlong 2-byte lead */
    if (lead < 0xE0) return 2;
    if (lead < 0xF0) return 3;
    if (lead < 0xF5) return 4;
    return 0;
}

size_t unicode_utf8_decode(const char *str, size_t len, uint32_t *cp)
{
    const unsigned char *s = (const unsigned char *)str;
    if (len == 0) { *cp = 0; return 0; }
    unsigned char c = s[0];
    int n = unicode_utf8_seq_len(c);
    if (n == 1) { *cp = c; return 1; }
    if (n == 0 || (size_t)n > len) goto bad;
    /* The second byte's range depends on the lead (rules out overlongs, surrogates
     * and code points above U+10FFFF); later bytes are plain continuations. */
    unsigned char lo = 0x80, hi = 0xBF;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
    else if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) goto bad;
    for (int i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) goto bad;
    if (n == 2) *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    else if (n == 3)
        *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    else
        *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12)
            | ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    return (size_t)n;
bad:
    *cp = UNICODE_BAD_BYTE + c;
    return 1;
}

size_t unicode_utf8_encode(uint32_t cp, char out[4])
{
    if (cp >= UNICODE_BAD_BYTE && cp < UNICODE_BAD_BYTE + 256) {
        out[0] = (char)(cp - UNICODE_BAD_BYTE);
        return 1;
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) cp = UNICODE_REPLACEMENT;
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- Categories ------------------------------------------------------------- */

unicode_gc unicode_category(uint32_t cp)
{
    if (cp < 256) return (unicode_gc)unicode__latin1_gc[cp];
    if (cp > 0x10FFFF) return UNICODE_GC_CN;
    /* Last range whose start is <= cp (range 0 starts at 0). */
    size_t lo = 0, hi = unicode__n_gc_ranges;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (unicode__gc_start[mid] <= cp) lo = mid;
        else hi = mid;
    }
    return (unicode_gc)unicode__gc_value[lo];
}

static int unicode_is_white_space(uint32_t cp)
{
    if (cp < 0x85) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    for (size_t i = 0; i < unicode__n_ws_ranges; i++) {
        if (cp < unicode__ws_ranges[i][0]) return 0;
        if (cp <= unicode__ws_ranges[i][1]) return 1;
    }
    return 0;
}

static unsigned unicode_gc_flags(unicode_gc gc)
{
    switch (gc) {
    case UNICODE_GC_LU: case UNICODE_GC_LL: case UNICODE_GC_LT: case UNICODE_GC_LM:
    case UNICODE_GC_LO: return UNICODE_LETTER;
    case UNICODE_GC_MN: case UNICODE_GC_MC: case UNICODE_GC_ME: return UNICODE_MARK;
    case UNICODE_GC_ND: case UNICODE_GC_NL: case UNICODE_GC_NO: return UNICODE_NUMBER;
    case UNICODE_GC_PC: case UNICODE_GC_PD: case UNICODE_GC_PS: case UNICODE_GC_PE:
    case UNICODE_GC_PI: case UNICODE_GC_PF: case UNICODE_GC_PO: return UNICODE_PUNCT;
    case UNICODE_GC_SM: case UNICODE_GC_SC: case UNICODE_GC_SK: case UNICODE_GC_SO:
        return UNICODE_SYMBOL;
    case UNICODE_GC_ZS: case UNICODE_GC_ZL: case UNICODE_GC_ZP: return UNICODE_SEPARATOR;
    default: return UNICODE_OTHER;
    }
}

unsigned unicode_flags(uint32_t cp)
{
    if (cp < 256) return unicode__latin1_flags[cp];
    if (cp > 0x10FFFF) return 0;  /* invalid input bytes: no class */
    unsigned f = unicode_gc_flags(unicode_category(cp));
    if (unicode_is_white_space(cp)) f |= UNICODE_WHITESPACE;
    return f;
}

const char *unicode_version(void)
{
    return unicode__version;
}
