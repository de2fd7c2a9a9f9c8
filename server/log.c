/* log.c -- text or JSON log lines on stderr; one fprintf per line so lines from
 * different threads never interleave. */
#include "server/log.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void timestamp(char *buf, size_t n)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    size_t k = strftime(buf, n, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + k, n - k, ".%03ldZ", ts.tv_nsec / 1000000);
}

void log_event(log_format fmt, const char *level, const char *msgfmt, ...)
{
    char msg[1024], ts[40];
    va_list ap;
    va_start(ap, msgfmt);
    vsnprintf(msg, sizeof msg, msgfmt, ap);
    va_end(ap);
    timestamp(ts, sizeof ts);
    if (fmt == LOG_JSON) {
        json_t *o = json_pack("{s:s,s:s,s:s%}", "ts", ts, "level", level, "msg", msg, strlen(msg));
        char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (s) fprintf(stderr, "%s\n", s);
        free(s);
    } else {
        fprintf(stderr, "%s %s %s\n", ts, level, msg);
    }
}

void log_request(log_format fmt, const log_request_fields *f)
{
    char ts[40];
    timestamp(ts, sizeof ts);
    if (fmt == LOG_JSON) {
        json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:i,s:i,s:f,s:f,s:f,s:f}", "ts", ts, "level", "info",
                              "id", f->id, "method", f->method, "path", f->path, "status", f->status,
                              "prompt_tokens", f->prompt_tokens, "completion_tokens", f->completion_tokens,
                              "queue_ms", f->queue_ms, "prefill_ms", f->prefill_ms, "decode_ms", f->decode_ms,
                              "duration_ms", f->duration_ms);
        if (o && f->model) json_object_set_new(o, "model", json_string(f->model));
        if (o && f->error) json_object_set_new(o, "error", json_string(f->error));
        char *s = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(6)) : NULL;
        json_decref(o);
        if (s) fprintf(stderr, "%s\n", s);
        free(s);
    } else {
        fprintf(stderr, "%s info request id=%s %s %s status=%d model=%s prompt_tokens=%d completion_tokens=%d "
                "queue_ms=%.2f prefill_ms=%.2f decode_ms=%.2f duration_ms=%.2f%s%s%s\n",
                ts, f->id, f->method, f->path, f->status, f->model ? f->model : "-", f->prompt_tokens,
                f->completion_tokens, f->queue_ms, f->prefill_ms, f->decode_ms, f->duration_ms,
                f->error ? " error=\"" : "", f->error ? f->error : "", f->error ? "\"" : "");
    }
}
