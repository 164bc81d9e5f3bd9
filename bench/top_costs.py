#!/usr/bin/env python3
"""The top costs of a folded CPU profile (inferno-collapse-perf's output): where the
samples end (self time, by area and by function), and the share of samples under a few
frames that matter to a lookup (inclusive).

    bench/top_costs.py /tmp/session-cache-profile/redis.folded
"""

import re
import sys
from collections import Counter

# Areas by the frame a sample ends in; the first pattern that matches wins.
AREAS = [
    ("kernel (syscalls, TCP, scheduler)", re.compile(r"_\[k\]$")),
    ("vDSO clock", re.compile(r"__vdso_")),
    ("allocator (mimalloc)", re.compile(r"^_?mi_|mimalloc")),
    ("memcpy/memmove/memset", re.compile(r"mem(cpy|move|set)|__memcpy")),
    ("h2 / hyper (HTTP/2)", re.compile(r"\bh2::|hyper(_util)?::|httparse|http::")),
    ("tonic / prost / tower", re.compile(r"tonic::|prost::|tower::|tonic_")),
    ("tokio runtime", re.compile(r"tokio::")),
    ("redis-rs (RESP, pipeline)", re.compile(r"redis::|combine::")),
    ("JSON / ISO 8601 decode", re.compile(r"serde_json::|serde::|session_cache::entry|chrono|time::")),
    ("SHA-256", re.compile(r"sha2::")),
    ("metrics", re.compile(r"metrics")),
    ("session_cache (other)", re.compile(r"session_cache")),
]

# Inclusive: the share of samples with this frame anywhere on the stack.
INCLUSIVE = [
    ("call layer (call.rs)", r"session_cache::call::"),
    ("connection accounting (transport::)", r"session_cache::transport::"),
    ("gRPC handler (service::)", r"session_cache::service::"),
    ("Redis store get", r"session_cache::store::redis::.*get"),
    ("memory store get", r"session_cache::store::memory::.*get"),
    ("Redis reads (read.rs)", r"session_cache::store::redis::read"),
    ("Redis batcher (coalesce.rs)", r"session_cache::store::redis::coalesce"),
    ("entry decode (JSON + ISO 8601)", r"session_cache::entry::decode"),
    ("token hashing", r"sha2::|TokenHash"),
    ("metrics", r"metrics"),
    ("redis-rs", r"redis::"),
    ("h2 (the HTTP/2 crate)", r"^<*h2::"),
    ("socket writes (kernel, loopback delivery included)", r"do_writev|sys_(write|writev|sendto|sendmsg)"),
    ("socket reads (kernel)", r"sys_(read|readv|recvfrom|recvmsg)"),
    ("epoll (kernel)", r"sys_epoll"),
    ("futex / wake-ups (kernel)", r"sys_futex|try_to_wake_up"),
]


def main():
    path = sys.argv[1]
    stacks = []
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            stacks.append((stack.split(";"), n))
            total += n
    areas, leaves = Counter(), Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        leaves[leaf] += n
        area = next((name for name, pattern in AREAS if pattern.search(leaf)), "other")
        areas[area] += n
    print(f"{total} samples\n")
    print("| area (where samples end) | share |")
    print("|---|---:|")
    for area, n in areas.most_common():
        print(f"| {area} | {n / total:.1%} |")
    print("\n| under this frame (inclusive) | share |")
    print("|---|---:|")
    for name, pattern in INCLUSIVE:
        regex = re.compile(pattern)
        n = sum(count for frames, count in stacks if any(regex.search(fr) for fr in frames))
        print(f"| {name} | {n / total:.1%} |")
    print("\n| function (self) | share |")
    print("|---|---:|")
    for leaf, n in leaves.most_common(20):
        name = leaf if len(leaf) < 100 else leaf[:97] + "..."
        print(f"| `{name}` | {n / total:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
