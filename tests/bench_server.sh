#!/bin/sh
# make bench-server: moeserve under load (wrk + tests/server/bench.lua) on the bench
# synthetic model: 32-token prompts, 64 generated tokens, greedy, at concurrency
# 1, 4, 16 and 64. Prints aggregate generated tok/s, requests/s, p50/p99 latency,
# mean time to first token, /health p99 while busy, and start-to-ready time.
# Figures, not tests: docs/PERFORMANCE.md records them next to `moe bench`.
#   BENCH_ARCH (qwen3moe), BENCH_THREADS (2), BENCH_SECONDS per level (30; at least
#   2 s per client so that every level completes several requests),
#   BENCH_CONC ("1 4 16 64"), BENCH_MODEL (a GGUF to use instead of the preset),
#   BENCH_SERVER_ARGS (extra moeserve flags, e.g. "--max-batch-tokens 512").
set -e
BUILD=${1:-build}
ARCH=${BENCH_ARCH:-qwen3moe}
THREADS=${BENCH_THREADS:-2}
SECONDS_PER=${BENCH_SECONDS:-30}
CONC=${BENCH_CONC:-"1 4 16 64"}
SHARED=${MOE_SHARED:-../shared}
MODEL=${BENCH_MODEL:-$BUILD/bench-$ARCH.gguf}

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bench-server: installing wrk"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
    fi
    command -v wrk >/dev/null || { echo "bench-server: wrk not installed (apt-get install wrk)" >&2; exit 1; }
fi
. tests/bench_lib.sh
bench_synth 1 "$MODEL"

metric() {  # sum of a metric family's samples
    curl -s "$URL/metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {printf "%.6f\n", s}'
}

LOG=$(mktemp)
PID=""
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT INT TERM
t0=$(now_ms)
bench_serve "$LOG" --model "bench=$MODEL" --threads "$THREADS" $BENCH_SERVER_ARGS
t1=$(now_ms)
echo "== start to /ready: $((t1 - t0)) ms (threads $THREADS)"
grep "loaded" "$LOG" | sed 's/^/   /'

# 32 prompt tokens (ids 100..131: valid in every vocabulary we build), 64 generated.
TOKENS=$(seq -s, 100 131)
export BENCH_BODY="{\"tokens\":[$TOKENS],\"max_tokens\":64,\"temperature\":0}"
curl -s "$URL/infer" -d "$BENCH_BODY" >/dev/null   # warm the page cache

printf "%-6s %10s %10s %10s %10s %10s %8s\n" conc "gen_tok/s" "req/s" "p50_ms" "p99_ms" "ttft_ms" errors
for c in $CONC; do
    g0=$(metric moeserve_generated_tokens_total)
    ts0=$(metric moeserve_time_to_first_token_seconds_sum)
    tc0=$(metric moeserve_time_to_first_token_seconds_count)
    d=$SECONDS_PER
    [ $((2 * c)) -gt "$d" ] && d=$((2 * c))
    out=$(wrk -t $([ "$c" -ge 2 ] && echo 2 || echo 1) -c "$c" -d "${d}s" --timeout 600s \
        -s tests/server/bench.lua "$URL/infer" | grep '^BENCH')
    g1=$(metric moeserve_generated_tokens_total)
    ts1=$(metric moeserve_time_to_first_token_seconds_sum)
    tc1=$(metric moeserve_time_to_first_token_seconds_count)
    echo "$out" | awk -v c="$c" -v g0="$g0" -v g1="$g1" -v ts0="$ts0" -v ts1="$ts1" -v tc0="$tc0" -v tc1="$tc1" '{
        g = g1 - g0; ts = ts1 - ts0; tc = tc1 - tc0
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%-6d %10.1f %10.2f %10.1f %10.1f %10.1f %8d\n", c, g / v["seconds"], v["requests"] / v["seconds"],
               v["p50_ms"], v["p99_ms"], (tc > 0 ? ts / tc * 1000 : 0), v["errors"] }'
done

# Liveness while the model is busy: 1000 sequential /health probes during a c=16 load.
wrk -t 2 -c 16 -d "${SECONDS_PER}s" -s tests/server/bench.lua "$URL/infer" >/dev/null &
WPID=$!
sleep 1
for i in $(seq 1000); do curl -s -o /dev/null -w '%{time_total}\n' "$URL/health"; done | sort -n |
    awk '{a[NR] = $1} END {printf "== /health under load: p50 %.2f ms, p99 %.2f ms (1000 probes)\n", a[int(NR*0.5)]*1000, a[int(NR*0.99)]*1000}'
kill $WPID 2>/dev/null || true
wait $WPID 2>/dev/null || true
echo "== compare with: $BUILD/moe bench -m $MODEL --threads $THREADS (decode at batch 1 and 16)"
kill -TERM $PID
wait $PID || true
