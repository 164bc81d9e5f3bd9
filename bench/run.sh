#!/usr/bin/env bash
# Benchmarks session-cache against its floors in one run: builds the release binaries,
# then bench/bench.py starts its own Redis, a three-primary Redis Cluster and servers on
# free loopback ports, drives them with h2load and redis-benchmark, and prints the table
# and, after it, the targets with met / not met.
#
#   bench/run.sh            the full run (a few minutes)
#   bench/run.sh --quick    a smoke of every scenario (seconds); what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The seed-equivalent loop uses redis-py, as the Python service does.
python3 -c 'import redis' 2>/dev/null || python3 -m pip install -q redis

if [[ " $* " == *" --quick "* ]]; then
  # The smoke checks that every scenario runs and answers as it should; its figures
  # mean nothing, so it spares the release build.
  cargo build --bin session-cache --example constant_server
  exec python3 bench/bench.py --bin-dir target/debug "$@"
fi
cargo build --release --bin session-cache --example constant_server
exec python3 bench/bench.py "$@"
