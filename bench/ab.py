#!/usr/bin/env python3
"""Interleaved A/B of two session-cache servers on one store, same load as bench.py.

Each side is a command line (a binary and its flags; `{redis}` stands for the Redis URL,
`{cluster}` for the nodes of a three-primary Redis Cluster started beside it, and
neither means the memory store), so one binary with two settings, or two builds, can be
compared. Both servers run at once on the same store; the scenarios run A, B, A, B, ...
for the given number of pairs, so that a busy host slows both alike, and the table gives
B/A within each pair.

    bench/ab.py --a 'target/release/session-cache --redis-url {redis} --redis-lookup script' \\
                --b 'target/release/session-cache --redis-url {redis} --redis-lookup commands'
"""

import argparse
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench

# Each scenario's calls, one body per load process, as bench.py spreads them.
SCENARIOS = {
    "get-hit": ("Get", [bench.get_request(token) for token in bench.TOKENS], 1),
    "get-miss": ("Get", [bench.get_request(token) for token in bench.spread("bench-miss-", bench.entry_key)], 2),
    "set": ("Set", [bench.set_request(token, user) for token, user in
                    zip(bench.spread("bench-set-", bench.entry_key), bench.USERS)], 1),
    "invalidate-user": ("InvalidateUser", [
        bench.invalidate_user_request(user)
        for user in bench.spread("bench-invalidated-", lambda user: "user_invalidated:" + user)], None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="side A's command line")
    parser.add_argument("--b", required=True, help="side B's command line")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200_000, help="calls at 500 in flight")
    parser.add_argument("--few", type=int, default=10_000, help="calls at 1 in flight")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="scenarios to run (default get-hit)")
    parser.add_argument("--in-flight", action="append", type=int, choices=(1, 500),
                        help="load levels (default both)")
    args = parser.parse_args()
    scenarios = args.scenario or ["get-hit"]
    levels = args.in_flight or [500, 1]

    procs = bench.Procs()
    workdir = tempfile.mkdtemp(prefix="session-cache-ab-")
    results = []  # (scenario, in_flight, pair, side, result)
    try:
        redis_port = bench.start_redis(procs, workdir)
        cluster_ports = (bench.start_cluster(procs, workdir)
                         if "{cluster}" in args.a + args.b else [])
        nodes = ",".join(f"127.0.0.1:{port}" for port in cluster_ports)
        sides = {}
        for side, line in (("A", args.a), ("B", args.b)):
            parts = shlex.split(line)
            cmd = [part.replace("{redis}", f"redis://127.0.0.1:{redis_port}").replace("{cluster}", nodes)
                   for part in parts]
            rports = ([redis_port] if any("{redis}" in part for part in parts) else []) + (
                cluster_ports if any("{cluster}" in part for part in parts) else [])
            sides[side] = (*bench.start_service(procs, workdir, cmd), rports)
        for port, _, _ in sides.values():
            for token, user in zip(bench.TOKENS, bench.USERS):
                bench.call_once(port, "Set", bench.set_request(token, user), workdir)
        for scenario in scenarios:
            method, bodies, outcome = SCENARIOS[scenario]
            for in_flight in levels:
                requests = args.requests if in_flight == 500 else args.few
                for pair in range(args.pairs):
                    for side in ("A", "B"):
                        port, proc, rports = sides[side]
                        for body in bodies:
                            reply, _ = bench.call_once(port, method, body, workdir)
                            if outcome is not None and bench.first_varint_field(reply) != outcome:
                                raise SystemExit(f"{side} {scenario}: not the expected outcome")
                        r = bench.measure(port, proc.pid, rports, method, bodies, requests, in_flight,
                                          workdir)
                        if r["ok"] != requests:
                            raise SystemExit(f"{side} {scenario}: {r['ok']} of {requests} ok")
                        results.append((scenario, in_flight, pair, side, r))
                        print(f"{scenario} {in_flight} pair {pair + 1} {side}: {r['rps']:,.0f}/s "
                              f"p50 {r['p50']:.3f} ms, {r['cpu_us']:.1f} us/call, Redis "
                              f"{bench.fmt(r['redis_us'], 2)} us/call, {bench.fmt(r['redis_commands'], 2)} commands "
                              f"and {bench.fmt(r['redis_reads'], 3)} reads/call", file=sys.stderr, flush=True)
    finally:
        procs.stop()

    print(f"\nA: {args.a}\nB: {args.b}\n")
    print("| scenario | in flight | pair | calls/s A / B | p50 ms A / B | server CPU us/call A / B "
          "| Redis CPU us/call A / B | B/A calls/s | B/A server CPU | B/A p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(s, f, p, side): r for s, f, p, side, r in results}
    for scenario in scenarios:
        for in_flight in levels:
            for pair in range(args.pairs):
                a, b = by[(scenario, in_flight, pair, "A")], by[(scenario, in_flight, pair, "B")]
                print(f"| {scenario} | {in_flight} | {pair + 1} | {a['rps']:,.0f} / {b['rps']:,.0f} | "
                      f"{a['p50']:.3f} / {b['p50']:.3f} | {a['cpu_us']:.1f} / {b['cpu_us']:.1f} | "
                      f"{bench.fmt(a['redis_us'], 2)} / {bench.fmt(b['redis_us'], 2)} | "
                      f"{b['rps'] / a['rps']:.2f} | {b['cpu_us'] / a['cpu_us']:.2f} | "
                      f"{b['p50'] / a['p50']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
