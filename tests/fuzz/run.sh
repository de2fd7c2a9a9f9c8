#!/bin/sh
# Builds and runs one of the libFuzzer targets (not part of `make test`):
#   sh tests/fuzz/run.sh [gguf|model|api] [SECONDS] [BUILD_DIR]   (from the project root)
#   gguf  (the default; 120 s): the GGUF reader (fuzz_gguf.c), seeded with small
#         hand-made files;
#   model (300 s): the tokenizer, loader and engine on hostile files (fuzz_model.c),
#         seeded with a tiny synthetic model of each architecture (written by
#         build/moe: `make` first) and ../shared's vocabularies when they are there;
#   api   (300 s): POST /infer bodies (fuzz_api.c), seeded with one body of each
#         documented form.
# Needs clang (Debian: apt-get install -y clang) and, for model and api, the
# project's packages (make deps). Crashing inputs are written to BUILD_DIR/crashes/;
# replay one with BUILD_DIR/fuzz_TARGET FILE.
set -e
TARGET=gguf
case "$1" in gguf|model|api) TARGET=$1; shift ;; esac
BUILD=${2:-build-fuzz}
CC=${FUZZ_CC:-clang}
CORPUS="$BUILD/$TARGET-corpus"
BIN="$BUILD/fuzz_$TARGET"
SAN="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"
CFLAGS="-std=c11 -g -O1 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -I."
mkdir -p "$CORPUS" "$BUILD/crashes"

case $TARGET in
gguf)
    $CC $CFLAGS $SAN tests/fuzz/fuzz_gguf.c models/gguf.c models/pages.c core/hugemem.c core/wconv.c -o "$BIN"
    # Seeds: small valid files covering every value type, arrays, and tensors of each type.
${PYTHON:-python3} - "$CORPUS" <<'PY'
import struct, sys, os
out = sys.argv[1]
def s(x): b = x.encode(); return struct.pack("<Q", len(b)) + b
def kv(k, t, v): return s(k) + struct.pack("<I", t) + v
def pad(b, a=32): return b + b"\0" * (-len(b) % a)
def tensor(name, ne, t, off): return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<I", t) + struct.pack("<Q", off)
scal = [(0,"<B",7),(1,"<b",-7),(2,"<H",700),(3,"<h",-700),(4,"<I",70000),(5,"<i",-70000),(6,"<f",1.5),(7,"<?",True),(10,"<Q",2**40),(11,"<q",-2**40),(12,"<d",0.25)]
kvs = [kv("k%d" % t, t, struct.pack(f, v)) for t, f, v in scal]
kvs.append(kv("general.architecture", 8, s("llama")))
kvs.append(kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + s("a") + s("bc") + s("")))
for t, f, v in scal:
    kvs.append(kv("a%d" % t, 9, struct.pack("<IQ", t, 2) + struct.pack(f, v) * 2))
hdr = lambda nt, nk: b"GGUF" + struct.pack("<IQQ", 3, nt, nk)
open(os.path.join(out, "kv_only.gguf"), "wb").write(pad(hdr(0, len(kvs)) + b"".join(kvs)))
ts = [tensor("a", [4, 2], 0, 0), tensor("b", [3], 1, 32), tensor("c", [2, 1, 1, 2], 30, 64)]
meta = hdr(len(ts), 2) + kvs[11] + kv("general.alignment", 4, struct.pack("<I", 32)) + b"".join(ts)
data = bytes(range(32)) + bytes(range(6)) + b"\0" * 26 + bytes(range(8))
open(os.path.join(out, "tensors.gguf"), "wb").write(pad(meta) + data)
PY
    "$BIN" -max_total_time="${1:-120}" -max_len=4096 -timeout=10 -artifact_prefix="$BUILD/crashes/" "$CORPUS"
    ;;
model)
    $CC $CFLAGS -march=native $(pkg-config --cflags openblas) $SAN tests/fuzz/fuzz_model.c core/*.c models/*.c \
        -o "$BIN" $(pkg-config --libs openblas) -lpthread -lm
    for arch in llama qwen2moe olmoe qwen3moe; do
        build/moe synth --arch $arch --preset tiny --seed 3 -o "$CORPUS/$arch.gguf" >/dev/null
    done
    build/moe synth --arch llama --preset dense --seed 3 -o "$CORPUS/dense.gguf" >/dev/null
    build/moe synth --arch qwen3moe --preset tiny --seed 3 --f16 -o "$CORPUS/qwen3moe-f16.gguf" >/dev/null
    build/moe synth --arch olmoe --preset tiny --seed 4 --type q8_0 -o "$CORPUS/olmoe-q8_0.gguf" >/dev/null
    build/moe synth --arch qwen2moe --preset tiny256 --seed 5 --type q4_k_m -o "$CORPUS/qwen2moe-q4_k_m.gguf" >/dev/null
    build/moe synth --arch olmoe --preset tiny256 --seed 6 --type q5_k_m -o "$CORPUS/olmoe-q5_k_m.gguf" >/dev/null
    build/moe synth --arch llama --preset tiny --seed 7 --type q4_0 -o "$CORPUS/llama-q4_0.gguf" >/dev/null
    build/moe synth --arch qwen2moe --preset tiny --seed 8 --type q4_k_m -o "$CORPUS/qwen2moe-q5_0.gguf" >/dev/null
    build/moe synth --arch olmoe --preset tiny --seed 9 --type q5_k_m -o "$CORPUS/olmoe-q5_1.gguf" >/dev/null
    build/moe synth --arch llama --preset tiny --seed 10 --type q4_1 -o "$CORPUS/llama-q4_1.gguf" >/dev/null
    build/moe synth --arch qwen3moe --preset tiny --seed 11 --type iq4_nl -o "$CORPUS/qwen3moe-iq4_nl.gguf" >/dev/null
    build/moe synth --arch llama --preset tiny256 --seed 12 --type q2_k -o "$CORPUS/llama-q2_k.gguf" >/dev/null
    build/moe synth --arch qwen2moe --preset tiny256 --seed 13 --type q3_k_m -o "$CORPUS/qwen2moe-q3_k_m.gguf" >/dev/null
    build/moe synth --arch olmoe --preset tiny256 --seed 14 --type iq4_xs -o "$CORPUS/olmoe-iq4_xs.gguf" >/dev/null
    build/moe synth --arch llama --preset tiny --seed 15 --split-experts -o "$CORPUS/llama-split.gguf" >/dev/null
    if [ -d ../shared/testdata/vocab ]; then
        cp ../shared/testdata/vocab/*.gguf "$CORPUS/"
    else
        echo "run.sh: ../shared/testdata/vocab not found: seeding with the synthetic models only"
    fi
    "$BIN" -max_total_time="${1:-300}" -max_len=2000000 -timeout=30 -rss_limit_mb=6144 \
        -artifact_prefix="$BUILD/crashes/" "$CORPUS"
    ;;
api)
    $CC $CFLAGS -march=native $(pkg-config --cflags openblas jansson libuv) $SAN tests/fuzz/fuzz_api.c \
        server/api.c server/ensemble_req.c server/scheduler.c server/log.c server/metrics.c core/*.c models/*.c \
        -o "$BIN" $(pkg-config --libs openblas jansson libuv) -lpthread -lm
    # LLVMFuzzerInitialize writes the seeds (fuzz_api_bodies) before the corpus is read.
    FUZZ_API_SEEDS="$CORPUS" "$BIN" -max_total_time="${1:-300}" -max_len=4096 -timeout=10 \
        -artifact_prefix="$BUILD/crashes/" "$CORPUS"
    ;;
esac
