# moeserve container: docker build -t moeserve .
#   docker run -p 8080:8080 moeserve                      (the default model, as make run)
#   docker run -p 8080:8080 -v /path/to/models:/models:ro moeserve --model /models/model.gguf
# Stop with SIGTERM (docker stop): /ready turns 503, in-flight work drains, exit 0;
# give docker stop -t more than MOESERVE_DRAIN_DELAY + MOESERVE_DRAIN_TIMEOUT.

FROM debian:12 AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        build-essential pkg-config libopenblas-dev libjansson-dev libuv1-dev libmicrohttpd-dev check \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A portable baseline (AVX2 + FMA) instead of the build machine's -march=native.
ARG ARCHFLAGS=-march=x86-64-v3
RUN make ARCHFLAGS="$ARCHFLAGS" build/moeserve build/moe

FROM debian:12-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        libopenblas0-pthread libjansson4 libuv1 libmicrohttpd12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin moeserve
COPY --from=build /src/build/moeserve /src/build/moe /usr/local/bin/
COPY --from=build /src/models/tinyshakespeare-moe.gguf /usr/local/share/moeserve/
USER moeserve
ENV MOESERVE_HOST=0.0.0.0 \
    MOESERVE_PORT=8080 \
    MOESERVE_DRAIN_DELAY=5 \
    MOESERVE_DRAIN_TIMEOUT=30 \
    MOESERVE_LOG_FORMAT=json
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/moeserve"]
CMD ["--model", "/usr/local/share/moeserve/tinyshakespeare-moe.gguf"]
