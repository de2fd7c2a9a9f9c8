/* fuzz_api.c -- libFuzzer target for POST /infer bodies (sh tests/fuzz/run.sh api;
 * test_api.c also runs it on mutated bodies).
 *
 * Two tiny synthetic models (llama and qwen3moe, so ensembles across
 * architectures and text prompts go through real tokenizers) are written and
 * loaded once; every input then goes through api_parse_infer. A body is either
 * accepted (and freed) or refused with one of the statuses api.h names (400, 404,
 * 413, 503) and a message; anything else aborts, so the fuzzer reports it. The
 * error envelope is built for each refusal, and the body also goes through
 * api_utf8_clean, the path request text takes into responses. With FUZZ_API_SEEDS
 * set to a directory, LLVMFuzzerInitialize first writes the seed bodies there
 * (before libFuzzer reads its corpus directories).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "models/model_file.h"
#include "models/synth.h"
#include "server/api.h"

/* The seeds, which test_api.c checks are accepted: one body of each form (text,
 * ids, several prompts, sampling, stops, logits, routing, ensembles voting with
 * member weights or averaging log-probabilities, labels). */
static const char *const fuzz_api_bodies[] = {
    "{\"prompt\": \"Hello world\", \"max_tokens\": 4}",
    "{\"tokens\": [1, 2, 3], \"max_tokens\": 2, \"temperature\": 0.7, \"top_k\": 5, \"top_p\": 0.9, "
    "\"min_p\": 0.05, \"seed\": 42}",
    "{\"prompts\": [\"a\", \"bb\", \"ccc\"], \"max_tokens\": 3, \"stop\": [\"\\n\", \"xx\"], \"model\": \"b\"}",
    "{\"prompt\": \"x\", \"logits\": \"last\", \"top_logprobs\": 3, \"routing\": true, "
    "\"repeat_penalty\": 1.1, \"repeat_last_n\": 16}",
    "{\"prompt\": \"vote\", \"ensemble\": {\"members\": [{\"model\": \"a\", \"weight\": 2}, {\"model\": \"b\"}], "
    "\"method\": \"vote\"}, \"max_tokens\": 3}",
    "{\"prompt\": \"label me\", \"labels\": [\"yes\", \"no\"], \"label_prefix\": \" \", \"model\": \"a\"}",
    "{\"prompt\": \"mean\", \"ensemble\": {\"members\": [{\"model\": \"a\"}, {\"model\": \"b\"}], "
    "\"method\": \"mean_logprob\"}, \"max_tokens\": 2}",
    "{\"prompt\": \"\\u00e9\\ud83d\\ude00\", \"max_tokens\": 1, \"stop\": [\"z\"]}",
};
static api_model fuzz_models[2];
static char fuzz_paths[2][96];

/* Writes and loads the two models; 0 or -1 with the reason on stderr. */
static int fuzz_api_setup(void)
{
    static const char *const arch[2] = {"llama", "qwen3moe"}, *const name[2] = {"a", "b"};
    char dir[64], err[256];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/fuzzapi.XXXXXX", tmp && strlen(tmp) < 40 ? tmp : "/tmp");
    if (!mkdtemp(dir)) return -1;
    for (int i = 0; i < 2; i++) {
        snprintf(fuzz_paths[i], sizeof fuzz_paths[i], "%s/%s.gguf", dir, name[i]);
        synth_params p = {.arch = arch[i], .preset = "tiny", .seed = 3};
        moe_model *m = NULL;
        if (synth_write(&p, fuzz_paths[i], err, sizeof err) || moe_model_load(fuzz_paths[i], &m, err, sizeof err)) {
            fprintf(stderr, "fuzz_api: %s\n", err);
            return -1;
        }
        unlink(fuzz_paths[i]);   /* the mapping keeps the data */
        fuzz_models[i] = (api_model){name[i], fuzz_paths[i], m, 64, 256};
    }
    rmdir(dir);
    return 0;
}

static void fuzz_api_teardown(void)
{
    for (int i = 0; i < 2; i++) {
        moe_model_free((moe_model *)fuzz_models[i].model);
        fuzz_models[i].model = NULL;
    }
}

/* 0: accepted; otherwise the status it was refused with. */
static int fuzz_api_one(const uint8_t *data, size_t size)
{
    char err[512] = "";
    api_infer q;
    memset(&q, 0, sizeof q);
    int rc = api_parse_infer((const char *)data, size, fuzz_models, 2, &q, err, sizeof err);
    if (rc == 0) {
        api_infer_free(&q);
    } else {
        if ((rc != 400 && rc != 404 && rc != 413 && rc != 503) || !err[0]) {
            fprintf(stderr, "fuzz_api: status %d, message '%s'\n", rc, err);
            abort();
        }
        size_t len;
        free(api_error_body(rc, err, &len));
    }
    size_t n;
    free(api_utf8_clean((const char *)data, size, &n));
    return rc;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *seeds = getenv("FUZZ_API_SEEDS");   /* run.sh api: write the seeds there first */
    for (size_t i = 0; seeds && i < sizeof fuzz_api_bodies / sizeof fuzz_api_bodies[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/body%zu.json", seeds, i);
        FILE *f = fopen(path, "w");
        if (!f || fputs(fuzz_api_bodies[i], f) < 0 || fclose(f)) abort();
    }
    if (fuzz_api_setup()) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_api_one(data, size);
    return 0;
}
