#!/usr/bin/env python3
"""Soak: minutes of mixed load against the service on a real Redis.

Three h2load streams run side by side for the whole duration: Get hits (the bulk),
Sets, and InvalidateUser for users the Gets do not read. It prints, per stream, calls,
failures and latency percentiles, and the service's resident memory at start and end,
so that a leak or a slow drift shows.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # the benchmark's helpers: messages, processes, h2load parsing (and tests/ on the path)
from testkit.measure import cpu_seconds, quantiles, rss_mib


def h2load_for(port, method, body, seconds, connections, streams, workdir, name):
    body_path = os.path.join(workdir, f"{name}.bin")
    with open(body_path, "wb") as f:
        f.write(body)
    log = os.path.join(workdir, f"{name}.log")
    return subprocess.Popen(
        ["h2load", "-D", str(seconds), "-c", str(connections), "-m", str(streams), "-t", "1",
         "--data", body_path, "--log-file", log, "-H", "content-type: application/grpc",
         "-H", "te: trailers", f"http://127.0.0.1:{port}/{bench.SERVICE}/{method}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log


def summarize(name, proc, log, seconds):
    out, _ = proc.communicate(timeout=seconds + 120)
    done = succeeded = failed = errored = 0
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            parts = [p.strip() for p in line[len("requests:"):].split(",")]
            counts = {p.split()[1]: int(p.split()[0]) for p in parts}
            done, succeeded = counts.get("done", 0), counts.get("succeeded", 0)
            failed, errored = counts.get("failed", 0), counts.get("errored", 0)
    # Latencies in 10 us buckets: a soak's log holds tens of millions of calls.
    p50, p99, p999 = (us / 1000 for us in quantiles(bench.h2load_latencies(log), (0.5, 0.99, 0.999), bucket=10))
    os.remove(log)
    print(f"{name:16} calls {done:>10,}  ok {succeeded:>10,}  failed {failed + errored:>6,}  "
          f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  p999 {p999:7.2f} ms")
    return failed + errored


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    seconds = max(5, int(args.minutes * 60))

    # Sessions outlive the soak; TTLs are exercised, not waited for.
    with bench.service_on_redis("soak", service_flags=["--ttl-seconds", "3600"],
                                redis_args=["--maxmemory", "256mb", "--maxmemory-policy", "noeviction"]
                                ) as (workdir, _, port, service):
        reply, _ = bench.call_once(port, "Set", bench.set_request("soak-token", "soak-user"), workdir)
        assert bench.first_varint_field(reply) == 1, "the soak's session is stored"

        rss_start = rss_mib(service.pid)
        cpu_start = cpu_seconds(service.pid)
        print(f"soak: {seconds} s of mixed load; service RSS at start {rss_start:.1f} MiB")
        streams = [
            ("Get hit", "Get", bench.get_request("soak-token"), 20, 10),
            ("Set", "Set", bench.set_request("soak-set", "soak-set-user"), 4, 4),
            ("InvalidateUser", "InvalidateUser",
             bench.invalidate_user_request("soak-invalidated"), 2, 2),
        ]
        running = [(name, *h2load_for(port, method, body, seconds, c, m, workdir, name.replace(" ", "-")))
                   for name, method, body, c, m in streams]
        errors = sum(summarize(name, proc, log, seconds) for name, proc, log in running)
        rss_end = rss_mib(service.pid)
        cpu = cpu_seconds(service.pid) - cpu_start
        reply, _ = bench.call_once(port, "Get", bench.get_request("soak-token"), workdir)
        still_hit = bench.first_varint_field(reply) == 1
        print(f"service RSS: start {rss_start:.1f} MiB, end {rss_end:.1f} MiB, "
              f"peak {rss_mib(service.pid, peak=True):.1f} MiB; CPU {cpu:.1f} s")
        print(f"errors: {errors}; the soak's session still hits: {still_hit}")
        return 0 if errors == 0 and still_hit else 1


if __name__ == "__main__":
    sys.exit(main())
