#!/usr/bin/env bash
# CPU profile of the service under one of bench.py's loads at 500 in flight (Get hit by
# default, or Set, or InvalidateUser), on each store asked for (one Redis, a
# three-primary Cluster, the memory store) and of the floor (the constant server under
# the same Get load): perf record (cpu-clock: this VM has no hardware counters, and
# DWARF unwinding: release builds keep no frame pointers), folded and drawn with inferno
# (`cargo install inferno`), and the top costs printed by bench/top_costs.py. The load is
# bench.py's: one h2load process per spread token (bench.SPREAD), 500 calls in flight
# in all.
#
#   bench/profile.sh [out-dir] [seconds] [get|set|invalidate-user] [stores...]
#         default /tmp/session-cache-profile, 8 s, get, and the stores redis memory floor
#         (cluster too when named)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/session-cache-profile}
seconds=${2:-8}
scenario=${3:-get}
shift $(($# < 3 ? $# : 3))
stores=("$@")
[ ${#stores[@]} -gt 0 ] || stores=(redis memory floor)
case "$scenario" in
  get) method=Get ;;
  set) method=Set ;;
  invalidate-user) method=InvalidateUser ;;
  *) echo "unknown scenario: $scenario" >&2; exit 2 ;;
esac
mkdir -p "$out"
for tool in perf h2load redis-server inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

# Ports and waits from tests/testkit, as bench.py uses them.
free_port() { PYTHONPATH=tests python3 -m testkit.local free-port; }
wait_port() { PYTHONPATH=tests python3 -m testkit.local wait-port "$1"; }
wait_redis() { PYTHONPATH=tests python3 -m testkit.local wait-redis "$1" "$2"; }
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
pids+=($!)
wait_redis "$redis_port" "$!"
# The request bodies, one per load process, and the Sets that seed the hits.
python3 - "$out" "$scenario" <<'EOF'
import os
import sys

sys.path.insert(0, "bench")
import bench

out, scenario = sys.argv[1], sys.argv[2]
bodies = {
    "get": [bench.get_request(token) for token in bench.TOKENS],
    "set": [bench.set_request(token, user)
            for token, user in zip(bench.spread("bench-set-", bench.entry_key), bench.USERS)],
    "invalidate-user": [bench.invalidate_user_request(user) for user in
                        bench.spread("bench-invalidated-", lambda user: "user_invalidated:" + user)],
}[scenario]
for i, body in enumerate(bodies):
    open(os.path.join(out, f"load-{i}.bin"), "wb").write(body)
for i, (token, user) in enumerate(zip(bench.TOKENS, bench.USERS)):
    open(os.path.join(out, f"seed-{i}.bin"), "wb").write(bench.set_request(token, user))
EOF

for store in "${stores[@]}"; do
  port=$(free_port)
  case "$store" in
    floor) command=(target/release/examples/constant_server "127.0.0.1:$port") ;;
    redis) command=(target/release/session-cache --listen "127.0.0.1:$port"
                    --redis-url "redis://127.0.0.1:$redis_port") ;;
    cluster)
      nodes=$(python3 - "$out" <<'EOF'
import sys

sys.path.insert(0, "bench")
import bench

procs = bench.Procs()
ports = bench.start_cluster(procs, sys.argv[1])
# The nodes outlive this script: the shell stops them by their pids.
print(",".join(f"127.0.0.1:{port}" for port in ports), *(p.pid for p in procs.procs))
EOF
)
      read -r nodes_list node_pids <<<"$nodes"
      for pid in $node_pids; do pids+=("$pid"); done
      command=(target/release/session-cache --listen "127.0.0.1:$port"
               --redis-cluster-nodes "$nodes_list" --revocation-replicas 0) ;;
    memory) command=(target/release/session-cache --listen "127.0.0.1:$port") ;;
    *) echo "unknown store: $store" >&2; exit 2 ;;
  esac
  RUST_LOG=warn "${command[@]}" >/dev/null 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_port "$port"
  h2() { h2load "$@" -H 'content-type: application/grpc' -H 'te: trailers' >/dev/null; }
  if [ "$store" != floor ]; then
    # Serving once the store's first ping has passed.
    python3 -c 'import sys; sys.path.insert(0, "bench"); import bench; bench.wait_serving(int(sys.argv[1]), sys.argv[2])' \
      "$port" "$out"
    for seed in "$out"/seed-*.bin; do
      h2 -n 1 -c 1 --data "$seed" "http://127.0.0.1:$port/sessioncache.v1.SessionCache/Set"
    done
  fi
  # Load for longer than the recording, which starts once the load has settled: one
  # h2load per body, 50 connections of 10 streams in all.
  loads=()
  bodies=("$out"/load-*.bin)
  for i in "${!bodies[@]}"; do
    connections=$((50 / ${#bodies[@]} + (i < 50 % ${#bodies[@]} ? 1 : 0)))
    h2 -D $((seconds + 3)) -c "$connections" -m 10 -t 1 --data "${bodies[$i]}" \
      "http://127.0.0.1:$port/sessioncache.v1.SessionCache/$method" &
    loads+=($!)
  done
  sleep 1
  perf record -q -e cpu-clock -F 499 --call-graph dwarf,8192 -p "$pid" -o "$out/$scenario-$store.data" \
    -- sleep "$seconds" 2>/dev/null
  wait "${loads[@]}"
  perf script -i "$out/$scenario-$store.data" 2>/dev/null | inferno-collapse-perf --all >"$out/$scenario-$store.folded"
  inferno-flamegraph --title "session-cache $method, $store, 500 in flight" \
    <"$out/$scenario-$store.folded" >"$out/$scenario-$store.svg"
  echo "== $scenario, $store: $out/$scenario-$store.svg"
  python3 bench/top_costs.py "$out/$scenario-$store.folded"
  kill "$pid" 2>/dev/null || true
done
