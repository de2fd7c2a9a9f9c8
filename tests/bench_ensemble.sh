#!/bin/sh
# make bench-ensemble: what an ensemble costs, on two bench-preset models of one
# vocabulary (seeds 1 and 2) served by one moeserve.
#   1. A 2-member ensemble request (mean_prob, 32-token prompt, 64 generated tokens,
#      greedy) against the same work as 2 single-model requests, one per member,
#      run concurrently. Target: ensemble throughput >= 0.9x the pair's.
#   2. Label scoring on one model: 8 labels against 1 label after a 128-token
#      prompt (the prompt's KV is computed once and shared). Target: < 2x.
# Figures, not tests: docs/PERFORMANCE.md records them.
#   BENCH_ARCH (qwen3moe), BENCH_THREADS (2), BENCH_ROUNDS (6), BENCH_MODEL and
#   BENCH_MODEL2 (GGUFs to use instead of the presets).
set -e
BUILD=${1:-build}
ARCH=${BENCH_ARCH:-qwen3moe}
THREADS=${BENCH_THREADS:-2}
ROUNDS=${BENCH_ROUNDS:-6}
SHARED=${MOE_SHARED:-../shared}
MODEL_A=${BENCH_MODEL:-$BUILD/bench-$ARCH.gguf}
MODEL_B=${BENCH_MODEL2:-$BUILD/bench-$ARCH-seed2.gguf}

. tests/bench_lib.sh
bench_synth 1 "$MODEL_A"
bench_synth 2 "$MODEL_B"

LOG=$(mktemp)
PID=""
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG" "$LOG".*' EXIT INT TERM
bench_serve "$LOG" --model "a=$MODEL_A" --model "b=$MODEL_B" --threads "$THREADS"
post() {  # post BODY [TAG]: fails loudly on anything but 200
    out="$LOG.out${2:-}"
    code=$(curl -s -o "$out" -w '%{http_code}' "$URL/infer" -d "$1")
    [ "$code" = 200 ] || { echo "bench-ensemble: HTTP $code: $(cat "$out")" >&2; exit 1; }
}

TOKENS=$(seq -s, 100 131)
SINGLE_A="{\"model\":\"a\",\"tokens\":[$TOKENS],\"max_tokens\":64}"
SINGLE_B="{\"model\":\"b\",\"tokens\":[$TOKENS],\"max_tokens\":64}"
ENS="{\"tokens\":[$TOKENS],\"max_tokens\":64,\"ensemble\":{\"members\":[{\"model\":\"a\"},{\"model\":\"b\"}],\"method\":\"mean_prob\"}}"
post "$SINGLE_A"; post "$SINGLE_B"; post "$ENS"   # warm the page cache

echo "== 2-member ensemble vs 2 concurrent single requests ($ROUNDS rounds each, 64 tokens, threads $THREADS per model)"
t0=$(now_ms)
for i in $(seq "$ROUNDS"); do
    post "$SINGLE_A" a & pa=$!
    post "$SINGLE_B" b & pb=$!
    wait $pa; wait $pb
done
t1=$(now_ms)
for i in $(seq "$ROUNDS"); do post "$ENS"; done
t2=$(now_ms)
awk -v r="$ROUNDS" -v p="$((t1 - t0))" -v e="$((t2 - t1))" 'BEGIN {
    printf "pair of singles: %8.0f ms per pair      (%.1f combined tok/s per pair stream)\n", p / r, 64 * r / (p / 1000)
    printf "ensemble:        %8.0f ms per request   (%.1f combined tok/s)\n", e / r, 64 * r / (e / 1000)
    printf "ensemble throughput / pair throughput: %.2fx (target >= 0.9x)\n", p / e }'

echo "== label scoring on model a: 8 labels vs 1 label after a 128-token prompt ($ROUNDS rounds each)"
PROMPT=$(seq -s, 200 327)
ONE="{\"model\":\"a\",\"tokens\":[$PROMPT],\"labels\":[\"positive\"]}"
EIGHT="{\"model\":\"a\",\"tokens\":[$PROMPT],\"labels\":[\"positive\",\"negative\",\"neutral\",\"mixed\",\"angry\",\"happy\",\"sad\",\"surprised\"]}"
post "$ONE"; post "$EIGHT"
t0=$(now_ms)
for i in $(seq "$ROUNDS"); do post "$ONE"; done
t1=$(now_ms)
for i in $(seq "$ROUNDS"); do post "$EIGHT"; done
t2=$(now_ms)
awk -v r="$ROUNDS" -v a="$((t1 - t0))" -v b="$((t2 - t1))" 'BEGIN {
    printf "1 label:  %6.0f ms per request\n8 labels: %6.0f ms per request\n", a / r, b / r
    printf "8 labels / 1 label: %.2fx (target < 2x)\n", b / a }'
kill -TERM $PID
wait $PID || true
