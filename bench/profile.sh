#!/usr/bin/env bash
# CPU profile of the service under one of bench.py's loads at 500 in flight (Get hit by
# default, or Set, or InvalidateUser), on one Redis and on the memory store: perf record (cpu-clock: this VM has no hardware counters, and
# DWARF unwinding: release builds keep no frame pointers), folded and drawn with inferno
# (`cargo install inferno`), and the top costs printed by bench/top_costs.py.
#
#   bench/profile.sh [out-dir] [seconds] [get|set|invalidate-user]
#                                  default /tmp/session-cache-profile, 8 s, get
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/session-cache-profile}
seconds=${2:-8}
scenario=${3:-get}
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
python3 - "$out" <<'EOF'
import sys, os
sys.path.insert(0, "bench")
import bench
for name, body in (("get", bench.get_request("bench-token")),
                   ("seed", bench.set_request("bench-token", "bench-user")),
                   ("set", bench.set_request("bench-set", "bench-set-user")),
                   ("invalidate-user", bench.invalidate_user_request("bench-invalidated-user"))):
    open(os.path.join(sys.argv[1], name + ".bin"), "wb").write(body)
EOF

for store in redis memory; do
  port=$(free_port)
  args=(--listen "127.0.0.1:$port")
  [ "$store" = redis ] && args+=(--redis-url "redis://127.0.0.1:$redis_port")
  RUST_LOG=warn target/release/session-cache "${args[@]}" >/dev/null 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_port "$port"
  # Serving once the store's first ping has passed.
  python3 -c 'import sys; sys.path.insert(0, "bench"); import bench; bench.wait_serving(int(sys.argv[1]), sys.argv[2])' \
    "$port" "$out"
  h2() { h2load "$@" -H 'content-type: application/grpc' -H 'te: trailers' >/dev/null; }
  h2 -n 1 -c 1 --data "$out/seed.bin" "http://127.0.0.1:$port/sessioncache.v1.SessionCache/Set"
  # Load for longer than the recording, which starts once the load has settled.
  h2 -D $((seconds + 3)) -c 50 -m 10 -t 1 --data "$out/$scenario.bin" \
    "http://127.0.0.1:$port/sessioncache.v1.SessionCache/$method" &
  load=$!
  sleep 1
  perf record -q -e cpu-clock -F 499 --call-graph dwarf,8192 -p "$pid" -o "$out/$scenario-$store.data" \
    -- sleep "$seconds" 2>/dev/null
  wait "$load"
  perf script -i "$out/$scenario-$store.data" 2>/dev/null | inferno-collapse-perf --all >"$out/$scenario-$store.folded"
  inferno-flamegraph --title "session-cache $method, $store store, 500 in flight" \
    <"$out/$scenario-$store.folded" >"$out/$scenario-$store.svg"
  echo "== $scenario, $store: $out/$scenario-$store.svg"
  python3 bench/top_costs.py "$out/$scenario-$store.folded"
done
