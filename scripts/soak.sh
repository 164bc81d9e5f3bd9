#!/usr/bin/env bash
# Soak test (not part of CI): N minutes (default 10) of mixed load against the service
# on a real Redis; prints calls, errors, p50/p99 and the service's RSS at start and end.
#   scripts/soak.sh [--minutes N]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || { echo "needs h2load (Debian: apt-get install nghttp2-client)"; exit 1; }
command -v redis-server >/dev/null || { echo "needs redis-server (Debian: apt-get install redis-server)"; exit 1; }
cargo build --release --bin session-cache
exec python3 bench/soak.py "$@"
