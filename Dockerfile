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
# Two builds instead of the build machine's -march=native: the portable AVX2
# baseline and the AVX-512 one; deploy/isa-exec.sh runs the one the CPU can.
RUN for isa in x86-64-v3 x86-64-v4; do \
        make ARCHFLAGS=-march=$isa BUILD=build/$isa build/$isa/moeserve build/$isa/moe || exit 1; \
    done

FROM debian:12-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        libopenblas0-pthread libjansson4 libuv1 libmicrohttpd12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin moeserve
COPY --from=build /src/build/x86-64-v3/moeserve /src/build/x86-64-v3/moe /usr/local/lib/moeserve/x86-64-v3/
COPY --from=build /src/build/x86-64-v4/moeserve /src/build/x86-64-v4/moe /usr/local/lib/moeserve/x86-64-v4/
COPY --from=build /src/deploy/isa-exec.sh /usr/local/bin/moeserve
COPY --from=build /src/deploy/isa-exec.sh /usr/local/bin/moe
RUN chmod 755 /usr/local/bin/moeserve /usr/local/bin/moe
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
