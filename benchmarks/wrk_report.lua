-- wrk script for benchmarks/run.py.
-- The request method comes from the BENCH_METHOD environment variable (wrk's -H flags
-- set the headers); at the end one machine-readable line is printed, prefixed with
-- "BENCH_JSON ", holding the totals and latency percentiles in microseconds.
local method = os.getenv("BENCH_METHOD")
if method ~= nil and method ~= "" then
  wrk.method = method
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
