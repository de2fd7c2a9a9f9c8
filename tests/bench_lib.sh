# Shared by the bench scripts (sourced, not run). Needs BUILD, ARCH and SHARED set.

# bench_synth SEED FILE: writes the bench preset once (a few GB), with the llama-spm
# vocabulary when ../shared has it, else the built-in byte-level one.
bench_synth() {
    [ -f "$2" ] && return 0
    echo "== writing the bench preset ($ARCH, seed $1) to $2 (once; a few GB)"
    vocab="$SHARED/testdata/vocab/ggml-vocab-llama-spm.gguf"
    if [ -f "$vocab" ]; then
        "$BUILD/moe" synth --arch "$ARCH" --preset bench --seed "$1" --vocab "$vocab" -o "$2.tmp"
    else
        echo "   ($vocab absent: built-in byte-level vocabulary)"
        "$BUILD/moe" synth --arch "$ARCH" --preset bench --seed "$1" -o "$2.tmp"
    fi
    mv "$2.tmp" "$2"
}

# bench_serve LOG FLAGS...: starts moeserve on any free port with stderr to LOG, sets
# PID and URL, and returns once /ready answers 200 (exits if the server dies).
bench_serve() {
    log=$1; shift
    "$BUILD/moeserve" --port 0 --quiet "$@" 2>"$log" &
    PID=$!
    URL=""
    until [ -n "$URL" ] && curl -sf "$URL/ready" >/dev/null 2>&1; do
        kill -0 $PID 2>/dev/null || { cat "$log"; exit 1; }
        [ -z "$URL" ] && URL=$(sed -n 's|.*listening on \(http://[^ ]*\).*|\1|p' "$log" | head -n 1)
        sleep 0.01
    done
}

now_ms() { date +%s%3N; }
