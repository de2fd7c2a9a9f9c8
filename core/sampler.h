/* sampler.h -- from a row of logits to the next token.
 *
 * Order: repetition penalty -> temperature (0: greedy argmax) -> top-k -> top-p ->
 * min-p -> draw from a seeded RNG. The same seed and logits give the same tokens.
 * sampler_sample allocates nothing (scratch sized at create).
 */
#ifndef MOE_CORE_SAMPLER_H
#define MOE_CORE_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature;    /* 0 = greedy */
    int top_k;            /* 0 = off */
    float top_p;          /* 1 = off */
    float min_p;          /* 0 = off */
    float repeat_penalty; /* 1 = off; llama.cpp semantics: logit>0 ? /p : *p */
    int repeat_last_n;    /* how much history the penalty looks at (0 = none, -1 = all) */
    uint64_t seed;
} sampler_params;

sampler_params sampler_default_params(void);
/* 0, or -1 with a message naming the bad field. */
int sampler_params_validate(const sampler_params *p, char *err, size_t errlen);

typedef struct sampler sampler;

int sampler_create(int n_vocab, const sampler_params *p, sampler **out, char *err, size_t errlen);
void sampler_free(sampler *s);
/* history: tokens so far (prompt + generated) for the repetition penalty. */
int32_t sampler_sample(sampler *s, const float *logits, const int32_t *history, size_t n_history);
/* Probability the last sample gave its token after all filters (for reporting). */
float sampler_last_prob(const sampler *s);

/* Stop strings ---------------------------------------------------------- */

/* Incremental matcher over the generated text. Feed bytes as they are produced;
 * it says when a stop string completed and how many bytes are safe to emit
 * (a possible partial stop string at the end is held back). */
typedef struct stop_matcher stop_matcher;

int stop_matcher_create(const char *const *stops, size_t n_stops, stop_matcher **out,
                        char *err, size_t errlen);
void stop_matcher_free(stop_matcher *m);
/* Appends text; returns 1 when a stop string is now contained in the text. */
int stop_matcher_feed(stop_matcher *m, const char *text, size_t len);
/* Bytes of the text (from the start) that can be emitted: all of it before the
 * stop string once one matched, otherwise all but a trailing partial match. */
size_t stop_matcher_safe_len(const stop_matcher *m);
const char *stop_matcher_text(const stop_matcher *m);

#endif
