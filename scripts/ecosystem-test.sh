#!/usr/bin/env bash
# Ecosystem test for session-cache: checks the service from the outside, the way its
# callers and operators meet it. This script only installs and sequences; the checks are
# programs of their own:
#   - tests/ecosystem/ (pytest): starts redis-server and target/debug/session-cache on
#     free loopback ports (memory and Redis stores, each with --idp appwrite pointing at
#     an Appwrite stand-in in the test process) and runs the README's grpcurl commands,
#     the Python and Node.js example clients (the Validate flow, counting the stand-in's
#     calls, and the Get/Set flow), the grpc.health.v1 checker, the Python service's
#     shared Redis layout, the clients once Redis is stopped, the deploy/ manifests'
#     fields, the dashboard's and alerts' metric names against a live /metrics, and
#     the spans a stand-in OTLP collector receives (and a dead collector's cost);
#     it also runs every sh block of README.md and deploy/README.md as written
#     (test_readme.py), against the release build the README starts;
#   - buf lint of the proto; promtool check/test of deploy/prometheus/;
#     kubernetes-validate --strict of deploy/kubernetes/; check-jsonschema of the
#     Compose files against the Compose specification's schema.
# It installs what is missing: the Python packages (scripts/python-env.sh, a venv in
# target/ecosystem/venv), the npm packages (examples/clients/node), redis-server (the
# Debian package) and promtool (the binary of Debian's prometheus package, into
# target/ecosystem/bin). It prints PASS or FAIL per step (a failing step's log follows
# it; all logs are in target/ecosystem/logs), ends with "N passed, M failed", and exits 1
# when any step failed.
#
#   scripts/ecosystem-test.sh [PYTEST ARGS...]    e.g. -k grpcurl
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
WORK=$ROOT/target/ecosystem
LOGS=$WORK/logs
VENV=$WORK/venv
NODE_DIR=$ROOT/examples/clients/node

mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.out
# grpcurl, pytest and kubernetes-validate come from the venv, promtool may from WORK/bin.
export PATH="$VENV/bin:$WORK/bin:$PATH"

PASSED=0
FAILED=0
STARTED_AT=$(date +%s)

# step NAME COMMAND...: runs the command with its output in a log; prints PASS or FAIL
# (and the end of the log on FAIL). With SHOW=1 the output also goes to the terminal.
step() {
  local name=$1 log t0=$SECONDS status
  shift
  log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//').log"
  if [ "${SHOW:-0}" = 1 ]; then
    "$@" 2>&1 | tee "$log" | sed 's/^/      | /'
    status=${PIPESTATUS[0]}
  else
    "$@" >"$log" 2>&1
    status=$?
  fi
  if [ "$status" = 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s (%ss)\n' "$name" $((SECONDS - t0))
    return 0
  fi
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s (%ss)\n' "$name" $((SECONDS - t0))
  [ "${SHOW:-0}" = 1 ] || tail -n 20 "$log" | sed 's/^/      | /'
  return 1
}

# skip NAME WHY: a step that could not run counts as failed.
skip() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s (not run: %s)\n' "$1" "$2"
}

python_packages() {
  scripts/python-env.sh && grpcurl -version
}

npm_packages() (
  cd "$NODE_DIR" || return 1
  if [ -f node_modules/.package-lock.json ] && [ ! package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "already installed"
  else
    timeout 600 npm ci --no-audit --no-fund || return 1
  fi
  npm ls --depth=0
)

build() {
  timeout 1500 cargo build --bin session-cache
}

# The README starts the service with `cargo run --release`: built here, so that the
# README's command only starts it.
build_release() {
  timeout 1800 cargo build --release --bin session-cache
}

# debian_tools: redis-server (the package, as .ci/run installs it), h2load (the
# nghttp2-client package) and promtool, when missing. promtool is the one binary taken from Debian's prometheus package into
# WORK/bin: installing the package would also install (and on a systemd host start) a
# Prometheus server, for a 48 MB binary that needs only libc.
debian_tools() {
  local sudo=() deb=$WORK/deb
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1 \
    || { ! command -v promtool >/dev/null 2>&1 && ! apt-cache show prometheus >/dev/null 2>&1; }; then
    timeout 300 "${sudo[@]}" apt-get update -qq || return 1
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    timeout 600 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq redis-server || return 1
  fi
  if ! command -v h2load >/dev/null 2>&1; then
    timeout 600 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq nghttp2-client || return 1
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    rm -rf "$deb" && mkdir -p "$deb" "$WORK/bin" || return 1
    (cd "$deb" && timeout 300 apt-get download prometheus) || return 1
    dpkg-deb -x "$deb"/prometheus_*.deb "$deb/root" || return 1
    cp "$deb/root/usr/bin/promtool" "$WORK/bin/promtool" && rm -rf "$deb" || return 1
  fi
  redis-server --version && h2load --version | head -1 && promtool --version
}

ecosystem_tests() {
  timeout 1200 pytest tests/ecosystem -v -p no:cacheprovider "$@"
}

buf_lint() (
  cd "$NODE_DIR" && timeout 120 npx --no-install buf lint "$ROOT" && echo "buf lint: no findings"
)

alert_rules() (
  cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml
)

# kubernetes_manifests: against the newest schemas the package ships and the oldest
# (1.25; the gRPC probes need 1.24), so that no field newer than that slips in.
compose_files() {
  check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose*.yml
}

kubernetes_manifests() {
  kubernetes-validate --strict deploy/kubernetes/*.yaml \
    && kubernetes-validate --strict --kubernetes-version 1.25.0 deploy/kubernetes/*.yaml
}

echo "session-cache ecosystem test (logs: ${LOGS#"$ROOT"/})"
step "python venv and packages" python_packages
PY_READY=$?
step "npm packages (examples/clients/node)" npm_packages
NPM_READY=$?
step "cargo build --bin session-cache" build
BUILT=$?
step "cargo build --release --bin session-cache (the README's)" build_release
BUILT=$((BUILT + $?))
step "Debian tools: redis-server, h2load, promtool" debian_tools
TOOLS_READY=$?

if [ "$PY_READY$NPM_READY$BUILT$TOOLS_READY" = 0000 ]; then
  SHOW=1 step "pytest tests/ecosystem (grpcurl, clients, Validate, health, Redis down, tracing, manifests, metrics)" \
    ecosystem_tests "$@"
else
  skip "pytest tests/ecosystem" "a set-up step failed"
fi
if [ -x "$NODE_DIR/node_modules/.bin/buf" ]; then
  step "buf lint" buf_lint
else
  skip "buf lint" "npm packages missing"
fi
if command -v promtool >/dev/null 2>&1; then
  step "promtool check rules, test rules (deploy/prometheus)" alert_rules
else
  skip "promtool check rules, test rules" "no promtool"
fi
if [ "$PY_READY" = 0 ]; then
  step "kubernetes-validate --strict (deploy/kubernetes)" kubernetes_manifests
  step "check-jsonschema vendor.compose-spec (deploy/docker-compose*.yml)" compose_files
else
  skip "kubernetes-validate --strict" "no python venv"
  skip "check-jsonschema (Compose files)" "no python venv"
fi

echo "($(($(date +%s) - STARTED_AT))s)"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
