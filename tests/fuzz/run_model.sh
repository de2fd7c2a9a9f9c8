#!/bin/sh
# Builds and runs the libFuzzer target for the tokenizer, the model loader and the
# engine on hostile GGUF files (not part of `make test`).
#   sh tests/fuzz/run_model.sh [SECONDS] [BUILD_DIR]   (from the project root; default 300 s)
# Needs clang and the project's packages (make deps). Seeds: a tiny synthetic model
# of each architecture (written by build/moe, so `make` first) and the vocabulary
# files of ../shared/testdata/vocab when they are there. Crashing inputs are written
# to BUILD_DIR/crashes/; replay one with BUILD_DIR/fuzz_model FILE.
set -e
SECONDS_TO_RUN=${1:-300}
BUILD=${2:-build-fuzz}
CC=${FUZZ_CC:-clang}
mkdir -p "$BUILD/model-corpus" "$BUILD/crashes"
$CC -std=c11 -g -O1 -march=native -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -I. \
    $(pkg-config --cflags openblas) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    tests/fuzz/fuzz_model.c core/*.c models/*.c -o "$BUILD/fuzz_model" \
    $(pkg-config --libs openblas) -lpthread -lm

for arch in llama qwen2moe olmoe qwen3moe; do
    build/moe synth --arch $arch --preset tiny --seed 3 -o "$BUILD/model-corpus/$arch.gguf" >/dev/null
done
build/moe synth --arch llama --preset dense --seed 3 -o "$BUILD/model-corpus/dense.gguf" >/dev/null
if [ -d ../shared/testdata/vocab ]; then
    cp ../shared/testdata/vocab/*.gguf "$BUILD/model-corpus/"
else
    echo "run_model.sh: ../shared/testdata/vocab not found: seeding with the synthetic models only"
fi
"$BUILD/fuzz_model" -max_total_time="$SECONDS_TO_RUN" -max_len=2000000 -timeout=30 -rss_limit_mb=6144 \
    -artifact_prefix="$BUILD/crashes/" "$BUILD/model-corpus"
