#!/usr/bin/env python3
"""Bytes of Redis memory per session, marker and tombstone, for docs/CAPACITY.md.

The service writes one of each (Set, InvalidateUser, InvalidateToken) into a fresh
Redis; each key's `MEMORY USAGE` is read, then `--copies` keys of the same name length,
value and TTL are written beside it and `INFO memory`'s used_memory delta divided by
their number: what a key costs once Redis's own tables (the keyspace and the expiry
dict) are counted.

    bench/redis_memory.py [--copies 100000]
"""

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=100_000)
    args = parser.parse_args()
    import redis

    with bench.service_on_redis("memory") as (workdir, redis_port, port, _):
        bench.call_once(port, "Set", bench.set_request("mem-token", "mem-user-0000000001"), workdir)
        bench.call_once(port, "InvalidateUser", bench.invalidate_user_request("mem-user-0000000002"),
                        workdir)
        bench.call_once(port, "Set", bench.set_request("mem-logout", "mem-user-0000000003"), workdir)
        bench.call_once(port, "InvalidateToken", bench.frame(bench.field_bytes(1, b"mem-logout")),
                        workdir)
        client = redis.Redis(port=redis_port)
        h = token_hash("mem-token")
        kinds = {
            "session (entry)": f"session_cache:{h}",
            "marker": "user_invalidated:mem-user-0000000002",
            "tombstone": "session_revoked:{session_cache:" + token_hash("mem-logout") + "}",
            "tombstone, old name (outside Cluster)": "session_revoked:" + token_hash("mem-logout"),
        }
        print("| key | name bytes | value bytes | TTL s | MEMORY USAGE | used_memory delta per key |")
        print("|---|---:|---:|---:|---:|---:|")
        found = {kind: (client.get(key), client.pttl(key), client.memory_usage(key))
                 for kind, key in kinds.items()}
        for kind, key in kinds.items():
            value, ttl, usage = found[kind]
            if value is None:
                print(f"| {kind} | missing: {key} | | | | |")
                continue
            client.flushall()
            client.set(key, value, px=ttl)
            before = client.info("memory")["used_memory"]
            pipe = client.pipeline(transaction=False)
            # Names of the same length: the key with its last characters replaced.
            for i in range(args.copies):
                suffix = f"{i:08x}"
                pipe.set(key[: -len(suffix) - 1] + suffix + key[-1], value, px=ttl)
                if i % 10_000 == 9_999:
                    pipe.execute()
            pipe.execute()
            after = client.info("memory")["used_memory"]
            print(f"| {kind} | {len(key)} | {len(value)} | {ttl // 1000} | {usage} | "
                  f"{(after - before) / args.copies:.0f} |")
            client.flushall()

if __name__ == "__main__":
    sys.exit(main())
