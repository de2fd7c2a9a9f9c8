-- wrk script for tests/bench_server.sh: POST /infer with the body in BENCH_BODY,
-- counting non-200 answers (wrk only counts socket errors and >= 400 as "non-2xx").
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")

local bad = 0
function response(status, headers, body)
   if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
   local s = summary.duration / 1e6
   io.write(string.format("BENCH requests=%d seconds=%.3f errors=%d p50_ms=%.2f p99_ms=%.2f mean_ms=%.2f\n",
      summary.requests, s, summary.errors.status + summary.errors.connect + summary.errors.read +
      summary.errors.write + summary.errors.timeout,
      latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3))
end
