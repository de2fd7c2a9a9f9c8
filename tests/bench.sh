#!/bin/sh
# make bench: engine throughput against this machine's rooflines (build/moe bench)
# and tokenizer throughput. Figures, not tests: docs/PERFORMANCE.md records them.
#   BENCH_ARCH (default qwen3moe), BENCH_THREADS (2), BENCH_QUICK=1 for a smoke run.
set -e
BUILD=${1:-build}
ARCH=${BENCH_ARCH:-qwen3moe}
THREADS=${BENCH_THREADS:-2}
SHARED=${MOE_SHARED:-../shared}
MODEL="$BUILD/bench-$ARCH.gguf"
TEXT="$SHARED/corpus/tinyshakespeare.txt"

. tests/bench_lib.sh
bench_synth 1 "$MODEL"
"$BUILD/moe" info "$MODEL"
quick=""
[ "${BENCH_QUICK:-0}" = 1 ] && quick="--quick"
echo "== engine: $BUILD/moe bench -m $MODEL --threads $THREADS $quick"
"$BUILD/moe" bench -m "$MODEL" --threads "$THREADS" $quick

echo "== tokenizer (1 thread)"
if [ -f "$TEXT" ]; then
    for v in llama-spm gpt-2; do
        f="$SHARED/testdata/vocab/ggml-vocab-$v.gguf"
        [ -f "$f" ] && "$BUILD/moe" tokenize -m "$f" --bench "$TEXT"
    done
    [ -f models/tinyshakespeare-moe.gguf ] && "$BUILD/moe" tokenize -m models/tinyshakespeare-moe.gguf --bench "$TEXT"
else
    echo "   skipped: $TEXT absent"
fi
