/* test_server_ensemble.c -- ensembles and label scoring through the real
 * build/moeserve: every method against a calculation done here from the members'
 * own single-model logits, one member and copies of one model equal that model,
 * vote ties, label scores against per-token log-probabilities, and the 400s.
 *
 * Models: tiny synthetic llamas of one vocabulary (seeds 1, 2, and a copy of the
 * first under another name) and, when ../shared has a vocabulary file, one with a
 * different vocabulary.
 */
#define _GNU_SOURCE
#include <math.h>

static char g_dir[64];
#define DEADLINE_S 120.0
#include "models/synth.h"
#include "tests/server_util.h"

static char g_a[128], g_a2[128], g_b[128], g_c[128], g_sa[128], g_sb[128];
static int g_have_c;
static server g_srv;
static int g_started;

#define V_MAX 40000
#define PROMPT "[286,75,75,78,300,12]"
#define N_PROMPT 6

/* One server for the whole suite (started by the first test that needs it). */
static int port(void)
{
    if (!g_started) {
        if (g_have_c)
            server_start(&g_srv, (const char *[]){"--model", g_a, "--model", g_b, "--model", g_c, "--model", g_a2,
                                                 NULL});
        else
            server_start(&g_srv, (const char *[]){"--model", g_a, "--model", g_b, "--model", g_a2, NULL});
        g_started = 1;
    }
    return g_srv.port;
}

static json_t *post(const char *fmt, ...)
{
    char body[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    return infer_ok(port(), body);
}

static void post_error(int status, const char *want, const char *body)
{
    http_resp r;
    http(port(), "POST", "/infer", NULL, body, &r);
    expect_error(&r, status, want);
    http_resp_free(&r);
}

/* log softmax of model's logits after tokens (prompt ids then extra ids), in double. */
static int member_logp(const char *model, const int32_t *extra, int n_extra, double *lp)
{
    char body[4096];
    int n = snprintf(body, sizeof body, "{\"model\":\"%s\",\"tokens\":[286,75,75,78,300,12", model);
    for (int i = 0; i < n_extra; i++) n += snprintf(body + n, sizeof body - (size_t)n, ",%d", extra[i]);
    snprintf(body + n, sizeof body - (size_t)n, "],\"max_tokens\":0,\"full_logits\":true}");
    json_t *j = infer_ok(port(), body);
    json_t *row = json_object_get(j, "full_logits");
    int V = (int)json_array_size(row);
    ck_assert(V > 0 && V <= V_MAX);
    double mx = -INFINITY, z = 0;
    for (int t = 0; t < V; t++) {
        lp[t] = json_number_value(json_array_get(row, (size_t)t));
        if (lp[t] > mx) mx = lp[t];
    }
    for (int t = 0; t < V; t++) z += exp(lp[t] - mx);
    for (int t = 0; t < V; t++) lp[t] -= mx + log(z);
    json_decref(j);
    return V;
}

static int argmax(const double *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

static void tokens_of(json_t *j, int32_t *out, int *n)
{
    json_t *t = json_object_get(j, "tokens");
    *n = (int)json_array_size(t);
    for (int i = 0; i < *n; i++) out[i] = (int32_t)json_integer_value(json_array_get(t, (size_t)i));
}

/* Methods against the members' own distributions ------------------------------ */

static double lp_a[V_MAX], lp_b[V_MAX], comb[V_MAX];

/* Checks every generated position of an a+b ensemble: recomputes the members'
 * distributions from their own full logits after the same history, combines them
 * here and checks the chosen token, its probability, each member's vote and the
 * agreement. */
static void check_method(const char *method, double wa, double wb)
{
    json_t *j = post("{\"tokens\":" PROMPT ",\"max_tokens\":5,\"ensemble\":{\"members\":[{\"model\":\"a\",\"weight\":%g},"
                     "{\"model\":\"b\",\"weight\":%g}],\"method\":\"%s\"}}", wa, wb, method);
    int32_t gen[16];
    int n_gen;
    tokens_of(j, gen, &n_gen);
    json_t *votes = json_object_get(j, "votes");
    ck_assert(n_gen >= 1 && n_gen <= 5);  /* fewer when the end-of-generation token wins */
    ck_assert_int_eq((int)json_array_size(votes), n_gen);
    double w[2] = {wa / (wa + wb), wb / (wa + wb)};
    int overruled[2] = {0, 0};
    double agree_sum = 0;
    for (int s = 0; s < n_gen; s++) {
        int V = member_logp("a", gen, s, lp_a);
        ck_assert_int_eq(member_logp("b", gen, s, lp_b), V);
        int own[2] = {argmax(lp_a, V), argmax(lp_b, V)};
        int want;
        double want_prob;
        if (!strcmp(method, "mean_prob")) {
            for (int t = 0; t < V; t++) comb[t] = w[0] * exp(lp_a[t]) + w[1] * exp(lp_b[t]);
            want = argmax(comb, V);
            want_prob = comb[want];
        } else if (!strcmp(method, "mean_logprob")) {
            double mx = -INFINITY, z = 0;
            for (int t = 0; t < V; t++) {
                comb[t] = w[0] * lp_a[t] + w[1] * lp_b[t];
                if (comb[t] > mx) mx = comb[t];
            }
            for (int t = 0; t < V; t++) z += exp(comb[t] - mx);
            want = argmax(comb, V);
            want_prob = exp(comb[want] - mx) / z;
        } else {  /* vote: most weight, then summed probability, then lower id */
            double W[2], S[2];
            for (int i = 0; i < 2; i++) {
                W[i] = 0;
                for (int k = 0; k < 2; k++) W[i] += own[k] == own[i] ? w[k] : 0;
                S[i] = w[0] * exp(lp_a[own[i]]) + w[1] * exp(lp_b[own[i]]);
            }
            int win;
            if (fabs(W[0] - W[1]) > 1e-9) win = W[0] > W[1] ? 0 : 1;
            else if (fabs(S[0] - S[1]) > 1e-9 * fmax(S[0], S[1])) win = S[0] > S[1] ? 0 : 1;
            else win = own[0] < own[1] ? 0 : 1;
            want = own[win];
            want_prob = S[win];
        }
        json_t *v = json_array_get(votes, (size_t)s);
        ck_assert_msg(json_integer_value(json_object_get(v, "chosen")) == want && gen[s] == want,
                      "%s position %d: chose %d, the members' logits give %d", method, s, gen[s], want);
        ck_assert_msg(fabs(json_number_value(json_object_get(v, "prob")) - want_prob) < 1e-4 * (1 + want_prob),
                      "%s position %d: prob %g want %g", method, s, json_number_value(json_object_get(v, "prob")), want_prob);
        json_t *mem = json_object_get(v, "members");
        double agree = 0;
        for (int i = 0; i < 2; i++) {
            json_t *m = json_array_get(mem, (size_t)i);
            const double *lp = i ? lp_b : lp_a;
            ck_assert_str_eq(json_string_value(json_object_get(m, "model")), i ? "b" : "a");
            ck_assert_int_eq(json_integer_value(json_object_get(m, "token")), own[i]);
            ck_assert(fabs(json_number_value(json_object_get(m, "prob")) - exp(lp[want])) < 1e-4);
            ck_assert(fabs(json_number_value(json_object_get(m, "weight")) - w[i]) < 1e-6);
            if (own[i] == want) agree += w[i];
            else overruled[i]++;
        }
        ck_assert(fabs(json_number_value(json_object_get(v, "agreement")) - agree) < 1e-6);
        agree_sum += agree;
    }
    json_t *sum = json_object_get(j, "ensemble");
    ck_assert_str_eq(json_string_value(json_object_get(sum, "method")), method);
    ck_assert(fabs(json_number_value(json_object_get(sum, "mean_agreement")) - agree_sum / n_gen) < 1e-6);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(json_object_get(sum, "members"), (size_t)i),
                                                            "overruled")), overruled[i]);
    json_decref(j);
}

START_TEST(mean_prob_matches_members) { check_method("mean_prob", 0.7, 0.3); }
END_TEST
START_TEST(mean_logprob_matches_members) { check_method("mean_logprob", 0.6, 0.4); }
END_TEST
/* Equal weights: every disagreement is a weight tie, decided by summed probability. */
START_TEST(vote_matches_members_and_breaks_ties) { check_method("vote", 1, 1); }
END_TEST
START_TEST(vote_unequal_weights) { check_method("vote", 0.8, 0.2); }
END_TEST

/* One member, copies ------------------------------------------------------------ */

static void same_tokens(json_t *x, json_t *y, const char *what)
{
    int32_t a[64], b[64];
    int na, nb;
    tokens_of(x, a, &na);
    tokens_of(y, b, &nb);
    ck_assert_msg(na == nb && !memcmp(a, b, (size_t)na * sizeof *a), "%s: tokens differ", what);
    ck_assert_str_eq(json_string_value(json_object_get(x, "text")), json_string_value(json_object_get(y, "text")));
}

START_TEST(one_member_and_copies_equal_the_model)
{
    static const char *methods[] = {"mean_prob", "mean_logprob", "vote"};
    json_t *alone = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"model\":\"a\"}");
    json_t *sampled = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"model\":\"a\",\"temperature\":0.9,\"seed\":7}");
    for (int m = 0; m < 3; m++) {
        json_t *one = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"ensemble\":{\"members\":[{\"model\":\"a\"}],"
                           "\"method\":\"%s\"}}", methods[m]);
        same_tokens(one, alone, "one member");
        json_t *one_s = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"temperature\":0.9,\"seed\":7,\"ensemble\":"
                             "{\"members\":[{\"model\":\"a\"}],\"method\":\"%s\"}}", methods[m]);
        same_tokens(one_s, sampled, "one member, sampled");
        /* Two copies: the same model twice (one scheduler) and under another name (two). */
        json_t *twice = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"ensemble\":{\"members\":[{\"model\":\"a\","
                             "\"weight\":0.2},{\"model\":\"a\",\"weight\":0.8}],\"method\":\"%s\"}}", methods[m]);
        same_tokens(twice, alone, "a twice");
        json_t *copy = post("{\"tokens\":" PROMPT ",\"max_tokens\":8,\"ensemble\":{\"members\":[{\"model\":\"a\","
                            "\"weight\":3},{\"model\":\"%s\",\"weight\":1}],\"method\":\"%s\"}}",
                            "a2", methods[m]);
        same_tokens(copy, alone, "a and its copy");
        json_t *v = json_array_get(json_object_get(copy, "votes"), 0);
        ck_assert(fabs(json_number_value(json_object_get(v, "agreement")) - 1.0) < 1e-6);
        json_decref(one); json_decref(one_s); json_decref(twice); json_decref(copy);
    }
    /* "logits": "last": one member's combined entries are the model's own log-softmax. */
    json_t *la = post("{\"tokens\":" PROMPT ",\"max_tokens\":3,\"model\":\"a\",\"logits\":\"last\",\"top_logprobs\":5}");
    json_t *le = post("{\"tokens\":" PROMPT ",\"max_tokens\":3,\"logits\":\"last\",\"top_logprobs\":5,\"ensemble\":"
                      "{\"members\":[{\"model\":\"a\"}]}}");
    json_t *ta = json_object_get(json_array_get(json_object_get(la, "logits"), 0), "top");
    json_t *te = json_object_get(json_array_get(json_object_get(le, "logits"), 0), "top");
    json_t *tm = json_object_get(json_array_get(json_object_get(le, "member_logits"), 0), "top");
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(json_object_get(la, "logits"), 0), "pos")),
                     json_integer_value(json_object_get(json_array_get(json_object_get(le, "logits"), 0), "pos")));
    ck_assert_int_eq((int)json_array_size(te), 5);
    for (size_t k = 0; k < 5; k++) {
        json_t *x = json_array_get(ta, k), *y = json_array_get(te, k), *z = json_array_get(tm, k);
        ck_assert_int_eq(json_integer_value(json_object_get(x, "id")), json_integer_value(json_object_get(y, "id")));
        ck_assert_int_eq(json_integer_value(json_object_get(x, "id")), json_integer_value(json_object_get(z, "id")));
        double d = json_number_value(json_object_get(x, "logprob"));
        ck_assert(fabs(d - json_number_value(json_object_get(y, "logprob"))) < 1e-4);
        ck_assert(fabs(d - json_number_value(json_object_get(z, "logprob"))) < 1e-4);
    }
    json_decref(la); json_decref(le); json_decref(alone); json_decref(sampled);
}
END_TEST

/* Labels ---------------------------------------------------------------------------- */

/* A label's score is the sum of its tokens' log-probabilities after the prompt. */
static double label_score(const char *model, json_t *tokens)
{
    int32_t t[64];
    int n = (int)json_array_size(tokens);
    ck_assert(n > 0 && n <= 64);
    for (int k = 0; k < n; k++) t[k] = (int32_t)json_integer_value(json_array_get(tokens, (size_t)k));
    double s = 0;
    for (int k = 0; k < n; k++) {
        member_logp(model, t, k, lp_a);
        s += lp_a[t[k]];
    }
    return s;
}

START_TEST(labels_equal_summed_token_logprobs)
{
    static const char *methods[] = {"mean_prob", "mean_logprob", "vote"};
    const char *labels = "[\"yes\",\"no way\",\"maybe so\",\"x\"]";
    for (int m = 0; m < 3; m++) {
        json_t *j = post("{\"tokens\":" PROMPT ",\"labels\":%s,\"label_prefix\":\" \",\"ensemble\":{\"members\":"
                         "[{\"model\":\"a\",\"weight\":0.75},{\"model\":\"b\",\"weight\":0.25}],\"method\":\"%s\"}}",
                         labels, methods[m]);
        json_t *ls = json_object_get(j, "labels");
        ck_assert_int_eq((int)json_array_size(ls), 4);
        double s[2][4], q[2][4], w[2] = {0.75, 0.25};
        for (int l = 0; l < 4; l++) {
            json_t *e = json_array_get(ls, (size_t)l);
            for (int i = 0; i < 2; i++) {
                s[i][l] = m == 0 ? label_score(i ? "b" : "a", json_object_get(e, "tokens"))
                                 : json_number_value(json_array_get(json_object_get(e, "logprobs"), (size_t)i));
                double got = json_number_value(json_array_get(json_object_get(e, "logprobs"), (size_t)i));
                ck_assert_msg(fabs(got - s[i][l]) < 1e-3 * (1 + fabs(s[i][l])), "label %d member %d: %g vs %g", l, i, got, s[i][l]);
            }
        }
        /* Each member's softmax over the labels, then the method over the labels. */
        int pick[2];
        for (int i = 0; i < 2; i++) {
            double mx = -INFINITY, z = 0;
            for (int l = 0; l < 4; l++) mx = fmax(mx, s[i][l]);
            for (int l = 0; l < 4; l++) z += exp(s[i][l] - mx);
            for (int l = 0; l < 4; l++) q[i][l] = exp(s[i][l] - mx) / z;
            pick[i] = argmax(q[i], 4);
            json_t *mv = json_array_get(json_object_get(json_object_get(j, "votes"), "members"), (size_t)i);
            ck_assert_int_eq(json_integer_value(json_object_get(mv, "label_index")), pick[i]);
        }
        double P[4];
        if (m == 1) {
            double mx = -INFINITY, z = 0;
            for (int l = 0; l < 4; l++) mx = fmax(mx, w[0] * s[0][l] + w[1] * s[1][l]);
            for (int l = 0; l < 4; l++) z += exp(w[0] * s[0][l] + w[1] * s[1][l] - mx);
            for (int l = 0; l < 4; l++) P[l] = exp(w[0] * s[0][l] + w[1] * s[1][l] - mx) / z;
        } else {
            for (int l = 0; l < 4; l++) P[l] = w[0] * q[0][l] + w[1] * q[1][l];
        }
        int want = m == 2 ? pick[0] : argmax(P, 4);  /* vote: 0.75 outweighs 0.25 */
        ck_assert_int_eq(json_integer_value(json_object_get(j, "label_index")), want);
        ck_assert_str_eq(json_string_value(json_object_get(j, "label")),
                         json_string_value(json_object_get(json_array_get(ls, (size_t)want), "label")));
        for (int l = 0; l < 4; l++)
            ck_assert(fabs(json_number_value(json_array_get(json_object_get(j, "label_probs"), (size_t)l)) - P[l]) < 1e-4);
        json_decref(j);
    }
    /* One model, no ensemble: its own scores. */
    json_t *j = post("{\"tokens\":" PROMPT ",\"model\":\"b\",\"labels\":%s}", labels);
    json_t *ls = json_object_get(j, "labels");
    for (int l = 0; l < 4; l++) {
        json_t *e = json_array_get(ls, (size_t)l);
        double want = label_score("b", json_object_get(e, "tokens"));
        ck_assert(fabs(json_number_value(json_array_get(json_object_get(e, "logprobs"), 0)) - want) < 1e-3 * (1 + fabs(want)));
    }
    ck_assert_ptr_null(json_object_get(j, "ensemble"));
    json_decref(j);
}
END_TEST

/* Errors ---------------------------------------------------------------------------- */

START_TEST(bad_ensembles_get_400)
{
    port();
    post_error(400, "unknown model 'zz'", "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"zz\"}]}}");
    post_error(400, "finite number >= 0", "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\",\"weight\":-1},{\"model\":\"b\"}]}}");
    post_error(400, "all zero", "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\",\"weight\":0},{\"model\":\"b\",\"weight\":0}]}}");
    post_error(400, "method", "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\"}],\"method\":\"median\"}}");
    post_error(400, "members", "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[]}}");
    post_error(400, "either 'model' or 'ensemble'", "{\"prompt\":\"hi\",\"model\":\"a\",\"ensemble\":{\"members\":[{\"model\":\"a\"}]}}");
    post_error(400, "'labels' is empty", "{\"prompt\":\"hi\",\"labels\":[]}");
    post_error(400, "labels[0] and labels[2] are both", "{\"prompt\":\"hi\",\"labels\":[\"yes\",\"no\",\"yes\"]}");
    post_error(400, "label_prefix", "{\"prompt\":\"hi\",\"label_prefix\":\"x\"}");
    post_error(400, "one 'prompt'", "{\"prompts\":[\"hi\",\"ho\"],\"ensemble\":{\"members\":[{\"model\":\"a\"}]}}");
    post_error(400, "\"last\"", "{\"prompt\":\"hi\",\"logits\":\"all\",\"ensemble\":{\"members\":[{\"model\":\"a\"}]}}");
    if (g_have_c) {
        post_error(400, "'a' and 'c' do not share a vocabulary",
                   "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"c\"}]}}");
    } else {
        printf("../shared vocabulary absent: skipping the mismatched-vocabulary case\n");
    }
}
END_TEST

/* Concurrency ------------------------------------------------------------------- */

#define N_CONC 5
static const char *const conc_bodies[N_CONC] = {
    "{\"tokens\":" PROMPT ",\"max_tokens\":12,\"ensemble\":{\"members\":[{\"model\":\"a\",\"weight\":0.7},"
    "{\"model\":\"b\",\"weight\":0.3}],\"method\":\"mean_prob\"}}",
    "{\"tokens\":" PROMPT ",\"max_tokens\":9,\"ensemble\":{\"members\":[{\"model\":\"b\"},{\"model\":\"a\"},"
    "{\"model\":\"a2\"}],\"method\":\"vote\"}}",
    "{\"tokens\":" PROMPT ",\"labels\":[\"yes\",\"no way\",\"maybe so\"],\"ensemble\":{\"members\":[{\"model\":\"a\"},"
    "{\"model\":\"b\"}],\"method\":\"mean_logprob\"}}",
    "{\"tokens\":[5,6,7],\"max_tokens\":12,\"model\":\"a\"}",
    "{\"tokens\":[9,8],\"max_tokens\":7,\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"a\"},{\"model\":\"b\"}],"
    "\"method\":\"mean_logprob\"}}",
};

/* What must not depend on what else runs: tokens, votes, label scores. */
static char *answer_key(json_t *j)
{
    json_t *k = json_pack("{s:O*,s:O*,s:O*}", "tokens", json_object_get(j, "tokens"), "votes",
                          json_object_get(j, "votes"), "labels", json_object_get(j, "labels"));
    char *s = json_dumps(k, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(6));
    json_decref(k);
    return s;
}

/* Members of many requests park and resume across two schedulers at once; the
 * answers equal the ones each request gets alone. */
START_TEST(concurrent_requests_give_the_same_answers)
{
    int p = port();
    char *alone[N_CONC];
    for (int i = 0; i < N_CONC; i++) {
        json_t *j = infer_ok(p, conc_bodies[i]);
        alone[i] = answer_key(j);
        json_decref(j);
    }
    for (int round = 0; round < 2; round++) {
        int fd[2 * N_CONC];
        for (int i = 0; i < 2 * N_CONC; i++) {
            fd[i] = http_send(p, "POST", "/infer", NULL, conc_bodies[i % N_CONC]);
            ck_assert(fd[i] >= 0);
        }
        for (int i = 0; i < 2 * N_CONC; i++) {
            http_resp r;
            http_recv(fd[i], &r);
            ck_assert_msg(r.status == 200, "%d: %.300s", r.status, r.body ? r.body : "");
            json_t *j = parse_json(&r);
            char *k = answer_key(j);
            ck_assert_msg(!strcmp(k, alone[i % N_CONC]), "request %d differs when run with others", i % N_CONC);
            free(k);
            json_decref(j);
            http_resp_free(&r);
        }
    }
    for (int i = 0; i < N_CONC; i++) free(alone[i]);
}
END_TEST

/* One slot per model: ensembles still all finish (admission is FIFO in every
 * scheduler and the loop submits a request's members together), and a model
 * named twice cannot fit and is refused. */
START_TEST(one_slot_per_model)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_a, "--model", g_b, "--max-seqs", "1", NULL});
    http_resp r;
    http(s.port, "POST", "/infer", NULL, "{\"prompt\":\"hi\",\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"a\"}]}}", &r);
    expect_error(&r, 400, "appears 2 times");
    http_resp_free(&r);
    const char *bodies[2] = {
        "{\"tokens\":" PROMPT ",\"max_tokens\":6,\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"b\"}]}}",
        "{\"tokens\":" PROMPT ",\"max_tokens\":6,\"ensemble\":{\"members\":[{\"model\":\"b\"},{\"model\":\"a\"}],"
        "\"method\":\"vote\"}}"};
    int fd[6];
    for (int i = 0; i < 6; i++) fd[i] = http_send(s.port, "POST", "/infer", NULL, bodies[i % 2]);
    for (int i = 0; i < 6; i++) {
        http_recv(fd[i], &r);
        ck_assert_msg(r.status == 200, "%d: %.300s", r.status, r.body ? r.body : "");
        http_resp_free(&r);
    }
    server_stop(&s);
}
END_TEST

/* A client that goes away: both members come back cancelled, slots free again.
 * Small-preset members with a 1000-token request keep the ensemble busy for
 * seconds, so the disconnect cannot race its natural end. */
START_TEST(disconnect_cancels_every_member)
{
    server s;
    server_start(&s, (const char *[]){"--model", g_sa, "--model", g_sb, "--max-seqs", "1", NULL});
    const char *body = "{\"tokens\":" PROMPT ",\"max_tokens\":1000,\"ensemble\":{\"members\":[{\"model\":\"sa\"},"
                       "{\"model\":\"sb\"}]}}";
    int f = http_send(s.port, "POST", "/infer", NULL, body);
    ck_assert(f >= 0);
    WAIT_FOR(metric(s.port, "moeserve_generated_tokens_total", NULL, NULL) > 0, "generation to start");
    close(f);
    WAIT_FOR(metric(s.port, "moeserve_sequences_finished_total", "reason=\"cancelled\"", NULL) == 2,
             "both members cancelled");
    WAIT_FOR(metric(s.port, "moeserve_running_sequences", NULL, NULL) == 0, "slots free");
    ck_assert(metric(s.port, "moeserve_kv_cache_blocks_used", NULL, NULL) == 0);
    ck_assert(metric(s.port, "moeserve_sequences_finished_total", "reason=\"length\"", NULL) == 0);
    json_decref(infer_ok(s.port, "{\"tokens\":" PROMPT ",\"max_tokens\":4,\"ensemble\":{\"members\":["
                                 "{\"model\":\"sa\"},{\"model\":\"sb\"}],\"method\":\"vote\"}}"));
    server_stop(&s);
}
END_TEST

/* Metrics and /models ----------------------------------------------------------- */

START_TEST(metrics_count_ensembles)
{
    int p = port();
    double before = metric(p, "moeserve_ensemble_requests_total", "method=\"vote\",kind=\"generate\"", NULL);
    double agree_before = metric(p, "moeserve_ensemble_agreement_ratio_count", NULL, NULL);
    json_t *j = post("{\"tokens\":" PROMPT ",\"max_tokens\":4,\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"b\"}],"
                     "\"method\":\"vote\"}}");
    json_t *mem = json_object_get(json_object_get(j, "ensemble"), "members");
    double over_b = (double)json_integer_value(json_object_get(json_array_get(mem, 1), "overruled"));
    double n_pos = (double)json_array_size(json_object_get(j, "votes"));
    json_decref(j);
    ck_assert(metric(p, "moeserve_ensemble_requests_total", "method=\"vote\",kind=\"generate\"", NULL) == before + 1);
    ck_assert(metric(p, "moeserve_ensemble_agreement_ratio_count", NULL, NULL) == agree_before + n_pos);
    ck_assert(metric(p, "moeserve_ensemble_overrules_total", "model=\"b\"", NULL) >= over_b);

    http_resp r;
    http(p, "GET", "/v1/models", NULL, NULL, &r);
    ck_assert_int_eq(r.status, 200);
    json_t *m = parse_json(&r);
    ck_assert_str_eq(json_string_value(json_object_get(m, "object")), "list");
    json_t *d = json_array_get(json_object_get(m, "data"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(d, "id")), "a");
    ck_assert_str_eq(json_string_value(json_object_get(d, "object")), "model");
    ck_assert_str_eq(json_string_value(json_object_get(d, "architecture")), "llama");
    ck_assert_int_eq(strlen(json_string_value(json_object_get(d, "vocab_fingerprint"))), 16);
    json_decref(m);
    http_resp_free(&r);

    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        printf("promtool absent (Debian package prometheus): skipping the promtool check\n");
        return;
    }
    http(p, "GET", "/metrics", NULL, NULL, &r);
    char path[160], cmd[256];
    snprintf(path, sizeof path, "%s/metrics.txt", g_dir);
    FILE *f = fopen(path, "w");
    ck_assert(f != NULL);
    fwrite(r.body, 1, r.len, f);
    fclose(f);
    http_resp_free(&r);
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
    ck_assert_msg(system(cmd) == 0, "promtool check metrics failed on %s", path);
    unlink(path);
}
END_TEST

static void stop_server(void)
{
    if (g_started) server_stop(&g_srv);
    g_started = 0;
}

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "%s", tu_tmpdir());
    snprintf(g_a, sizeof g_a, "a=%s/a.gguf", g_dir);
    snprintf(g_b, sizeof g_b, "b=%s/b.gguf", g_dir);
    snprintf(g_c, sizeof g_c, "c=%s/c.gguf", g_dir);
    snprintf(g_a2, sizeof g_a2, "a2=%s/a.gguf", g_dir);
    char err[256], vocab[256] = "";
    snprintf(g_sa, sizeof g_sa, "sa=%s/sa.gguf", g_dir);
    snprintf(g_sb, sizeof g_sb, "sb=%s/sb.gguf", g_dir);
    synth_params pa = {.arch = "llama", .preset = "tiny", .seed = 1}, pb = {.arch = "llama", .preset = "tiny", .seed = 2};
    synth_params psa = {.arch = "llama", .preset = "small", .seed = 1}, psb = {.arch = "llama", .preset = "small", .seed = 2};
    if (synth_write(&pa, g_a + 2, err, sizeof err) || synth_write(&pb, g_b + 2, err, sizeof err) ||
        synth_write(&psa, g_sa + 3, err, sizeof err) || synth_write(&psb, g_sb + 3, err, sizeof err)) {
        fprintf(stderr, "synth_write: %s\n", err);
        return EXIT_FAILURE;
    }
    const char *shared = tu_shared_dir();
    if (shared) snprintf(vocab, sizeof vocab, "%s/testdata/vocab/ggml-vocab-gpt-2.gguf", shared);
    if (shared && access(vocab, R_OK) == 0) {
        synth_params pc = {.arch = "llama", .preset = "tiny", .seed = 3, .vocab_path = vocab};
        if (synth_write(&pc, g_c + 2, err, sizeof err)) {
            fprintf(stderr, "synth_write: %s\n", err);
            return EXIT_FAILURE;
        }
        g_have_c = 1;
    } else {
        printf("../shared/testdata/vocab absent: no model with another vocabulary\n");
    }
    Suite *s = suite_create("server_ensemble");
    TCase *tc = tcase_create("ensemble");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, mean_prob_matches_members);
    tcase_add_test(tc, mean_logprob_matches_members);
    tcase_add_test(tc, vote_matches_members_and_breaks_ties);
    tcase_add_test(tc, vote_unequal_weights);
    tcase_add_test(tc, one_member_and_copies_equal_the_model);
    tcase_add_test(tc, labels_equal_summed_token_logprobs);
    tcase_add_test(tc, bad_ensembles_get_400);
    tcase_add_test(tc, concurrent_requests_give_the_same_answers);
    tcase_add_test(tc, one_slot_per_model);
    tcase_add_test(tc, disconnect_cancels_every_member);
    tcase_add_test(tc, metrics_count_ensembles);
    tcase_add_checked_fixture(tc, NULL, stop_server);  /* each test's server, in its own process */
    suite_add_tcase(s, tc);
    int rc = tu_run_suite(s);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (!getenv("SERVER_KEEP") && system(cmd)) {}
    return rc;
}
