/* test_server.c -- the real build/moeserve process, driven over HTTP with plain
 * sockets: every endpoint and error status, batching invariance, disconnects,
 * overload, drain on SIGTERM, limits, auth, and a promtool check of /metrics.
 *
 * Each test starts its own server on a free loopback port (--port 0; the port is
 * read from the "listening on" log line) with tiny synthetic models written once
 * by synth_write. Nothing waits on a fixed sleep: every wait polls a condition
 * with a generous deadline.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>

#include "models/synth.h"
#include "server/api.h"
#include "server/config.h"
#include "tests/testutil.h"

static char g_dir[64];
static char g_model_a[128], g_model_b[128];
#include "tests/server_util.h"

/* Endpoints ------------------------------------------------------------------------ */

START_TEST(health_ready_models_and_paths)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    http_resp r;
    const char *ok_paths[] = {"/health", "/livez", "/ready", "/readyz"};
    for (int i = 0; i < 4; i++) {
        http(s.port, "GET", ok_paths[i], NULL, NULL, &r);
        ck_assert_msg(r.status == 200, "%s -> %d", ok_paths[i], r.status);
        json_decref(parse_json(&r));
        http_resp_free(&r);
    }
    http(s.port, "GET", "/models", NULL, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    json_t *j = parse_json(&r);
    json_t *m = json_array_get(json_object_get(j, "models"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(m, "name")), "a");
    ck_assert_str_eq(json_string_value(json_object_get(m, "architecture")), "olmoe");
    ck_assert_int_eq(json_integer_value(json_object_get(m, "experts")), 8);
    ck_assert_int_eq(json_integer_value(json_object_get(m, "experts_used")), 2);
    ck_assert(json_integer_value(json_object_get(m, "parameters")) >
              json_integer_value(json_object_get(m, "active_parameters")));
    ck_assert_int_eq(strlen(json_string_value(json_object_get(m, "vocab_fingerprint"))), 16);
    json_decref(j);
    http_resp_free(&r);

    char v[128];
    http(s.port, "GET", "/metrics", NULL, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert(header(&r, "Content-Type", v, sizeof v) && strstr(v, "text/plain"));
    ck_assert(strstr(r.body, "moeserve_requests_total"));
    http_resp_free(&r);

    http(s.port, "GET", "/nope", NULL, NULL, &r);
    expect_error(&r, 404, "/nope");
    http_resp_free(&r);
    http(s.port, "GET", "/infer", NULL, NULL, &r);
    expect_error(&r, 405, "POST");
    ck_assert(header(&r, "Allow", v, sizeof v) && strstr(v, "POST"));
    http_resp_free(&r);
    http(s.port, "POST", "/health", NULL, "{}", &r);
    expect_error(&r, 405, "GET");
    http_resp_free(&r);

    /* Keep-alive with pipelining: two answers on one connection, in order. */
    int fd = connect_port(s.port);
    const char *two = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                      "POST /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 30\r\n\r\n"
                      "{\"prompt\":\"hi\",\"max_tokens\":2}";
    ck_assert_int_eq(send_all(fd, two, strlen(two)), 0);
    char all[16384];
    size_t got = 0;
    ssize_t k;
    while (got < sizeof all - 1 && (k = recv(fd, all + got, sizeof all - 1 - got, 0)) > 0) got += (size_t)k;
    all[got] = 0;
    close(fd);
    char *second = strstr(all + 1, "HTTP/1.1 ");
    ck_assert_msg(!strncmp(all, "HTTP/1.1 200", 12) && second && !strncmp(second, "HTTP/1.1 200", 12),
                  "pipelined answers: %.300s", all);
    ck_assert(strstr(second, "\"tokens\""));
    server_stop(&s);
}
END_TEST

/* A model still loading: /health 200, /ready 503 naming the progress, the loaded
 * model serves, the loading one answers 503 + Retry-After, /models lists it as not
 * loaded. The second model is a FIFO, so its loader blocks in open() until the
 * test opens the other end: no race with a fast load. It is not a regular file, so
 * the server then exits 1 with a message that says so. */
START_TEST(ready_503_while_loading)
{
    char fifo[128], arg[160], v[64];
    snprintf(fifo, sizeof fifo, "%s/slow.gguf", g_dir);
    unlink(fifo);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    snprintf(arg, sizeof arg, "slow=%s", fifo);
    server s;
    server_start_env(&s, NULL, 0, (const char *[]){"--model", g_model_a, "--model", arg, NULL});
    http_resp r;
    for (;;) {  /* the first model loads; the second stays in open() */
        http(s.port, "GET", "/ready", NULL, NULL, &r);
        ck_assert_int_eq(r.status, 503);
        int one_loaded = strstr(r.body, "loading models (1 of 2 loaded)") != NULL;
        ck_assert_msg(one_loaded || strstr(r.body, "loading models (0 of 2 loaded)"), "%s", r.body);
        ck_assert(header(&r, "Retry-After", v, sizeof v));
        http_resp_free(&r);
        if (one_loaded) break;
        nap();
    }
    ck_assert_int_eq(http_status(s.port, "GET", "/health"), 200);
    json_decref(infer_ok(s.port, "{\"model\":\"a\",\"prompt\":\"hi\",\"max_tokens\":2}"));
    http(s.port, "POST", "/infer", NULL, "{\"model\":\"slow\",\"prompt\":\"hi\"}", &r);
    expect_error(&r, 503, "still loading");
    ck_assert(header(&r, "Retry-After", v, sizeof v));
    http_resp_free(&r);
    http(s.port, "GET", "/models", NULL, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    json_t *j = parse_json(&r), *m = json_array_get(json_object_get(j, "models"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(m, "name")), "slow");
    ck_assert(json_is_false(json_object_get(m, "loaded")));
    json_decref(j);
    http_resp_free(&r);
    int fd = open(fifo, O_WRONLY);  /* lets the loader's open() return */
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(server_wait(&s), 1);
    ck_assert_msg(log_has(&s, "not a regular file"), "the log names the problem (log %s)", s.log);
    unlink(fifo);
}
END_TEST

START_TEST(help_and_bad_flags)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s/moeserve --help", tu_build_dir());
    FILE *p = popen(cmd, "r");
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    ck_assert_int_eq(pclose(p), 0);
    const char *flags[] = {"--model", "--host", "--port", "--max-batch-tokens", "--batch-wait-us", "--kv-cache-mb",
                           "--max-queue", "--max-body-bytes", "--request-timeout", "--api-key", "--drain-delay",
                           "--drain-timeout", "--log-format", "--kv-type", "MOESERVE_"};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++)
        ck_assert_msg(strstr(buf, flags[i]), "--help lacks %s", flags[i]);
    snprintf(cmd, sizeof cmd, "%s/moeserve --model %s --max-queue -3 2>/dev/null", tu_build_dir(), g_model_a);
    ck_assert_int_ne(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "%s/moeserve --bogus 2>/dev/null", tu_build_dir());
    ck_assert_int_ne(system(cmd), 0);
    /* A model that cannot load: the process exits non-zero, it does not hang. */
    snprintf(cmd, sizeof cmd, "%s/moeserve --port 0 --model %s/missing.gguf 2>/dev/null", tu_build_dir(), g_dir);
    ck_assert_int_ne(system(cmd), 0);
}
END_TEST

/* Inference --------------------------------------------------------------------------- */

START_TEST(infer_outputs)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    json_t *j = infer_ok(s.port, "{\"prompt\":\"The quick brown fox\",\"max_tokens\":6}");
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "a");
    ck_assert(json_is_string(json_object_get(j, "id")));
    json_t *toks = json_object_get(j, "tokens");
    const char *fin = json_string_value(json_object_get(j, "finish_reason"));
    ck_assert(!strcmp(fin, "length") || !strcmp(fin, "eos"));
    if (!strcmp(fin, "length")) ck_assert_int_eq(json_array_size(toks), 6);
    ck_assert(json_is_string(json_object_get(j, "text")));
    size_t n_prompt = json_array_size(json_object_get(j, "prompt_tokens"));
    ck_assert_int_gt(n_prompt, 0);
    json_t *usage = json_object_get(j, "usage");
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "prompt_tokens")), n_prompt);
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "completion_tokens")), json_array_size(toks));
    json_t *tm = json_object_get(j, "timings");
    ck_assert(json_is_number(json_object_get(tm, "queue_ms")) && json_is_number(json_object_get(tm, "prefill_ms")) &&
              json_is_number(json_object_get(tm, "decode_ms")));

    /* The same prompt as ids gives the same tokens. */
    char body[4096];
    char *ids = json_dumps(json_object_get(j, "prompt_tokens"), JSON_COMPACT);
    snprintf(body, sizeof body, "{\"tokens\":%s,\"max_tokens\":6}", ids);
    json_t *j2 = infer_ok(s.port, body);
    ck_assert(json_equal(json_object_get(j2, "tokens"), toks));
    json_decref(j2);

    /* logits=all with greedy decoding: each generated token is the top-1 of the
     * position before it; log-probs are <= 0 and sorted. */
    snprintf(body, sizeof body, "{\"tokens\":%s,\"max_tokens\":4,\"logits\":\"all\",\"top_logprobs\":3}", ids);
    j2 = infer_ok(s.port, body);
    json_t *lg = json_object_get(j2, "logits"), *gen = json_object_get(j2, "tokens");
    size_t n_gen = json_array_size(gen);
    ck_assert_int_eq(json_array_size(lg), n_prompt + n_gen - 1);
    for (size_t e = 0; e < json_array_size(lg); e++) {
        json_t *ent = json_array_get(lg, e), *top = json_object_get(ent, "top");
        ck_assert_int_eq(json_integer_value(json_object_get(ent, "pos")), e);
        ck_assert_int_eq(json_array_size(top), 3);
        double prev = 1e30;
        for (size_t k = 0; k < 3; k++) {
            json_t *t = json_array_get(top, k);
            double lp = json_number_value(json_object_get(t, "logprob"));
            double l = json_number_value(json_object_get(t, "logit"));
            ck_assert(lp <= 0 && l <= prev);
            prev = l;
            ck_assert(json_is_string(json_object_get(t, "token")));
        }
        if (e + 1 >= n_prompt)
            ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(top, 0), "id")),
                             json_integer_value(json_array_get(gen, e + 1 - n_prompt)));
    }
    json_decref(j2);

    /* max_tokens 0 scores the prompt; full_logits is the whole last row; routing
     * gives k experts and weights per layer for every position. */
    snprintf(body, sizeof body, "{\"tokens\":%s,\"max_tokens\":0,\"logits\":\"last\",\"full_logits\":true,"
             "\"routing\":true}", ids);
    j2 = infer_ok(s.port, body);
    ck_assert_int_eq(json_array_size(json_object_get(j2, "tokens")), 0);
    ck_assert_int_eq(json_array_size(json_object_get(j2, "full_logits")), 510);
    json_t *last = json_array_get(json_object_get(j2, "logits"), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(last, "pos")), n_prompt - 1);
    /* top-1 of the last position is the argmax of the full row */
    json_t *row = json_object_get(j2, "full_logits");
    size_t best = 0;
    for (size_t i = 1; i < json_array_size(row); i++)
        if (json_number_value(json_array_get(row, i)) > json_number_value(json_array_get(row, best))) best = i;
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(json_object_get(last, "top"), 0), "id")), best);
    json_t *rt = json_object_get(j2, "routing");
    ck_assert_int_eq(json_array_size(rt), n_prompt);
    json_t *ex = json_object_get(json_array_get(rt, 0), "experts");
    ck_assert_int_eq(json_array_size(ex), 2);                        /* layers */
    ck_assert_int_eq(json_array_size(json_array_get(ex, 0)), 2);     /* top-2 */
    double wsum = 0;
    json_t *w0 = json_array_get(json_object_get(json_array_get(rt, 0), "weights"), 0);
    for (size_t k = 0; k < 2; k++) wsum += json_number_value(json_array_get(w0, k));
    ck_assert(wsum > 0 && wsum <= 1.0001);
    json_decref(j2);

    /* Several prompts in one request: one result each, each equal to its single run. */
    j2 = infer_ok(s.port, "{\"prompts\":[\"The quick brown fox\",\"Hello\"],\"max_tokens\":6}");
    json_t *res = json_object_get(j2, "results");
    ck_assert_int_eq(json_array_size(res), 2);
    ck_assert(json_equal(json_object_get(json_array_get(res, 0), "tokens"), toks));
    json_decref(j2);

    /* Stop strings cut the text before the stop string: take two printable ASCII
     * characters of the generated text as the stop string. */
    const char *text = json_string_value(json_object_get(j, "text"));
    for (size_t i = 1; text[i] && text[i + 1]; i++) {
        if (text[i] < 33 || text[i] > 126 || text[i + 1] < 33 || text[i + 1] > 126) continue;
        json_t *st = json_pack("{s:s,s:i,s:[s#]}", "prompt", "The quick brown fox", "max_tokens", 6, "stop",
                               text + i, (int)2);
        char *sb = json_dumps(st, JSON_COMPACT);
        j2 = infer_ok(s.port, sb);
        ck_assert_str_eq(json_string_value(json_object_get(j2, "finish_reason")), "stop");
        ck_assert(strlen(json_string_value(json_object_get(j2, "text"))) <= i);
        json_decref(j2);
        free(sb);
        json_decref(st);
        break;
    }
    free(ids);
    json_decref(j);
    server_stop(&s);
}
END_TEST

START_TEST(request_errors)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-body-bytes", "2000", NULL});
    struct { const char *body; int status; const char *want; } cases[] = {
        {"{\"prompt\": \"x\"", 400, "invalid JSON"},
        {"[1,2]", 400, "object"},
        {"{\"prompt\":\"hi\",\"max_token\":5}", 400, "max_token"},
        {"{\"prompt\":\"hi\",\"max_tokens\":\"5\"}", 400, "max_tokens"},
        {"{\"prompt\":\"hi\",\"max_tokens\":-1}", 400, "max_tokens"},
        {"{\"prompt\":\"hi\",\"temperature\":-0.5}", 400, "temperature"},
        {"{\"prompt\":\"hi\",\"top_p\":0}", 400, "top_p"},
        {"{\"prompt\":\"hi\",\"top_logprobs\":21,\"logits\":\"last\"}", 400, "top_logprobs"},
        {"{\"prompt\":\"hi\",\"logits\":\"some\"}", 400, "logits"},
        {"{\"prompt\":\"hi\",\"stop\":\"x\"}", 400, "stop"},
        {"{\"prompt\":\"hi\",\"seed\":-1}", 400, "seed"},
        {"{\"prompt\":\"hi\",\"routing\":1}", 400, "routing"},
        {"{\"tokens\":[1,2,510]}", 400, "[0, 510)"},
        {"{\"tokens\":[1,-2]}", 400, "tokens"},
        {"{\"tokens\":[]}", 400, "empty"},
        {"{\"prompt\":\"\"}", 400, "empty"},
        {"{\"prompt\":\"hi\",\"tokens\":[1]}", 400, "exactly one"},
        {"{\"max_tokens\":3}", 400, "exactly one"},
        {"{\"prompt\":\"hi\",\"model\":\"zzz\"}", 404, "zzz"},
        {"{\"prompt\":\"hi\",\"max_tokens\":100000}", 400, "max_tokens"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        http_resp r;
        http(s.port, "POST", "/infer", NULL, cases[i].body, &r);
        expect_error(&r, cases[i].status, cases[i].want);
        http_resp_free(&r);
    }
    /* A prompt over the context (512) is 413; so is a body over --max-body-bytes,
     * declared (Content-Length) or not. */
    char *big = malloc(8192);
    int n = sprintf(big, "{\"tokens\":[");
    for (int i = 0; i < 600; i++) n += sprintf(big + n, "%s100", i ? "," : "");
    sprintf(big + n, "]}");
    http_resp r;
    http(s.port, "POST", "/infer", NULL, big, &r);
    expect_error(&r, 413, "max-body-bytes");
    http_resp_free(&r);
    server_stop(&s);

    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    http(s.port, "POST", "/infer", NULL, big, &r);
    expect_error(&r, 413, "context");
    http_resp_free(&r);
    free(big);
    /* Chunked upload without a length, over the limit. */
    server_stop(&s);
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-body-bytes", "100", NULL});
    int fd = connect_port(s.port);
    const char *req = "POST /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "c8\r\n";
    ck_assert_int_eq(send_all(fd, req, strlen(req)), 0);
    char chunk[300];
    memset(chunk, ' ', 200);
    memcpy(chunk + 200, "\r\n0\r\n\r\n", 8);
    ck_assert_int_eq(send_all(fd, chunk, 207), 0);
    http_recv(fd, &r);
    expect_error(&r, 413, "max-body-bytes");
    http_resp_free(&r);
    server_stop(&s);
}
END_TEST

/* Batching invariance ----------------------------------------------------------------- */

#define N_CLIENTS 16

typedef struct {
    int port;
    const char *body;
    char *answer;        /* tokens and logits, compact JSON */
    pthread_barrier_t *start;
} client;

static char *answer_of(json_t *j)
{
    json_t *k = json_pack("{s:O,s:O}", "tokens", json_object_get(j, "tokens"), "logits", json_object_get(j, "logits"));
    char *s = json_dumps(k, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(k);
    return s;
}

static void *client_main(void *arg)
{
    client *c = arg;
    if (c->start) pthread_barrier_wait(c->start);
    http_resp r;
    http(c->port, "POST", "/infer", NULL, c->body, &r);
    if (r.status == 200) {
        json_error_t e;
        json_t *j = json_loadb(r.body, r.len, 0, &e);
        if (j) c->answer = answer_of(j);
        json_decref(j);
    }
    http_resp_free(&r);
    return NULL;
}

START_TEST(batching_gives_the_same_answers)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--batch-wait-us", "20000", NULL});
    static const char *words[] = {"alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"};
    char bodies[N_CLIENTS][256];
    client alone[N_CLIENTS], together[N_CLIENTS];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, N_CLIENTS);
    for (int i = 0; i < N_CLIENTS; i++) {
        /* Different prompt lengths, so prefill chunks and decodes mix in one step. */
        snprintf(bodies[i], sizeof bodies[i],
                 "{\"prompt\":\"%s %s %s\",\"max_tokens\":%d,\"logits\":\"all\",\"top_logprobs\":2%s}",
                 words[i % 8], words[(i * 3) % 8], i % 3 ? "and some more words to prefill" : "", 8 + i % 5,
                 i % 4 == 1 ? ",\"temperature\":0.9,\"seed\":7" : "");
        alone[i] = (client){s.port, bodies[i], NULL, NULL};
        client_main(&alone[i]);
        ck_assert_msg(alone[i].answer, "client %d failed alone", i);
        together[i] = (client){s.port, bodies[i], NULL, &bar};
    }
    double steps0 = metric(s.port, "moeserve_steps_total", NULL, NULL);
    int max_tokens_sum = 0;
    for (int i = 0; i < N_CLIENTS; i++) max_tokens_sum += 8 + i % 5;
    pthread_t th[N_CLIENTS];
    for (int i = 0; i < N_CLIENTS; i++) pthread_create(&th[i], NULL, client_main, &together[i]);
    for (int i = 0; i < N_CLIENTS; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < N_CLIENTS; i++) {
        ck_assert_msg(together[i].answer, "client %d failed in the batch", i);
        if (strcmp(alone[i].answer, together[i].answer))
            fprintf(stderr, "client %d alone:    %s\nclient %d together: %s\n", i, alone[i].answer, i, together[i].answer);
        ck_assert_msg(!strcmp(alone[i].answer, together[i].answer), "client %d: batch changed the answer", i);
        free(alone[i].answer);
        free(together[i].answer);
    }
    pthread_barrier_destroy(&bar);
    /* They did share steps: one at a time would take at least max_tokens steps each. */
    ck_assert(metric(s.port, "moeserve_steps_total", NULL, NULL) - steps0 < max_tokens_sum);
    server_stop(&s);
}
END_TEST

/* n clients sending body at once each get the answer one client gets alone. */
static void concurrent_equal_alone(int port, const char *body, int n)
{
    client alone = {port, body, NULL, NULL}, c[8];
    pthread_t th[8];
    ck_assert_int_le(n, 8);
    client_main(&alone);
    ck_assert(alone.answer);
    for (int i = 0; i < n; i++) {
        c[i] = (client){port, body, NULL, NULL};
        pthread_create(&th[i], NULL, client_main, &c[i]);
    }
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(c[i].answer && !strcmp(c[i].answer, alone.answer), "client %d", i);
        free(c[i].answer);
    }
    free(alone.answer);
}

START_TEST(kv_admission_waits_for_blocks)
{
    server s;
    /* 64 positions of KV: each request below reserves 3 blocks of 16, so only one
     * runs at a time and the others wait for its blocks, yet all complete alike. */
    server_start(&s, (const char *[]){"--model", g_model_a, "--kv-cache-tokens", "64", NULL});
    const char *body = "{\"prompt\":\"blocks please\",\"max_tokens\":30,\"logits\":\"last\"}";
    concurrent_equal_alone(s.port, body, 4);
    ck_assert(metric(s.port, "moeserve_kv_cache_blocks_capacity", NULL, NULL) == 4);
    ck_assert(metric(s.port, "moeserve_kv_cache_blocks_used", NULL, NULL) == 0);
    /* A request that could never fit the pool is refused up front. */
    http_resp r;
    http(s.port, "POST", "/infer", NULL, "{\"prompt\":\"x\",\"max_tokens\":100}", &r);
    expect_error(&r, 413, "kv-cache");
    http_resp_free(&r);
    server_stop(&s);
}
END_TEST

/* --kv-type f16 (here from the environment): the same --kv-cache-mb holds twice
 * the positions, the load line says f16, and concurrent requests still get
 * what each gets alone. */
START_TEST(kv_f16_holds_twice_the_positions)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--kv-cache-mb", "2", NULL});
    double b32 = metric(s.port, "moeserve_kv_cache_blocks_capacity", NULL, NULL);
    double bytes32 = metric(s.port, "moeserve_kv_cache_size_bytes", NULL, NULL);
    server_stop(&s);
    ck_assert_msg(log_has(&s, "positions, f32)"), "log %s", s.log);
    server_start_env(&s, (const char *[]){"MOESERVE_KV_TYPE=f16", NULL}, 1,
                     (const char *[]){"--model", g_model_a, "--kv-cache-mb", "2", NULL});
    double b16 = metric(s.port, "moeserve_kv_cache_blocks_capacity", NULL, NULL);
    double bytes16 = metric(s.port, "moeserve_kv_cache_size_bytes", NULL, NULL);
    ck_assert_msg(b16 == 2 * b32 || b16 == 2 * b32 - 1, "f32 %g blocks, f16 %g", b32, b16);
    ck_assert_msg(fabs(bytes16 - bytes32) <= bytes32 / b32, "f32 %g bytes, f16 %g", bytes32, bytes16);
    const char *body = "{\"prompt\":\"half the bytes\",\"max_tokens\":12,\"logits\":\"last\"}";
    concurrent_equal_alone(s.port, body, 3);
    server_stop(&s);
    ck_assert_msg(log_has(&s, "positions, f16)"), "log %s", s.log);
}
END_TEST

/* The ready line names the kernel set OpenBLAS runs and says when the engine
 * does not use it: Prescott (what OpenBLAS falls back to on a CPU it does not
 * know, forced here through OPENBLAS_CORETYPE, which it reads when it loads)
 * against Haswell. The answers are the same to the bit either way: the default
 * steps stay below any switch. */
START_TEST(ready_line_names_the_blas_kernels)
{
    static const char *sets[] = {"Prescott", "Haswell"};
    const char *body = "{\"prompt\":\"which kernels\",\"max_tokens\":10,\"logits\":\"last\"}";
    char *answer[2];
    for (int i = 0; i < 2; i++) {
        char env[64], want[96];
        snprintf(env, sizeof env, "OPENBLAS_CORETYPE=%s", sets[i]);
        server s;
        server_start_env(&s, (const char *[]){env, NULL}, 1, (const char *[]){"--model", g_model_a, NULL});
        client c = {s.port, body, NULL, NULL};
        client_main(&c);
        answer[i] = c.answer;
        ck_assert_msg(answer[i], "no answer with %s", sets[i]);
        server_stop(&s);
        int unused = matmul_sgemm_rows_for(sets[i]) == MATMUL_SGEMM_NEVER;
        snprintf(want, sizeof want, "(matmul: OpenBLAS %s kernels%s", sets[i], unused ? ", not used" : ")");
        ck_assert_msg(log_has(&s, want), "'%s' in log %s", want, s.log);
    }
#if defined(__AVX2__) && defined(__FMA__)
    ck_assert_int_eq(matmul_sgemm_rows_for("Prescott"), MATMUL_SGEMM_NEVER);   /* a vector build */
#endif
    ck_assert_str_eq(answer[0], answer[1]);
    free(answer[0]);
    free(answer[1]);
}
END_TEST

/* A long request: 64 prompts of 400 tokens each, one sequence at a time. */
static const char *long_body(void)
{
    static char b[4096];
    int n = sprintf(b, "{\"max_tokens\":400,\"prompts\":[");
    for (int i = 0; i < 64; i++) n += sprintf(b + n, "%s\"story %d\"", i ? "," : "", i);
    sprintf(b + n, "]}");
    return b;
}

START_TEST(disconnect_frees_the_sequence)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-seqs", "1", NULL});
    int fd = http_send(s.port, "POST", "/infer", NULL, long_body());
    ck_assert_int_ge(fd, 0);
    WAIT_FOR(metric(s.port, "moeserve_generated_tokens_total", NULL, NULL) > 0, "generation to start");
    close(fd);
    WAIT_FOR(metric(s.port, "moeserve_sequences_finished_total", "reason=\"cancelled\"", NULL) >= 1,
             "the cancelled sequences");
    WAIT_FOR(metric(s.port, "moeserve_running_sequences", NULL, NULL) == 0 &&
             metric(s.port, "moeserve_queue_depth", NULL, NULL) == 0, "the batch to empty");
    ck_assert(metric(s.port, "moeserve_kv_cache_blocks_used", NULL, NULL) == 0);
    ck_assert(metric(s.port, "moeserve_sequences_finished_total", "reason=\"length\"", NULL) < 64);
    /* The server is fine afterwards. */
    json_decref(infer_ok(s.port, "{\"prompt\":\"hi\",\"max_tokens\":2}"));
    server_stop(&s);
}
END_TEST

START_TEST(overload_and_deadline)
{
    server s;
    /* --max-queue 0: nothing may wait, so every request is refused at once. */
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-queue", "0", NULL});
    http_resp r;
    char v[32];
    http(s.port, "POST", "/infer", NULL, "{\"prompt\":\"hi\"}", &r);
    expect_error(&r, 503, "queue");
    ck_assert(header(&r, "Retry-After", v, sizeof v) && atoi(v) > 0);
    http_resp_free(&r);
    server_stop(&s);

    /* A queue of 16 already busy with a 64-prompt request refuses another 16. */
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-seqs", "1", "--max-queue", "70", NULL});
    int fd = http_send(s.port, "POST", "/infer", NULL, long_body());
    WAIT_FOR(metric(s.port, "moeserve_queue_depth", NULL, NULL) >= 8, "the queue to fill");
    http(s.port, "POST", "/infer", NULL, long_body(), &r);
    expect_error(&r, 503, "max-queue");
    ck_assert(header(&r, "Retry-After", v, sizeof v));
    http_resp_free(&r);
    close(fd);
    server_stop(&s);

    /* A deadline far shorter than the work: 504. */
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-seqs", "1", "--request-timeout", "0.05", NULL});
    http(s.port, "POST", "/infer", NULL, long_body(), &r);
    expect_error(&r, 504, "request-timeout");
    http_resp_free(&r);
    WAIT_FOR(metric(s.port, "moeserve_kv_cache_blocks_used", NULL, NULL) == 0, "KV blocks to return");
    server_stop(&s);
}
END_TEST

/* Auth ------------------------------------------------------------------------------ */

START_TEST(auth_on_and_off)
{
    server s;
    server_start_env(&s, (const char *[]){"MOESERVE_API_KEY=s3cret", NULL}, 1,
                     (const char *[]){"--model", g_model_a, NULL});
    http_resp r;
    http(s.port, "POST", "/infer", NULL, "{\"prompt\":\"hi\",\"max_tokens\":1}", &r);
    expect_error(&r, 401, "Authorization");
    http_resp_free(&r);
    http(s.port, "POST", "/infer", "Authorization: Bearer wrong\r\n", "{\"prompt\":\"hi\",\"max_tokens\":1}", &r);
    expect_error(&r, 401, NULL);
    http_resp_free(&r);
    http(s.port, "POST", "/infer", "Authorization: Bearer s3cret\r\n", "{\"prompt\":\"hi\",\"max_tokens\":1}", &r);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    http(s.port, "GET", "/metrics", NULL, NULL, &r);
    expect_error(&r, 401, NULL);
    http_resp_free(&r);
    ck_assert_int_eq(http_status(s.port, "GET", "/health"), 200);
    ck_assert_int_eq(http_status(s.port, "GET", "/ready"), 200);
    server_stop(&s);
    /* The flag wins over the environment. */
    server_start_env(&s, (const char *[]){"MOESERVE_API_KEY=s3cret", NULL}, 1,
                     (const char *[]){"--model", g_model_a, "--api-key", "other", NULL});
    http(s.port, "POST", "/infer", "Authorization: Bearer other\r\n", "{\"prompt\":\"hi\",\"max_tokens\":1}", &r);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    server_stop(&s);
}
END_TEST

/* Several models -------------------------------------------------------------------- */

START_TEST(two_models)
{
    char spec_b[200];
    snprintf(spec_b, sizeof spec_b, "second=%s", g_model_b);
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--model", spec_b, NULL});
    http_resp r;
    http(s.port, "GET", "/models", NULL, NULL, &r);
    json_t *j = parse_json(&r);
    json_t *ms = json_object_get(j, "models");
    ck_assert_int_eq(json_array_size(ms), 2);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(ms, 1), "name")), "second");
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(ms, 1), "architecture")), "qwen3moe");
    json_decref(j);
    http_resp_free(&r);
    json_t *a = infer_ok(s.port, "{\"prompt\":\"hello\",\"max_tokens\":5,\"logits\":\"last\"}");
    json_t *b = infer_ok(s.port, "{\"prompt\":\"hello\",\"max_tokens\":5,\"logits\":\"last\",\"model\":\"second\"}");
    ck_assert_str_eq(json_string_value(json_object_get(b, "model")), "second");
    ck_assert(!json_equal(json_object_get(a, "logits"), json_object_get(b, "logits")));
    json_decref(a);
    json_decref(b);
    ck_assert(metric(s.port, "moeserve_expert_tokens_total", "model=\"second\"", NULL) > 0);
    server_stop(&s);
}
END_TEST

/* Drain ------------------------------------------------------------------------------- */

typedef struct {
    int port, status, complete;
    char retry[16];
} drain_client;

static void *drain_client_main(void *arg)
{
    drain_client *c = arg;
    http_resp r;
    http(c->port, "POST", "/infer", NULL, "{\"prompt\":\"drain me\",\"max_tokens\":200}", &r);
    c->status = r.status;
    if (r.status == 200) {
        json_error_t e;
        json_t *j = json_loadb(r.body, r.len, 0, &e);
        const char *fin = j ? json_string_value(json_object_get(j, "finish_reason")) : NULL;
        c->complete = fin && (!strcmp(fin, "length") || !strcmp(fin, "eos") || !strcmp(fin, "stop"));
        json_decref(j);
    }
    if (!header(&r, "Retry-After", c->retry, sizeof c->retry)) c->retry[0] = 0;
    http_resp_free(&r);
    return NULL;
}

static void drain_run(const char *timeout, int n, int *n_ok, int *n_503)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--max-seqs", "2", "--drain-delay", "0.5",
                                      "--drain-timeout", timeout, NULL});
    drain_client c[16];
    pthread_t th[16];
    for (int i = 0; i < n; i++) {
        c[i] = (drain_client){.port = s.port};
        pthread_create(&th[i], NULL, drain_client_main, &c[i]);
    }
    WAIT_FOR(metric(s.port, "moeserve_running_sequences", NULL, NULL) +
             metric(s.port, "moeserve_queue_depth", NULL, NULL) +
             metric(s.port, "moeserve_sequences_finished_total", NULL, NULL) >= n, "all requests to arrive");
    kill(s.pid, SIGTERM);
    /* Readiness flips at once; liveness stays (unless the drain already ended). */
    int st;
    WAIT_FOR((st = http_status(s.port, "GET", "/ready")) == 503 || st == -1, "ready to turn 503");
    if (st == 503) ck_assert_int_ne(http_status(s.port, "GET", "/health"), 503);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    ck_assert_int_eq(server_wait(&s), 0);
    *n_ok = *n_503 = 0;
    for (int i = 0; i < n; i++) {
        ck_assert_msg(c[i].status == 200 || c[i].status == 503, "client %d got %d", i, c[i].status);
        if (c[i].status == 200) { ck_assert(c[i].complete); (*n_ok)++; }
        else { ck_assert_msg(c[i].retry[0], "503 without Retry-After"); (*n_503)++; }
    }
    /* After the drain the port is closed. */
    ck_assert_int_lt(connect_port(s.port), 0);
}

START_TEST(sigterm_drains_in_flight_work)
{
    int ok, unavailable;
    drain_run("60", 6, &ok, &unavailable);   /* plenty of time: all complete */
    ck_assert_int_eq(ok, 6);
    drain_run("0", 12, &ok, &unavailable);   /* no time: none lost, the rest 503 */
    ck_assert_int_eq(ok + unavailable, 12);
}
END_TEST

START_TEST(second_signal_exits_at_once)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--drain-delay", "100", NULL});
    kill(s.pid, SIGTERM);
    WAIT_FOR(http_status(s.port, "GET", "/ready") == 503, "ready to turn 503");
    kill(s.pid, SIGINT);
    ck_assert_int_ne(server_wait(&s), -1);  /* it exited (by itself) well before the 100 s delay */
}
END_TEST

/* Hostile input ------------------------------------------------------------------------ */

START_TEST(hostile_bodies_get_4xx)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    char *deep = malloc(200001);
    for (int i = 0; i < 100000; i++) { deep[i] = '['; deep[100000 + i] = ']'; }
    deep[200000] = 0;
    const char *bodies[] = {
        deep, "", "null", "\"x\"", "{\"prompt\":\"a\\u0000b\",\"max_tokens\":1,\"stop\":[\"\\u0000\"]}",
        "{\"tokens\":[1e400]}", "{\"tokens\":[99999999999999999999]}", "{\"prompt\":\"hi\",\"prompt\":\"ho\"}",
        "{\"prompts\":[]}", "{\"prompts\":[1,2]}", "{\"prompts\":[[]]}", "{\"prompt\":\"\\ud800\"}",
        "{\"max_tokens\":1.5,\"prompt\":\"x\"}", "{\"temperature\":1e309,\"prompt\":\"x\"}",
        "\xff\xfe{\"prompt\":1}", "{\"prompt\":\"x\",\"logits\":\"all\",\"top_logprobs\":-1}",
    };
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        http_resp r;
        http(s.port, "POST", "/infer", NULL, bodies[i], &r);
        ck_assert_msg(r.status >= 400 && r.status < 500, "body %zu -> %d %.200s", i, r.status, r.body ? r.body : "");
        json_decref(parse_json(&r));
        http_resp_free(&r);
    }
    free(deep);
    /* The server still serves. */
    json_decref(infer_ok(s.port, "{\"prompt\":\"a b\",\"max_tokens\":1}"));
    ck_assert_int_eq(http_status(s.port, "GET", "/health"), 200);
    server_stop(&s);
}
END_TEST

/* In-process: flags and environment, UTF-8 cleaning -------------------------------------- */

START_TEST(config_flags_and_environment)
{
    server_config c;
    char err[256];
    setenv("MOESERVE_PORT", "9000", 1);
    setenv("MOESERVE_MODEL", "x=/m/one.gguf,/m/two.gguf", 1);
    setenv("MOESERVE_QUIET", "1", 1);
    server_config_default(&c);
    char *argv1[] = {"moeserve", "--port", "9001", NULL};
    ck_assert_int_eq(server_config_parse(&c, 3, argv1, err, sizeof err), 0);
    ck_assert_int_eq(c.port, 9001);                 /* the flag wins */
    ck_assert_int_eq(c.n_models, 2);                /* the variable lists several */
    ck_assert_str_eq(c.models[0].name, "x");
    ck_assert_str_eq(c.models[1].name, "two");      /* file stem */
    ck_assert_int_eq(c.quiet, 1);
    server_config_free(&c);
    /* Models on the command line replace those of the environment. */
    server_config_default(&c);
    char *argv2[] = {"moeserve", "--model=/a/b.c.gguf", "--log-format", "json", "--request-timeout", "2.5", NULL};
    ck_assert_int_eq(server_config_parse(&c, 6, argv2, err, sizeof err), 0);
    ck_assert_int_eq(c.n_models, 1);
    ck_assert_str_eq(c.models[0].name, "b.c");
    ck_assert_int_eq(c.log_fmt, LOG_JSON);
    ck_assert(c.request_timeout == 2.5);
    server_config_free(&c);
    unsetenv("MOESERVE_MODEL");
    unsetenv("MOESERVE_QUIET");
    const char *bad[][4] = {{"moeserve", "--model", "a=x", "--model"}, {"moeserve", "--model", "a=x", "--port=70000"},
                            {"moeserve", "--model", "a b=x", NULL}, {"moeserve", "--model", "a=x", "--log-format=xml"}};
    for (int i = 0; i < 4; i++) {
        server_config_default(&c);
        int n = bad[i][3] ? 4 : 3;
        ck_assert_int_eq(server_config_parse(&c, n, (char **)bad[i], err, sizeof err), -1);
        ck_assert(*err);
        server_config_free(&c);
    }
    setenv("MOESERVE_PORT", "eighty", 1);
    server_config_default(&c);
    char *argv3[] = {"moeserve", "--model", "m.gguf", NULL};
    ck_assert_int_eq(server_config_parse(&c, 3, argv3, err, sizeof err), -1);
    ck_assert(strstr(err, "port"));
    server_config_free(&c);
    unsetenv("MOESERVE_PORT");
    char *argv4[] = {"moeserve", "--model", "m.gguf", "--weights", "copy", NULL};
    server_config_default(&c);
    ck_assert_int_eq(c.weights, GGUF_LOAD_AUTO);
    ck_assert_int_eq(server_config_parse(&c, 5, argv4, err, sizeof err), 0);
    ck_assert_int_eq(c.weights, GGUF_LOAD_COPY);
    server_config_free(&c);
    argv4[4] = "mmap";
    server_config_default(&c);
    ck_assert_int_eq(server_config_parse(&c, 5, argv4, err, sizeof err), 0);
    ck_assert_int_eq(c.weights, GGUF_LOAD_MMAP);
    server_config_free(&c);
    char *argv5[] = {"moeserve", "--model", "m.gguf", "--no-packed-projections", NULL};
    server_config_default(&c);
    ck_assert_int_eq(c.no_packed_projections, 0);
    ck_assert_int_eq(server_config_parse(&c, 4, argv5, err, sizeof err), 0);
    ck_assert_int_eq(c.no_packed_projections, 1);
    server_config_free(&c);
    argv4[4] = "heap";
    server_config_default(&c);
    ck_assert_int_eq(server_config_parse(&c, 5, argv4, err, sizeof err), -1);
    ck_assert(strstr(err, "auto, mmap or copy"));
    server_config_free(&c);
    char *argv6[] = {"moeserve", "--model", "m.gguf", "--projections", "file", NULL};
    server_config_default(&c);
    ck_assert_int_eq(c.projections, MOE_PROJ_AUTO);
    ck_assert_int_eq(server_config_parse(&c, 5, argv6, err, sizeof err), 0);
    ck_assert_int_eq(c.projections, MOE_PROJ_FILE);
    server_config_free(&c);
    argv6[4] = "f16";
    server_config_default(&c);
    ck_assert_int_eq(server_config_parse(&c, 5, argv6, err, sizeof err), -1);
    ck_assert(strstr(err, "auto, f32 or file"));
    server_config_free(&c);
    char *argv7[] = {"moeserve", "--model", "m.gguf", "--kv-type", "f16", NULL};
    server_config_default(&c);
    ck_assert_int_eq(c.kv_type, KV_F32);
    ck_assert_int_eq(server_config_parse(&c, 5, argv7, err, sizeof err), 0);
    ck_assert_int_eq(c.kv_type, KV_F16);
    server_config_free(&c);
    argv7[4] = "q8_0";
    server_config_default(&c);
    ck_assert_int_eq(server_config_parse(&c, 5, argv7, err, sizeof err), -1);
    ck_assert(strstr(err, "f32 or f16"));
    server_config_free(&c);
}
END_TEST

/* A quantized model served with its projections read only in the file's type
 * (--projections file) answers as with their F32 copies, and the load line
 * says which it did. */
START_TEST(projections_in_the_file_type_serve_the_same)
{
    char path[128];
    snprintf(path, sizeof path, "%s/q8.gguf", g_dir);
    synth_params p = {.arch = "qwen2moe", .preset = "tiny", .seed = 4, .wtype = GGML_TYPE_Q8_0};
    char err[256];
    ck_assert_msg(synth_write(&p, path, err, sizeof err) == 0, "%s", err);
    const char *body = "{\"prompt\":\"the projections\",\"max_tokens\":8,\"logits\":\"all\",\"top_logprobs\":3}";
    server s;
    server_start(&s, (const char *[]){"--model", path, "--projections", "f32", NULL});
    json_t *a = infer_ok(s.port, body);
    server_stop(&s);
    ck_assert_msg(!log_has(&s, "projections read in the file's type"), "log %s", s.log);
    server_start(&s, (const char *[]){"--model", path, "--projections", "file", NULL});
    json_t *b = infer_ok(s.port, body);
    server_stop(&s);
    ck_assert_msg(log_has(&s, "projections read in the file's type"), "log %s", s.log);
    ck_assert(json_equal(json_object_get(a, "tokens"), json_object_get(b, "tokens")));
    ck_assert(json_equal(json_object_get(a, "logits"), json_object_get(b, "logits")));
    json_decref(a);
    json_decref(b);
    unlink(path);
}
END_TEST

/* --weights copy (here from the environment) serves the same answers as the
 * default mapping, and says so at load. */
START_TEST(weights_copy_serves_the_same)
{
    const char *body = "{\"prompt\":\"weights\",\"max_tokens\":8,\"logits\":\"last\",\"top_logprobs\":3}";
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    json_t *a = infer_ok(s.port, body);
    server_stop(&s);
    server_start_env(&s, (const char *[]){"MOESERVE_WEIGHTS=copy", NULL}, 1, (const char *[]){"--model", g_model_a, NULL});
    json_t *b = infer_ok(s.port, body);
    server_stop(&s);
    ck_assert(json_equal(json_object_get(a, "tokens"), json_object_get(b, "tokens")));
    ck_assert(json_equal(json_object_get(a, "logits"), json_object_get(b, "logits")));
    json_decref(a);
    json_decref(b);
    ck_assert_msg(log_has(&s, "weights copied into huge pages"), "the load line says the weights were copied (log %s)",
                  s.log);
}
END_TEST

/* The weights of a mapped model are read in before /ready says 200, and the log
 * says so; --no-preload skips it; a copy (already in memory) needs no read. */
START_TEST(weights_read_in_before_ready)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, NULL});
    ck_assert_int_eq(http_status(s.port, "GET", "/ready"), 200);
    server_stop(&s);
    ck_assert_msg(log_has(&s, "of weights read in before ready"), "log %s", s.log);
    server_start(&s, (const char *[]){"--model", g_model_a, "--no-preload", NULL});
    ck_assert_int_eq(http_status(s.port, "GET", "/ready"), 200);
    server_stop(&s);
    ck_assert_msg(!log_has(&s, "read in before ready"), "log %s", s.log);
    server_start(&s, (const char *[]){"--model", g_model_a, "--weights", "copy", NULL});
    server_stop(&s);
    ck_assert_msg(!log_has(&s, "read in before ready"), "log %s", s.log);
}
END_TEST

START_TEST(utf8_cleaning)
{
    size_t n;
    char *s = api_utf8_clean("a\xff\xc3\xa9\xe2\x82", 6, &n);
    ck_assert_str_eq(s, "a\xef\xbf\xbd\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd");
    ck_assert_int_eq(n, strlen(s));
    free(s);
    s = api_utf8_clean("\xed\xa0\x80\xc0\xaf", 5, &n);  /* surrogate, overlong */
    for (size_t i = 0; i < n; i += 3) ck_assert(!memcmp(s + i, "\xef\xbf\xbd", 3));
    free(s);
}
END_TEST

/* Metrics and logs ---------------------------------------------------------------------- */

START_TEST(metrics_pass_promtool_and_logs_are_json)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_model_a, "--log-format", "json", NULL});
    json_decref(infer_ok(s.port, "{\"prompt\":\"metrics please\",\"max_tokens\":4}"));
    http_resp r;
    http(s.port, "POST", "/infer", NULL, "{\"prompt\":1}", &r);
    http_resp_free(&r);
    http(s.port, "GET", "/metrics", NULL, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    const char *names[] = {"moeserve_requests_total{endpoint=\"/infer\",code=\"200\"} 1",
                           "moeserve_request_duration_seconds_bucket", "moeserve_queue_wait_seconds_bucket",
                           "moeserve_time_to_first_token_seconds_bucket", "moeserve_time_per_output_token_seconds_bucket",
                           "moeserve_forward_seconds_bucket", "moeserve_batch_tokens_bucket", "moeserve_queue_depth",
                           "moeserve_running_sequences", "moeserve_kv_cache_usage_ratio", "moeserve_prompt_tokens_total",
                           "moeserve_generated_tokens_total", "moeserve_expert_tokens_total{model=\"a\",layer=\"1\",expert=\"7\"}",
                           "moeserve_expert_dropped_tokens_total"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        ck_assert_msg(strstr(r.body, names[i]), "/metrics lacks %s", names[i]);
    ck_assert(metric(s.port, "moeserve_expert_tokens_total", NULL, NULL) > 0);
    /* the phases of the forwards: experts ran, and all of them add up to no more
     * than the forwards' time the scheduler measured around the same calls */
    ck_assert(metric(s.port, "moeserve_forward_phase_seconds_total", "phase=\"experts\"", NULL) > 0);
    double phases = metric(s.port, "moeserve_forward_phase_seconds_total", "model=\"a\"", NULL);
    double forwards = metric(s.port, "moeserve_forward_seconds_sum", "model=\"a\"", NULL);
    ck_assert_msg(phases > 0 && phases <= forwards, "phases %g s, forwards %g s", phases, forwards);
    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        printf("promtool absent (Debian package prometheus): skipping the promtool check\n");
    } else {
        char path[200], cmd[300];
        snprintf(path, sizeof path, "%s/metrics-%d.txt", g_dir, (int)getpid());
        FILE *f = fopen(path, "w");
        fwrite(r.body, 1, r.len, f);
        fclose(f);
        snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
        ck_assert_msg(system(cmd) == 0, "promtool check metrics failed on %s", path);
        unlink(path);
    }
    http_resp_free(&r);
    server_stop(&s);
    /* One JSON object per line; the request lines carry id, status and tokens. */
    FILE *f = fopen(s.log, "r");
    char line[4096];
    int n_req = 0;
    while (fgets(line, sizeof line, f)) {
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        ck_assert_msg(j, "log line is not JSON: %s", line);
        if (json_object_get(j, "status")) {
            n_req++;
            ck_assert(json_is_string(json_object_get(j, "id")));
            ck_assert(json_is_integer(json_object_get(j, "completion_tokens")));
        }
        json_decref(j);
    }
    fclose(f);
    ck_assert_int_ge(n_req, 2);
    unlink(s.log);
}
END_TEST

static int want(const char *only, const char *name) { return !only || !strcmp(only, name); }

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "%s", tu_tmpdir());
    snprintf(g_model_a, sizeof g_model_a, "%s/a.gguf", g_dir);
    snprintf(g_model_b, sizeof g_model_b, "%s/b.gguf", g_dir);
    char err[256];
    synth_params pa = {.arch = "olmoe", .preset = "tiny", .seed = 1}, pb = {.arch = "qwen3moe", .preset = "tiny", .seed = 2};
    if (synth_write(&pa, g_model_a, err, sizeof err) || synth_write(&pb, g_model_b, err, sizeof err)) {
        fprintf(stderr, "synth_write: %s\n", err);
        return EXIT_FAILURE;
    }
    Suite *s = suite_create("server");
    TCase *tc = tcase_create("http");
    tcase_set_timeout(tc, 600);
    /* SERVER_TEST=name runs one test (while debugging). */
    const char *only = getenv("SERVER_TEST");
    if (want(only, "health_ready_models_and_paths")) tcase_add_test(tc, health_ready_models_and_paths);
    if (want(only, "ready_503_while_loading")) tcase_add_test(tc, ready_503_while_loading);
    if (want(only, "help_and_bad_flags")) tcase_add_test(tc, help_and_bad_flags);
    if (want(only, "infer_outputs")) tcase_add_test(tc, infer_outputs);
    if (want(only, "request_errors")) tcase_add_test(tc, request_errors);
    if (want(only, "batching_gives_the_same_answers")) tcase_add_test(tc, batching_gives_the_same_answers);
    if (want(only, "kv_admission_waits_for_blocks")) tcase_add_test(tc, kv_admission_waits_for_blocks);
    if (want(only, "kv_f16_holds_twice_the_positions")) tcase_add_test(tc, kv_f16_holds_twice_the_positions);
    if (want(only, "ready_line_names_the_blas_kernels")) tcase_add_test(tc, ready_line_names_the_blas_kernels);
    if (want(only, "disconnect_frees_the_sequence")) tcase_add_test(tc, disconnect_frees_the_sequence);
    if (want(only, "overload_and_deadline")) tcase_add_test(tc, overload_and_deadline);
    if (want(only, "auth_on_and_off")) tcase_add_test(tc, auth_on_and_off);
    if (want(only, "two_models")) tcase_add_test(tc, two_models);
    if (want(only, "sigterm_drains_in_flight_work")) tcase_add_test(tc, sigterm_drains_in_flight_work);
    if (want(only, "second_signal_exits_at_once")) tcase_add_test(tc, second_signal_exits_at_once);
    if (want(only, "hostile_bodies_get_4xx")) tcase_add_test(tc, hostile_bodies_get_4xx);
    if (want(only, "config_flags_and_environment")) tcase_add_test(tc, config_flags_and_environment);
    if (want(only, "weights_copy_serves_the_same")) tcase_add_test(tc, weights_copy_serves_the_same);
    if (want(only, "projections_in_the_file_type_serve_the_same"))
        tcase_add_test(tc, projections_in_the_file_type_serve_the_same);
    if (want(only, "weights_read_in_before_ready")) tcase_add_test(tc, weights_read_in_before_ready);
    if (want(only, "utf8_cleaning")) tcase_add_test(tc, utf8_cleaning);
    if (want(only, "metrics_pass_promtool_and_logs_are_json")) tcase_add_test(tc, metrics_pass_promtool_and_logs_are_json);
    suite_add_tcase(s, tc);
    int rc = tu_run_suite(s);
    unlink(g_model_a);
    unlink(g_model_b);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (!getenv("SERVER_KEEP") && system(cmd)) {}
    return rc;
}
