#!/usr/bin/env python3
"""Checks docs/CAPACITY.md's model at one point: a fixed mix of calls per second
against the service on one Redis (or, with --cluster, a three-primary Redis Cluster),
and the cores the service and Redis (all primaries) actually used.

    bench/capacity_check.py --get 8000 --set 800 --invalidate 200 --seconds 15

Prints the measured cores of each beside what the model predicts from the constants
given (--*-us, measured by bench/run.sh at 500 in flight).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # (and tests/ on the path)
from testkit.measure import cpu_seconds

CLIENTS = 50  # h2load --rps is per client; 50 connections, as bench.py


def load(port, method, body, rate, seconds, workdir, name=None):
    path = os.path.join(workdir, f"{name or method}.bin")
    with open(path, "wb") as f:
        f.write(body)
    return subprocess.Popen(
        ["h2load", "-D", str(seconds), "-c", str(CLIENTS), "-m", "1", "-t", "1",
         f"--rps={rate / CLIENTS:g}", "--data", path,
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}/{bench.SERVICE}/{method}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def done_calls(output):
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            return int(line.split(",")[3].split()[0])
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--get", type=float, default=8000, help="Get hits per second")
    parser.add_argument("--set", type=float, default=800, help="Sets per second")
    parser.add_argument("--invalidate", type=float, default=200, help="InvalidateUsers per second")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--get-us", type=float, required=True, help="service CPU per Get hit")
    parser.add_argument("--set-us", type=float, required=True)
    parser.add_argument("--invalidate-us", type=float, required=True)
    parser.add_argument("--redis-get-us", type=float, required=True, help="Redis CPU per Get hit")
    parser.add_argument("--redis-set-us", type=float, required=True)
    parser.add_argument("--redis-invalidate-us", type=float, required=True)
    parser.add_argument("--cluster", action="store_true",
                        help="a three-primary Redis Cluster instead of one Redis")
    args = parser.parse_args()

    store = (bench.service_on_cluster if args.cluster else bench.service_on_redis)("capacity")
    with store as (workdir, redis_ports, port, service):
        redis_ports = redis_ports if args.cluster else [redis_ports]
        # The hits spread over tokens of every primary, as bench.py's loads.
        for token, user in zip(bench.TOKENS, bench.USERS):
            bench.call_once(port, "Set", bench.set_request(token, user), workdir)
        cpu0, rcpu0, t0 = cpu_seconds(service.pid), bench.redis_cpu_seconds(redis_ports), time.time()
        gets = [(f"Get {i}", load(port, "Get", bench.get_request(token), args.get / len(bench.TOKENS),
                                  args.seconds, workdir, f"get-{i}"))
                for i, token in enumerate(bench.TOKENS)]
        runs = [
            *gets,
            ("Set", load(port, "Set", bench.set_request("bench-set", "bench-set-user"), args.set,
                         args.seconds, workdir)),
            ("InvalidateUser", load(port, "InvalidateUser",
                                    bench.invalidate_user_request("bench-invalidated-user"),
                                    args.invalidate, args.seconds, workdir)),
        ]
        calls = {}
        for method, run in runs:
            method = method.split()[0]
            calls[method] = calls.get(method, 0) + done_calls(run.communicate()[0])
        elapsed = time.time() - t0
        cores = (cpu_seconds(service.pid) - cpu0) / elapsed
        redis_cores = (bench.redis_cpu_seconds(redis_ports) - rcpu0) / elapsed
    rates = {m: n / elapsed for m, n in calls.items()}
    predicted = (rates["Get"] * args.get_us + rates["Set"] * args.set_us
                 + rates["InvalidateUser"] * args.invalidate_us) / 1e6
    predicted_redis = (rates["Get"] * args.redis_get_us + rates["Set"] * args.redis_set_us
                       + rates["InvalidateUser"] * args.redis_invalidate_us) / 1e6
    print("calls/s achieved: " + ", ".join(f"{m} {r:,.0f}" for m, r in rates.items()))
    print("| | measured cores | predicted cores | measured / predicted |")
    print("|---|---:|---:|---:|")
    print(f"| service | {cores:.3f} | {predicted:.3f} | {cores / predicted:.2f} |")
    print(f"| Redis | {redis_cores:.3f} | {predicted_redis:.3f} | {redis_cores / predicted_redis:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
