#!/bin/sh
# Runs every Check suite in BUILD/tests and prints one total line at the end.
# Each binary prints Check's "NN%: Checks: N, Failures: F, Errors: E" line.
BUILD=${1:-build}
export MOE_BUILD="$BUILD"
export PYTHON="${PYTHON:-/usr/bin/python3}"
export CK_DEFAULT_TIMEOUT="${CK_DEFAULT_TIMEOUT:-600}"
passed=0; failed=0; bad_bins=""
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    echo "== $(basename "$t")"
    out=$("$t" 2>&1); rc=$?
    printf '%s\n' "$out"
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+%: Checks: [0-9]+' | tail -n 1)
    if [ -z "$line" ]; then
        failed=$((failed + 1)); bad_bins="$bad_bins $(basename "$t")(no summary, exit $rc)"; continue
    fi
    n=$(echo "$line" | sed -E 's/.*Checks: ([0-9]+).*/\1/')
    f=$(echo "$line" | sed -E 's/.*Failures: ([0-9]+).*/\1/')
    e=$(echo "$line" | sed -E 's/.*Errors: ([0-9]+).*/\1/')
    passed=$((passed + n - f - e)); failed=$((failed + f + e))
    [ "$rc" -ne 0 ] && [ $((f + e)) -eq 0 ] && { failed=$((failed + 1)); bad_bins="$bad_bins $(basename "$t")(exit $rc)"; }
done
[ -n "$bad_bins" ] && echo "failing binaries:$bad_bins"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
