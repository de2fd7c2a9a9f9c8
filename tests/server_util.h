/* server_util.h -- driving a real build/moeserve over HTTP from a Check suite:
 * start/stop the process on a free loopback port (--port 0, the port read from
 * its "listening on" log line), plain-socket HTTP, the error envelope, metrics.
 * The same approach as tests/test_server.c. The including file defines g_dir (a
 * directory for the server logs) before including this header.
 */
#ifndef MOE_TESTS_SERVER_UTIL_H
#define MOE_TESTS_SERVER_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>

#include "core/clock.h"
#include "tests/testutil.h"

#define DEADLINE_S 120.0  /* generous: sanitizer builds on a busy machine */

static inline void nap(void) { usleep(5000); }  /* between polls of a condition */

/* Server process ---------------------------------------------------------------- */

typedef struct {
    pid_t pid;
    int port;
    char log[160];
} server;

/* Starts build/moeserve with the given flags (NULL-terminated) and extra
 * environment "K=V" strings; waits for the port and, if want_ready, for /ready. */
static inline int http_status(int port, const char *method, const char *path);

static inline void server_start_env(server *s, const char *const *env, int want_ready, const char *const *flags)
{
    static int seq;
    snprintf(s->log, sizeof s->log, "%s/server-%d-%d.log", g_dir, (int)getpid(), seq++);
    char bin[256];
    snprintf(bin, sizeof bin, "%s/moeserve", tu_build_dir());
    ck_assert_msg(access(bin, X_OK) == 0, "%s missing: build it first", bin);
    const char *argv[64];
    int n = 0;
    argv[n++] = bin;
    argv[n++] = "--port";
    argv[n++] = "0";
    argv[n++] = "--threads";
    argv[n++] = "1";
    for (int i = 0; flags[i]; i++) argv[n++] = flags[i];
    argv[n] = NULL;
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);  /* never outlive a failed test */
        int fd = open(s->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) { dup2(fd, 2); dup2(fd, 1); close(fd); }
        for (int i = 0; env && env[i]; i++) putenv((char *)env[i]);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    s->pid = pid;
    s->port = 0;
    double t0 = clock_mono_s();
    while (!s->port && clock_mono_s() - t0 < DEADLINE_S) {
        FILE *f = fopen(s->log, "r");
        char line[1024];
        while (f && fgets(line, sizeof line, f)) {
            const char *p = strstr(line, "listening on http://127.0.0.1:");
            if (p) s->port = atoi(p + strlen("listening on http://127.0.0.1:"));
        }
        if (f) fclose(f);
        int st;
        ck_assert_msg(waitpid(pid, &st, WNOHANG) == 0, "moeserve exited during start-up (log %s)", s->log);
        if (!s->port) nap();
    }
    ck_assert_msg(s->port > 0, "moeserve did not log its port (log %s)", s->log);
    while (want_ready && http_status(s->port, "GET", "/ready") != 200) {
        ck_assert_msg(clock_mono_s() - t0 < DEADLINE_S, "moeserve not ready in time (log %s)", s->log);
        nap();
    }
}

static inline void server_start(server *s, const char *const *flags) { server_start_env(s, NULL, 1, flags); }

/* Waits for the process; returns its exit status (or -1 on a signal/timeout). */
static inline int server_wait(server *s)
{
    double t0 = clock_mono_s();
    int st;
    while (clock_mono_s() - t0 < DEADLINE_S) {
        pid_t r = waitpid(s->pid, &st, WNOHANG);
        if (r == s->pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        nap();
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, &st, 0);
    return -1;
}

static inline void server_stop(server *s)
{
    kill(s->pid, SIGTERM);
    int rc = server_wait(s);
    ck_assert_msg(rc == 0, "moeserve exited with %d after SIGTERM (log %s)", rc, s->log);
}

/* Whether the server's log has a line containing needle. */
static inline int log_has(const server *s, const char *needle)
{
    FILE *f = fopen(s->log, "r");
    char line[1024];
    int found = 0;
    while (f && !found && fgets(line, sizeof line, f)) found = strstr(line, needle) != NULL;
    if (f) fclose(f);
    return found;
}

/* HTTP over a plain socket -------------------------------------------------------- */

typedef struct {
    int status;
    char head[4096];  /* status line and headers */
    char *body;       /* malloc'd, NUL-terminated */
    size_t len;
} http_resp;

static inline void http_resp_free(http_resp *r) { free(r->body); r->body = NULL; }

static inline int connect_port(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {(time_t)DEADLINE_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) { close(fd); return -1; }
    return fd;
}

static inline int send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Sends one request (Connection: close) on a new socket; returns the fd. */
static inline int http_send(int port, const char *method, const char *path, const char *headers, const char *body)
{
    int fd = connect_port(port);
    if (fd < 0) return -1;
    size_t blen = body ? strlen(body) : 0;
    char head[1024];
    int n = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Length: %zu\r\n%s\r\n", method, path, blen, headers ? headers : "");
    if (send_all(fd, head, (size_t)n) || (blen && send_all(fd, body, blen))) { close(fd); return -1; }
    return fd;
}

static inline int http_recv(int fd, http_resp *r)
{
    size_t cap = 8192, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap) buf = realloc(buf, cap *= 2);
        ssize_t k = recv(fd, buf + len, cap - len - 1, 0);
        if (k <= 0) break;
        len += (size_t)k;
    }
    close(fd);
    buf[len] = 0;
    memset(r, 0, sizeof *r);
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1) { free(buf); r->status = -1; return -1; }
    size_t hl = (size_t)(sep - buf);
    if (hl >= sizeof r->head) hl = sizeof r->head - 1;
    memcpy(r->head, buf, hl);
    r->head[hl] = 0;
    r->len = len - (size_t)(sep + 4 - buf);
    r->body = malloc(r->len + 1);
    memcpy(r->body, sep + 4, r->len);
    r->body[r->len] = 0;
    free(buf);
    return 0;
}

static inline int http(int port, const char *method, const char *path, const char *headers, const char *body,
                http_resp *r)
{
    int fd = http_send(port, method, path, headers, body);
    if (fd < 0) { memset(r, 0, sizeof *r); r->status = -1; return -1; }
    return http_recv(fd, r);
}

static inline int http_status(int port, const char *method, const char *path)
{
    http_resp r;
    http(port, method, path, NULL, NULL, &r);
    http_resp_free(&r);
    return r.status;
}

/* Value of a response header (case-insensitive name), or NULL. */
static inline const char *header(const http_resp *r, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    for (const char *p = strstr(r->head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        if (!strncasecmp(p + 2, name, nl) && p[2 + nl] == ':') {
            const char *v = p + 3 + nl;
            while (*v == ' ') v++;
            size_t n = strcspn(v, "\r\n");
            if (n >= cap) n = cap - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return out;
        }
    }
    return NULL;
}

static inline json_t *parse_json(const http_resp *r)
{
    json_error_t e;
    json_t *j = json_loadb(r->body, r->len, 0, &e);
    ck_assert_msg(j != NULL, "response is not JSON (%s): %.300s", e.text, r->body);
    return j;
}

/* Asserts the error envelope: status, code, type and a message containing want. */
static inline void expect_error(const http_resp *r, int status, const char *want)
{
    ck_assert_msg(r->status == status, "want %d, got %d: %.400s", status, r->status, r->body ? r->body : "");
    json_t *j = parse_json(r);
    json_t *e = json_object_get(j, "error");
    ck_assert_msg(json_is_object(e), "no error object: %s", r->body);
    ck_assert_int_eq(json_integer_value(json_object_get(e, "code")), status);
    ck_assert(json_is_string(json_object_get(e, "type")));
    const char *msg = json_string_value(json_object_get(e, "message"));
    ck_assert(msg && *msg);
    if (want) ck_assert_msg(strstr(msg, want), "message '%s' lacks '%s'", msg, want);
    json_decref(j);
}

static inline json_t *infer_ok(int port, const char *body)
{
    http_resp r;
    http(port, "POST", "/infer", NULL, body, &r);
    ck_assert_msg(r.status == 200, "POST /infer %s -> %d %.400s", body, r.status, r.body ? r.body : "");
    json_t *j = parse_json(&r);
    http_resp_free(&r);
    return j;
}

/* Metrics: the sum of every sample of a family whose labels contain `labels`. */
static inline double metric(int port, const char *name, const char *labels, const char *auth)
{
    http_resp r;
    http(port, "GET", "/metrics", auth, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    double sum = 0;
    size_t nl = strlen(name);
    for (char *line = strtok(r.body, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#' || strncmp(line, name, nl) || (line[nl] != '{' && line[nl] != ' ')) continue;
        if (labels && !strstr(line, labels)) continue;
        char *sp = strrchr(line, ' ');
        if (sp) sum += strtod(sp + 1, NULL);
    }
    http_resp_free(&r);
    return sum;
}

#define WAIT_FOR(cond, what)                                                             \
    do {                                                                                 \
        double t0_ = clock_mono_s();                                                     \
        while (!(cond)) {                                                                \
            ck_assert_msg(clock_mono_s() - t0_ < DEADLINE_S, "timed out waiting for %s", what); \
            nap();                                                                       \
        }                                                                                \
    } while (0)

#endif
