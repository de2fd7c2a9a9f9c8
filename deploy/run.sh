#!/bin/sh
# make run: serve the default model (models/tinyshakespeare-moe.gguf) over HTTP.
# MOESERVE_HOST / MOESERVE_PORT (or HOST / PORT) override 127.0.0.1:8080; extra
# moeserve flags go in MOESERVE_ARGS.
BUILD=${1:-build}
MODEL=${MOESERVE_DEFAULT_MODEL:-models/tinyshakespeare-moe.gguf}
HOST=${MOESERVE_HOST:-${HOST:-127.0.0.1}}
PORT=${MOESERVE_PORT:-${PORT:-8080}}
if [ ! -f "$MODEL" ]; then
    echo "moeserve: $MODEL not found" >&2
    exit 1
fi
echo "moeserve: serving $MODEL on http://$HOST:$PORT  (try: curl -X POST $HOST:$PORT/infer -d '{\"prompt\":\"ROMEO:\",\"max_tokens\":64,\"temperature\":0.8}')"
# shellcheck disable=SC2086
exec "$BUILD/moeserve" --model "$MODEL" --host "$HOST" --port "$PORT" $MOESERVE_ARGS
