#!/bin/sh
# Builds and runs the libFuzzer target for the GGUF reader (not part of `make test`).
#   sh tests/fuzz/run.sh [SECONDS] [BUILD_DIR]      (from the project root; default 120 s)
# Needs clang (Debian: apt-get install -y clang). Crashing inputs are written to
# BUILD_DIR/crashes/; replay one with BUILD_DIR/fuzz_gguf FILE.
set -e
SECONDS_TO_RUN=${1:-120}
BUILD=${2:-build-fuzz}
CC=${FUZZ_CC:-clang}
mkdir -p "$BUILD/corpus" "$BUILD/crashes"
$CC -std=c11 -g -O1 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -I. \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    tests/fuzz/fuzz_gguf.c models/gguf.c core/hugemem.c -o "$BUILD/fuzz_gguf"

# Seeds: small valid files covering every value type, arrays, and tensors of each type.
${PYTHON:-python3} - "$BUILD/corpus" <<'PY'
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
"$BUILD/fuzz_gguf" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -timeout=10 \
    -artifact_prefix="$BUILD/crashes/" "$BUILD/corpus"
