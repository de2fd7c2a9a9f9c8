/* log.h -- one line per event on stderr, as text or JSON (--log-format). */
#ifndef MOE_SERVER_LOG_H
#define MOE_SERVER_LOG_H

#include "server/config.h"

/* A free-form event ("listening on ...", "model ... loaded"). printf-style. */
void log_event(log_format fmt, const char *level, const char *msgfmt, ...)
    __attribute__((format(printf, 3, 4)));

typedef struct {
    const char *id, *method, *path, *model;  /* model may be NULL */
    int status;
    int prompt_tokens, completion_tokens;
    double queue_ms, prefill_ms, decode_ms, duration_ms;
    const char *error;                       /* NULL when none */
} log_request_fields;

void log_request(log_format fmt, const log_request_fields *f);

#endif
