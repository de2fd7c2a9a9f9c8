#!/bin/sh
# The container's moeserve and moe: runs this program's build for the best
# instruction set the CPU (and kernel) offer. The AVX-512 build (x86-64-v4)
# decodes k-quant files about twice as fast as the AVX2 one (x86-64-v3), which
# every x86-64 machine of the last decade runs (docs/PERFORMANCE.md, "The
# k-quants without AVX-512"). MOESERVE_ISA=x86-64-v3 picks the portable build.
prog=$(basename "$0")
dir=${MOESERVE_ISA_DIR:-/usr/local/lib/moeserve}
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
level=x86-64-v4
for f in avx512f avx512bw avx512cd avx512dq avx512vl; do
    case "$flags" in
    *" $f "*) ;;
    *) level=x86-64-v3 ;;
    esac
done
level=${MOESERVE_ISA:-$level}
if [ ! -x "$dir/$level/$prog" ]; then
    echo "$prog: no build for instruction set '$level' in $dir (MOESERVE_ISA: x86-64-v3 or x86-64-v4)" >&2
    exit 2
fi
exec "$dir/$level/$prog" "$@"
